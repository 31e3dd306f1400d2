"""Small-M (decode, M <= 16) W4A4 GEMM: reads the PACKED int4 weight directly, split-K over the SMs.

At M <= 16 the GEMM is bound by reading the weight: packed int4 is 4x fewer bytes than bf16, so the
kernel must stream W at full bandwidth with the unpack done in registers. Per program: one N tile
(BLOCK_N rows of W) and one K slice; the M <= 16 activation rows are loaded as one 16-row tile (rows
beyond M masked to 0: tl.dot on int8 needs >= 16 rows) and

    acc += dot(A_lo, W_loᵀ) + dot(A_hi, W_hiᵀ)     (int8 x int8 -> int32, exact; layout as w4a4_gemm.py)

M = 1 takes `_gemv_kernel` instead (CUDA-core multiply-adds, one program per BLOCK_N rows, no padding
to 16 rows): on the H200, at M = 1, it took 0.42-0.51x the time of this tensor-core kernel's default
config and 0.51-0.63x that of its best swept config (results/kernels/bench_decode_parts.json and
results/archive/decode-parts-67a6937/). For 2 <= M <= 16 (and M = 1 with config KERNEL="mma"):
grid = N tiles x SPLIT_K. SPLIT_K is chosen so that about 2 programs per SM run even when N / BLOCK_N
is below the SM count (N = 4096 -> 64 tiles of 64 on 132 SMs). With SPLIT_K > 1 the splits meet in
ONE launch: each program atomically adds its int32 partial sums into a workspace tile and then bumps
that tile's arrival counter; the program that arrives last takes the finished sums out with an atomic
exchange (which also leaves the workspace zeroed for the next call), applies the scales and writes the
output, and resets the counter. Integer adds are exact and order independent, so the result is
deterministic. The workspace and counters persist per (device, stream, N) and are zero between calls,
so a decode step needs no memset and no separate epilogue launch (measured: that saved <= 2 us per
layer; the GEMM itself is the cost). No autotuning: the config is a function of (N, K, SMs), which also
keeps the host-side launch cost low.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import interpreting, num_sms

MAX_M = 16
# Fixed tile sizes for the interpreter (CPU tests); tests also force split_k.
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GEMV_BLOCK_N=16, GEMV_BLOCK_K=32)
# M = 1 (the gemv kernel): rows of W and bytes of K per program (a config may override either; KERNEL
# "mma" sends M = 1 to the tensor-core kernel instead).
GEMV_CONFIG = dict(GEMV_BLOCK_N=16, GEMV_BLOCK_K=512)


@triton.jit
def _decode_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, KH, stride_am, stride_wn,
                   stride_cm, K_PER_SPLIT, SPLIT_K, ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
                   ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, 16)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rn_l = tl.where(n_ok, rn, 0).to(tl.int64)  # clamped rows: W loads need only the K mask
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros((16, BLOCK_N), dtype=tl.int32)
    for it in range(ITERS):
        kk = k_start + it * BLOCK_K + rk
        k_ok = kk < KH
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptr + rn_l[:, None] * stride_wn + kk[None, :], mask=k_ok[None, :], other=0)
        if PACK:
            a8 = a.to(tl.int8, bitcast=True)
            w8 = w.to(tl.int8, bitcast=True)
            acc = tl.dot((a8 << 4) >> 4, tl.trans((w8 << 4) >> 4), acc, out_dtype=tl.int32)
            acc = tl.dot(a8 >> 4, tl.trans(w8 >> 4), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        ws = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        # Every thread's adds are issued before the counter bump; its acq_rel makes them visible to the
        # program that sees the last arrival (and that program's exchange reads them through L2).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.atomic_xchg(ws, tl.zeros((16, BLOCK_N), dtype=tl.int32), mask=mask, sem="acq_rel")
            _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


@triton.jit
def _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS: tl.constexpr):
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]  # the reference's order
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, N, KH, stride_wn, ITERS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M = 1: integer multiply-adds on the CUDA cores, no tensor-core tile (which would be 15/16 padding and
    needs its operands re-laid out). Elementwise products accumulate in a (BLOCK_N, BLOCK_K) int32 tile
    and are reduced once at the end, so the loop is loads, unpacks and multiply-adds."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn_l = tl.where(n_ok, rn, 0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for it in range(ITERS):
        kk = it * BLOCK_K + rk
        k_ok = kk < KH
        a = tl.load(a_ptr + kk, mask=k_ok, other=0).to(tl.int8, bitcast=True)
        w = tl.load(w_ptr + rn_l[:, None] * stride_wn + kk[None, :], mask=k_ok[None, :], other=0)
        w = w.to(tl.int8, bitcast=True)
        if PACK:
            acc += ((w << 4) >> 4).to(tl.int32) * ((a << 4) >> 4).to(tl.int32)[None, :]
            acc += (w >> 4).to(tl.int32) * (a >> 4).to(tl.int32)[None, :]
        else:
            acc += w.to(tl.int32) * a.to(tl.int32)[None, :]
    tot = tl.sum(acc, axis=1)
    sa = tl.load(sa_ptr + tl.zeros((BLOCK_N,), dtype=tl.int32))  # the one token's scale, broadcast
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = tot.to(tl.float32) * sa * sw  # the reference's order
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
    tl.store(c_ptr + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


# (device, stream, N) -> (int32 (MAX_M, N) partial sums, int32 arrival counters per 16 columns), zero between
# calls (the last program of each tile leaves them so). Per stream: two streams must not share one.
_WORKSPACES: dict = {}


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, n)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros((MAX_M, n), device=device, dtype=torch.int32),
                            torch.zeros(triton.cdiv(n, 16), device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def decode_config(n: int, kh: int, device: torch.device) -> dict:
    """BLOCK_N / BLOCK_K / SPLIT_K for the GPU: 64-row W tiles, 256-byte K steps, and enough K splits
    for ~2 programs per SM (each split keeps >= 2 K steps so the loads still pipeline).
    (Tried once on the H200 and dropped: no split-K with 16/32-row tiles and the epilogue in the kernel
    took 60 us for the whole 4096x4096 decode layer at M = 1 from a CUDA graph; each program then walks
    all of K serially. Record: results/archive/kernels-h200-smoke/lin_quick.json.)"""
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    bn, bk = 64, 256
    tiles = triton.cdiv(n, bn)
    ksteps = triton.cdiv(kh, bk)
    split = max(1, min(ksteps // 2, round(2 * num_sms(device) / tiles)))
    return dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split)


def resolved_config(m: int, n: int, kh: int, device: torch.device, config: dict | None = None) -> dict:
    """The config a call runs with: `config` (else decode_config) over GEMV_CONFIG, and KERNEL ("gemv"
    for M = 1, else "mma", unless the config names one)."""
    cfg = {**GEMV_CONFIG, **(config or decode_config(n, kh, device))}
    cfg.setdefault("KERNEL", "gemv" if m == 1 else "mma")
    return cfg


def w4a4_gemm_decode(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, bits: int = 4,
                     config: dict | None = None) -> torch.Tensor:
    """Same contract as `w4a4_gemm.w4a4_gemm` for M <= 16 (a (M, K/2) packed or (M, K) int8 codes)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, w {tuple(w.shape)}")
    m, kh = a.shape
    n = w.shape[0]
    if m > MAX_M:
        raise ValueError(f"the decode GEMM takes M <= {MAX_M}, got {m}")
    pack = bits == 4
    a = a if a.stride(-1) == 1 else a.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    a8, w8 = (a.view(torch.uint8), w.view(torch.uint8)) if pack else (a.view(torch.int8), w.view(torch.int8))
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    cfg = resolved_config(m, n, kh, a.device, config)
    sa = a_scale.reshape(-1).float().contiguous()
    sw = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sw
    if cfg["KERNEL"] == "gemv":
        if m != 1:
            raise ValueError(f"the gemv decode kernel takes M = 1, got {m}")
        bn = cfg["GEMV_BLOCK_N"]
        _gemv_kernel[(triton.cdiv(n, bn),)](a8, w8, sa, sw, b, out, n, kh, w8.stride(0),
                                            ITERS=triton.cdiv(kh, cfg["GEMV_BLOCK_K"]), HAS_BIAS=bias is not None,
                                            PACK=pack, BLOCK_N=bn, BLOCK_K=cfg["GEMV_BLOCK_K"],
                                            num_warps=cfg.get("num_warps", 4))
        return out
    bn, bk, split = cfg["BLOCK_N"], cfg["BLOCK_K"], max(1, int(cfg["SPLIT_K"]))
    # K slice per split, a whole number of BLOCK_K steps; drop splits that would be empty.
    k_per = triton.cdiv(triton.cdiv(kh, split), bk) * bk
    split = triton.cdiv(kh, k_per)
    atomic = split > 1
    if bn < 16:
        raise ValueError(f"BLOCK_N must be >= 16, got {bn}")
    ws, counters = _workspace(a.device, n) if atomic else (out, out)
    _decode_kernel[(triton.cdiv(n, bn), split)](
        a8, w8, sa, sw, b, out, ws, counters, m, n, kh, a8.stride(0), w8.stride(0), out.stride(0), k_per, split,
        ITERS=k_per // bk, HAS_BIAS=bias is not None, PACK=pack, ATOMIC=atomic, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return out
