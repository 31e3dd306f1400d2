"""Per-token fused transform + quantize kernels: `token` (factors on chip) and `tiled` (corner cases).

For each token x (n = n1 * n2): X = x.reshape(n1, n2), Y = P1ᵀ X P2, scale = max(alpha * max|Y| / maxq,
1e-8), codes = clamp(round_half_even(Y / scale)); packed byte b holds y[b] | y[b + n/2] << 4. With
H = (n/2) // n2 and S = (n/2) % n2 (S = n2/2 when n1 is odd), both nibble tiles come out of dots with row
slices of P1ᵀ and (rolled by S) column slices of P2 in the same (r, c) positions:
- low nibbles  = rows [0, H (+1 if S)) of Y = P1ᵀ[rows] · T, T = X P2;
- high nibbles = byte (r, c) -> y[(H + r) n2 + S + c]: with T_roll = X P2[:, (c + S) % n2],
  Y_hi[r, c] = P1ᵀ[H + r] · T_roll[:, c] if c < n2 - S else P1ᵀ[H + r + 1] · T_roll[:, c].
`_fused_onchip_kernel` (paper Fig. 8a) keeps P1, P2 on chip and walks the tokens on a persistent grid;
`_fused_tiled_kernel` (Fig. 8b/c) tiles the n2 reduction and the output and streams factor tiles from L2,
in two passes over the tiles (max, then quantize + store) since the scale needs the whole row. Both take
odd n1 and `split_intermediate` (T kept in float32 as two half-precision parts for the second product).
"""
from __future__ import annotations

import triton
import triton.language as tl

from flatquant.kernels._triton_utils import _mm, _mm_f32rhs, _quantize, _scale, mask_and, next_pow2, num_sms
from flatquant.kernels.transform.common import code_cast, pdl_trigger, persistent_start

# Tile sizes of the tiled kernel.
TILED_BLOCK_N = 64
TILED_BLOCK_K = 64
TILED_BLOCK_R = 64
# Persistent grid: programs per SM.
PROGRAMS_PER_SM = 4


@triton.jit
def _fused_onchip_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha, NITER,
                         NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr,
                         N2P: tl.constexpr, RP: tl.constexpr, RLO: tl.constexpr, H: tl.constexpr,
                         S: tl.constexpr, HAS_P2: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
                         IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                         TRIGGER: tl.constexpr):
    NH: tl.constexpr = (N1 * N2) // 2
    pid, nprog = persistent_start(TRIGGER, INTERP)
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
            tl.store(ob + rows * N2 + c, code_cast(qlo, ob.dtype.element_ty), mask=mask_and(valid, tok_ok))
    pdl_trigger(TRIGGER, 2, INTERP)  # RouteConfig.pdl_trigger "end"



@triton.jit
def _fused_tiled_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_x, stride_o, alpha, NITER,
                        NITER_C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr,
                        RTOT: tl.constexpr, RLO: tl.constexpr, H: tl.constexpr, S: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, BR: tl.constexpr, HAS_P2: tl.constexpr, PACK: tl.constexpr,
                        SPLIT: tl.constexpr, IS_F32: tl.constexpr, MAXQ: tl.constexpr, DT: tl.constexpr,
                        INTERP: tl.constexpr, TRIGGER: tl.constexpr):
    NH: tl.constexpr = (N1 * N2) // 2
    pid, nprog = persistent_start(TRIGGER, INTERP)
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
                        if not PACK:  # (the order of the per-token kernel's store, branches swapped)
                            tl.store(ob + rows * N2 + c, code_cast(qlo, ob.dtype.element_ty),
                                     mask=mask_and(valid, tok_ok))
                        else:
                            qhi = _quantize(Yhi, s, MAXQ, INTERP)
                            byte = (qlo & 15) | ((qhi & 15) << 4)
                            tl.store(ob + rows * N2 + c, byte.to(tl.uint8), mask=mask_and(valid, tok_ok))
            if ps == 0:
                s = _scale(amax, alpha, MAXQ, INTERP)
                tl.store(scale_ptr + t, s, mask=tok_ok)
    pdl_trigger(TRIGGER, 2, INTERP)  # RouteConfig.pdl_trigger "end"


def launch_token(x2, p1c, p2c, has_p2: bool, out, scale, alpha32: float, shape: tuple, consts: dict, onchip: bool,
                 num_programs: int | None, tiles: tuple[int, int, int] | None) -> None:
    """Launch the on-chip (`onchip`) or the tiled kernel; shape = (n1, n2, h, s, rlo) from `common.plan`,
    consts the shared constexprs (PACK, SPLIT, IS_F32, MAXQ, DT, INTERP, TRIGGER)."""
    n1, n2, h, s, rlo = shape
    m = x2.shape[0]
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    grid0 = num_programs or min(m, num_sms(x2.device) * PROGRAMS_PER_SM)
    niter = triton.cdiv(m, grid0)
    common = dict(NITER_C=niter if consts["INTERP"] else 1, N1=n1, N2=n2, N1P=n1p, RLO=rlo, H=h, S=s,
                  HAS_P2=has_p2, **consts)
    args = (x2, p1c, p2c, out, scale, m, x2.stride(0), out.stride(0), alpha32, niter)
    if onchip:
        warps = 4 if n1p * n2p <= 64 * 64 else 8
        # Pipelining the token loop's X loads costs shared memory: 128 x 128 tiles fit only one stage.
        stages = 2 if n1p * n2p <= 64 * 128 else 1
        _fused_onchip_kernel[(grid0,)](*args, N2P=n2p, RP=next_pow2(rlo), num_warps=warps, num_stages=stages,
                                       **common)
    else:
        bn, bk, br = tiles or (TILED_BLOCK_N, TILED_BLOCK_K, TILED_BLOCK_R)
        bn, bk, br = min(next_pow2(bn), n2p), min(next_pow2(bk), n2p), min(next_pow2(br), next_pow2(rlo))
        # 8 warps: with 4, the 64-wide tiles spill (sm_90).
        _fused_tiled_kernel[(grid0,)](*args, RTOT=rlo, BN=bn, BK=bk, BR=br, num_warps=8, num_stages=2, **common)
