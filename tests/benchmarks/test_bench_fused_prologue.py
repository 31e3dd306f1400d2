"""benchmarks/runtime/bench_fused_prologue.py: one case of each kind on the CPU (interpreter, tiny sizes, the CUDA
graph timing replaced by one call): the reference check passes and a record is written."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("kind,fmt", [("norm", "packed"), ("silu", "int8"), ("norm", "fp8_w8a8"), ("silu", "fp8_w8a8")])
def test_case_on_cpu(load_script, monkeypatch, kind, fmt):
    import torch

    mod = load_script("bench_fused_prologue")
    monkeypatch.setattr(mod, "graph_ms", lambda fns: [f() for f in fns] and 1.0)
    monkeypatch.setattr(mod, "rotation_count", lambda *a, **k: 2)
    monkeypatch.setattr(mod.fused_ops, "_use_triton", lambda t, fused: False)
    recs = []

    class W:
        def add(self, r):
            recs.append(r)

    # bf16 on the CPU: the interpreter's bf16 casts truncate, so compare in the kernel's own rounding only
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t.half())
    mod.case(W(), "tiny", kind, 64, 3, fmt, device="cpu")
    assert recs[0]["op"] == kind and recs[0]["speedup"] == 1.0
    # the interpreter's e4m3 cast is not torch's (tests/runtime/test_static.py): the FP8 check runs on the GPU
    assert recs[0]["matches_reference"] is True or fmt == "fp8_w8a8"
