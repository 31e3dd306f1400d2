"""benchmarks/runtime/bench_e2e.py: --smoke runs every row and phase on the CPU and writes a JSON list of records;
without CUDA a real run is refused in one line; the records render in the report section."""
from __future__ import annotations

import json

import pytest


def test_smoke_writes_every_row_and_phase(load_script, tmp_path):
    from flatquant.report import e2e

    out = tmp_path / "e2e.json"
    assert load_script("bench_e2e").main(["--smoke", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())
    got = {(r["row"], r["phase"], r["batch"]) for r in recs if r["phase"] != "max_batch"}
    for row in ("bf16", "fp8", "int4", "flatquant"):
        assert {(row, "decode", 1), (row, "decode", 2), (row, "prefill", 2), (row, "layer_mem", 1)} <= got
    assert not [r for r in recs if r.get("error") or r.get("oom")]
    for r in recs:
        for key in ("kind", "model_shape", "row", "phase", "batch", "seqlen", "kv_len", "median_ms", "tokens_per_s",
                    "peak_mem_gib", "device", "git_commit", "command", "date"):
            assert key in r, key
    dec = {r["row"]: r for r in recs if r["phase"] == "decode" and r["batch"] == 2}
    # tiny head_dim 16: 8 code bytes + 8 scale / zero bytes per head and token against 32 in bf16
    assert dec["flatquant"]["kv_cache_bytes"] * 2 == dec["bf16"]["kv_cache_bytes"]
    assert dec["int4"]["weights_bytes"] < dec["fp8"]["weights_bytes"] < dec["bf16"]["weights_bytes"]
    assert "## End-to-end speed and memory" in "\n".join(e2e.e2e_section(recs))


def test_refuses_without_cuda(load_script, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_script("bench_e2e").main(["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_bad_arguments(load_script, tmp_path):
    from flatquant.errors import FlatQuantError

    with pytest.raises(FlatQuantError, match="unknown model shape"):
        load_script("bench_e2e").main(["--smoke", "--shapes", "gpt5", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="unknown row"):
        load_script("bench_e2e").main(["--smoke", "--rows", "int3", "--out", str(tmp_path / "x.json")])


def test_decode_batches_in_the_decode_gemm_range_keep_the_default_route(load_script):
    """A decode batch up to RouteConfig.small_m_max runs the default route (the packed decode GEMM); only larger
    decode batches are forced onto --w4-large-route."""
    from types import SimpleNamespace

    from flatquant.kernels.routes import DEFAULT_ROUTES

    mod = load_script("bench_e2e")
    lins = [SimpleNamespace(gemm_route="unset") for _ in range(3)]
    bench = mod.Bench.__new__(mod.Bench)
    bench.a = SimpleNamespace(w4_large_route="scaled_mm")
    bench.w4_linears = lambda dec: lins
    bench.set_routes(None, DEFAULT_ROUTES.small_m_max)
    assert {m.gemm_route for m in lins} == {None}
    bench.set_routes(None, DEFAULT_ROUTES.small_m_max + 1)
    assert {m.gemm_route for m in lins} == {"scaled_mm"}
    bench.set_routes(None, 4096, decode=False)
    assert {m.gemm_route for m in lins} == {None}
