"""W4A4 GEMM vs the reference. The integer sum is exact (int32, or fp32 for small-integer fp8 products),
so the only differences are the float32 epilogue (a possible FMA contraction on GPU) and the final
rounding to bf16/fp16: results must agree to one unit in the last place of the output dtype, and
match the float64 dequantized product to the output dtype's rounding."""
import pytest
import torch

pytest.importorskip("triton")

from tolerances import DEVICE, ON_GPU

from flatquant.kernels.gemm.w4a4_gemm import DEFAULT_GEMM_ROUTE, ROUTES, w4a4_gemm
from flatquant.kernels.reference import (
    quantize_weight_reference,
    transform_quantize_reference,
    unpack_codes,
    w4a4_gemm_reference,
)

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}


def _operands(m, n, k, bits, bias=True):
    x = torch.randn(m, k, device=DEVICE)
    x[0, 0] = 50.0  # outlier
    w = torch.randn(n, k, device=DEVICE)
    a, sa = transform_quantize_reference(x, None, None, 1.0, bits)
    qw, sw = quantize_weight_reference(w, bits)
    b = torch.randn(n, device=DEVICE) if bias else None
    return a, sa, qw, sw, b


def _check(m, n, k, bits, route, out_dtype, bias=True, config=None):
    a, sa, qw, sw, b = _operands(m, n, k, bits, bias)
    y = w4a4_gemm(a, sa, qw, sw, b, out_dtype, bits, route=route, config=config)
    assert y.shape == (m, n) and y.dtype == out_dtype
    yr = w4a4_gemm_reference(a, sa, qw, sw, b, out_dtype, bits)
    tol = ULP[out_dtype]
    torch.testing.assert_close(y.float().cpu(), yr.float().cpu(), rtol=tol, atol=tol * float(yr.float().abs().max()) * 1e-2)
    # against the dequantized product in float64
    deq = (unpack_codes(a, bits).double() * sa.double()[:, None]) @ (unpack_codes(qw, bits).double() * sw.double()[:, None]).t()
    if b is not None:
        deq = deq + b.double()
    err = (y.double() - deq).norm() / deq.norm()
    assert err < 2 * tol, err


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (5, 40, 64), (33, 70, 96), (3, 48, 576), (17, 96, 1536)])
def test_gemm_int4(route, m, n, k):
    _check(m, n, k, 4, route, torch.float16, bias=(m % 2 == 1))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gemm_out_dtypes(out_dtype):
    _check(9, 64, 128, 4, "int8", out_dtype)


def test_gemm_int8_codes():
    _check(7, 48, 128, 8, None, torch.float16)
    _check(7, 48, 128, 8, "fp8", torch.float16)  # falls back to int8: int8 codes are not exact in e4m3


def test_gemm_extreme_codes_exact():
    """All -8 codes: the largest products; int sums must be exact."""
    m, n, k = 4, 32, 256
    from flatquant.kernels.reference import pack_int4

    a = pack_int4(torch.full((m, k), -8, dtype=torch.int8)).to(DEVICE)
    w = pack_int4(torch.full((n, k), -8, dtype=torch.int8)).to(DEVICE)
    one_m = torch.ones(m, device=DEVICE)
    one_n = torch.ones(n, device=DEVICE)
    for route in ROUTES:
        y = w4a4_gemm(a, one_m, w, one_n, None, torch.float32, 4, route=route)
        assert torch.all(y == 64.0 * k)


def test_default_route_and_errors():
    assert DEFAULT_GEMM_ROUTE in ROUTES
    a, sa, qw, sw, _ = _operands(2, 32, 64, 4)
    with pytest.raises(ValueError):
        w4a4_gemm(a, sa, qw, sw, route="int2")
    with pytest.raises(ValueError):
        w4a4_gemm(a[:, :16], sa, qw, sw)


@pytest.mark.skipif(not ON_GPU, reason="autotuned configs and model shapes: GPU only")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m", [1, 16, 300, 1024])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gemm_autotuned_gpu(route, m, n, k):
    _check(m, n, k, 4, route, torch.bfloat16)
