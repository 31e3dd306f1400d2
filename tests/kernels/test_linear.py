import pytest
import torch
from tolerances import DEVICE, TIE_TOL, rounded_t_tie_tol, tie_flip_slack

from flatquant.kernels.linear import W4A4Linear, set_backend
from flatquant.kernels.reference import kron_factors, kron_transform_reference, transform_quantize_reference


def _layer(in_f, out_f, bits=4, transform="both", bias=True, act_clip=0.9, device=DEVICE):
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    n1, n2 = kron_factors(in_f)
    p1 = torch.linalg.qr(torch.randn(n1, n1))[0] if transform in ("both", "p1") else None
    p2 = torch.linalg.qr(torch.randn(n2, n2))[0] if transform == "both" else None
    m = W4A4Linear.from_float(w, b, p1, p2, act_clip=act_clip, bits=bits)
    return m.to(device), w, b, p1, p2


def _assert_matches_reference_layer(m, x, y, y_ref, tol):
    """The Triton layer's output y against the reference layer's y_ref, within tol (relative, and of the
    largest output) plus what activation codes flipped at .5 ties may move (`tie_flip_slack`)."""
    x2 = x.reshape(-1, m.in_features)
    p1, p2, alpha = *m._factors(x.dtype), m._alpha()
    rounded = not m.split_intermediate
    _, scale = transform_quantize_reference(x2, p1, p2, alpha, m.bits, round_intermediate=rounded)
    pre = kron_transform_reference(x2, p1, p2, round_intermediate=rounded) / scale[:, None]
    tie_tol = rounded_t_tie_tol(x.dtype, m.bits, alpha) if rounded else TIE_TOL
    slack = tie_flip_slack(pre, scale, m.dequantized_weight(), tie_tol)
    yf, rf = y.float().cpu().reshape(slack.shape), y_ref.float().cpu().reshape(slack.shape)
    bound = tol * rf.abs() + tol * float(rf.abs().max()) + slack
    assert ((yf - rf).abs() <= bound).all(), f"max excess {float(((yf - rf).abs() - bound).max())}"


def _float_ref(x, w, b, p1, p2):
    y = kron_transform_reference(x.float(), p1, p2) @ w.t().to(x.device)
    return y + b.to(x.device) if b is not None else y


@pytest.mark.parametrize("bits,tol", [(4, 0.25), (8, 0.02)])
def test_reference_backend_close_to_float(bits, tol):
    """CPU reference path, no triton needed: close to the float linear within quantization error."""
    m, w, b, p1, p2 = _layer(64, 48, bits=bits, act_clip=1.0, device="cpu")
    x = torch.randn(2, 5, 64)
    y = m(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    ref = _float_ref(x, w, b, p1, p2)
    assert ((y - ref).norm() / ref.norm()).item() < tol


def test_state_dict_round_trip_and_backend_validation():
    m, *_ = _layer(32, 16, device="cpu")
    m2 = W4A4Linear(32, 16, bias=True, p1=torch.eye(4), p2=torch.eye(8))
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError):
        m.backend = "cuda"
    with pytest.raises(ValueError):
        W4A4Linear(32, 16, p1=torch.eye(5))


@pytest.mark.parametrize("transform", ["both", "p1", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_reference(transform, dtype):
    pytest.importorskip("triton")
    m, *_ = _layer(96, 40, transform=transform, bias=transform != "none")
    x = (torch.randn(2, 3, 96) * 2).to(dtype).to(DEVICE)
    y_ref = m(x)
    set_backend(m, "triton")
    y = m(x)
    assert y.shape == y_ref.shape == (2, 3, 40) and y.dtype == dtype
    _assert_matches_reference_layer(m, x, y, y_ref, 2.0 ** -10 if dtype == torch.float16 else 1e-5)


def test_o_proj_head_mixing_9_heads():
    pytest.importorskip("triton")
    heads, head_dim = 9, 16
    w = torch.randn(24, heads * head_dim)
    p1 = torch.linalg.qr(torch.randn(heads, heads))[0]
    m = W4A4Linear.from_float(w, None, p1, None, act_clip=0.95).to(DEVICE)
    x = torch.randn(4, heads * head_dim, device=DEVICE)
    y_ref = m(x)
    m.backend = "triton"
    _assert_matches_reference_layer(m, x, m(x), y_ref, 1e-5)


@pytest.mark.parametrize("route", ["auto", "int8", "fp8", "decode", "int_mm", "scaled_mm", "tma_int8", "tma_fp8"])
@pytest.mark.parametrize("tokens", [3, 9, 20])
def test_every_gemm_route_matches_reference(route, tokens):
    """Each route (pinned) on fresh inputs, decode-sized (3: the dp4a kernel on packed codes; 9: the
    tensor-core kernel on codes one per byte) and larger M, odd factor sizes (96 = 8 x 12).
    The reference GEMM runs on the fused kernel's own activation codes: bf16 inputs may flip a code at a
    .5 tie between kernel and reference transform (allowed and tested in test_fused_transform_quant),
    which is not what this test is about."""
    pytest.importorskip("triton")
    from flatquant.kernels.gemm.decode import activation_format
    from flatquant.kernels.reference import w4a4_gemm_reference
    from flatquant.kernels.transform.dispatch import fused_transform_quantize

    m, *_ = _layer(96, 40, transform="both")
    m.gemm_route = route
    m.backend = "triton"
    x = (torch.randn(tokens, 96) * 2).to(torch.bfloat16).to(DEVICE)
    want = {3: "packed", 9: "int8", 20: None}[tokens]
    if want is not None:
        assert activation_format(tokens, 40, 48, x.device) == want
    a, sa = fused_transform_quantize(x, *m._factors(x.dtype), m._alpha(), 4)
    y_ref = w4a4_gemm_reference(a, sa, m.qweight, m.weight_scale, m.bias, torch.bfloat16, 4)
    y = m(x)
    assert y.dtype == torch.bfloat16
    if route.startswith("tma_"):  # pinned, and taken (the interpreter runs the TMA kernel on the CPU)
        assert m.gemm_route_for(tokens, torch.bfloat16, x.device) == route
    # bf16 output: 1 ulp; scaled_mm: 2 (scales applied in another order) + the bias rounded to bf16
    smm = m.gemm_route_for(tokens, torch.bfloat16, x.device) == "scaled_mm"
    tol = 2.0 ** -7 * (2 if smm else 1)
    atol = tol * float(y_ref.float().abs().max()) * 1e-2 + (2.0 ** -8 * float(m.bias.abs().max()) if smm else 0.0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=atol)


def test_route_dispatch_and_weight_cache(monkeypatch):
    from dataclasses import replace

    from flatquant.kernels.gemm import tma as tma_gemm
    from flatquant.kernels.gemm.w4a4_gemm import DEFAULT_GEMM_ROUTE
    from flatquant.kernels.routes import DEFAULT_ROUTES

    m, *_ = _layer(64, 32, device="cpu")
    cuda, bf16, f16 = torch.device("cuda"), torch.bfloat16, torch.float16
    assert m.gemm_route_for(1, bf16, cuda) == "decode"
    assert m.gemm_route_for(DEFAULT_ROUTES.small_m_max, bf16, cuda) == "decode"
    hopper = [False]  # a fake device capability: the real check needs a GPU
    monkeypatch.setattr(tma_gemm, "tma_supported", lambda m_, n, k, dev: hopper[0] and k % 16 == 0)
    m.routes = replace(DEFAULT_ROUTES, large_m_route="scaled_mm", tma_m_min=2048)
    assert m.gemm_route_for(2047, bf16, cuda) == "scaled_mm"
    assert m.gemm_route_for(2047, f16, cuda) == "int_mm"  # row-wise _scaled_mm is bf16-only
    assert m.gemm_route_for(4096, bf16, cuda) == "scaled_mm"  # no Hopper: the first of fallback_routes that takes it
    hopper[0] = True
    assert m.gemm_route_for(4096, bf16, cuda) == m.routes.tma_route
    set_backend(m, "reference", routes=replace(m.routes, tma_m_min=None))  # off: large_m_route at every large M
    assert m.backend == "reference" and m.routes.tma_m_min is None
    assert m.gemm_route_for(1 << 20, bf16, cuda) == "scaled_mm"
    m.routes = replace(DEFAULT_ROUTES, small_m_max=4, large_m_min=64, large_m_route="int_mm")
    assert [m.gemm_route_for(t, bf16, cuda) for t in (4, 5, 64)] == ["decode", DEFAULT_GEMM_ROUTE, "int_mm"]
    m.routes = DEFAULT_ROUTES
    m.gemm_route = "tma_fp8"
    assert m.gemm_route_for(64, bf16, cuda) == "tma_fp8"
    m.gemm_route = "decode"
    assert m.gemm_route_for(64, bf16, cuda) == DEFAULT_GEMM_ROUTE
    odd, *_ = _layer(36, 20, device="cpu")  # K, N not multiples of 8: cuBLASLt refuses
    assert odd.gemm_route_for(4096, bf16, cuda) == DEFAULT_GEMM_ROUTE
    with pytest.raises(ValueError):
        W4A4Linear(32, 16, gemm_route="cutlass")
    pytest.importorskip("triton")
    m = m.to(DEVICE)  # the unpack kernel runs where the kernels run (CUDA, or CPU under the interpreter)
    codes = m._weight_codes("int8")
    assert codes is m._weight_codes("int8") and codes.shape == (32, 64)
    m.clear_cache()
    assert not m._cast_cache


def test_decode_route_above_16_tokens():
    """small_m_max raised (up to the decode GEMM's 128): M = 40 tokens take the decode route and match the
    reference layer."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from flatquant.kernels.routes import DEFAULT_ROUTES

    m, *_ = _layer(64, 48)
    x = torch.randn(40, 64, device=DEVICE)
    y_ref = m(x)
    set_backend(m, "triton", routes=replace(DEFAULT_ROUTES, small_m_max=64))
    assert m.gemm_route_for(40, torch.float32, torch.device("cuda")) == "decode"
    _assert_matches_reference_layer(m, x, m(x), y_ref, 1e-5)
