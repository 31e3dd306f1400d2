"""W4A4 GEMM (Triton): packed int4 activations x packed int4 weights -> bf16/fp16.

y[m, n] = (sum_k qa[m, k] * qw[n, k]) * sa[m] * sw[n] (+ bias[n])

Layout (see `flatquant.kernels.reference`): row r of A (M, K/2) and of W (N, K/2), uint8, byte j =
element j (low nibble) | element j + K/2 (high nibble), two's complement. A K-tile of BLOCK_K bytes
therefore carries BLOCK_K elements of the first half of K (low nibbles) and the BLOCK_K elements
BLOCK_K/2... of the second half at the same offsets (high nibbles), so the main loop is

    acc += dot(A_lo, W_loᵀ) + dot(A_hi, W_hiᵀ)

with no interleaving: the low nibble is sign-extended by (b << 4) >> 4 on int8, the high by b >> 4.

Two tensor-core routes:
- "int8": int8 x int8 -> int32 dots (wgmma / mma int8 on Hopper). Exact.
- "fp8": the int4 values are exact in float8 e4m3; fp8 x fp8 -> float32 dots. Same peak rate as int8 on
  H100; exact while sums stay below 2**24, with max_num_imprecise_acc=32 so that Hopper's reduced-
  precision fp8 accumulation is promoted to float32 every 32 products (tested against the reference).
Scales and bias are applied in the epilogue in float32, in the reference's order.
8-bit codes (bits=8, int8 storage) use the int8 route with one dot per tile.

`w4a4_gemm` takes DEFAULT_GEMM_ROUTE unless a route is named (`W4A4Linear` names
RouteConfig.triton_gemm_route; benchmarks/kernels/bench_w4a4_linear.py records both).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import interpreting

DEFAULT_GEMM_ROUTE = "int8"
ROUTES = ("int8", "fp8")

# Fixed config for the interpreter (and for tests that force one): no autotuning there.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def _m_bucket(m: int) -> int:
    for b in (16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


def _configs():
    c = triton.Config
    return [
        # decode / small M: weight-bandwidth bound, many N tiles to fill the SMs
        c(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1), num_warps=4, num_stages=4),
        c(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1), num_warps=4, num_stages=4),
        c(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1), num_warps=4, num_stages=5),
        c(dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1), num_warps=4, num_stages=4),
        # medium M
        c(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4),
        c(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4),
        c(dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=4),
        # large M: compute bound (wgmma needs >= 64 rows per warpgroup)
        c(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), num_warps=8, num_stages=3),
        c(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
        c(dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
        c(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    ]


def _prune(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    if mb <= 16:
        want = (16,)
    elif mb <= 64:
        want = (16, 64)
    elif mb <= 256:
        want = (64, 128)
    else:
        want = (128, 256)
    kh = named_args["KH"]
    out = [c for c in configs if c.kwargs["BLOCK_M"] in want and c.kwargs["BLOCK_K"] <= max(32, kh)]
    return out or configs[:1]


@triton.jit
def _unpack_lo(b):
    b8 = b.to(tl.int8, bitcast=True)
    return (b8 << 4) >> 4


@triton.jit
def _unpack_hi(b):
    b8 = b.to(tl.int8, bitcast=True)
    return b8 >> 4


@triton.jit
def _w4a4_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, KH, stride_am, stride_bn, stride_cm,
                      M_BUCKET, KH_C: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
                      FP8: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_l = tl.where(rm < M, rm, 0).to(tl.int64)  # clamp rows: loads stay in bounds without a mask
    rn_l = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + rm_l[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn_l[:, None] * stride_bn + rk[None, :]
    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, KH_C if INTERP else KH, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            km = (k0 + rk) < KH
            a = tl.load(a_ptrs, mask=km[None, :], other=0)
            b = tl.load(b_ptrs, mask=km[None, :], other=0)
        if PACK:
            a_lo = _unpack_lo(a)
            a_hi = _unpack_hi(a)
            b_lo = tl.trans(_unpack_lo(b))
            b_hi = tl.trans(_unpack_hi(b))
            if FP8:
                # max_num_imprecise_acc=32: Hopper's fast fp8 accumulation keeps too few bits for sums
                # of thousands of products; promote to full float32 every 32-deep step (keeps it exact).
                acc = tl.dot(a_lo.to(tl.float16).to(tl.float8e4nv), b_lo.to(tl.float16).to(tl.float8e4nv), acc,
                             max_num_imprecise_acc=32, out_dtype=tl.float32)
                acc = tl.dot(a_hi.to(tl.float16).to(tl.float8e4nv), b_hi.to(tl.float16).to(tl.float8e4nv), acc,
                             max_num_imprecise_acc=32, out_dtype=tl.float32)
            else:
                acc = tl.dot(a_lo, b_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, b_hi, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # epilogue: float32, (acc * sa) * sb + bias, like the reference
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        y = y + bias[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.cache
def _get_autotuned():
    """The autotuned kernel, built on first use (once per process)."""
    kw = dict(configs=_configs(), key=["M_BUCKET", "N", "KH", "HAS_BIAS", "PACK", "FP8"],
              prune_configs_by={"early_config_prune": _prune})
    inner = triton.heuristics({"EVEN_K": lambda args: args["KH"] % args["BLOCK_K"] == 0})(_w4a4_gemm_kernel)
    try:
        return triton.autotune(warmup=5, rep=20, **kw)(inner)
    except TypeError:  # a Triton without warmup/rep
        return triton.autotune(**kw)(inner)


def w4a4_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, bits: int = 4,
              route: str | None = None, config: dict | None = None) -> torch.Tensor:
    """Integer GEMM with scale epilogue. a (M, K/2) uint8 packed (bits=4) or (M, K) int8 (bits=8);
    a_scale (M,) float32; w (N, K/2) / (N, K); w_scale (N,); bias (N,) or None. Returns (M, N) out_dtype.

    route: "int8" | "fp8" (None = DEFAULT_GEMM_ROUTE). config: fixed BLOCK_M/N/K/GROUP_M (+ num_warps,
    num_stages) instead of autotuning (the interpreter always uses a fixed config).
    """
    route = route or DEFAULT_GEMM_ROUTE
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 8 and route == "fp8":
        route = "int8"  # int8 codes are not exact in e4m3
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, w {tuple(w.shape)}")
    m, kh = a.shape
    n = w.shape[0]
    pack = bits == 4
    a = a if a.stride(-1) == 1 else a.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    if pack:
        a8, w8 = a.view(torch.uint8), w.view(torch.uint8)
    else:
        a8, w8 = a.view(torch.int8), w.view(torch.int8)
    sa = a_scale.reshape(-1).float().contiguous()
    sb = w_scale.reshape(-1).float().contiguous()
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    b = bias.reshape(-1).float().contiguous() if bias is not None else sb
    interp = interpreting()
    common = dict(KH_C=kh if interp else 1, HAS_BIAS=bias is not None, PACK=pack, FP8=route == "fp8",
                  INTERP=interp)
    args = (a8, w8, sa, sb, b, out, m, n, kh, a8.stride(0), w8.stride(0), out.stride(0), _m_bucket(m))
    if interp or config is not None:
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 3)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w4a4_gemm_kernel[grid](*args, EVEN_K=kh % cfg["BLOCK_K"] == 0, num_warps=warps, num_stages=stages,
                                **common, **cfg)
    else:
        kern = _get_autotuned()
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        kern[grid](*args, **common)
    return out
