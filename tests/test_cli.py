"""The `flatquant` command end to end on a tiny saved model: eval, quantize, report, and bad input.

Bad input must give one line on stderr, exit status 2, no traceback and nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flatquant import cli


def _conftest():
    """tests/conftest.py's helpers (tests/ is not a package; load the file by path, under its own name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_flatquant_tests_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_helpers = _conftest()
build_model, build_tokenizer, SAMPLE_TEXT = _helpers.build_model, _helpers.build_tokenizer, _helpers.SAMPLE_TEXT

REQUIRED = ("model", "method", "w_bits", "a_bits", "kv_bits", "weight_quantizer", "dataset", "seqlen", "windows",
            "ppl", "device", "git_commit", "command", "date")
REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """cli.main in-process: (exit status, stdout, stderr). argparse mistakes exit via SystemExit."""
    capsys.readouterr()  # drop what the test's own setup printed
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("flatquant"), err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))] if results.is_dir() else []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny Llama (with tokenizer), a small data folder, and parameters from `quantize --preset tiny`."""
    import gzip

    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer()
    model_dir = root / "tiny-llama"
    build_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    for sub in ("wikitext2", "c4", "calib"):
        (data / sub).mkdir(parents=True)
    (data / "wikitext2" / "wikitext2_raw_test.txt").write_text("\n\n".join([SAMPLE_TEXT] * 3))
    (data / "calib" / "wiki_articles.txt").write_text("\n\n".join([SAMPLE_TEXT] * 4))
    with gzip.open(data / "c4" / "c4_validation_proxy.jsonl.gz", "wt") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Document {i}. " + SAMPLE_TEXT[: 200 + 10 * i]}) + "\n")
    params = root / "params"
    results = root / "results-quantize"
    rc = cli.main([str(a) for a in ["quantize", "--model", model_dir, "--preset", "tiny", "--output", params,
                                    "--compare", "fp16", *common(data, results)]])
    assert rc == 0
    return {"root": root, "model": model_dir, "data": data, "params": params, "quantize_results": results}


def common(data, results, seqlen=32):
    return ["--data-dir", data, "--results-dir", results, "--seqlen", str(seqlen), "--max-windows", "2",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]


def eval_args(env, results, *extra, model=None):
    return ["eval", "--model", model or env["model"], *common(env["data"], results), *extra]


# ------------------------------------------------------------------------------------------- happy paths
def test_eval_fp16_writes_record_and_table(env, tmp_path, capsys):
    results = tmp_path / "results"
    rc, out, err = run(eval_args(env, results), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    for key in REQUIRED:
        assert key in rec, key
    assert rec["method"] == "fp16" and (rec["w_bits"], rec["a_bits"], rec["kv_bits"]) == (16, 16, 16)
    assert rec["model"] == "tiny-llama" and rec["dataset"] == "wikitext2" and rec["seqlen"] == 32
    assert rec["windows"] == 2 and rec["ppl"] > 1 and rec["device"] == "cpu"
    assert "method" in out and "ppl" in out and "fp16" in out and "W16A16KV16" in out


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_eval_baselines(env, tmp_path, capsys, method):
    results = tmp_path / "results"
    rc, out, err = run(eval_args(env, results, "--method", method, "--dataset", "wikitext2,c4",
                                 "--model-name", "Tiny-Llama-1.5"), capsys)
    assert rc == 0, err
    recs = records(results)
    assert sorted(r["dataset"] for r in recs) == ["c4", "wikitext2"]
    for r in recs:
        assert r["method"] == method and (r["w_bits"], r["a_bits"], r["kv_bits"]) == (4, 4, 4)
        assert r["weight_quantizer"] == "rtn" and r["model"] == "Tiny-Llama-1.5"
    assert all(p.name.startswith(f"ppl-Tiny-Llama-1.5-{method}-W4A4KV4") for p in results.glob("*.json"))
    assert f"{method:<12} {'W4A4KV4':<12} wikitext2" in out


def test_quantize_saves_params_and_eval_reuses_them(env, tmp_path, capsys, monkeypatch):
    params = env["params"]
    assert (params / "flatquant.json").is_file()
    assert sorted(p.name for p in (params / "layers").iterdir()) == ["layer_000.safetensors", "layer_001.safetensors"]
    assert json.loads((params / "flatquant.json").read_text())["complete"] is True
    assert not params.with_name("params.partial").exists()
    by_method = {r["method"]: r for r in records(env["quantize_results"])}
    assert set(by_method) == {"fp16", "flatquant"}
    assert by_method["flatquant"]["calib"]["epochs"] == 2  # the tiny preset

    import flatquant.methods.flatquant

    def no_calibration(*a, **k):
        raise AssertionError("eval --params must not recalibrate")

    monkeypatch.setattr(flatquant.methods.flatquant, "calibrate", no_calibration)
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "flatquant", "--params", params), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    assert rec["method"] == "flatquant" and rec["calib"]["epochs"] == 2  # the recipe of the saved parameters
    assert rec["ppl"] == pytest.approx(by_method["flatquant"]["ppl"], rel=1e-3)


def test_quantize_reuses_complete_output(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "params"
    shutil.copytree(env["params"], out)
    import flatquant.methods.flatquant

    monkeypatch.setattr(flatquant.methods.flatquant, "calibrate", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    rc, stdout, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", out, "--compare", "",
                           *common(env["data"], "")], capsys)
    assert rc == 0, err
    assert "parameters saved to" in stdout


@pytest.mark.parametrize("method", ["quarot", "smoothquant"])
def test_cli_and_python_give_the_same_result(env, tmp_path, capsys, method):
    """`flatquant eval --method M` with no quantizer options == quantize(model, MConfig()) in Python: same
    defaults (weight clip search included), same perplexity to the last bit."""
    from flatquant import QuaRotConfig, SmoothQuantConfig, calib_preset, quantize
    from flatquant.data import eval_tokens
    from flatquant.eval.perplexity import perplexity
    from flatquant.models import load_model
    from flatquant.runner import calibration_data

    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", method, "--preset", "tiny"), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    model, tok = load_model(str(env["model"]), device="cpu")
    cfg = {"quarot": QuaRotConfig, "smoothquant": SmoothQuantConfig}[method]()
    assert rec["w_clip_search"] is cfg.w_clip_search is True
    calib = calibration_data(tok, calib_preset("tiny"), env["data"])
    quantize(model, cfg, calib=calib, progress=False)
    ids = eval_tokens(tok, "wikitext2", data_dir=env["data"], seqlen=32)
    assert perplexity(model, ids, seqlen=32, max_windows=2, batch_size=2, progress=False)["ppl"] == rec["ppl"]


def test_eval_gptq_record_next_to_rtn(env, tmp_path, capsys):
    """--weight-quantizer gptq: calibration windows from the preset, its own record (RTN's name unchanged)."""
    results = tmp_path / "results"
    for wq in ("rtn", "gptq"):
        rc, out, err = run(eval_args(env, results, "--method", "quarot", "--preset", "tiny", "--weight-quantizer", wq),
                           capsys)
        assert rc == 0, err
    by_wq = {r["weight_quantizer"]: r for r in records(results)}
    assert set(by_wq) == {"rtn", "gptq"}
    assert sorted(p.name for p in results.glob("*.json")) == ["ppl-tiny-llama-quarot-W4A4KV4-gptq-wikitext2-maxwin2.json",
                                                              "ppl-tiny-llama-quarot-W4A4KV4-wikitext2-maxwin2.json"]
    gptq = by_wq["gptq"]["gptq"]
    assert gptq["nsamples"] == 4 and gptq["seqlen"] == 32 and gptq["act_order"] and len(gptq["layers"]) == 2
    assert "gptq" not in by_wq["rtn"]
    assert "gptq" in out.splitlines()[-1]  # the table names the weight quantizer


def test_quantize_gptq_and_eval_reuses_saved_gptq_weights(env, tmp_path, capsys, monkeypatch):
    out_dir, results = tmp_path / "params", tmp_path / "results"
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", out_dir, "--compare", "",
                      "--weight-quantizer", "gptq", *common(env["data"], results)], capsys)
    assert rc == 0, err
    (calibrated,) = records(results)
    assert calibrated["weight_quantizer"] == "gptq" and "gptq_err" in calibrated["calib_layers"][0]
    assert json.loads((out_dir / "flatquant.json").read_text())["quant"]["weight_quantizer"] == "gptq"

    import flatquant.methods.gptq

    monkeypatch.setattr(flatquant.methods.gptq, "apply_gptq", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    results2 = tmp_path / "results2"  # default: the saved weights as they are, GPTQ not rerun
    rc, _, err = run(eval_args(env, results2, "--method", "flatquant", "--params", out_dir), capsys)
    assert rc == 0, err
    (rec,) = records(results2)
    assert rec["weight_quantizer"] == "gptq" and rec["ppl"] == pytest.approx(calibrated["ppl"], rel=1e-6)
    assert rec["gptq"]["loaded_from"] == str(out_dir)
    # an RTN folder is not silently turned into a GPTQ one
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", env["params"], "--compare",
                      "", "--weight-quantizer", "gptq", *common(env["data"], tmp_path / "results3")], capsys)
    assert_user_error(rc, err, "other quantization settings", "--no-resume")


def test_eval_params_posthoc_gptq(env, tmp_path, capsys):
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "flatquant", "--params", env["params"], "--preset", "tiny",
                               "--weight-quantizer", "gptq"), capsys)
    assert rc == 0, err
    (rec,) = records(results)
    assert rec["weight_quantizer"] == "gptq" and rec["gptq"]["nsamples"] == 4 and len(rec["gptq"]["layers"]) == 2
    assert rec["calib"]["epochs"] == 2  # the recipe of the saved transforms
    assert (results / "ppl-tiny-llama-flatquant-W4A4KV4-gptq-wikitext2-maxwin2.json").is_file()


def test_report_renders_markdown(env, tmp_path, capsys):
    out = tmp_path / "docs" / "RESULTS.md"
    rc, stdout, err = run(["report", "--results-dir", env["quantize_results"], "--out", out,
                           "--plots-dir", tmp_path / "docs" / "plots"], capsys)
    assert rc == 0, err
    md = out.read_text()
    assert "| Bits | Method | W quantizer | WikiText-2 | C4 (proxy) |" in md
    assert "FlatQuant" in md and "tiny-llama" in md
    assert f"wrote {out}" in stdout
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)  # shared docs, not private temp-file permissions
    # a second run overwrites the existing report (the usual case: docs/RESULTS.md is committed)
    out.write_text("stale")
    rc, stdout, err = run(["report", "--results-dir", env["quantize_results"], "--out", out,
                           "--plots-dir", tmp_path / "docs" / "plots"], capsys)
    assert rc == 0, err
    assert out.read_text() == md


def test_default_model_name():
    assert cli.default_model_name("smollm2-135m") == "SmolLM2-135M-Instruct"
    assert cli.default_model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert cli.default_model_name("/models/Llama-2-7b-hf/") == "Llama-2-7b-hf"
    assert cli.default_model_name("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B"


def test_subprocess_exit_status(env, tmp_path):
    """`python -m flatquant`: success exits 0; a user error exits 2 with one line on stderr."""
    results = tmp_path / "results"
    environ = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ok = subprocess.run([sys.executable, "-m", "flatquant", *map(str, eval_args(env, results))],
                        capture_output=True, text=True, env=environ, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    (rec,) = records(results)
    assert rec["command"].startswith("python -m flatquant eval --model")
    bad = subprocess.run([sys.executable, "-m", "flatquant", *map(str, eval_args(env, results, "--w-bits", "1"))],
                         capture_output=True, text=True, env=environ, timeout=300, check=False)
    assert_user_error(bad.returncode, bad.stderr, "w_bits", "between 2 and 16")


# ------------------------------------------------------------------------------------------- bad input
def assert_nothing_written(results: Path, *folders: Path):
    assert records(results) == []
    for f in folders:
        assert not f.exists(), f
        assert not f.with_name(f.name + ".partial").exists()


def test_unknown_model_path(env, tmp_path, capsys):
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, model=tmp_path / "no-such-model"), capsys)
    assert_user_error(rc, err, "not found")
    assert_nothing_written(results)
    (tmp_path / "empty").mkdir()
    rc, _, err = run(eval_args(env, results, model=tmp_path / "empty"), capsys)
    assert_user_error(rc, err, "no config.json")


def test_unsupported_architecture(env, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    results, out = tmp_path / "results", tmp_path / "out"
    rc, _, err = run(["quantize", "--model", path, "--preset", "tiny", "--output", out,
                      *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "unsupported architecture", "gpt2", "llama", "qwen2", "qwen3")
    assert_nothing_written(results, out)


@pytest.mark.parametrize("flag,bits", [("--w-bits", 1), ("--w-bits", 17), ("--a-bits", 0), ("--kv-bits", 32)])
def test_bits_out_of_range(env, tmp_path, capsys, flag, bits):
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "rtn", flag, bits), capsys)
    assert_user_error(rc, err, "between 2 and 16")
    assert_nothing_written(results)


@pytest.mark.parametrize("case", ["unknown-name", "missing-file", "missing-data-dir", "unknown-task"])
def test_bad_dataset(env, tmp_path, capsys, case):
    results = tmp_path / "results"
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    (data / "c4" / "c4_validation_proxy.jsonl.gz").unlink()
    argv, words = {
        "unknown-name": (["--dataset", "wikitext3"], ["unknown text source", "wikitext3"]),
        "missing-file": (["--dataset", "wikitext2,c4"], ["data file not found", "c4"]),
        "missing-data-dir": (["--data-dir", tmp_path / "nope"], ["does not exist"]),
        "unknown-task": (["--tasks", "arc_easy,mmlu"], ["unknown zero-shot task", "mmlu"]),
    }[case]
    rc, _, err = run([*eval_args(env, results), "--data-dir", data, *argv], capsys)
    assert_user_error(rc, err, *words)
    assert_nothing_written(results)


def test_seqlen_longer_than_text(env, tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out"
    rc, _, err = run([*eval_args(env, results), "--seqlen", "100000"], capsys)
    assert_user_error(rc, err, "fewer than one window")
    # calibration windows longer than the calibration text
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", out,
                      "--calib-seqlen", "100000", *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "wiki-calib", "fewer than")
    assert_nothing_written(results, out)


def test_bad_numbers(env, tmp_path, capsys):
    results = tmp_path / "results"
    for argv, words in ((["--max-windows", "0"], ["--max-windows"]), (["--seqlen", "1"], ["--seqlen"]),
                        (["--device", "tpu9"], ["device"]), (["--seqlen", "abc"], ["invalid int"])):
        rc, _, err = run([*eval_args(env, results), *argv], capsys)
        assert_user_error(rc, err, *words)
    assert_nothing_written(results)


def test_unwritable_outputs(env, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = run(eval_args(env, blocker / "results"), capsys)
    assert_user_error(rc, err, "cannot write", "a-file")
    rc, _, err = run(eval_args(env, blocker), capsys)  # the results dir is an existing file
    assert_user_error(rc, err, "cannot write")
    results = tmp_path / "results"
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", blocker / "params",
                      *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "cannot write")
    assert_nothing_written(results)
    assert blocker.read_text() == "not a folder"
    rc, _, err = run(["report", "--results-dir", env["quantize_results"], "--out", blocker / "RESULTS.md",
                      "--plots-dir", tmp_path / "plots"], capsys)
    assert_user_error(rc, err, "cannot write")
    rc, _, err = run(["report", "--results-dir", tmp_path / "no-results", "--out", tmp_path / "R.md"], capsys)
    assert_user_error(rc, err, "not found")
    assert not (tmp_path / "R.md").exists()


def test_quantize_refuses_foreign_output_folder(env, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    results = tmp_path / "results"
    for extra in ([], ["--no-resume"]):
        rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", out, *extra,
                          *common(env["data"], results)], capsys)
        assert_user_error(rc, err, "not a flatquant parameter folder")
    assert (out / "notes.txt").read_text() == "keep me"
    assert_nothing_written(results)


def _corrupt(params: Path, how: str, env) -> Path | None:
    """Damage a copy of the saved parameters; returns a model folder to use instead (or None)."""
    if how == "truncated-safetensors":
        f = params / "layers" / "layer_001.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "missing-layer":
        (params / "layers" / "layer_001.safetensors").unlink()
    elif how == "corrupt-json":
        (params / "flatquant.json").write_text('{"format": "flatquant-params-v1", "sizes": ')
    elif how == "not-params":
        (params / "flatquant.json").unlink()
    elif how == "other-model":
        tok = build_tokenizer()
        other = params.parent / "tiny-llama-wide"
        build_model("llama", vocab_size=len(tok), intermediate_size=128).save_pretrained(other)
        tok.save_pretrained(other)
        return other
    return None


CORRUPTIONS = {"truncated-safetensors": ["corrupt safetensors", "layer_001"],
               "missing-layer": ["layer 1", "missing"], "corrupt-json": ["corrupt JSON"],
               "not-params": ["no flatquant.json"], "other-model": ["intermediate_size", "128"]}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_eval(env, tmp_path, capsys, how):
    params = tmp_path / "params"
    shutil.copytree(env["params"], params)
    model = _corrupt(params, how, env)
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "flatquant", "--params", params, model=model), capsys)
    assert_user_error(rc, err, *CORRUPTIONS[how])
    assert_nothing_written(results)


@pytest.mark.parametrize("how", ["truncated-safetensors", "corrupt-json", "other-model"])
def test_corrupt_checkpoint_quantize_resume(env, tmp_path, capsys, how):
    """`quantize --output DIR` on damaged saved parameters fails before evaluating anything."""
    params = tmp_path / "params"
    shutil.copytree(env["params"], params)
    model = _corrupt(params, how, env) or env["model"]
    results = tmp_path / "results"
    rc, _, err = run(["quantize", "--model", model, "--preset", "tiny", "--output", params,
                      *common(env["data"], results)], capsys)
    assert_user_error(rc, err, *CORRUPTIONS[how])
    assert_nothing_written(results)
    assert not (tmp_path / "params.partial").exists()


def test_quantize_output_with_other_settings(env, tmp_path, capsys):
    params = tmp_path / "params"
    shutil.copytree(env["params"], params)
    results = tmp_path / "results"
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--epochs", "3", "--output", params,
                      *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "other calibration settings", "--no-resume")
    assert_nothing_written(results)


def test_params_misuse(env, tmp_path, capsys):
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "rtn", "--params", env["params"]), capsys)
    assert_user_error(rc, err, "--params only applies")
    rc, _, err = run(eval_args(env, results, "--method", "flatquant", "--params", tmp_path / "none"), capsys)
    assert_user_error(rc, err, "no such folder")
    assert_nothing_written(results)


def test_bad_weight_quantizer_and_gptq_without_calibration_data(env, tmp_path, capsys):
    results = tmp_path / "results"
    rc, _, err = run(eval_args(env, results, "--method", "rtn", "--weight-quantizer", "bogus"), capsys)
    assert_user_error(rc, err, "invalid choice", "bogus", "gptq")
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    (data / "calib" / "wiki_articles.txt").unlink()
    for argv in (["--method", "rtn"], ["--method", "flatquant", "--params", env["params"]]):
        rc, _, err = run([*eval_args(env, results, *argv, "--weight-quantizer", "gptq"), "--data-dir", data], capsys)
        assert_user_error(rc, err, "data file not found", "wiki_articles")
    assert_nothing_written(results)


def test_unknown_preset_and_baseline(env, tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "out"
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "huge", "--output", out,
                      *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "invalid choice", "huge", "cpu-quick")
    rc, _, err = run(["quantize", "--model", env["model"], "--preset", "tiny", "--output", out,
                      "--compare", "fp16,gptq", *common(env["data"], results)], capsys)
    assert_user_error(rc, err, "unknown baseline", "gptq")
    rc, _, err = run(["eval", "--method", "awq"], capsys)
    assert_user_error(rc, err, "invalid choice", "awq")
    assert_nothing_written(results, out)
