"""benchmarks/kernels/bench_decode_gemm_m.py's pick of the decode tiles per M bucket and of small_m_max."""
from __future__ import annotations

import pytest


@pytest.fixture
def bench(load_script):
    return load_script("bench_decode_gemm_m")


def _rec(route, k, n, m, ms, bm=None, bn=32):
    cfg = dict(KERNEL="mma", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SUB=1, MMA_WARPS=4, SPLIT_K=1)
    return dict(kind="decode_gemm_m", model="x", shape={"in": k, "out": n, "M": m}, route=route, median_ms=ms,
                config=cfg if route == "decode" else None)


def test_pick_best_tiles_and_small_m_max(bench):
    shapes = [(4096, 4096), (4096, 11008)]
    recs = []
    for k, n in shapes:
        for m, smm in ((16, 1.0), (32, 1.0), (64, 1.0), (128, 1.0)):
            recs.append(_rec("scaled_mm", k, n, m, smm))
            bucket = max(16, m)
            recs.append(_rec("decode", k, n, m, 0.5 if m <= 32 else (0.9 if m == 64 else 1.2), bucket, 32))
            recs.append(_rec("decode", k, n, m, 0.6 if m <= 32 else (1.5 if m == 64 else 1.1), bucket, 64))
    recs.append(_rec("decode", 4096, 4096, 64, 0.1, 64, 128))  # one point only: not a candidate
    recs.append(_rec("decode", 4096, 4096, 64, None, 64, 16))  # did not compile
    got = bench.pick(recs)
    assert got["mma_m_config"]["32"]["BLOCK_N"] == 32
    assert got["mma_m_config"]["64"]["BLOCK_N"] == 32
    assert got["mma_m_config"]["128"]["BLOCK_N"] == 64  # 1.1 < 1.2, still slower than scaled_mm
    assert got["decode_wins_up_to_m"] == 64 and got["small_m_max"] == 64


def test_pick_keeps_16_when_decode_loses(bench):
    recs = [_rec("scaled_mm", 4096, 4096, 16, 0.5), _rec("decode", 4096, 4096, 16, 0.6, 16)]
    assert bench.pick(recs)["small_m_max"] == 16
