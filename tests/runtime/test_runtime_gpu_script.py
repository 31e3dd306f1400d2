"""benchmarks/runtime/runtime_gpu.py --smoke: every part runs on the CPU and writes its records."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_smoke_run_writes_records(tiny_data_dir, tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "runtime" / "runtime_gpu.py"
    spec = importlib.util.spec_from_file_location("_bench_runtime_gpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "records"
    assert script.main(["--smoke", "--out-dir", str(out), "--data-dir", str(tiny_data_dir)]) == 0
    recs = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    kinds = sorted(r["kind"] for r in recs.values())
    assert kinds == ["checkpoint", "generation", "generation", "memory", "memory", "ppl", "ppl", "ppl"], kinds
    ppl = {r["runtime"]: r for r in recs.values() if r["kind"] == "ppl"}
    assert set(ppl) == {"fake-quant", "packed", "fake-quant-float64"}
    assert ppl["fake-quant-float64"]["fake_quant_ppl"] == ppl["fake-quant"]["ppl"]
    assert abs(ppl["packed"]["ppl"] / ppl["fake-quant"]["ppl"] - 1) < 0.01  # the target on the GPU, met on the CPU
    ck = next(r for r in recs.values() if r["kind"] == "checkpoint")
    assert 0 < ck["bytes_packed"] < ck["bytes_fp16"]
    for key in ("model", "w_bits", "a_bits", "kv_bits", "device", "git_commit", "command", "date"):
        assert key in ck
    gen = next(r for r in recs.values() if r["kind"] == "generation" and "noise" not in r["variant"])
    assert len(gen["prompts"]) == 5 and all(len(p["packed_tokens"]) == 8 for p in gen["prompts"])
    stack = next(r for r in recs.values() if r.get("variant") == "tiny-shape")
    assert stack["packed_tensor_bytes_per_layer"] < stack["fp16_tensor_bytes_per_layer"]
