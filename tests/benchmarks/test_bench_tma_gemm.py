"""benchmarks/kernels/bench_tma_gemm.py's choice of the fastest exact config per code format (pure Python)."""
from __future__ import annotations

import math

import pytest


@pytest.fixture
def bench(load_script):
    return load_script("bench_tma_gemm")


def _rec(name, shape, speedup):
    return {"kernel": f"tma_gemm_{name}", "shape": {"in": shape[0], "out": shape[1], "M": 8192}, "speedup": speedup}


def test_best_configs_geometric_mean_over_full_coverage(bench):
    a, b = (4096, 11008), (11008, 4096)
    records = [
        {"kernel": "cublas_int_mm", "shape": {"in": 4096, "out": 11008, "M": 8192}, "speedup": 9.0},  # not a config
        {"kernel": "tma_gemm_exactness_int8_128x256x128_s3", "shape": {"M": 512}, "speedup": None},
        _rec("int8_128x256x128_s3", a, 2.0), _rec("int8_128x256x128_s3", b, 0.5),      # geo mean 1.0
        _rec("int8_128x256x128_s4", a, 1.2), _rec("int8_128x256x128_s4", b, 1.1),      # geo mean 1.149
        _rec("int8_256x128x128_s3", a, 3.0),                                              # one point only
        _rec("fp8_128x128x128_s4", a, 1.5), _rec("fp8_128x128x128_s4", b, 1.5),
    ]
    best = bench.best_configs(records)
    assert best["int8"][0] == "int8_128x256x128_s4"
    assert best["int8"][1] == pytest.approx(math.sqrt(1.2 * 1.1))
    assert best["fp8"] == ("fp8_128x128x128_s4", pytest.approx(1.5))


def test_best_configs_none_timed(bench):
    assert bench.best_configs([]) == {}
    assert set(bench.best_configs([_rec("fp8_128x128x128_s4", (4096, 4096), 1.0)])) == {"fp8"}
