"""The one-launch decode linear (transform + quantize + gemv) vs the two-kernel path it replaces and the
reference: the same codes and exact integer sums, so the outputs must be equal bit for bit to
`fused_transform_quantize` + `w4a4_gemm_decode` (both run the block kernel's math and the float32
epilogue in the same order) and close to the PyTorch reference."""
import pytest
import torch

pytest.importorskip("triton")

from tolerances import DEVICE, ON_GPU, ROUNDED_T_SCALE_RTOL, assert_codes_match, rounded_t_tie_tol

from flatquant.kernels.fused_decode import fused_decode_linear, supported
from flatquant.kernels.gemm.decode import w4a4_gemm_decode
from flatquant.kernels.linear import W4A4Linear
from flatquant.kernels.reference import (
    kron_transform_reference,
    quantize_weight_reference,
    transform_quantize_reference,
    unpack_int4,
    w4a4_gemm_reference,
)
from flatquant.kernels.transform.dispatch import fused_transform_quantize

DTYPE = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter truncates bf16 casts


def _factor(n):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q + 0.1 * torch.randn(n, n, dtype=torch.float64) / n ** 0.5).float().to(DEVICE)


def _case(m, n1, n2, n_out, has_p1=True, has_p2=True, bias=True):
    n = n1 * n2
    x = (torch.randn(m, n) * 2).to(DTYPE).to(DEVICE)
    x[0, n // 3] = 40.0  # an outlier
    p1 = _factor(n1).to(DTYPE) if has_p1 else None
    p2 = _factor(n2).to(DTYPE) if has_p2 else None
    qw, sw = quantize_weight_reference(torch.randn(n_out, n, device=DEVICE), 4)
    b = torch.randn(n_out, device=DEVICE) if bias else None
    return x, p1, p2, qw, sw, b


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n1,n2,n_out", [(8, 8, 40), (8, 12, 33), (24, 24, 70), (32, 48, 24)])
@pytest.mark.parametrize("has_p1,has_p2,bias", [(True, True, True), (True, False, False), (False, True, True)])
def test_fused_decode_equals_two_kernel_path(m, n1, n2, n_out, has_p1, has_p2, bias):
    x, p1, p2, qw, sw, b = _case(m, n1, n2, n_out, has_p1, has_p2, bias)
    y = fused_decode_linear(x, p1, p2, 0.9, qw, sw, b, torch.float32)
    a, sa = fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="block")
    y2 = w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4)
    assert torch.equal(y, y2)
    # Against the reference: the codes, off by one only near a .5 tie as the transform tests allow (one flipped
    # code of the outlier token moves its outputs by up to scale x 7 x weight scale, which a tolerance on
    # the product alone cannot bound), then the GEMM on those codes.
    ar, sar = transform_quantize_reference(x, p1, p2, 0.9, 4, round_intermediate=True)
    torch.testing.assert_close(sa.cpu(), sar.cpu(), rtol=ROUNDED_T_SCALE_RTOL, atol=0)
    pre = kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sar.unsqueeze(-1)
    assert_codes_match(unpack_int4(a), unpack_int4(ar), pre, rounded_t_tie_tol(x.dtype, 4, 0.9))
    yr = w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4)
    torch.testing.assert_close(y.cpu(), yr.cpu(), rtol=1e-5, atol=1e-5 * float(yr.abs().max()))


@pytest.mark.parametrize("rows,kw,l2", [(16, 16, False), (32, 64, True), (64, 16, True)])
def test_fused_decode_configs(rows, kw, l2):
    """Rows per program and words per K step that do not divide N / K; the L2 prefetch on and off."""
    x, p1, p2, qw, sw, b = _case(1, 16, 24, 100)
    y = fused_decode_linear(x, p1, p2, 1.0, qw, sw, b, torch.float32, config=dict(ROWS=rows, KW=kw, L2_PREFETCH=l2))
    a, sa = fused_transform_quantize(x, p1, p2, 1.0, 4, kernel="block")
    assert torch.equal(y, w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4))


def test_fused_decode_edge_tokens_and_refusals():
    """An all-zero token (scale 1e-8, codes 0, output = bias) and one huge outlier; unsupported calls
    (odd n1, 8 bits, M > 4, rows that are not whole words) are refused with a clear error."""
    x, p1, p2, qw, sw, b = _case(2, 8, 8, 24)
    x[0] = 0.0
    x[1] = 0.0
    x[1, 5] = 1e4
    y = fused_decode_linear(x, p1, p2, 1.0, qw, sw, b, torch.float32)
    torch.testing.assert_close(y[0].cpu(), b.cpu(), rtol=0, atol=1e-5)
    a, sa = fused_transform_quantize(x, p1, p2, 1.0, 4, kernel="block")
    assert torch.equal(y, w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4))
    assert not supported(1, 9 * 8, 24, _factor(9), _factor(8), 4, x, qw)  # odd n1
    assert not supported(1, 64, 24, p1, p2, 8, x, qw)
    assert not supported(5, 64, 24, p1, p2, 4, x, qw)
    with pytest.raises(ValueError, match="does not take"):
        fused_decode_linear(torch.randn(5, 64, device=DEVICE, dtype=DTYPE), p1, p2, 1.0, qw, sw)


@pytest.mark.parametrize("m", [1, 2])
def test_layer_takes_the_fused_decode_path(m, monkeypatch):
    """W4A4Linear (Triton backend) at M <= routes.fused_decode_max_m runs the one-launch kernel and gives the
    same output as the two-kernel path (fused_decode_max_m = 0, the default)."""
    from dataclasses import replace

    from flatquant.kernels import fused_decode, linear
    from flatquant.kernels.routes import DEFAULT_ROUTES

    assert DEFAULT_ROUTES.fused_decode_max_m == 0
    n1, n2, n_out = 16, 32, 48
    layer = W4A4Linear.from_float(torch.randn(n_out, n1 * n2, device=DEVICE) / 16, torch.randn(n_out, device=DEVICE),
                                  _factor(n1), _factor(n2), act_clip=0.9, backend="triton",
                                  routes=replace(DEFAULT_ROUTES, fused_decode_max_m=2))
    x = (torch.randn(3, m, n1 * n2) * 2).to(DTYPE).to(DEVICE)[:, 0]  # a (3, n) view: M = 3 > fused_decode_max_m
    x1 = x[:m]
    calls = []
    real = fused_decode.fused_decode_linear
    monkeypatch.setattr(fused_decode, "fused_decode_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = layer(x1)
    assert calls == [1]
    linear.set_backend(layer, "triton", routes=DEFAULT_ROUTES)
    assert torch.equal(y, layer(x1)) and len(calls) == 1
    assert linear.W4A4Linear is W4A4Linear


@pytest.mark.skipif(not ON_GPU, reason="model shapes: GPU only")
@pytest.mark.parametrize("n_in,n_out", [(4096, 4096), (4096, 14336), (14336, 4096), (11008, 4096), (4096, 11008),
                                        (576, 1536), (1536, 576)])
def test_fused_decode_model_shapes_gpu(n_in, n_out):
    """Default config (rows per program from the SM count) at Llama/Qwen/SmolLM2 shapes:
    bitwise equal to the block transform + decode GEMM, on fresh inputs three times (scratch reuse)."""
    from flatquant.kernels.reference import kron_factors

    n1, n2 = kron_factors(n_in)
    p1, p2 = _factor(n1).to(DTYPE), _factor(n2).to(DTYPE)
    qw, sw = quantize_weight_reference(torch.randn(n_out, n_in, device=DEVICE), 4)
    b = torch.randn(n_out, device=DEVICE)
    for _ in range(3):
        x = (torch.randn(1, n_in, device=DEVICE) * 3).to(DTYPE)
        y = fused_decode_linear(x, p1, p2, 0.9, qw, sw, b, torch.bfloat16)
        a, sa = fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="block")
        assert torch.equal(y, w4a4_gemm_decode(a, sa, qw, sw, b, torch.bfloat16, 4))
