"""Fused transform + quantize at prefill for factors that are not powers of two, without padding them to one.

The block kernel (`block._fused_block_kernel`) pads both factor tiles to powers of two.
At the Llama/Qwen sizes 11008 = 86 x 128, 13824 = 108 x 128 and 14336 = 112 x 128, n1 is padded to 128,
and at 5120 = 64 x 80 n2 is: the dots then do 8.4 MFLOP per token at 11008 where 4.7 carry data, and at
prefill the kernel is bound by that work (KERNELS.md, "Known limits").

Here n1 is cut into power-of-two chunks of at least 16 (the dot's minimum): 86 -> 64 + 32, 108 and 112 ->
64 + 32 + 16, so the n1 side is padded only to the next multiple of 16; the first dot's K (n2) likewise
into at most two chunks (80 -> 64 + 16). Per token, with the flash-attention pattern of two chained dots:

    Vᵀ_c  = P2ᵀ · X_cᵀ                 (N2P x C) for chunk c of X's rows (X = x.reshape(n1, n2))
    Yᵀ_lo += Vᵀ_c · P1[c, :H]          (N2P x HP): Yᵀ_lo[j, h] = Y[h, j]      (low nibbles)
    Yᵀ_hi += Vᵀ_c · P1[c, H:]          (N2P x HP): Yᵀ_hi[j, h] = Y[H + h, j]  (high nibbles)

Vᵀ_c comes out of the first dot in registers and feeds the second dot as its left operand, so nothing
goes through shared memory between the two (the block kernel transposes V on chip instead), and X_cᵀ is
the first dot's right operand read straight from memory in X's own order (a K-contiguous tile). Element
(j, h) of Yᵀ_lo / Yᵀ_hi are the two nibbles of packed byte h*n2 + j, so packing needs no shuffle, as in
the block kernel. The per-token max, scale, codes and the store are the block kernel's (`block_codes`
semantics: V rounded once to the half dtype before the second dot; y * (1/s) rounded half to even).

At 11008 this is 6.3 MFLOP per token instead of 8.4 (14336 / 13824: 7.3 instead of 8.4; 5120: 2.4 instead
of 3.1). `fused_transform_quantize` takes it (`dispatch.default_kernel`) at more than
`RouteConfig.split_max_m` tokens where a factor is not a power of two and `chunked_supported` (even n1 of
16 to 128, 64 <= n2 <= 128), or when asked for with kernel="chunked".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import (
    _div_rn,
    _mm,
    _round_clamp_product,
    _scale,
    mask_and,
    next_pow2,
    num_sms,
    triton_dtype,
)
from flatquant.kernels.transform.common import store_code_pair

# Programs per SM of the persistent grid, warps (64 Yᵀ rows per warpgroup), the pipeline depth of the token
# loop's X loads, and PREFETCH: the next token's tiles requested into registers instead (more registers).
CHUNKED_PROGRAMS_PER_SM = 2
CHUNKED_WARPS = 8
CHUNKED_STAGES = 3
CHUNKED_PREFETCH = False


def _pow2_parts(n: int) -> list[int]:
    """n rounded up to a multiple of 16, as power-of-two parts, largest first: 86 -> [64, 32]."""
    rest = -(-n // 16) * 16
    parts = []
    while rest:
        parts.append(1 << (rest.bit_length() - 1))
        rest -= parts[-1]
    return parts


def n1_chunks(n1: int) -> tuple[int, int, int]:
    """X's rows (n1) as up to three power-of-two chunks, largest first (0 = none): 86 -> (64, 32, 0),
    40 -> (32, 16, 0), 112 -> (64, 32, 16), 64 -> (64, 0, 0)."""
    chunks = _pow2_parts(n1)
    if len(chunks) > 3:
        raise ValueError(f"n1 = {n1} needs {len(chunks)} power-of-two chunks; the chunked kernel takes at most 3")
    return tuple(chunks + [0] * (3 - len(chunks)))


def n2_chunks(n2: int, has_p2: bool = True) -> tuple[int, int]:
    """The first dot's K (n2) as at most two power-of-two chunks (0 = none): 80 -> (64, 16), 128 -> (128, 0);
    one padded chunk where two would not do (112 -> (128, 0)) or where there is no first dot (no P2)."""
    parts = _pow2_parts(n2)
    if not has_p2 or len(parts) > 2:
        return rows_padded(n2), 0
    return parts[0], (parts[1] if len(parts) > 1 else 0)


def rows_padded(n2: int) -> int:
    """Rows of one token's Yᵀ tiles: n2 padded to a power of two of at least 64 (one warpgroup's wgmma)."""
    return max(64, 1 << (n2 - 1).bit_length())


def chunked_supported(n1: int, n2: int, has_p2: bool) -> bool:
    """Whether the chunked kernel takes these factors: an even n1 of 16 to 128 (at most three chunks) and
    64 <= n2 <= 128 (one token's Yᵀ tile fills whole warpgroups, 64 rows each, with little padding)."""
    return n1 % 2 == 0 and 16 <= n1 <= 128 and 64 <= n2 <= 128


@triton.jit
def _mm_acc(a, b, acc, IS_F32: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b (float32 accumulator), the sum inside the dot on the GPU."""
    if INTERP:
        return acc + _mm(a, b, IS_F32, INTERP)
    else:
        if IS_F32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _chunk_factors(p1_ptr, O: tl.constexpr, C: tl.constexpr, N1: tl.constexpr, H: tl.constexpr,
                   HP: tl.constexpr, DT: tl.constexpr):
    """Rows [O, O + C) of P1, split into its column halves: (C, HP) each, zero-padded."""
    a = O + tl.arange(0, C)
    h = tl.arange(0, HP)
    m = (a[:, None] < N1) & (h[None, :] < H)
    lo = tl.load(p1_ptr + a[:, None] * N1 + h[None, :], mask=m, other=0.0).to(DT)
    hi = tl.load(p1_ptr + a[:, None] * N1 + (H + h)[None, :], mask=m, other=0.0).to(DT)
    return lo, hi


@triton.jit
def _load_chunk(xb, tok_ok, O: tl.constexpr, C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                K0: tl.constexpr, K1: tl.constexpr, DT: tl.constexpr):
    """X_cᵀ for rows [O, O + C) of X, X_cᵀ[k, a] = x[(O + a) * N2 + k] (contiguous along k, the first dot's
    K), in K chunks: k in [0, K0) and [K0, K0 + K1) (the second is the first again when K1 = 0: unused)."""
    a = O + tl.arange(0, C)
    k = tl.arange(0, K0)
    Xa = tl.load(xb + a[None, :] * N2 + k[:, None], mask=mask_and((k[:, None] < N2) & (a[None, :] < N1), tok_ok),
                 other=0.0).to(DT)
    if K1 > 0:
        k = K0 + tl.arange(0, K1)
        Xb = tl.load(xb + a[None, :] * N2 + k[:, None], mask=mask_and((k[:, None] < N2) & (a[None, :] < N1), tok_ok),
                     other=0.0).to(DT)
    else:
        Xb = Xa
    return Xa, Xb


@triton.jit
def _load_token(xb, tok_ok, N1: tl.constexpr, N2: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                C2: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, DT: tl.constexpr):
    """One token's X tiles: (X_cᵀ K chunk 0, K chunk 1) for the row chunks C0, C1, C2; an absent chunk
    repeats chunk 0's tiles (unused)."""
    X0a, X0b = _load_chunk(xb, tok_ok, 0, C0, N1, N2, K0, K1, DT)
    X1a, X1b = X0a, X0b
    X2a, X2b = X0a, X0b
    if C1 > 0:
        X1a, X1b = _load_chunk(xb, tok_ok, C0, C1, N1, N2, K0, K1, DT)
    if C2 > 0:
        X2a, X2b = _load_chunk(xb, tok_ok, C0 + C1, C2, N1, N2, K0, K1, DT)
    return X0a, X0b, X1a, X1b, X2a, X2b


@triton.jit
def _chunk_math(Xa, Xb, p2ta, p2tb, lo, hi, Ylo, Yhi, K1: tl.constexpr, HAS_P2: tl.constexpr,
                IS_F32: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    """One chunk: Vᵀ_c = P2ᵀ X_cᵀ over both K chunks (rounded to DT), then both halves of Yᵀ accumulate
    Vᵀ_c P1[c]."""
    if HAS_P2:
        V = _mm(p2ta, Xa, IS_F32, INTERP)
        if K1 > 0:
            V = _mm_acc(p2tb, Xb, V, IS_F32, INTERP)
        Vt = V.to(DT)
    else:
        Vt = Xa
    return _mm_acc(Vt, lo, Ylo, IS_F32, INTERP), _mm_acc(Vt, hi, Yhi, IS_F32, INTERP)


@triton.jit
def _fused_chunked_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha,
                          NITER, NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                          N2P: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, C0: tl.constexpr,
                          C1: tl.constexpr, C2: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                          HAS_P2: tl.constexpr, PACK: tl.constexpr, PREFETCH: tl.constexpr,
                          IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr,
                          INTERP: tl.constexpr):
    """A persistent grid walks the tokens, one per step (module docstring). The factors are loaded once per
    program: P2ᵀ in its K chunks ((N2P, K0) and (N2P, K1)) and P1's row chunks C0, C1, C2 (0 = absent) in
    column halves. Without PREFETCH, Triton pipelines the X loads (num_stages); with it, the next token's X
    tiles are requested into registers before this token's dots (a loop-carried load, not pipelined), so
    their memory latency overlaps the dots and the quantize epilogue either way."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    j = tl.arange(0, N2P)
    h = tl.arange(0, HP)
    if HAS_P2:  # P2ᵀ[j, k] = P2[k, j], columns k in [0, K0) and [K0, K0 + K1)
        k = tl.arange(0, K0)
        p2ta = tl.load(p2_ptr + k[None, :] * N2 + j[:, None], mask=(j[:, None] < N2) & (k[None, :] < N2),
                       other=0.0).to(DT)
        if K1 > 0:
            k = K0 + tl.arange(0, K1)
            p2tb = tl.load(p2_ptr + k[None, :] * N2 + j[:, None], mask=(j[:, None] < N2) & (k[None, :] < N2),
                           other=0.0).to(DT)
        else:
            p2tb = p2ta  # unused
    else:
        p2ta = tl.zeros((16, 16), dtype=DT)  # unused
        p2tb = p2ta
    lo0, hi0 = _chunk_factors(p1_ptr, 0, C0, N1, H, HP, DT)
    if C1 > 0:
        lo1, hi1 = _chunk_factors(p1_ptr, C0, C1, N1, H, HP, DT)
    if C2 > 0:
        lo2, hi2 = _chunk_factors(p1_ptr, C0 + C1, C2, N1, H, HP, DT)
    om = (j[:, None] < N2) & (h[None, :] < H)
    if PREFETCH:  # the first token's tiles
        t = pid.to(tl.int64)
        X0an, X0bn, X1an, X1bn, X2an, X2bn = _load_token(x_ptr + t * stride_x, t < M, N1, N2, C0, C1, C2, K0, K1, DT)
    for it in range(NITER_C if INTERP else NITER):  # interpreter: a Python int (no assignment)
        t = (pid + it * nprog).to(tl.int64)
        tok_ok = t < M
        if PREFETCH:
            X0a, X0b, X1a, X1b, X2a, X2b = X0an, X0bn, X1an, X1bn, X2an, X2bn
            tn = t + nprog  # the next token of this program (masked off past M)
            X0an, X0bn, X1an, X1bn, X2an, X2bn = _load_token(x_ptr + tn * stride_x, tn < M, N1, N2, C0, C1, C2,
                                                             K0, K1, DT)
        else:
            X0a, X0b, X1a, X1b, X2a, X2b = _load_token(x_ptr + t * stride_x, tok_ok, N1, N2, C0, C1, C2, K0, K1, DT)
        Ylo = tl.zeros((N2P, HP), dtype=tl.float32)
        Yhi = tl.zeros((N2P, HP), dtype=tl.float32)
        Ylo, Yhi = _chunk_math(X0a, X0b, p2ta, p2tb, lo0, hi0, Ylo, Yhi, K1, HAS_P2, IS_F32, DT, INTERP)
        if C1 > 0:
            Ylo, Yhi = _chunk_math(X1a, X1b, p2ta, p2tb, lo1, hi1, Ylo, Yhi, K1, HAS_P2, IS_F32, DT, INTERP)
        if C2 > 0:
            Ylo, Yhi = _chunk_math(X2a, X2b, p2ta, p2tb, lo2, hi2, Ylo, Yhi, K1, HAS_P2, IS_F32, DT, INTERP)
        # Padded rows / columns are exact zeros, so they never set the max.
        amax = tl.max(tl.maximum(tl.max(tl.abs(Ylo), axis=1), tl.max(tl.abs(Yhi), axis=1)), axis=0)
        s = _scale(amax, alpha, MAXQ, INTERP)
        tl.store(scale_ptr + t, s, mask=tok_ok)
        inv = _div_rn(1.0, s, INTERP)  # one division per token, then products (as the block kernel)
        qlo = _round_clamp_product(Ylo, inv, MAXQ, INTERP)
        qhi = _round_clamp_product(Yhi, inv, MAXQ, INTERP)
        ob = out_ptr + t * stride_o + h[None, :] * N2 + j[:, None]
        store_code_pair(ob, qlo, qhi, mask_and(om, tok_ok), H * N2, PACK)


def chunked_config(config: dict | None = None) -> dict:
    """Warps, pipeline stages, programs per SM and the register prefetch of the chunked kernel, with the
    caller's overrides (also "maxnreg": a register cap per thread)."""
    return {"num_warps": CHUNKED_WARPS, "num_stages": CHUNKED_STAGES, "programs_per_sm": CHUNKED_PROGRAMS_PER_SM,
            "prefetch": CHUNKED_PREFETCH, **(config or {})}


def launch_chunked(x2, p1c, p2c, has_p2: bool, out, scale, alpha32: float, n1: int, n2: int, pack: bool,
                   bits: int, dd, interp: bool, num_programs: int | None, config: dict | None) -> None:
    """Launch `_fused_chunked_kernel` over the (M, n) rows of x2 (the caller checked `chunked_supported`)."""
    if not chunked_supported(n1, n2, has_p2):
        raise ValueError(f"the chunked kernel needs an even n1 of 16 to 128 and 64 <= n2 <= 128, got {n1} x {n2}")
    m = x2.shape[0]
    cfg = chunked_config(config)
    c0, c1, c2 = n1_chunks(n1)
    k0, k1 = n2_chunks(n2, has_p2)
    grid0 = num_programs or min(m, num_sms(x2.device) * int(cfg["programs_per_sm"]))
    niter = triton.cdiv(m, grid0)
    consts = dict(NITER_C=niter if interp else 1, N1=n1, N2=n2, N2P=rows_padded(n2), H=n1 // 2,
                  HP=next_pow2(n1 // 2), C0=c0, C1=c1, C2=c2, K0=k0, K1=k1, HAS_P2=has_p2, PACK=pack,
                  PREFETCH=bool(cfg["prefetch"]), IS_F32=dd == torch.float32, MAXQ=2 ** (bits - 1) - 1,
                  DT=triton_dtype(dd), INTERP=interp, num_warps=int(cfg["num_warps"]))
    regs = {"maxnreg": int(cfg["maxnreg"])} if cfg.get("maxnreg") else {}
    _fused_chunked_kernel[(grid0,)](x2, p1c, p2c, out, scale, m, x2.stride(0), out.stride(0), alpha32, niter,
                                    num_stages=int(cfg["num_stages"]), **regs, **consts)
