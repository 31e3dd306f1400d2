"""Fused Kronecker transform + per-token symmetric quantization (Triton), one pass over activations.

For each token x (n = n1 * n2): X = x.reshape(n1, n2), Y = P1ᵀ X P2 on chip, scale =
max(alpha * max|Y| / maxq, 1e-8), codes = clamp(round_half_even(Y / scale)), written as packed int4
(layout in `flatquant.kernels.reference`: byte j = element j | element j + n/2 << 4) or int8, plus the
float32 scale. Semantics: `reference.transform_quantize_reference`.

Output-tile trick (so that packing needs no shuffles): the packed byte b holds y[b] and y[b + n/2].
With H = (n/2) // n2 and S = (n/2) % n2 (S is 0 when n1 is even, n2/2 when n1 is odd):
- low nibbles  = rows [0, H (+1 if S)) of Y: Y_lo = P1ᵀ[rows 0..] · T,            T = X P2
- high nibbles = byte (r, c) -> y[(H + r) n2 + S + c]: with T_roll = X P2[:, (c + S) % n2],
  Y_hi[r, c] = P1ᵀ[H + r] · T_roll[:, c] if c < n2 - S else P1ᵀ[H + r + 1] · T_roll[:, c].
So both nibble tiles come out of dots with row slices of P1ᵀ and (rolled) column slices of P2, in the
same (r, c) positions, and byte (r, c) = lo | hi << 4 is stored at r * n2 + c (masked b < n/2).

Kernels (`fused_transform_quantize` picks one):
- `_fused_block_kernel` (default for even n1): several tokens per step, two large dots.
- `fused_transform_split._fused_split_kernel` (default at decode, <= SPLIT_MAX_M tokens with 128 x 128
  factor tiles): one token's Y columns spread over several programs, the per-token max met through tagged
  slots (or, with CB >= n2, one program per token and no wait).
- `fused_transform_chunked` (default at prefill where a factor is not a power of two).
- `_fused_onchip_kernel` (per-token design, paper Fig. 8a; odd n1 and split_intermediate=True): P1, P2
  loaded once per program and kept on chip; a persistent grid walks the tokens; one pass (load, 2-3
  dots, amax, quantize, store).
- `_fused_tiled_kernel` (corner cases, Fig. 8b/c): when the factors are too large to sit on chip, the
  n2 reduction and the output columns / rows are tiled (BK, BN, BR) and P1/P2 tiles stream from L2.
  The per-token max needs the whole row, so the kernel runs two passes over the tiles (amax, then
  quantize + store), recomputing the tiles instead of writing the intermediate to global memory;
  the token (n * 2 bytes) stays in L2 between the two passes, so HBM still sees one read.
P2 = None (single-sided, e.g. o_proj head mixing: P1 = heads x heads, n2 = head_dim) skips the first
product; P1 = None uses an identity P1.

Precision: the dots multiply in the activation dtype (fp16/bf16 on tensor cores; float32 inputs use
exact IEEE float32 dots). The intermediate T is float32; for the second product it is split into
hi + lo half-precision parts (two dots: ~float32 accuracy, `split_intermediate=True`) or rounded
once to the half dtype (`split_intermediate=False`, the default: faster, matches the reference with
`round_intermediate=True` except where T's rounding flips).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import (
    mask_and,
    _div_rn,
    _mm,
    _mm_f32rhs,
    _quantize,
    _round_clamp_product,
    _scale,
    gdc_launch_dependents,
    interpreting,
    next_pow2,
    num_sms,
    triton_dtype,
)
from flatquant.kernels.reference import dot_dtype_for, kron_factors

# Factors whose padded tiles exceed this many elements (X / T: N1P x N2P, P2: N2P x N2P) take the
# tiled corner-case kernel. 128 x 128 holds every Llama/Qwen size (n2 <= 128 up to n = 16384).
ONCHIP_MAX_ELEMENTS = 128 * 128
# Tile sizes of the corner-case kernel.
TILED_BLOCK_N = 64
TILED_BLOCK_K = 64
TILED_BLOCK_R = 64
# Persistent grid: programs per SM.
PROGRAMS_PER_SM = 4
# Block kernel (several tokens per step): X tile at most this many elements, dot M sides at most this
# many rows (register budget of the float32 intermediates at 8 warps), persistent programs per SM.
BLOCK_MAX_ELEMENTS = 64 * 128
BLOCK_MAX_ROWS = 128
BLOCK_PROGRAMS_PER_SM = 2
# Request the next step's X tile before this step's dots (register prefetch; see `_fused_block_kernel`).
BLOCK_PREFETCH = False
_BLOCK_STAGES: dict = {}  # launch shape -> pipeline stages that fit in shared memory
# Split kernel (decode; `fused_transform_split.py`): calls with at most this many tokens. One program per
# token has only its latency to offer (a few us), so few tokens are faster spread over programs; the G
# programs of a token must be resident together (G * tokens <= SMs).
SPLIT_MAX_M = 16
# ... and only for padded factor tiles of at least this many elements: in the 52b9cb8 sweep (H200,
# results/archive/kernels-h200-52b9cb8/) the split kernel beat the block kernel at 14336 = 112 x 128
# (tiles 128 x 128: 9.4-9.9 vs 10.5-11.6 us per call) but not at 4096 = 64 x 64 (7.8 vs 7.4 us).
SPLIT_MIN_TILE = 128 * 128
# Prefill where a factor is not a power of two (5120 = 64 x 80, 11008 = 86 x 128, 13824 = 108 x 128,
# 14336 = 112 x 128) takes the chunked kernel (`fused_transform_chunked.py`: factors padded to a multiple of
# 16, not to a power of two). Measured faster than the block kernel at all four sizes and all prefill
# batches on the H100 at ce40e0a (b = 64: 62 / 57 / 62 / 66 % of copy bandwidth against 59 / 48 / 60 /
# 64 %; results/archive/kernels-h100-ce40e0a/bench_fused_transform.json, the fused_chunked rows).
CHUNKED_DEFAULT = True


# Where the kernels let a programmatic dependent (the decode GEMM, launched with PDL) start: "start" (at
# once: its launch and first weight loads overlap this kernel), "end" (after the stores are issued) or
# None (never: it starts when this grid completes). The dependent waits for this grid's writes either way.
PDL_TRIGGER = "start"


def pdl_trigger() -> int:
    """PDL_TRIGGER as the kernels' TRIGGER constexpr (0 none, 1 start, 2 end)."""
    if PDL_TRIGGER not in (None, "start", "end"):
        raise ValueError(f"PDL_TRIGGER must be None, 'start' or 'end', got {PDL_TRIGGER!r}")
    return {None: 0, "start": 1, "end": 2}[PDL_TRIGGER]


@triton.jit
def _pdl_trigger(TRIGGER: tl.constexpr, HERE: tl.constexpr, INTERP: tl.constexpr):
    """Let a decode GEMM launched as a programmatic dependent start (griddepcontrol.launch_dependents) if
    this is the point TRIGGER names (`pdl_trigger`: 1 start, 2 end); it still waits for all our writes in
    gdc_wait."""
    if TRIGGER == HERE and not INTERP:
        gdc_launch_dependents()


@triton.jit
def _code_cast(q, OUT_T: tl.constexpr):
    """Unpacked codes as the output wants them: int8, or float8 e4m3 (|q| <= 8 is exact there) so that
    the cuBLASLt FP8 GEMM can read them without a conversion pass."""
    if OUT_T == tl.int8:
        return q.to(tl.int8)
    else:
        return q.to(tl.float32).to(OUT_T)


@triton.jit
def _fused_onchip_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha, NITER,
                         NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr,
                         N2P: tl.constexpr, RP: tl.constexpr, RLO: tl.constexpr, H: tl.constexpr,
                         S: tl.constexpr, HAS_P2: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
                         IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                         TRIGGER: tl.constexpr):
    NH: tl.constexpr = (N1 * N2) // 2
    _pdl_trigger(TRIGGER, 1, INTERP)  # at the start (PDL_TRIGGER "start")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    r = tl.arange(0, RP)
    xmask = (i[:, None] < N1) & (j[None, :] < N2)
    # ---- factors, loaded once per program
    if HAS_P2:
        pm = (j[:, None] < N2) & (j[None, :] < N2)
        P2 = tl.load(p2_ptr + j[:, None] * N2 + j[None, :], mask=pm, other=0.0).to(DT)
        if S != 0:
            P2r = tl.load(p2_ptr + j[:, None] * N2 + (j[None, :] + S) % N2, mask=pm, other=0.0).to(DT)
    a = i[None, :]
    rows = r[:, None]
    # P1ᵀ row slices: P1t[r, a] = P1[a, row0 + r]
    P1lo = tl.load(p1_ptr + a * N1 + rows, mask=(rows < RLO) & (a < N1), other=0.0).to(DT)
    if PACK:
        P1A = tl.load(p1_ptr + a * N1 + (H + rows), mask=(rows < RLO) & (H + rows < N1) & (a < N1),
                      other=0.0).to(DT)
        if S != 0:
            P1B = tl.load(p1_ptr + a * N1 + (H + 1 + rows), mask=(rows < RLO) & (H + 1 + rows < N1) & (a < N1),
                          other=0.0).to(DT)
    c = j[None, :]
    if PACK:
        valid = (rows * N2 + c < NH) & (c < N2) & (rows < RLO)
    else:
        valid = (rows < N1) & (c < N2)
    for it in range(NITER_C if INTERP else NITER):  # interpreter: a Python int (no assignment)
        t = (pid + it * nprog).to(tl.int64)
        tok_ok = t < M
        xb = x_ptr + t * stride_x
        X = tl.load(xb + i[:, None] * N2 + j[None, :], mask=mask_and(xmask, tok_ok), other=0.0).to(DT)
        if HAS_P2:
            T = _mm(X, P2, IS_F32, INTERP)
        else:
            T = X.to(tl.float32)
        Ylo = _mm_f32rhs(P1lo, T, DT, IS_F32, SPLIT, INTERP)
        amax = tl.max(tl.max(tl.where(valid, tl.abs(Ylo), 0.0), axis=1), axis=0)
        if PACK:
            if S == 0:
                Yhi = _mm_f32rhs(P1A, T, DT, IS_F32, SPLIT, INTERP)
            else:
                if HAS_P2:
                    Tr = _mm(X, P2r, IS_F32, INTERP)
                else:
                    Tr = tl.load(xb + i[:, None] * N2 + (j[None, :] + S) % N2, mask=mask_and(xmask, tok_ok),
                                 other=0.0).to(tl.float32)
                YA = _mm_f32rhs(P1A, Tr, DT, IS_F32, SPLIT, INTERP)
                YB = _mm_f32rhs(P1B, Tr, DT, IS_F32, SPLIT, INTERP)
                Yhi = tl.where(c < N2 - S, YA, YB)
            amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(Yhi), 0.0), axis=1), axis=0))
        s = _scale(amax, alpha, MAXQ, INTERP)
        tl.store(scale_ptr + t, s, mask=tok_ok)
        qlo = _quantize(Ylo, s, MAXQ, INTERP)
        ob = out_ptr + t * stride_o
        if PACK:
            qhi = _quantize(Yhi, s, MAXQ, INTERP)
            byte = (qlo & 15) | ((qhi & 15) << 4)
            tl.store(ob + rows * N2 + c, byte.to(tl.uint8), mask=mask_and(valid, tok_ok))
        else:
            tl.store(ob + rows * N2 + c, _code_cast(qlo, ob.dtype.element_ty), mask=mask_and(valid, tok_ok))
    _pdl_trigger(TRIGGER, 2, INTERP)  # after the stores (PDL_TRIGGER "end")


@triton.jit
def _fused_tiled_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha, NITER,
                        NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr,
                        RTOT: tl.constexpr, RLO: tl.constexpr, H: tl.constexpr, S: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                        HAS_P2: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
                        IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                        TRIGGER: tl.constexpr):
    NH: tl.constexpr = (N1 * N2) // 2
    _pdl_trigger(TRIGGER, 1, INTERP)  # at the start (PDL_TRIGGER "start")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, N1P)
    cn = tl.arange(0, BN)
    kb = tl.arange(0, BK)
    rb = tl.arange(0, BR)
    a = i[None, :]
    for it in range(NITER_C if INTERP else NITER):  # interpreter: a Python int (no assignment)
        t = (pid + it * nprog).to(tl.int64)
        tok_ok = t < M
        xb = x_ptr + t * stride_x
        ob = out_ptr + t * stride_o
        amax = tl.full((), 0.0, tl.float32)
        s = tl.full((), 1.0, tl.float32)
        for ps in tl.static_range(2):  # pass 0: amax; pass 1: quantize + store
            for c0 in range(0, N2, BN):
                cols = c0 + cn
                colsr = (cols + S) % N2
                cm = cols < N2
                if HAS_P2:
                    T = tl.zeros((N1P, BN), dtype=tl.float32)
                    Tr = tl.zeros((N1P, BN), dtype=tl.float32)
                    for k0 in range(0, N2, BK):
                        kk = k0 + kb
                        X = tl.load(xb + i[:, None] * N2 + kk[None, :],
                                    mask=mask_and((i[:, None] < N1) & (kk[None, :] < N2), tok_ok), other=0.0).to(DT)
                        pmask = (kk[:, None] < N2) & cm[None, :]
                        P2 = tl.load(p2_ptr + kk[:, None] * N2 + cols[None, :], mask=pmask, other=0.0).to(DT)
                        T += _mm(X, P2, IS_F32, INTERP)
                        if PACK and S != 0:
                            P2r = tl.load(p2_ptr + kk[:, None] * N2 + colsr[None, :], mask=pmask,
                                          other=0.0).to(DT)
                            Tr += _mm(X, P2r, IS_F32, INTERP)
                else:
                    xm = mask_and((i[:, None] < N1) & cm[None, :], tok_ok)
                    T = tl.load(xb + i[:, None] * N2 + cols[None, :], mask=xm, other=0.0).to(DT).to(tl.float32)
                    Tr = tl.load(xb + i[:, None] * N2 + colsr[None, :], mask=xm, other=0.0).to(DT).to(tl.float32)
                for r0 in range(0, RTOT, BR):
                    rows = (r0 + rb)[:, None]
                    c = cols[None, :]
                    P1lo = tl.load(p1_ptr + a * N1 + rows, mask=(rows < RTOT) & (a < N1), other=0.0).to(DT)
                    Ylo = _mm_f32rhs(P1lo, T, DT, IS_F32, SPLIT, INTERP)
                    if PACK:
                        valid = (rows * N2 + c < NH) & (c < N2) & (rows < RLO)
                        P1A = tl.load(p1_ptr + a * N1 + (H + rows), mask=(rows < RLO) & (H + rows < N1) & (a < N1),
                                      other=0.0).to(DT)
                        if S == 0:
                            Yhi = _mm_f32rhs(P1A, T, DT, IS_F32, SPLIT, INTERP)
                        else:
                            P1B = tl.load(p1_ptr + a * N1 + (H + 1 + rows),
                                          mask=(rows < RLO) & (H + 1 + rows < N1) & (a < N1), other=0.0).to(DT)
                            YA = _mm_f32rhs(P1A, Tr, DT, IS_F32, SPLIT, INTERP)
                            YB = _mm_f32rhs(P1B, Tr, DT, IS_F32, SPLIT, INTERP)
                            Yhi = tl.where(c < N2 - S, YA, YB)
                    else:
                        valid = (rows < N1) & (c < N2)
                    if ps == 0:
                        amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(Ylo), 0.0), axis=1), axis=0))
                        if PACK:
                            amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(Yhi), 0.0), axis=1),
                                                           axis=0))
                    else:
                        qlo = _quantize(Ylo, s, MAXQ, INTERP)
                        if PACK:
                            qhi = _quantize(Yhi, s, MAXQ, INTERP)
                            byte = (qlo & 15) | ((qhi & 15) << 4)
                            tl.store(ob + rows * N2 + c, byte.to(tl.uint8), mask=mask_and(valid, tok_ok))
                        else:
                            tl.store(ob + rows * N2 + c, _code_cast(qlo, ob.dtype.element_ty), mask=mask_and(valid, tok_ok))
            if ps == 0:
                s = _scale(amax, alpha, MAXQ, INTERP)
                tl.store(scale_ptr + t, s, mask=tok_ok)
    _pdl_trigger(TRIGGER, 2, INTERP)  # after the stores (PDL_TRIGGER "end")


@triton.jit
def load_block_factors(p1_ptr, p2_ptr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr,
                       H: tl.constexpr, HP: tl.constexpr, HAS_P2: tl.constexpr, DT: tl.constexpr):
    """The block kernel's factor tiles, zero-padded, in the dot dtype: P1[:, :H] and P1[:, H:] ((N1P, HP)
    each) and P2 ((N2P, N2P); P1lo as a placeholder when there is none: `block_codes` then skips it)."""
    j = tl.arange(0, N2P)
    a = tl.arange(0, N1P)
    h = tl.arange(0, HP)
    qm = (a[:, None] < N1) & (h[None, :] < H)
    P1lo = tl.load(p1_ptr + a[:, None] * N1 + h[None, :], mask=qm, other=0.0).to(DT)
    P1hi = tl.load(p1_ptr + a[:, None] * N1 + (H + h)[None, :], mask=qm, other=0.0).to(DT)
    if HAS_P2:
        pm = (j[:, None] < N2) & (j[None, :] < N2)
        P2 = tl.load(p2_ptr + j[:, None] * N2 + j[None, :], mask=pm, other=0.0).to(DT)
    else:
        P2 = P1lo
    return P1lo, P1hi, P2


@triton.jit
def block_codes(X, P2, P1lo, P1hi, alpha, BT: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr,
                HAS_P2: tl.constexpr, IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr,
                INTERP: tl.constexpr):
    """The block kernel's math for BT tokens X ((BT*N1P, N2P), rows = (token, i)): codes Yᵀ_lo / Yᵀ_hi
    ((BT*N2P, HP) int32, rows = (token, j): element (j, h) is the low / high nibble of packed byte h*n2 + j)
    and the (BT,) scales (see `_fused_block_kernel`). Also used by `fused_decode.py`."""
    if HAS_P2:
        V = _mm(X, P2, IS_F32, INTERP).to(DT)
    else:
        V = X
    Vt = tl.reshape(tl.permute(tl.reshape(V, (BT, N1P, N2P)), (0, 2, 1)), (BT * N2P, N1P))
    Ylo = _mm(Vt, P1lo, IS_F32, INTERP)
    Yhi = _mm(Vt, P1hi, IS_F32, INTERP)
    # Row maxima in the dot's own layout first; only the (BT*N2P,) vector changes shape.
    rmax = tl.maximum(tl.max(tl.abs(Ylo), axis=1), tl.max(tl.abs(Yhi), axis=1))
    amax = tl.max(tl.reshape(rmax, (BT, N2P)), axis=1)
    s = _scale(amax, alpha, MAXQ, INTERP)
    # One IEEE division per token, then products: y * (1/s) differs from y / s by at most one float32
    # ulp, which can move a code only at an exact .5 tie (as summation order can).
    inv = tl.reshape(tl.broadcast_to(_div_rn(tl.full((BT,), 1.0, tl.float32), s, INTERP)[:, None], (BT, N2P)),
                     (BT * N2P,))[:, None]
    return _round_clamp_product(Ylo, inv, MAXQ, INTERP), _round_clamp_product(Yhi, inv, MAXQ, INTERP), s


@triton.jit
def _load_block(x_ptr, tok, ri, j, M, stride_x, N1: tl.constexpr, N2: tl.constexpr, DT: tl.constexpr):
    """The block kernel's X tile: rows (token tok, factor row ri), columns j; zeros past M and the factors."""
    xm = (tok[:, None] < M) & (ri[:, None] < N1) & (j[None, :] < N2)
    return tl.load(x_ptr + tok[:, None] * stride_x + ri[:, None] * N2 + j[None, :], mask=xm, other=0.0).to(DT)


@triton.jit
def _fused_block_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha, NITER,
                        NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr,
                        N2P: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
                        HAS_P2: tl.constexpr, PACK: tl.constexpr, PREFETCH: tl.constexpr, IS_F32: tl.constexpr,
                        MAXQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr, TRIGGER: tl.constexpr):
    """BT tokens per step, two large dots instead of per-token small ones (even n1 only):
      V  = X P2                  on the (BT*N1P, N2P) view of BT tokens (rows = (token, i)), contiguous load
      Vᵀ = per-token transpose   (BT*N2P, N1P): rows = (token, j), an on-chip layout change
      Yᵀ_lo = Vᵀ P1[:, :H], Yᵀ_hi = Vᵀ P1[:, H:]   ->  Yᵀ_lo[(t, j), h] = Y_t[h, j], Yᵀ_hi[(t, j), h] = Y_t[H + h, j]
    Element (h, j) of Y_lo is y[h*n2 + j] and of Y_hi is y[h*n2 + j + n/2]: exactly the two nibbles of
    packed byte h*n2 + j, so packing needs no shuffle. V is rounded once to the half dtype before the
    second dot (the reference with round_intermediate=True). Padded rows/columns are exact zeros.
    With PREFETCH the next step's X tile is requested (in registers) before this step's dots, instead of
    Triton's software pipelining of the loads (num_stages buffers in shared memory, cp.async)."""
    _pdl_trigger(TRIGGER, 1, INTERP)  # at the start (PDL_TRIGGER "start")
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    j = tl.arange(0, N2P)
    h = tl.arange(0, HP)
    P1lo, P1hi, P2 = load_block_factors(p1_ptr, p2_ptr, N1, N2, N1P, N2P, H, HP, HAS_P2, DT)
    r = tl.arange(0, BT * N1P)          # X rows: (token r // N1P, factor row r % N1P)
    rt = r // N1P
    ri = r % N1P
    q = tl.arange(0, BT * N2P)          # Yᵀ rows: (token q // N2P, column q % N2P)
    qt = q // N2P
    qj = q % N2P
    tb = tl.arange(0, BT)
    if PREFETCH:
        Xn = _load_block(x_ptr, pid.to(tl.int64) * BT + rt, ri, j, M, stride_x, N1, N2, DT)
    for it in range(NITER_C if INTERP else NITER):  # interpreter: a Python int (no assignment)
        t0 = (pid + it * nprog).to(tl.int64) * BT
        if PREFETCH:
            X = Xn
            Xn = _load_block(x_ptr, t0 + nprog * BT + rt, ri, j, M, stride_x, N1, N2, DT)  # this program's next step
        else:
            X = _load_block(x_ptr, t0 + rt, ri, j, M, stride_x, N1, N2, DT)
        qlo, qhi, s = block_codes(X, P2, P1lo, P1hi, alpha, BT, N1P, N2P, HAS_P2, IS_F32, MAXQ, DT, INTERP)
        tl.store(scale_ptr + t0 + tb, s, mask=t0 + tb < M)
        otok = t0 + qt
        om = (otok[:, None] < M) & (qj[:, None] < N2) & (h[None, :] < H)
        ob = out_ptr + otok[:, None] * stride_o + h[None, :] * N2 + qj[:, None]
        if PACK:
            tl.store(ob, ((qlo & 15) | ((qhi & 15) << 4)).to(tl.uint8), mask=om)
        else:
            tl.store(ob, _code_cast(qlo, ob.dtype.element_ty), mask=om)
            tl.store(ob + H * N2, _code_cast(qhi, ob.dtype.element_ty), mask=om)
    _pdl_trigger(TRIGGER, 2, INTERP)  # after the stores (PDL_TRIGGER "end")


def _plan(n: int, p1, p2, bits: int, packed: bool = True):
    if p1 is not None:
        n1 = p1.shape[0]
    elif p2 is not None:
        n1 = n // p2.shape[0]
    else:
        n1 = kron_factors(n)[0]
    n2 = n // n1
    if n1 * n2 != n:
        raise ValueError(f"factor sizes do not divide the hidden size {n}")
    if p1 is not None and tuple(p1.shape) != (n1, n1):
        raise ValueError(f"P1 must be ({n1}, {n1}), got {tuple(p1.shape)}")
    if p2 is not None and tuple(p2.shape) != (n2, n2):
        raise ValueError(f"P2 must be ({n2}, {n2}), got {tuple(p2.shape)}")
    pack = bits == 4 and packed
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if pack and n % 2:
        raise ValueError(f"int4 packing needs an even hidden size, got {n}")
    nh = n // 2
    h, s = (nh // n2, nh % n2) if pack else (0, 0)
    rlo = (h + (1 if s else 0)) if pack else n1
    return n1, n2, pack, h, s, rlo


def block_config(n1p: int, n2p: int) -> dict:
    """Tokens per step and launch shape of `_fused_block_kernel`: as many tokens as keep the X tile at
    most BLOCK_MAX_ELEMENTS and both dot M sides (BT*N1P, BT*N2P) at most BLOCK_MAX_ROWS."""
    bt = max(1, min(BLOCK_MAX_ELEMENTS // (n1p * n2p), BLOCK_MAX_ROWS // max(n1p, n2p)))
    bt = 1 << (bt.bit_length() - 1)  # a power of two (tile sizes are)
    # 8 warps (two warpgroups) once the first dot has >= 128 rows; 3 load stages where shared memory
    # allows (the launcher drops to 2, then 1, on an out-of-resources error). Both from the H200 sweep
    # (benchmarks/bench_fused_transform.py --sweep; results/archive/kernels-h200-smoke/sweep.json).
    return dict(BT=bt, num_warps=8 if bt * n1p >= 128 else 4, num_stages=3, programs_per_sm=BLOCK_PROGRAMS_PER_SM,
                prefetch=BLOCK_PREFETCH)


def _launch_block(x2, p1c, p2c, has_p2: bool, out, scale, alpha32: float, n1: int, n2: int, pack: bool, bits: int,
                  dd: torch.dtype, interp: bool, num_programs: int | None, config: dict | None) -> None:
    """Launch `_fused_block_kernel` (config: `block_config` with the caller's overrides)."""
    m = x2.shape[0]
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    cfg = {**block_config(n1p, n2p), **(config or {})}
    bt = int(cfg["BT"])
    if "BT" not in (config or {}):  # few tokens (decode): one token block per SM before fewer programs
        bt = min(bt, next_pow2(triton.cdiv(m, num_sms(x2.device)), minimum=1))
    nblk = triton.cdiv(m, bt)
    grid0 = num_programs or min(nblk, num_sms(x2.device) * int(cfg["programs_per_sm"]))
    niter = triton.cdiv(nblk, grid0)
    consts = dict(NITER_C=niter if interp else 1, N1=n1, N2=n2, N1P=n1p, N2P=n2p, H=n1 // 2, HP=next_pow2(n1 // 2),
                  BT=bt, HAS_P2=has_p2, PACK=pack, PREFETCH=bool(cfg.get("prefetch", False)),
                  IS_F32=dd == torch.float32, MAXQ=2 ** (bits - 1) - 1, DT=triton_dtype(dd), INTERP=interp,
                  TRIGGER=pdl_trigger(), num_warps=int(cfg["num_warps"]))
    regs = {"maxnreg": int(cfg["maxnreg"])} if cfg.get("maxnreg") else {}
    key = (n1p, n2p, bt, int(cfg["num_warps"]), int(cfg["num_stages"]), regs.get("maxnreg"), consts["PREFETCH"], dd)
    stages = _BLOCK_STAGES.get(key, int(cfg["num_stages"]))
    while True:
        try:
            _fused_block_kernel[(grid0,)](x2, p1c, p2c, out, scale, m, x2.stride(0), out.stride(0), alpha32, niter,
                                          num_stages=stages, **regs, **consts)
            break
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1  # shared memory: fewer pipelined X tiles
    _BLOCK_STAGES[key] = stages


def default_kernel(m: int, n1: int, n2: int, has_p2: bool, device: torch.device, onchip: bool = True,
                   split_intermediate: bool = False, config: dict | None = None) -> str:
    """The kernel `fused_transform_quantize` takes for m tokens of n1 x n2 factors when none is named: with an
    even n1, factors on chip and split_intermediate off, "split" for at most SPLIT_MAX_M tokens (decode) with
    padded factor tiles of at least SPLIT_MIN_TILE elements, "chunked" at prefill where a factor is not a power
    of two and `chunked_supported` (CHUNKED_DEFAULT), else "block"; otherwise "token" with the factors on chip,
    else "tiled"."""
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    if not (onchip and n1 % 2 == 0 and not split_intermediate):
        return "token" if onchip else "tiled"
    if m <= SPLIT_MAX_M and n1p * n2p >= SPLIT_MIN_TILE:
        from flatquant.kernels.fused_transform_split import split_programs

        if interpreting() or m * split_programs(n2, config)[1] <= num_sms(device):
            return "split"
    if m > SPLIT_MAX_M and CHUNKED_DEFAULT and (n1p != n1 or n2p != n2):
        from flatquant.kernels.fused_transform_chunked import chunked_supported

        if chunked_supported(n1, n2, has_p2):
            return "chunked"
    return "block"


def fused_transform_quantize(x: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                             alpha: float = 1.0, bits: int = 4, *, split_intermediate: bool = False,
                             onchip_max_elements: int | None = None, tiles: tuple[int, int, int] | None = None,
                             num_programs: int | None = None, out_format: str | None = None,
                             kernel: str | None = None, config: dict | None = None):
    """Triton fused transform + quantize. x (..., n) contiguous-able, fp16/bf16/fp32, on CUDA (or any
    device under TRITON_INTERPRET=1). Returns (stored codes, scale) like the reference:
    (..., n/2) uint8 packed int4 (or (..., n) int8 for bits=8) and float32 scale of shape x.shape[:-1].
    P1 / P2 are read row-major in the activation's dot dtype; others (another dtype, or a column-major Q
    from torch.linalg.qr) are converted on every call, one extra kernel each, which at decode costs as
    much as the transform itself. `W4A4Linear` caches converted factors; direct callers should too.

    split_intermediate: keep T = X P2 in float32 as two half-precision parts for the second product
    (per-token kernel only, ~float32 accuracy) instead of rounding it once to the half dtype (default;
    the same rounding as the model's own bf16 matmuls).

    kernel: None picks one (`default_kernel`). When n1 is even, the factors fit on chip and
    split_intermediate is off: "split" (`_fused_split_kernel`, each token over several programs; one with
    config CB >= n2) for at most SPLIT_MAX_M tokens (decode) with padded factor tiles of at least
    SPLIT_MIN_TILE elements; "chunked" (`fused_transform_chunked.py`, n1 in power-of-two chunks) at
    prefill where a factor is not a power of two; else "block" (`_fused_block_kernel`, several tokens per
    step, big dots). Otherwise "token" (per-token on-chip kernel) when the factors fit on chip, else "tiled"
    (corner cases). config: block-kernel overrides ({"BT", "num_warps", "num_stages", "programs_per_sm",
    "maxnreg", "prefetch"}; see `block_config`; maxnreg caps the registers per thread, e.g. so that two
    programs fit on an SM), chunked-kernel overrides (`chunked_config`), split-kernel overrides ({"CB",
    "num_warps"}: Y columns per program, warps).
    onchip_max_elements / tiles (BN, BK, BR) override the on-chip vs tiled choice (tests force the
    corner-case path with small values).

    out_format: None / "packed" (the stored format above), or, for the cuBLASLt GEMM routes, the same
    codes unpacked one per byte in natural element order: "int8" ((..., n) int8, for torch._int_mm) or
    "fp8" ((..., n) float8_e4m3fn, 4 bits only, for torch._scaled_mm). Unpacked output writes n bytes
    per token instead of n/2 but saves the GEMM a separate unpack pass (read n/2 + write n bytes).
    """
    fmt = out_format or ("packed" if bits == 4 else "int8")
    if fmt not in ("packed", "int8", "fp8") or (fmt != "int8" and bits == 8):
        raise ValueError(f"out_format {out_format!r} is not valid for {bits} bits")
    n = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n1, n2, pack, h, s, rlo = _plan(n, p1, p2, bits, packed=fmt == "packed")
    dd = dot_dtype_for(x.dtype)
    if p1 is None:
        p1 = torch.eye(n1, device=x.device, dtype=dd)
    p1c = p1.to(device=x.device, dtype=dd).contiguous()
    p2c = p2.to(device=x.device, dtype=dd).contiguous() if p2 is not None else p1c  # dummy when absent
    out_dt = {"packed": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    out = torch.empty((m, n // 2 if pack else n), device=x.device, dtype=out_dt)
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    interp = interpreting()
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    limit = ONCHIP_MAX_ELEMENTS if onchip_max_elements is None else onchip_max_elements
    onchip = tiles is None and max(n1p * n2p, n2p * n2p if p2 is not None else 0) <= limit
    if kernel is None:
        kernel = default_kernel(m, n1, n2, p2 is not None, x.device, onchip, split_intermediate, config)
    if kernel not in ("block", "chunked", "split", "token", "tiled"):
        raise ValueError(f"kernel must be 'block', 'chunked', 'split', 'token' or 'tiled', got {kernel!r}")
    alpha32 = float(torch.tensor(float(alpha), dtype=torch.float32))
    if kernel == "chunked":
        from flatquant.kernels.fused_transform_chunked import launch_chunked

        if split_intermediate or tiles is not None:
            raise ValueError("the chunked kernel needs split_intermediate=False and on-chip factors")
        launch_chunked(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp,
                       num_programs, config)
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    if kernel == "split":
        if n1 % 2 or split_intermediate or n1p * n2p > limit:
            raise ValueError("the split kernel needs an even n1, split_intermediate=False and on-chip factors")
        from flatquant.kernels.fused_transform_split import launch_split

        launch_split(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp, config)
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    if kernel == "block":
        if n1 % 2 or split_intermediate or n1p * n2p > limit:
            raise ValueError("the block kernel needs an even n1, split_intermediate=False and on-chip factors")
        _launch_block(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp,
                      num_programs, config)
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    onchip = kernel == "token"
    grid0 = num_programs or min(m, num_sms(x.device) * PROGRAMS_PER_SM)
    niter = triton.cdiv(m, grid0)
    common = dict(NITER_C=niter if interp else 1, N1=n1, N2=n2, N1P=n1p, RLO=rlo, H=h, S=s,
                  HAS_P2=p2 is not None, PACK=pack, SPLIT=bool(split_intermediate), IS_F32=dd == torch.float32,
                  MAXQ=2 ** (bits - 1) - 1, DT=triton_dtype(dd), INTERP=interp, TRIGGER=pdl_trigger())
    args = (x2, p1c, p2c, out, scale, m, x2.stride(0), out.stride(0), alpha32, niter)
    if onchip:
        rp = next_pow2(rlo)
        warps = 4 if n1p * n2p <= 64 * 64 else 8
        # Software-pipelining the token loop's X loads costs shared memory: at 128 x 128 tiles two
        # stages already need ~200 KB (ptxas/Triton, sm_90), so large tiles use one.
        stages = 2 if n1p * n2p <= 64 * 128 else 1
        _fused_onchip_kernel[(grid0,)](*args, N2P=n2p, RP=rp, num_warps=warps, num_stages=stages, **common)
    else:
        bn, bk, br = tiles or (TILED_BLOCK_N, TILED_BLOCK_K, TILED_BLOCK_R)
        bn, bk, br = min(next_pow2(bn), n2p), min(next_pow2(bk), n2p), min(next_pow2(br), next_pow2(rlo))
        # 8 warps: with 4, the 64-wide tiles spill (ptxas, sm_90).
        _fused_tiled_kernel[(grid0,)](*args, RTOT=rlo, BN=bn, BK=bk, BR=br, num_warps=8, num_stages=2, **common)
    return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)


def unfused_transform_quantize_torch(x: torch.Tensor, p1: torch.Tensor | None, p2: torch.Tensor | None,
                                     alpha: float = 1.0, bits: int = 4):
    """The unfused PyTorch sequence (the paper's Table 6 baseline): matmul, matmul, quantize, pack.

    Intermediates are in x's dtype (as a model would run it). Used only as a benchmark baseline.
    """
    n = x.shape[-1]
    n1 = p1.shape[0] if p1 is not None else n // p2.shape[0]
    xr = x.reshape(-1, n1, n // n1)
    if p2 is not None:
        xr = torch.matmul(xr, p2)
    if p1 is not None:
        xr = torch.matmul(p1.t(), xr)
    y = xr.reshape(-1, n).float()
    maxq = 2 ** (bits - 1) - 1
    scale = (y.abs().amax(dim=-1, keepdim=True) * alpha / maxq).clamp(min=1e-8)
    q = torch.clamp(torch.round(y / scale), -maxq - 1, maxq).to(torch.int8)
    if bits == 4:
        q = ((q[:, : n // 2] & 0xF) | (q[:, n // 2:] << 4)).to(torch.uint8)
    return q, scale.squeeze(-1)
