"""The MoE layer calibration benchmark's CPU smoke mode writes a calib_cost record."""
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[2] / "benchmarks" / "calib" / "bench_moe_layer.py"


@pytest.mark.parametrize("shape", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_smoke_writes_a_calib_cost_record(tmp_path, shape):
    spec = importlib.util.spec_from_file_location("bench_moe_layer", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--shape", shape, "--epochs", "1", "--out-dir", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / f"calib_cost_{shape}-moe-layer.json").read_text())
    assert rec["kind"] == "calib_cost" and rec["finite"] and rec["epochs_run"] == 1
    assert rec["experts"] == (4 if shape == "mixtral-8x7b" else 8) and rec["experts_per_token"] == 2
    assert rec["layer_seconds_paper_recipe"] > 0 and "15 epochs of 128 samples" in rec["extrapolation"]
    assert rec["family"] == ("mixtral" if shape == "mixtral-8x7b" else "qwen3_moe")
