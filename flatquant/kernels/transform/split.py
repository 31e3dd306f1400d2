"""The split kernel: fused transform + quantize at decode, one token's Y columns spread over G programs.

A token alone is a few microseconds of latency for one program, so at decode (`RouteConfig.split_max_m`
tokens at most, `dispatch.default_kernel`) program g of the token computes the Y columns [g*CB, (g+1)*CB)
and the programs meet for the per-token max through tagged slots in global memory. Same math, rounding and
output layout as the block kernel (`block._fused_block_kernel`); semantics:
`reference.transform_quantize_reference(..., round_intermediate=True)`. Called through
`fused_transform_quantize(..., kernel="split")`.
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
    next_pow2,
    num_sms,
    stream_state,
    triton_dtype,
)
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig
from flatquant.kernels.transform.common import pdl_trigger, store_code_pair

# Tokens one call may take: the size of the cross-program state (RouteConfig.split_max_m picks the kernel).
SPLIT_CAPACITY = 16
# Slots per token of the cross-program maximum (>= programs per token: at most 128 / 16 = 8 on chip).
SPLIT_SLOTS = 16


@triton.jit
def _fused_split_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, gen_ptr, slot_ptr, stride_x, stride_o, alpha,
                        N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr, H: tl.constexpr,
                        HP: tl.constexpr, CB: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                        HAS_P2: tl.constexpr, PACK: tl.constexpr, IS_F32: tl.constexpr, MAXQ: tl.constexpr,
                        DT: tl.constexpr, PHASE: tl.constexpr, INTERP: tl.constexpr, TRIGGER: tl.constexpr):
    """Decode (few tokens): one token's transform on G programs, program g owning the Y columns
    [g*CB, (g+1)*CB). With CB >= n2, G = 1: one program per token, and no cross-program wait.
    Y[:, cols] = P1ᵀ (X P2[:, cols]) needs all of X but only a column slice of P2, so there is no
    redundant work, and both nibbles of a packed byte (rows h and H + h, same column) come out of the
    same program. V = X P2[:, cols] is rounded once to the half dtype, as in the block kernel.

    With G > 1 the per-token scale needs the max over all G programs. Each program publishes
    (generation + 1, its partial max) as ONE 64-bit store into its slot, then polls the G slots of its token until all
    carry that generation: one write and (when the others are done) one load, instead of a chain of
    dependent atomics. The generation is a per-token counter read at the start and bumped by program 0
    once it has seen all slots (every program read it before publishing). The G programs of a token
    must be resident together: the launcher keeps G * tokens <= SMs. PHASE 0 is that one launch. The
    CPU interpreter runs programs one after another, so there a poll would never end: it launches
    PHASE 1 (compute, publish) and then PHASE 2 (compute again, read the slots, quantize, store)."""
    pdl_trigger(TRIGGER, 1, INTERP)  # RouteConfig.pdl_trigger "start"
    g = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    if G > 1:
        gen = tl.load(gen_ptr + t, volatile=True)
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    c = g * CB + tl.arange(0, CB)
    h = tl.arange(0, HP)
    xb = x_ptr + t * stride_x
    if HAS_P2:
        X = tl.load(xb + i[:, None] * N2 + j[None, :], mask=(i[:, None] < N1) & (j[None, :] < N2), other=0.0).to(DT)
        P2c = tl.load(p2_ptr + j[:, None] * N2 + c[None, :], mask=(j[:, None] < N2) & (c[None, :] < N2),
                      other=0.0).to(DT)
        V = _mm(X, P2c, IS_F32, INTERP).to(DT)
    else:
        V = tl.load(xb + i[:, None] * N2 + c[None, :], mask=(i[:, None] < N1) & (c[None, :] < N2), other=0.0).to(DT)
    qm = (i[:, None] < N1) & (h[None, :] < H)
    # P1's column halves, loaded row-major (coalesced) and transposed on chip: Y = P1ᵀ V.
    P1lo = tl.load(p1_ptr + i[:, None] * N1 + h[None, :], mask=qm, other=0.0).to(DT)
    P1hi = tl.load(p1_ptr + i[:, None] * N1 + (H + h)[None, :], mask=qm, other=0.0).to(DT)
    Ylo = _mm(tl.trans(P1lo), V, IS_F32, INTERP)  # (HP, CB): Y[h, c]      -> low nibbles (elements h*n2 + c)
    Yhi = _mm(tl.trans(P1hi), V, IS_F32, INTERP)  # (HP, CB): Y[H + h, c]  -> high nibbles (element + n/2)
    part = tl.max(tl.max(tl.maximum(tl.abs(Ylo), tl.abs(Yhi)), axis=1), axis=0)  # padding is exact zeros
    if G == 1:  # one program per token: its maximum is the token's
        amax = part
    else:
        slots = slot_ptr + t * GP
        gp = tl.arange(0, GP)
        tag = (gen + 1) & 0xFFFFFFFF  # 32 bits: after 2**32 calls it wraps, still unequal to the previous tag
        if PHASE != 2:
            word = (tag << 32) | (part.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
            tl.atomic_xchg(slots + g, word, sem="relaxed")  # an atomic: a strong 64-bit write, never torn
        amax = part
        if PHASE != 1:  # (PHASE 1 only publishes)
            v = tl.load(slots + gp, mask=gp < G, other=0, volatile=True)
            if PHASE == 0:
                while tl.sum(((gp < G) & (((v >> 32) & 0xFFFFFFFF) != tag)).to(tl.int32), axis=0) > 0:
                    v = tl.load(slots + gp, mask=gp < G, other=0, volatile=True)
            if g == 0:
                tl.store(gen_ptr + t, gen + 1)  # every program of this token has read gen: it has published
            amax = tl.max(tl.where(gp < G, (v & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0.0), axis=0)
    if PHASE != 1:
        s = _scale(amax, alpha, MAXQ, INTERP)
        if g == 0:
            tl.store(scale_ptr + t, s)
        inv = _div_rn(tl.full((), 1.0, tl.float32), s, INTERP)  # as in the block kernel: y * (1/s)
        qlo = _round_clamp_product(Ylo, inv, MAXQ, INTERP)
        qhi = _round_clamp_product(Yhi, inv, MAXQ, INTERP)
        om = (h[:, None] < H) & (c[None, :] < N2)
        ob = out_ptr + t * stride_o + h[:, None] * N2 + c[None, :]
        store_code_pair(ob, qlo, qhi, om, H * N2, PACK)
    pdl_trigger(TRIGGER, 2, INTERP)  # RouteConfig.pdl_trigger "end"


def _split_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 generation per token and int64 slots (token, program): the split kernel's state, kept on the
    device between calls, per (device, stream)."""
    return stream_state("fused_split", device, None, lambda d: (
        torch.zeros(SPLIT_CAPACITY, device=d, dtype=torch.int64),
        torch.zeros((SPLIT_CAPACITY, SPLIT_SLOTS), device=d, dtype=torch.int64)))


def split_programs(n2: int, config: dict | None = None, routes: RouteConfig = DEFAULT_ROUTES) -> tuple[int, int]:
    """(columns per program CB, programs per token G) of the split kernel (config "CB" over the routes')."""
    cb = min(next_pow2(int((config or {}).get("CB", routes.split_columns))), next_pow2(n2))
    return cb, triton.cdiv(n2, cb)


def launch_split(x2, p1c, p2c, has_p2: bool, out, scale, alpha32: float, n1: int, n2: int, pack: bool, bits: int,
                 dd: torch.dtype, interp: bool, config: dict | None, routes: RouteConfig = DEFAULT_ROUTES) -> None:
    """Launch `_fused_split_kernel`: grid (G, tokens), one launch on the GPU, two in the interpreter."""
    m = x2.shape[0]
    if m > SPLIT_CAPACITY:
        raise ValueError(f"the split kernel takes at most {SPLIT_CAPACITY} tokens, got {m}")
    cb, g = split_programs(n2, config, routes)
    if g > SPLIT_SLOTS:
        raise ValueError(f"the split kernel takes at most {SPLIT_SLOTS} programs per token, got {g}")
    if not interp and g * m > num_sms(x2.device):
        raise ValueError(f"the split kernel needs its {g * m} programs resident together, more than the SMs")
    gen, slots = _split_state(x2.device)
    consts = dict(N1=n1, N2=n2, N1P=next_pow2(n1), N2P=next_pow2(n2), H=n1 // 2, HP=next_pow2(n1 // 2), CB=cb, G=g,
                  GP=SPLIT_SLOTS, HAS_P2=has_p2, PACK=pack, IS_F32=dd == torch.float32, MAXQ=2 ** (bits - 1) - 1,
                  DT=triton_dtype(dd), INTERP=interp, TRIGGER=routes.pdl_trigger_code(),
                  num_warps=int((config or {}).get("num_warps", routes.split_warps)))
    args = (x2, p1c, p2c, out, scale, gen, slots, x2.stride(0), out.stride(0), alpha32)
    for phase in ((1, 2) if interp and g > 1 else (0,)):  # one program per token: no wait, one launch
        _fused_split_kernel[(g, m)](*args, PHASE=phase, **consts)
