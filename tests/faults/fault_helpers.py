"""Helpers of the fault-injection tier (tests/faults): tiny models, CLI runs, one-line error checks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from flatquant import cli

ROOT = Path(__file__).resolve().parents[2]


def _helpers():
    spec = importlib.util.spec_from_file_location("_flatquant_faults_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _helpers()
LAYERS = 3


def save_model(path: Path, tok, seed: int = 0, **overrides) -> Path:
    H.build_model("llama", vocab_size=len(tok), seed=seed, num_hidden_layers=LAYERS, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def common(data, results) -> list:
    return ["--data-dir", data, "--results-dir", results, "--seqlen", "32", "--max-windows", "2", "--batch-size", "2",
            "--device", "cpu", "--no-progress"]


def quantize_args(fenv, output, results, model=None) -> list[str]:
    return [str(a) for a in ["quantize", "--model", model or fenv["model"], "--preset", "tiny", "--output", output,
                             "--compare", "", *common(fenv["data"], results)]]


def eval_args(fenv, results, *extra, model=None) -> list[str]:
    return [str(a) for a in ["eval", "--model", model or fenv["model"], *common(fenv["data"], results), *extra]]


def run(argv, capsys):
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("flatquant: error:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))] if Path(results).is_dir() else []


def layer_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "layers").glob("*.safetensors"))}
