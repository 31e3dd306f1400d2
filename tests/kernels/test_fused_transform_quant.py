"""Fused transform + quantize vs the PyTorch reference.

Codes must equal the reference bit for bit, or differ by one only where the reference's
pre-rounding value y / scale is within 1e-3 of a .5 tie (float32 summation order; see
tests/kernels/tolerances.py). Scales: float32 dots -> rtol 1e-5 (summation order); fp16/bf16 inputs ->
the kernel's float32 intermediate is carried as hi + lo halves (2^-16 relative for bf16) -> rtol 1e-4;
the faster variants that round T = X P2 to the half dtype -> rtol 2^-9 (ROUNDED_T_RTOL) and a wider tie band.
"""
import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from tolerances import (
    DEVICE,
    ON_GPU,
    ROUNDED_T_SCALE_RTOL,
    TIE_TOL,
    assert_codes_match,
    max_rounded_t_flips,
    rounded_t_tie_tol,
)

from flatquant.kernels._triton_utils import _round_clamp
from flatquant.kernels.reference import kron_transform_reference, transform_quantize_reference, unpack_codes
from flatquant.kernels.transform.dispatch import fused_transform_quantize


@triton.jit
def _round_kernel(v_ptr, q_ptr, N: tl.constexpr, MAXQ: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < N
    tl.store(q_ptr + r, _round_clamp(tl.load(v_ptr + r, mask=ok, other=0.0), MAXQ, INTERP), mask=ok)


def _factor(n, device, dtype=torch.float32):
    """A random well-conditioned factor (orthogonal-ish plus noise)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q + 0.1 * torch.randn(n, n, dtype=torch.float64) / n ** 0.5).to(dtype).to(device)


def _inputs(m, n, dtype, device):
    x = torch.randn(m, n) * torch.rand(m, 1) * 3
    x[0] = 0.0                       # all-zero token
    if m > 1:
        x[1, n // 3] = 1e3           # one huge outlier
    if m > 2:
        # tiny token (fp16: T's low part would fall below fp16's normal range, so less tiny there)
        x[2] = (1e-2 if dtype == torch.float16 else 1e-6) * torch.randn(n)
    return x.to(dtype).to(device)


def _check(x, p1, p2, alpha, bits, split=True, **kw):
    q, s = fused_transform_quantize(x, p1, p2, alpha, bits, split_intermediate=split, **kw)
    qr, sr = transform_quantize_reference(x, p1, p2, alpha, bits, round_intermediate=not split)
    assert q.shape == qr.shape and q.dtype == qr.dtype and s.shape == sr.shape and s.dtype == torch.float32
    # T rounded to the half dtype (not split): see ROUNDED_T_SCALE_RTOL
    rtol = 1e-5 if x.dtype == torch.float32 else 1e-4 if split else ROUNDED_T_SCALE_RTOL
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=rtol, atol=0)
    y = kron_transform_reference(x, p1, p2, round_intermediate=not split)
    pre = (y.float() / sr.unsqueeze(-1)).cpu()
    tie_tol = TIE_TOL if split else rounded_t_tie_tol(x.dtype, bits, alpha)
    flips = assert_codes_match(unpack_codes(q, bits), unpack_codes(qr, bits), pre, tie_tol)
    assert flips <= (max(1, 1e-3 * x.numel()) if split else max_rounded_t_flips(x.numel(), bits))
    return q, s


CASES = [  # (n1, n2, has_p1, has_p2)
    (16, 16, True, True),
    (24, 24, True, True),    # SmolLM2 hidden 576: non power of two, padded to 32
    (3, 32, True, True),     # odd n1: packed halves split a row
    (9, 64, True, False),    # o_proj head mixing: 9 heads, head_dim 64, P2 = identity
    (1, 40, False, True),    # n1 = 1 (prime-like): one full matrix
    (8, 20, False, True),    # only P2
    (8, 16, False, False),   # no transform: plain per-token quantization
]


@pytest.mark.parametrize("n1,n2,has_p1,has_p2", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(n1, n2, has_p1, has_p2, dtype):
    x = _inputs(6, n1 * n2, dtype, DEVICE)
    p1 = _factor(n1, DEVICE) if has_p1 else None
    p2 = _factor(n2, DEVICE) if has_p2 else None
    _check(x, p1, p2, alpha=0.9, bits=4)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_token_and_outlier(bits):
    x = _inputs(4, 24 * 24, torch.float32, DEVICE)
    q, s = _check(x, _factor(24, DEVICE), _factor(24, DEVICE), 1.0, bits)
    assert s[0].item() == pytest.approx(1e-8) and not unpack_codes(q, bits)[0].any()
    assert torch.isfinite(s).all()


def test_int8_and_fp16_and_3d_input():
    x = _inputs(5, 32 * 48, torch.float16, DEVICE).reshape(5, 1, 32 * 48)  # SmolLM2 1536 = 32 x 48
    q, s = _check(x, _factor(32, DEVICE, torch.float16), _factor(48, DEVICE, torch.float16), 0.8, 8)
    assert q.shape == (5, 1, 1536) and s.shape == (5, 1)


def test_round_intermediate_variant():
    # fp16: the interpreter's fp16 rounding matches torch's (its bf16 cast truncates).
    x = _inputs(5, 24 * 24, torch.float16, DEVICE)
    _check(x, _factor(24, DEVICE), _factor(24, DEVICE), 0.95, 4, split=False)


def test_persistent_grid_covers_all_tokens():
    x = _inputs(7, 16 * 16, torch.float32, DEVICE)
    _check(x, _factor(16, DEVICE), _factor(16, DEVICE), 1.0, 4, num_programs=2)


@pytest.mark.parametrize("n1,n2,has_p1,has_p2,bits", [
    (24, 24, True, True, 4), (3, 32, True, True, 4), (9, 64, True, False, 4), (24, 24, True, True, 8),
])
def test_tiled_corner_case_path(n1, n2, has_p1, has_p2, bits):
    """Force the corner-case kernel (factors 'too large' for on-chip memory) with 16-wide tiles."""
    x = _inputs(3, n1 * n2, torch.float32, DEVICE)
    p1 = _factor(n1, DEVICE) if has_p1 else None
    p2 = _factor(n2, DEVICE) if has_p2 else None
    _check(x, p1, p2, 0.9, bits, tiles=(16, 16, 16))
    _check(x, p1, p2, 0.9, bits, onchip_max_elements=16 * 16)


def test_errors():
    x = torch.randn(2, 15, device=DEVICE)
    with pytest.raises(ValueError):
        fused_transform_quantize(x, None, None, 1.0, 4)  # odd size cannot be packed
    with pytest.raises(ValueError):
        fused_transform_quantize(torch.randn(2, 16, device=DEVICE), torch.eye(3, device=DEVICE), None)


@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes: GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("n,single", [(4096, False), (5120, False), (11008, False), (14336, False),
                                      (28672, False), (40 * 128, True), (28 * 128, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_sizes_gpu(n, single, dtype):
    from flatquant.kernels.reference import kron_factors

    if single:
        n1, n2 = n // 128, 128
    else:
        n1, n2 = kron_factors(n)
    x = _inputs(37, n, dtype, DEVICE)
    p1 = _factor(n1, DEVICE).to(dtype)
    p2 = None if single else _factor(n2, DEVICE).to(dtype)
    _check(x, p1, p2, 0.9, 4)
    _check(x, p1, p2, 0.9, 4, tiles=(64, 64, 32))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("n1,n2,tiles", [(3, 32, None), (24, 24, None), (16, 32, None), (8, 20, (16, 16, 16))])
def test_unpacked_output_formats(fmt, n1, n2, tiles):
    """out_format="int8"/"fp8" (for the cuBLASLt routes): the same int4 codes, one per byte, natural order."""
    # fp16: the default rounds T = X P2 once to the half dtype, and the interpreter's bf16 cast truncates.
    x = _inputs(6, n1 * n2, torch.float16, DEVICE)
    p1, p2 = _factor(n1, DEVICE), _factor(n2, DEVICE)
    q, s = fused_transform_quantize(x, p1, p2, 0.9, 4, out_format=fmt, tiles=tiles)
    assert q.shape == x.shape and q.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    qr, sr = transform_quantize_reference(x, p1, p2, 0.9, 4, round_intermediate=True)
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=ROUNDED_T_SCALE_RTOL, atol=0)
    pre = (kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sr.unsqueeze(-1)).cpu()
    assert_codes_match(q.float().to(torch.int8), unpack_codes(qr, 4), pre)
    with pytest.raises(ValueError):
        fused_transform_quantize(x, p1, p2, 0.9, 8, out_format="fp8")


# ---------------------------------------------------------------- block kernel (several tokens per step) ---
# fp32 and fp16 inputs: the block kernel rounds T = X P2 once to the half dtype (the reference with
# round_intermediate=True), and the interpreter's bf16 cast truncates (bf16 is checked on the GPU below).
BLOCK_CASES = [  # (n1, n2, has_p1, has_p2)
    (16, 16, True, True),
    (24, 24, True, True),    # SmolLM2 576: padded to 32 x 32, H = 12 padded to 16
    (32, 48, True, True),    # SmolLM2 1536
    (10, 32, True, False),   # o_proj head mixing with an even head count, P2 = identity
    (6, 16, False, True),    # only P2
    (2, 16, True, True),     # smallest even n1
]


@pytest.mark.parametrize("n1,n2,has_p1,has_p2", BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_block_kernel_matches_reference(n1, n2, has_p1, has_p2, dtype, bits):
    x = _inputs(11, n1 * n2, dtype, DEVICE)  # 11 tokens: not a multiple of any tokens-per-step
    p1 = _factor(n1, DEVICE) if has_p1 else None
    p2 = _factor(n2, DEVICE) if has_p2 else None
    _check(x, p1, p2, 0.85, bits, split=False, kernel="block")


@pytest.mark.parametrize("bt,programs,extra", [(1, 3, {}), (2, 2, {}), (4, 1, {}), (8, 2, {}),
                                               (1, 2, {"num_stages": 1, "maxnreg": 128}),
                                               (1, 3, {"prefetch": True}), (4, 2, {"prefetch": True})])
def test_block_kernel_configs_cover_all_tokens(bt, programs, extra):
    """Every tokens-per-step, a persistent grid smaller than the number of blocks, one pipeline stage with a
    register cap, the next step's tile requested ahead."""
    x = _inputs(13, 16 * 32, torch.float16, DEVICE)
    q, s = _check(x, _factor(16, DEVICE), _factor(32, DEVICE), 1.0, 4, split=False, kernel="block",
                  num_programs=programs, config={"BT": bt, **extra})
    assert s[0].item() == pytest.approx(1e-8) and not unpack_codes(q, 4)[0].any()  # the all-zero token


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_block_kernel_unpacked_formats(fmt):
    x = _inputs(9, 16 * 32, torch.float16, DEVICE)
    p1, p2 = _factor(16, DEVICE), _factor(32, DEVICE)
    q, s = fused_transform_quantize(x, p1, p2, 0.9, 4, out_format=fmt, kernel="block")
    qr, sr = transform_quantize_reference(x, p1, p2, 0.9, 4, round_intermediate=True)
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=ROUNDED_T_SCALE_RTOL, atol=0)
    pre = (kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sr.unsqueeze(-1)).cpu()
    assert_codes_match(q.float().to(torch.int8), unpack_codes(qr, 4), pre)


def test_kernel_choice_and_block_errors():
    x = _inputs(3, 3 * 32, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="even n1"):
        fused_transform_quantize(x, _factor(3, DEVICE), _factor(32, DEVICE), kernel="block")  # odd n1
    x = _inputs(3, 16 * 16, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="even n1"):
        fused_transform_quantize(x, _factor(16, DEVICE), _factor(16, DEVICE), kernel="block", split_intermediate=True)
    with pytest.raises(ValueError, match="kernel must be"):
        fused_transform_quantize(x, _factor(16, DEVICE), _factor(16, DEVICE), kernel="nope")
    # forcing the per-token kernel gives the same codes as the block kernel (same rounding of T)
    p1, p2 = _factor(16, DEVICE), _factor(16, DEVICE)
    a = fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="block")
    b = fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="token")
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=0)
    assert (unpack_codes(a[0], 4).int() - unpack_codes(b[0], 4).int()).abs().max() <= 1


@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes: GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("n,single", [(576, False), (1536, False), (4096, False), (5120, False), (8192, False),
                                      (11008, False), (13824, False), (14336, False), (40 * 128, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_kernel_model_sizes_gpu(n, single, dtype):
    from flatquant.kernels.reference import kron_factors

    n1, n2 = (n // 128, 128) if single else kron_factors(n)
    x = _inputs(301, n, dtype, DEVICE)
    p1 = _factor(n1, DEVICE).to(dtype)
    p2 = None if single else _factor(n2, DEVICE).to(dtype)
    for bits in (4, 8):
        q, s = fused_transform_quantize(x, p1, p2, 0.9, bits, kernel="block")
        qr, sr = transform_quantize_reference(x, p1, p2, 0.9, bits, round_intermediate=True)
        # T = X P2 is rounded once to the half dtype: see ROUNDED_T_ULP for the bound. The flips are rare
        # (a band of 2^-8 |v|, tried first, was too narrow on the H200 at commit 614268a).
        torch.testing.assert_close(s, sr, rtol=ROUNDED_T_SCALE_RTOL, atol=0)
        pre = (kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sr.unsqueeze(-1)).cpu()
        flips = assert_codes_match(unpack_codes(q, bits), unpack_codes(qr, bits), pre,
                                   rounded_t_tie_tol(dtype, bits, 0.9))
        assert flips <= max_rounded_t_flips(x.numel(), bits)


# ------------------------------------------------------- split kernel (decode: one token over programs) ---
# The same rounding as the block kernel (T = X P2 rounded once to the half dtype): fp32 and fp16 on the CPU.
@pytest.mark.parametrize("n1,n2,has_p1,has_p2", BLOCK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_kernel_matches_reference(n1, n2, has_p1, has_p2, dtype, bits):
    x = _inputs(5, n1 * n2, dtype, DEVICE)
    p1 = _factor(n1, DEVICE) if has_p1 else None
    p2 = _factor(n2, DEVICE) if has_p2 else None
    _check(x, p1, p2, 0.85, bits, split=False, kernel="split")


@pytest.mark.parametrize("cb", [16, 32, 64])
def test_split_kernel_column_blocks_and_repeated_calls(cb):
    """Any number of programs per token (48 columns: 3, 2 or 1 programs, the last one part padding), and
    the cross-program state (generation per token, published maxima) carried correctly over calls: each
    call on fresh inputs equals the reference, and the generation moves by one per call and token when a
    token has several programs (one program per token needs no state)."""
    from flatquant.kernels.transform import split as fts

    p1, p2 = _factor(8, DEVICE), _factor(48, DEVICE)
    for m in (3, 1, 16):
        gen, _ = fts._split_state(torch.device(DEVICE))
        before = gen.clone()
        x = _inputs(m, 8 * 48, torch.float16, DEVICE)
        q, s = _check(x, p1, p2, 0.9, 4, split=False, kernel="split", config={"CB": cb})
        assert s[0].item() == pytest.approx(1e-8) and not unpack_codes(q, 4)[0].any()  # the all-zero token
        gen, _ = fts._split_state(torch.device(DEVICE))
        several = fts.split_programs(48, {"CB": cb})[1] > 1
        assert torch.equal(gen - before, (torch.arange(fts.SPLIT_CAPACITY, device=DEVICE) < m).long() * several)


def test_split_kernel_is_the_default_for_few_tokens_and_large_factors_only():
    from dataclasses import replace

    from flatquant.kernels.routes import DEFAULT_ROUTES
    from flatquant.kernels.transform import split as fts

    max_m = DEFAULT_ROUTES.split_max_m
    p1, p2 = _factor(8, DEVICE), _factor(48, DEVICE)  # tiles 16 x 64: two 32-column programs per token
    for min_tile, m, used in ((16 * 64, max_m, True), (16 * 64, max_m + 1, False),
                              (DEFAULT_ROUTES.split_min_tile, 2, False)):
        routes = replace(DEFAULT_ROUTES, split_min_tile=min_tile)
        gen, _ = fts._split_state(torch.device(DEVICE))
        before = int(gen.sum())
        x = _inputs(m, 8 * 48, torch.float16, DEVICE)
        _check(x, p1, p2, 0.9, 4, split=False, routes=routes)
        gen, _ = fts._split_state(torch.device(DEVICE))
        assert (int(gen.sum()) > before) == used
    # a column block of at least n2: one program per token, the cross-program state left alone
    assert fts.split_programs(48) == (32, 2) and fts.split_programs(48, {"CB": 64}) == (64, 1)
    gen, _ = fts._split_state(torch.device(DEVICE))
    before = gen.clone()
    _check(_inputs(3, 8 * 48, torch.float16, DEVICE), _factor(8, DEVICE), _factor(48, DEVICE), 0.9, 4, split=False,
           kernel="split", config={"CB": 64})
    assert torch.equal(fts._split_state(torch.device(DEVICE))[0], before)
    x = _inputs(fts.SPLIT_CAPACITY + 1, 8 * 48, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="at most"):
        fused_transform_quantize(x, p1, p2, kernel="split")
    with pytest.raises(ValueError, match="even n1"):
        fused_transform_quantize(x[:2, :96], _factor(3, DEVICE), _factor(32, DEVICE), kernel="split")


@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes and the cross-program wait: GPU only")
@pytest.mark.parametrize("n", [576, 1536, 4096, 5120, 8192, 11008, 14336])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_split_kernel_model_sizes_gpu(n, m):
    """bf16 at decode sizes, the same bounds as the block kernel's GPU test; three calls in a row, the
    third one replayed from a CUDA graph (the cross-program state lives on the device)."""
    from flatquant.kernels.reference import kron_factors

    n1, n2 = kron_factors(n)
    p1 = _factor(n1, DEVICE).to(torch.bfloat16)
    p2 = _factor(n2, DEVICE).to(torch.bfloat16)
    x = _inputs(m, n, torch.bfloat16, DEVICE)
    calls = [lambda: fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="split")] * 2
    calls[0]()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_transform_quantize(x, p1, p2, 0.9, 4, kernel="split")

    def replay():
        graph.replay()
        return captured
    for call in calls + [replay]:
        x.copy_(_inputs(m, n, torch.bfloat16, DEVICE))
        q, s = call()
        torch.cuda.synchronize()
        qr, sr = transform_quantize_reference(x, p1, p2, 0.9, 4, round_intermediate=True)
        torch.testing.assert_close(s, sr, rtol=ROUNDED_T_SCALE_RTOL, atol=0)
        pre = (kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sr.unsqueeze(-1)).cpu()
        assert_codes_match(unpack_codes(q, 4), unpack_codes(qr, 4), pre, rounded_t_tie_tol(torch.bfloat16, 4, 0.9))


@pytest.mark.skipif(not ON_GPU, reason="the inline division is GPU code (the interpreter uses libdevice's)")
def test_inline_ieee_division_matches_torch_bit_for_bit():
    """`_div_rn` (the division's fast path written out, no slow-path call) equals torch's float32 division
    bit for bit where the kernels divide: amax * alpha / maxq (maxq 7 and 127), 1 / scale for scales from
    1e-8 up, and activations over a scale, across 60 decades of magnitude."""
    import triton
    import triton.language as tl

    from flatquant.kernels._triton_utils import _div_rn

    @triton.jit
    def _div_kernel(a_ptr, b_ptr, q_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < N
        a = tl.load(a_ptr + r, mask=ok, other=1.0)
        b = tl.load(b_ptr + r, mask=ok, other=1.0)
        tl.store(q_ptr + r, _div_rn(a, b, False), mask=ok)

    g = torch.Generator().manual_seed(0)
    n = 1 << 20

    def magnitudes(lo, hi):
        return (torch.rand(n, generator=g) * (hi - lo) + lo).exp2() * (1 + torch.rand(n, generator=g))
    cases = [(magnitudes(-100, 100), torch.full((n,), 7.0)), (magnitudes(-100, 100), torch.full((n,), 127.0)),
             (torch.ones(n), magnitudes(-27, 60)),
             (magnitudes(-100, 100) * torch.randn(n, generator=g).sign(), magnitudes(-27, 60))]
    for a, b in cases:
        a, b = a.float().to(DEVICE), b.float().to(DEVICE)
        q = torch.empty_like(a)
        _div_kernel[(triton.cdiv(n, 1024),)](a, b, q, N=n, BLOCK=1024)
        assert torch.equal(q.view(torch.int32), (a / b).view(torch.int32))


@pytest.mark.parametrize("maxq", [7, 127])
def test_round_clamp_matches_torch_round_and_clamp(maxq):
    """`_round_clamp` (on the GPU: one addition of 1.5 * 2**23, a clamp of the sum and the bits; in the
    interpreter: clamp, rint, clamp) equals torch.round(v).clamp(-maxq - 1, maxq) on ties (±0.5 … ±8.5,
    ±126.5), values near and far beyond the bounds, 2**22 and up, ±inf, denormals, and random floats over
    many magnitudes. On the GPU a NaN gives -maxq - 1 (min/max return the non-NaN operand; the kernels
    never produce a NaN from finite inputs); numpy's, in the interpreter, propagate it."""
    from flatquant.kernels._triton_utils import interpreting

    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-130, 131, dtype=torch.float32) + 0.5
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0 ** 22, -2.0 ** 22, 2.0 ** 22 + 1, 2.0 ** 23 + 1, -2.0 ** 24,
                            1.5 * 2.0 ** 23, -1.5 * 2.0 ** 23, 3e38, -3e38, float("inf"), float("-inf"),
                            maxq + 0.4999999, maxq + 0.5, -maxq - 1.5, -maxq - 1.4999999])
    rand = torch.randn(1 << 14, generator=g) * (2.0 ** (torch.rand(1 << 14, generator=g) * 40 - 20))
    v = torch.cat([ties, -ties, special, rand, ties.nextafter(torch.tensor(0.0)), ties.nextafter(torch.tensor(1e9))])
    v = v.float().to(DEVICE)
    q = torch.empty(v.shape, dtype=torch.int32, device=DEVICE)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, q, N=v.numel(), MAXQ=maxq, INTERP=interpreting(), BLOCK=1024)
    assert torch.equal(q.cpu(), torch.round(v).clamp(-maxq - 1, maxq).int().cpu())
    if interpreting():
        return
    nan = torch.full((16,), float("nan"), device=DEVICE)
    qn = torch.empty(16, dtype=torch.int32, device=DEVICE)
    _round_kernel[(1,)](nan, qn, N=16, MAXQ=maxq, INTERP=interpreting(), BLOCK=16)
    assert torch.all(qn.cpu() == -maxq - 1)
