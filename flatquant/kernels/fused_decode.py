"""One-launch decode linear (M = 1 by default): Kronecker transform + int4 quantize + packed-weight GEMV.

At M = 1 the two-kernel path (fused transform, then the dp4a gemv launched as its programmatic dependent)
spends most of its time in fixed latencies: the transform's chain of dependent steps, the
dependent grid's release once the transform has finished, and the gemv's own ramp. Here every program
does all of it for its own rows of W, with nothing to wait for:

1. request its first weight tile (registers) and, optionally, ask L2 for the rest of its rows
   (`L2_PREFETCH`): the weight does not depend on the input, so its read overlaps step 2;
2. transform and quantize the token(s) itself, with the block kernel's math (`block_codes`): every
   program computes the same codes and scale (the same instructions on the same data), a few hundred
   KFLOP per program on the tensor cores, the factors read from L2;
3. write the packed codes to a per-program scratch row and read them back as int32 words after a CTA
   barrier (the codes come out of the dots in a layout that cannot be sliced per K step in registers);
4. the dp4a gemv over its rows (`gemv_step`), the next weight tile requested before each step;
   per-token scale, per-channel scale and bias in the epilogue.

Same semantics as `fused_transform_quantize` followed by `w4a4_gemm_decode` (the same codes, exact
integer sums, the same float32 epilogue order). Packed int4 only; even n1 with factor tiles on chip (the
block kernel's case); rows of whole int32 words. `supported` says whether a call qualifies;
`W4A4Linear` takes this path for M <= RouteConfig.fused_decode_max_m when it does. Off by default (0):
measured slower than the two launches it replaces (docs/KERNELS.md, "One-launch decode").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import interpreting, next_pow2, num_sms, stream_state, triton_dtype
from flatquant.kernels.gemm.decode import _lines
from flatquant.kernels.gemm.decode_kernels import _prefetch_rows, gemv_step
from flatquant.kernels.reference import dot_dtype_for, kron_factors
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig
from flatquant.kernels.transform.block import block_codes, load_block_factors
from flatquant.kernels.transform.common import ONCHIP_MAX_ELEMENTS

# int32 weight words per thread in one K step (per register buffer; two buffers are live).
WORDS_PER_THREAD = 32


def supported(m: int, n_in: int, n_out: int, p1, p2, bits: int, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `fused_decode_linear` takes this call: 4-bit, 1 <= m <= 4, even n1 with on-chip factor
    tiles, rows of whole int32 words, a row-major weight."""
    if bits != 4 or not 1 <= m <= 4 or n_in % 8 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    n1 = p1.shape[0] if p1 is not None else (n_in // p2.shape[0] if p2 is not None else kron_factors(n_in)[0])
    n2 = n_in // n1
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    return (n1 % 2 == 0 and n1p * n2p <= ONCHIP_MAX_ELEMENTS and n2p * n2p <= ONCHIP_MAX_ELEMENTS
            and w.dim() == 2 and w.shape == (n_out, n_in // 2) and w.stride(-1) == 1 and w.stride(0) % 4 == 0
            and w.data_ptr() % 16 == 0)


def decode_linear_config(n_out: int, n1p: int, n2p: int, device: torch.device, config: dict | None = None,
                         routes: RouteConfig = DEFAULT_ROUTES) -> dict:
    """Rows of W per program (ROWS: about one program per SM unless the config names it), warps (8 for
    128-row factor tiles or when ROWS >= 64, else 4), int32 words per row and K step (WORDS_PER_THREAD words
    per thread) and L2_PREFETCH (routes.fused_decode_l2_prefetch)."""
    cfg = dict(config or {})
    if "ROWS" not in cfg:
        cfg["ROWS"] = 16 if interpreting() else min(128, max(16, triton.next_power_of_2(
            triton.cdiv(n_out, num_sms(device)))))
    cfg.setdefault("num_warps", 8 if (n1p >= 128 or cfg["ROWS"] >= 64) else 4)
    if "KW" not in cfg:
        cfg["KW"] = 16 if interpreting() else max(16, WORDS_PER_THREAD * 32 * cfg["num_warps"] // cfg["ROWS"])
    cfg.setdefault("L2_PREFETCH", routes.fused_decode_l2_prefetch)
    return cfg


@triton.jit
def _fused_decode_kernel(x_ptr, p1_ptr, p2_ptr, w_ptr, sw_ptr, bias_ptr, c_ptr, sb_ptr, sw32_ptr, N, stride_x,
                         stride_wn, stride_cm, alpha, M: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                         N1P: tl.constexpr, N2P: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                         HAS_P2: tl.constexpr, HAS_BIAS: tl.constexpr, IS_F32: tl.constexpr, MAXQ: tl.constexpr,
                         DT: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_KW: tl.constexpr, ITERS: tl.constexpr, L2_LINES: tl.constexpr):
    KW: tl.constexpr = N1 * N2 // 8            # int32 words per packed row
    KH: tl.constexpr = N1 * N2 // 2            # bytes per packed row
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * ROWS + tl.arange(0, ROWS)
    rk = tl.arange(0, BLOCK_KW)
    n_ok = rn < N
    rn_l = tl.where(n_ok, rn, 0).to(tl.int64)
    w_rows = w_ptr + rn_l[None, :, None] * stride_wn
    # 1. the weight first: it does not depend on the token
    w_next = tl.load(w_rows + rk[None, None, :], mask=(rk < KW)[None, None, :], other=0)
    if L2_LINES > 0:
        _prefetch_rows(w_ptr + rn_l * stride_wn, BLOCK_KW, KW, 32, L2_LINES)
    # 2. the transform + quantize of each token (every program the same), packed into this program's scratch
    j = tl.arange(0, N2P)
    a = tl.arange(0, N1P)
    h = tl.arange(0, HP)
    P1lo, P1hi, P2 = load_block_factors(p1_ptr, p2_ptr, N1, N2, N1P, N2P, H, HP, HAS_P2, DT)
    xm = (a[:, None] < N1) & (j[None, :] < N2)
    om = (j[:, None] < N2) & (h[None, :] < H)
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    scratch = sb_ptr + pid.to(tl.int64) * (BLOCK_M * KH)
    for t in tl.static_range(M):
        X = tl.load(x_ptr + t * stride_x + a[:, None] * N2 + j[None, :], mask=xm, other=0.0).to(DT)
        qlo, qhi, s = block_codes(X, P2, P1lo, P1hi, alpha, 1, N1P, N2P, HAS_P2, IS_F32, MAXQ, DT, INTERP)
        tl.store(scratch + t * KH + h[None, :] * N2 + j[:, None], ((qlo & 15) | ((qhi & 15) << 4)).to(tl.uint8),
                 mask=om)
        sa = tl.where(rm == t, tl.sum(s, axis=0), sa)
    # 3. the codes as int32 words: written by this program's threads, visible to all of them after the barrier
    tl.debug_barrier()
    a_words = sw32_ptr + pid.to(tl.int64) * (BLOCK_M * KW) + rm[:, None, None] * KW
    m_ok = rm < M
    # 4. the gemv, the next weight tile requested before each step's arithmetic
    acc = tl.zeros((BLOCK_M, ROWS, BLOCK_KW), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M, 1, BLOCK_KW), dtype=tl.int32)
    for it in range(ITERS):
        kk = it * BLOCK_KW + rk
        k_ok = kk < KW
        av = tl.load(a_words + kk[None, None, :], mask=m_ok[:, None, None] & k_ok[None, None, :], other=0,
                     cache_modifier=".cg")
        w = w_next
        ahead = kk + BLOCK_KW
        w_next = tl.load(w_rows + ahead[None, None, :], mask=(ahead < KW)[None, None, :], other=0)
        acc, asum = gemv_step(av, w, acc, asum, True, INTERP, BLOCK_M, ROWS, BLOCK_KW)
    tot = tl.sum(acc, axis=2) - 8 * tl.sum(asum, axis=2)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = tot.to(tl.float32) * sa[:, None] * sw[None, :]  # the reference's order
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _scratch(device: torch.device, nbytes: int) -> torch.Tensor:
    """int32 scratch (per device and stream) of at least nbytes: each program's packed codes."""
    words = triton.cdiv(nbytes, 4)
    key = triton.next_power_of_2(max(words, 1024))
    return stream_state("fused_decode", device, key, lambda d: torch.empty(key, device=d, dtype=torch.int32))


def fused_decode_linear(x: torch.Tensor, p1: torch.Tensor | None, p2: torch.Tensor | None, alpha: float,
                        w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None, config: dict | None = None,
                        routes: RouteConfig | None = None) -> torch.Tensor:
    """y = Q_a(x kron(P1, P2)) Q_w(W)ᵀ (+ bias) in one launch for x (M, n_in) with M <= 4 (see the module
    docstring); w (n_out, n_in/2) packed int4, w_scale (n_out,), bias (n_out,) or None. The same result as
    `fused_transform_quantize` + `w4a4_gemm_decode`. config: {"ROWS", "num_warps", "KW", "L2_PREFETCH"}
    (`decode_linear_config`)."""
    m, n_in = x.shape
    n_out = w.shape[0]
    if not supported(m, n_in, n_out, p1, p2, 4, x, w):
        shapes = [None if p is None else tuple(p.shape) for p in (p1, p2)]
        raise ValueError(f"fused_decode_linear does not take M={m}, in={n_in}, out={n_out}, dtype={x.dtype}, "
                         f"factors {shapes[0]} x {shapes[1]}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    n1 = p1.shape[0] if p1 is not None else (n_in // p2.shape[0] if p2 is not None else kron_factors(n_in)[0])
    n2 = n_in // n1
    dd = dot_dtype_for(x.dtype)
    if p1 is None:
        p1 = torch.eye(n1, device=x.device, dtype=dd)
    p1c = p1.to(device=x.device, dtype=dd).contiguous()
    p2c = p2.to(device=x.device, dtype=dd).contiguous() if p2 is not None else p1c
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    cfg = decode_linear_config(n_out, n1p, n2p, x.device, config, routes or DEFAULT_ROUTES)
    rows, bkw = int(cfg["ROWS"]), int(cfg["KW"])
    kw = n_in // 8
    grid = triton.cdiv(n_out, rows)
    block_m = triton.next_power_of_2(m)
    scratch = _scratch(x.device, grid * block_m * n_in // 2)
    out = torch.empty((m, n_out), device=x.device, dtype=out_dtype or x.dtype)
    sw = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sw
    lines = _lines(kw - bkw, 32) if cfg["L2_PREFETCH"] else 0
    interp = interpreting()
    _fused_decode_kernel[(grid,)](
        x, p1c, p2c, w.view(torch.int32), sw, b, out, scratch.view(torch.uint8), scratch, n_out, x.stride(0),
        w.stride(0) // 4, out.stride(0), float(torch.tensor(float(alpha), dtype=torch.float32)), M=m, N1=n1, N2=n2,
        N1P=n1p, N2P=n2p, H=n1 // 2, HP=next_pow2(n1 // 2), HAS_P2=p2 is not None, HAS_BIAS=bias is not None,
        IS_F32=dd == torch.float32, MAXQ=7, DT=triton_dtype(dd), INTERP=interp, BLOCK_M=block_m, ROWS=rows,
        BLOCK_KW=bkw, ITERS=triton.cdiv(kw, bkw), L2_LINES=0 if interp else lines, num_warps=int(cfg["num_warps"]))
    return out
