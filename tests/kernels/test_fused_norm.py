"""The fused prologue + transform + quantize kernel (flatquant.kernels.fused_norm) against its reference
(the unfused ops, then the transform + quantize reference), fresh random inputs, Triton interpreter.

Tolerances: the kernel's sum of squares and rsqrt round differently from torch's mean / rsqrt (float32
ulps), which can move the model-dtype rounding of a normed value by one ulp and so a code at a rounding
tie: scales within 1e-3 relative (1e-5 in float32), codes differ by at most one step on at most 1% of the
elements; the residual output is exact (one rounded addition). The bf16 interpreter casts truncate, so
the half-precision cases use float16."""
from __future__ import annotations

import pytest
import torch

from flatquant.kernels import fused_norm as fn
from flatquant.kernels import reference as ref

CASES = [(64, 8, True), (160, 10, True), (160, 10, False), (64, None, False)]  # (n, n1, P2 given)


def _factors(n, n1, has_p2, g):
    if n1 is None:
        return None, None
    n2 = n // n1
    p1 = torch.eye(n1) + torch.randn(n1, n1, generator=g) * 0.3 / n1 ** 0.5
    p2 = torch.eye(n2) + torch.randn(n2, n2, generator=g) * 0.3 / n2 ** 0.5 if has_p2 else None
    return p1, p2


def _codes(a, bits, fmt):
    if fmt == "packed":
        return ref.unpack_codes(a, bits).float()
    return a.float()


def _check(got, want, dtype, bits, fmt):
    (a, s), (b, t) = got, want
    assert a.shape == b.shape and a.dtype == b.dtype and s.shape == t.shape
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    assert torch.allclose(s, t, rtol=rtol, atol=0), (s - t).abs().max()
    ca, cb = _codes(a, bits, fmt), _codes(b, bits, fmt)
    d = (ca - cb).abs()
    assert d.max() <= 1 and (d > 0).float().mean() <= 0.01, (d.max(), (d > 0).float().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,n1,has_p2", CASES)
@pytest.mark.parametrize("fmt", ["packed", "int8", "fp8"])
def test_norm_prologue_matches_reference(dtype, n, n1, has_p2, fmt):
    g = torch.Generator().manual_seed(n + (n1 or 0) + len(fmt))
    p1, p2 = _factors(n, n1, has_p2, g)
    x = (torch.randn(7, n, generator=g) * 2).to(dtype)
    res = torch.randn(7, n, generator=g).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    for r in (None, res):
        a, s, rout = fn.prologue_quantize("norm", x, p1, p2, 0.9, 4, fmt, res=r, w=w, eps=1e-5, num_programs=3)
        b, t, rref = fn.norm_quant_reference(x, r, w, 1e-5, p1, p2, 0.9, 4, fmt)
        assert torch.equal(rout, rref)
        _check((a, s), (b, t), dtype, 4, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,n1,has_p2", CASES)
@pytest.mark.parametrize("fmt", ["packed", "int8"])
def test_silu_prologue_matches_reference(dtype, n, n1, has_p2, fmt):
    g = torch.Generator().manual_seed(3 * n + (n1 or 0))
    p1, p2 = _factors(n, n1, has_p2, g)
    gu = (torch.randn(2, 5, 2 * n, generator=g) * 2).to(dtype)
    a, s, none = fn.prologue_quantize("silu", gu, p1, p2, 0.8, 4, fmt, num_programs=4)
    b, t = fn.silu_quant_reference(gu.reshape(-1, 2 * n), p1, p2, 0.8, 4, fmt)
    assert none is None
    _check((a, s), (b, t), dtype, 4, fmt)


def test_int8_codes_and_unsupported_sizes():
    g = torch.Generator().manual_seed(5)
    p1, p2 = _factors(64, 8, True, g)
    x = torch.randn(4, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.5
    a, s, _ = fn.prologue_quantize("norm", x, p1, p2, 1.0, 8, "int8", w=w, eps=1e-6)
    b, t, _ = fn.norm_quant_reference(x, None, w, 1e-6, p1, p2, 1.0, 8, "int8")
    _check((a, s), (b, t), torch.float32, 8, "int8")
    assert not fn.supported(90, torch.eye(9), torch.eye(10), 4)  # odd n1: the nibble split is not on a row
    with pytest.raises(ValueError):
        fn.prologue_quantize("norm", torch.randn(2, 90), torch.eye(9), torch.eye(10), 1.0, w=torch.ones(90))
    with pytest.raises(ValueError):
        fn.prologue_quantize("gelu", x, p1, p2, 1.0)


def test_fused_linear_matches_unfused_linear():
    """norm_linear / silu_linear on a Triton W4A4Linear equal the unfused ops followed by the linear."""
    from flatquant.kernels.linear import W4A4Linear

    g = torch.Generator().manual_seed(9)
    for n, out in ((64, 48), (160, 64)):
        p1, p2 = _factors(n, 8 if n == 64 else 10, True, g)
        lin = W4A4Linear.from_float(torch.randn(out, n, generator=g) * 0.1, p1=p1, p2=p2, act_clip=0.9,
                                    backend="triton").half()
        x, res = torch.randn(3, 6, n, generator=g).half(), torch.randn(3, 6, n, generator=g).half()
        w = (torch.rand(n, generator=g) + 0.5).half()
        assert fn._plan_for(lin, x, n) is not None and fn._plan_for(lin, x[:1, :2], n)[0] == "decode"
        y, r = fn.norm_linear(lin, x, res, w, 1e-5, fused_ops_on=False)
        from flatquant.runtime.fused_ops import add_rmsnorm_reference, silu_mul_reference
        h, rr = add_rmsnorm_reference(x, res, w, 1e-5)
        want = lin(h)
        assert torch.equal(r, rr) and y.shape == want.shape
        assert torch.allclose(y.float(), want.float(), rtol=0, atol=2e-2 * want.float().abs().max().item())
        gu = torch.randn(18, 2 * n, generator=g).half()
        got = fn.silu_linear(lin, gu, fused_ops_on=False)
        want = lin(silu_mul_reference(gu))
        assert torch.allclose(got.float(), want.float(), rtol=0, atol=2e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("mode", ["norm", "add_norm", "silu"])
def test_fp8_prologue_matches_reference(mode):
    """The FP8 rows' fused pass: scales equal; the interpreter's e4m3 cast is not torch's (ties, values near
    powers of two), so rare code mismatches only (as the plain FP8 quantizer's test allows)."""
    from flatquant.runtime import fp8

    g = torch.Generator().manual_seed(len(mode))
    n = 200
    x = (torch.randn(5, 2 * n if mode == "silu" else n, generator=g) * 3).half()
    res = torch.randn(5, n, generator=g).half() if mode == "add_norm" else None
    w = (torch.rand(n, generator=g) + 0.5).half()
    m = "silu" if mode == "silu" else "norm"
    q, s, r = fp8.prologue_fp8(m, x, res, w, 1e-5)
    qr, sr, rr = fp8.prologue_fp8_reference(m, x, res, w, 1e-5)
    assert q.shape == (16, n) and not q[5:].float().any()
    assert torch.allclose(s, sr, rtol=1e-3, atol=0)
    assert (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean() < 0.02
    if m == "norm":
        assert torch.equal(r, rr)
    else:
        assert r is None


def test_fp8_norm_linear_matches_unfused(monkeypatch):
    """The FP8 wiring (codes -> Fp8Linear.gemm_codes, residual, shapes) with the pass replaced by its reference
    (the kernel itself is checked above; the interpreter's e4m3 casts would blur an end-to-end comparison):
    equal to the unfused ops followed by the linear."""
    from flatquant.runtime import fp8
    from flatquant.runtime.fused_ops import add_rmsnorm_reference, silu_mul_reference

    calls = []
    monkeypatch.setattr(fn, "_fp8_fused", lambda lin, x, on: isinstance(lin, fp8.Fp8Linear))
    monkeypatch.setattr(fp8, "prologue_fp8", lambda *a, **k: calls.append(a[0]) or fp8.prologue_fp8_reference(*a, **k))
    g = torch.Generator().manual_seed(11)
    lin = fp8.Fp8Linear.from_float(torch.randn(48, 64, generator=g) * 0.1)
    x, res, w = torch.randn(2, 3, 64, generator=g).half(), torch.randn(2, 3, 64, generator=g).half(), \
        (torch.rand(64, generator=g) + 0.5).half()
    y, r = fn.norm_linear(lin, x, res, w, 1e-5)
    h, rr = add_rmsnorm_reference(x, res, w, 1e-5)
    assert torch.equal(r, rr) and torch.equal(y, lin(h))
    lin2 = fp8.Fp8Linear.from_float(torch.randn(32, 64, generator=g) * 0.1)
    gu = torch.randn(6, 128, generator=g).half()
    assert torch.equal(fn.silu_linear(lin2, gu), lin2(silu_mul_reference(gu)))
    assert calls == ["norm", "silu"]


def test_self_check_passes_in_the_interpreter():
    """The GPU check bench_e2e records before timing (float16 here: the interpreter's bf16 casts truncate)."""
    assert fn.self_check("cpu", torch.float16) is None
