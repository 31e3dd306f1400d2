"""The block kernel: fused transform + quantize for several tokens per step, in two large dots (even n1).

Semantics: `reference.transform_quantize_reference(..., round_intermediate=True)`. `block_codes` (the math)
and `load_block_factors` are also used by the one-launch decode kernel (`fused_decode.py`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import _div_rn, _mm, _round_clamp_product, _scale, next_pow2, num_sms, triton_dtype
from flatquant.kernels.transform.common import pdl_trigger, persistent_start, store_code_pair

# X tile at most this many elements and dot M sides at most this many rows (register budget of the
# float32 intermediates at 8 warps); persistent programs per SM.
BLOCK_MAX_ELEMENTS = 64 * 128
BLOCK_MAX_ROWS = 128
BLOCK_PROGRAMS_PER_SM = 2
# Request the next step's X tile into registers before this step's dots (off: Triton pipelines the loads).
BLOCK_PREFETCH = False
_BLOCK_STAGES: dict = {}  # launch shape -> pipeline stages that fit in shared memory


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
    pid, nprog = persistent_start(TRIGGER, INTERP)
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
        store_code_pair(ob, qlo, qhi, om, H * N2, PACK)
    pdl_trigger(TRIGGER, 2, INTERP)  # RouteConfig.pdl_trigger "end"



def block_config(n1p: int, n2p: int) -> dict:
    """Tokens per step and launch shape of `_fused_block_kernel`: as many tokens as keep the X tile at
    most BLOCK_MAX_ELEMENTS and both dot M sides (BT*N1P, BT*N2P) at most BLOCK_MAX_ROWS."""
    bt = max(1, min(BLOCK_MAX_ELEMENTS // (n1p * n2p), BLOCK_MAX_ROWS // max(n1p, n2p)))
    bt = 1 << (bt.bit_length() - 1)  # a power of two (tile sizes are)
    # 8 warps once the first dot has >= 128 rows; 3 load stages (the launcher drops to 2, then 1, where
    # shared memory is short). From the H200 sweep (docs/KERNELS.md).
    return dict(BT=bt, num_warps=8 if bt * n1p >= 128 else 4, num_stages=3, programs_per_sm=BLOCK_PROGRAMS_PER_SM,
                prefetch=BLOCK_PREFETCH)


def launch_block(x2, p1c, p2c, has_p2: bool, out, scale, alpha32: float, n1: int, n2: int, pack: bool, bits: int,
                  dd: torch.dtype, interp: bool, num_programs: int | None, config: dict | None,
                 trigger: int) -> None:
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
                  TRIGGER=trigger, num_warps=int(cfg["num_warps"]))
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
