"""Large-M GEMM routes on cuBLASLt: int4 codes unpacked to one byte each, then a vendor GEMM.

At large M the GEMM is compute bound and cuBLASLt's INT8 / FP8 kernels run closer to the tensor-core
peak than the Triton kernel in `w4a4_gemm.py`. Two routes, same semantics as the reference:

- "int_mm":    torch._int_mm(int8 codes, int8 weightᵀ) -> int32 (exact), then ONE fused elementwise
               pass (Triton `_scale_epilogue_kernel`): (acc · sa[m]) · sw[n] + bias[n] -> bf16/fp16/fp32.
               Costs an int32 (M, N) round trip through memory.
- "scaled_mm": torch._scaled_mm on float8 e4m3 codes (int4 values are exact in e4m3, the products and
               the float32 sums are exact below 2**24: K · 64 < 2**24 for K < 262144) with row-wise
               scales (sa as (M, 1), sw as (1, N)) and the bias applied inside the GEMM epilogue; no
               intermediate. cuBLASLt wants a bf16 output and a bf16 bias for row-wise scaling, so the
               bias is rounded to bf16 first (half a bf16 ulp of the bias; documented in docs/KERNELS.md).

The activation codes come straight out of the fused transform kernel in the unpacked format
(`fused_transform_quantize(..., out_format="int8" | "fp8")`), so no activation unpack pass is needed.
The weight is static: `W4A4Linear` caches its unpacked codes (one byte per weight: the packed weight
stays the stored format, the cache adds 2x the packed bytes; drop it with `W4A4Linear.clear_cache()`).
`unpack_int4_codes` is the one-pass unpack used for that cache and for already-packed activations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import interpreting

CUBLAS_ROUTES = ("int_mm", "scaled_mm")


def route_supported(route: str, m: int, n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the vendor GEMM accepts these sizes. CUDA limits: torch._int_mm needs M > 16 and K, N
    multiples of 8; FP8 _scaled_mm needs K, N multiples of 16 and (row-wise scales) a bf16 output."""
    if route == "int_mm":
        return device.type != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16)
    if route == "scaled_mm":
        ok = hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn") and out_dtype == torch.bfloat16
        return ok and (device.type != "cuda" or (k % 16 == 0 and n % 16 == 0))
    raise ValueError(f"unknown cuBLAS route {route!r}")


# ---------------------------------------------------------------------------------- unpack ---

@triton.jit
def _unpack_kernel(p_ptr, o_ptr, R, KH, stride_p, stride_o, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Byte j of a row -> element j (low nibble) and element j + K/2 (high nibble), sign-extended.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r[:, None] < R) & (j[None, :] < KH)
    b = tl.load(p_ptr + r.to(tl.int64)[:, None] * stride_p + j[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
    lo = (b << 4) >> 4
    hi = b >> 4
    ob = o_ptr + r.to(tl.int64)[:, None] * stride_o + j[None, :]
    if o_ptr.dtype.element_ty == tl.int8:
        tl.store(ob, lo, mask=mask)
        tl.store(ob + KH, hi, mask=mask)
    else:  # float8: exact for -8..7
        tl.store(ob, lo.to(tl.float32).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(ob + KH, hi.to(tl.float32).to(o_ptr.dtype.element_ty), mask=mask)


def unpack_int4_codes(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """(R, K/2) uint8 packed -> (R, K) int8 (or float8_e4m3fn) codes in natural order, one pass.
    Same result as `reference.unpack_int4` (tested)."""
    p = packed.view(torch.uint8)
    p = p if p.stride(-1) == 1 else p.contiguous()
    r, kh = p.shape
    out = torch.empty((r, 2 * kh), device=p.device, dtype=dtype)
    if r and kh:
        br, bk = 16, 128
        _unpack_kernel[(triton.cdiv(r, br), triton.cdiv(kh, bk))](p, out, r, kh, p.stride(0), out.stride(0),
                                                                  BLOCK_R=br, BLOCK_K=bk)
    return out


# -------------------------------------------------------------------------------- epilogue ---

@triton.jit
def _scale_epilogue_kernel(acc_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, stride_acc, stride_c,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm.to(tl.int64)[:, None] * stride_acc + rn[None, :], mask=mask, other=0)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # the reference's order
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_c + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def scale_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """y = (acc · sa[:, None]) · sw[None, :] (+ bias) in float32 -> out_dtype, one read of acc (int32)."""
    m, n = acc.shape
    out = torch.empty((m, n), device=acc.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    sa = a_scale.reshape(-1).float().contiguous()
    sb = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sb
    bm, bn = (16, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _scale_epilogue_kernel[grid](acc, sa, sb, b, out, m, n, acc.stride(0), out.stride(0),
                                 HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out


# ------------------------------------------------------------------------------------ GEMMs ---

def int_mm_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_codes (M, K) int8, w_codes (N, K) int8 (row-major, i.e. a column-major Wᵀ as cuBLASLt wants)."""
    acc = torch._int_mm(a_codes, w_codes.t())
    return scale_epilogue(acc, a_scale, w_scale, bias, out_dtype)


def scaled_mm_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a_codes (M, K) float8_e4m3fn, w_codes (N, K) float8_e4m3fn; row-wise scales, bf16 out only."""
    if out_dtype != torch.bfloat16:
        raise ValueError("the scaled_mm route (row-wise FP8 scales) produces bf16 only")
    sa = a_scale.reshape(-1, 1).float()
    sb = w_scale.reshape(1, -1).float()
    b = bias.to(torch.bfloat16) if bias is not None else None
    r = torch._scaled_mm(a_codes, w_codes.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16,
                         use_fast_accum=False)  # full float32 accumulation keeps the integer sums exact
    return r[0] if isinstance(r, tuple) else r
