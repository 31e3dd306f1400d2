"""Large-M GEMM on one-byte codes for Hopper: TMA tile loads, persistent programs, scales in the epilogue.

    y[m, n] = (sum_k a[m, k] * w[n, k]) * sa[m] * sw[n] (+ bias[n])   -> bf16 / fp16 / fp32

Why it exists: at M in the thousands the W4A4 layer is bound by tensor-core throughput, and on the H100
cuBLASLt FP8 with row-wise scales (`cublas.py`) and the Triton GEMM in `w4a4_gemm.py` (which unpacks
nibbles in its main loop, so its operands reach the tensor cores through registers) ran well below the
FP8 / INT8 peak (docs/KERNELS.md, "Large M"). This kernel reads codes already one per byte (the fused
transform writes them so, `out_format="int8" | "fp8"`; the layer caches its weight so) through the TMA
unit straight into shared memory, feeds wgmma, and applies the per-token and per-channel scales (and
bias) on the accumulator before the single store.

Two code formats, the same integer result:
- "int8": int8 x int8 -> int32 wgmma. Exact.
- "fp8" (e4m3, where every int4 value is exact): Hopper's fp8 wgmma accumulates with fewer bits than
  float32, so the dot is promoted into a float32 accumulator every `imprecise_k` products (Triton's
  max_num_imprecise_acc). A promoted partial sum is an integer of magnitude at most 64 * imprecise_k
  (8192 at 128); the float32 total is exact below 2**24. tests/kernels/test_tma_gemm.py checks that
  with the largest codes on the GPU.

  Without promotion (imprecise_k = 0, "fast accumulation") the running sum stays in the narrow
  accumulator and is not exact (docs/KERNELS.md); it stays a config option only to measure what
  promotion costs.

`tma_gemm` takes a config (CONFIG_KEYS: tile sizes, warps, stages, persistent or one program per tile,
imprecise_k for fp8 (0: no promotion, not exact; measured only), flatten (Triton's loop flattening),
tma_store (the output tile through shared memory and the TMA unit)); `config_for` gives the default.
Requirements: K a multiple of 16 (TMA row stride), 16-byte aligned rows, compute
capability 9.0+ on CUDA (the interpreter also runs it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import interpreting, num_sms

FORMATS = ("int8", "fp8")

# Keyed by code format: the fastest exact config of each in the H100 sweep (docs/KERNELS.md, "Large M"):
# 128 x 256 tiles on two warpgroups, 3 stages; int8 with the tile loop flattened (the next tile's loads
# start during this tile's epilogue), fp8 with promotion every 128 products.
DEFAULT_CONFIGS = {
    "int8": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, persistent=True,
                 flatten=True),
    "fp8": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, persistent=True,
                imprecise_k=128),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2,
                          persistent=True, imprecise_k=32)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "persistent",
               "imprecise_k", "flatten", "tma_store")


def config_for(fmt: str) -> dict:
    return dict(INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIGS[fmt])


def tma_supported(m: int, n: int, k: int, device: torch.device) -> bool:
    """Sizes and device this kernel takes: K % 16 == 0 (TMA strides), Hopper or newer on CUDA."""
    if k % 16 or k == 0 or m == 0 or n == 0:
        return False
    if device.type != "cuda":
        return interpreting()
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row-tiles share each column of weight tiles while it is in L2.
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % gsize
    pid_n = (tile % group) // gsize
    return pid_m, pid_n


@triton.jit
def _tma_gemm_kernel(a_desc, w_desc, c_desc, sa_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_cm, num_tiles,
                     num_programs, tiles_per_program,
                     HAS_BIAS: tl.constexpr, FP8: tl.constexpr, IMPRECISE_K: tl.constexpr, FLATTEN: tl.constexpr,
                     TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, INTERP: tl.constexpr, TPP_C: tl.constexpr, KT_C: tl.constexpr):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # Persistent: one program per SM walks the tiles with stride num_programs; otherwise num_programs is
    # the tile count and each program does one tile.
    # (A loop over the program's own tile count, not range(pid, num_tiles, step), and constexpr bounds
    # under the interpreter, which cannot take runtime values as range bounds. The last round's spare
    # programs redo the last tile: same values, written twice.)
    for i in tl.range(0, TPP_C if INTERP else tiles_per_program, flatten=FLATTEN):
        tile = tl.minimum(tl.program_id(0) + i * num_programs, num_tiles - 1)
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(KT_C if INTERP else k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])  # out-of-bounds rows / K read as zeros
            w = w_desc.load([off_n, ki * BLOCK_K])
            if FP8:
                if IMPRECISE_K == 0:  # Hopper's fast fp8 accumulation, no promotion (for measurement only)
                    acc = tl.dot(a, w.T, acc, out_dtype=tl.float32)
                else:
                    acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=IMPRECISE_K, out_dtype=tl.float32)
            else:
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        # Epilogue in float32, in the reference's order: (acc * sa) * sw + bias.
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if TMA_STORE:
            c_desc.store([off_m, off_n], y.to(c_desc.dtype))  # clipped to (M, N) by the TMA unit
        else:
            c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def tma_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: dict | None = None) -> torch.Tensor:
    """a_codes (M, K) and w_codes (N, K), both int8 or both float8_e4m3fn, integer values (int4 or int8
    codes; fp8 only for int4); a_scale (M,), w_scale (N,), bias (N,) or None. Returns (M, N) out_dtype.
    config: keys of CONFIG_KEYS (default: `config_for(format)`)."""
    fmt = {torch.int8: "int8", getattr(torch, "float8_e4m3fn", None): "fp8"}.get(a_codes.dtype)
    if fmt is None or w_codes.dtype != a_codes.dtype:
        raise ValueError(f"codes must be both int8 or both float8_e4m3fn, got {a_codes.dtype} and {w_codes.dtype}")
    if a_codes.dim() != 2 or w_codes.dim() != 2 or a_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a_codes.shape)}, w {tuple(w_codes.shape)}")
    m, k = a_codes.shape
    n = w_codes.shape[0]
    out = torch.empty((m, n), device=a_codes.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if not tma_supported(m, n, k, a_codes.device):
        raise ValueError(f"tma_gemm needs K % 16 == 0 and a Hopper GPU (or the interpreter); K={k}")
    cfg = {**config_for(fmt), **(config or {})}
    a = a_codes if a_codes.stride(-1) == 1 and a_codes.stride(0) == k else a_codes.contiguous()
    w = w_codes if w_codes.stride(-1) == 1 and w_codes.stride(0) == k else w_codes.contiguous()
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    tma_store = bool(cfg.get("tma_store", False)) and (n * out.element_size()) % 16 == 0
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn]) if tma_store else a_desc  # unused when not storing by TMA
    sa = a_scale.reshape(-1).float().contiguous()
    sw = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sw
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(tiles, num_sms(a.device)) if cfg.get("persistent", True) else tiles
    interp = interpreting()
    _tma_gemm_kernel[(programs,)](
        a_desc, w_desc, c_desc, sa, sw, b, out, m, n, k, out.stride(0), tiles, programs, triton.cdiv(tiles, programs),
        HAS_BIAS=bias is not None, FP8=fmt == "fp8", IMPRECISE_K=int(cfg.get("imprecise_k", 128)),
        FLATTEN=bool(cfg.get("flatten", False)), TMA_STORE=tma_store, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], INTERP=interp, TPP_C=triton.cdiv(tiles, programs) if interp else 1,
        KT_C=triton.cdiv(k, bk) if interp else 1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
