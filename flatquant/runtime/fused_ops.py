"""Elementwise ops of the static decoder: residual add + RMSNorm and SiLU(gate) · up, one Triton launch each
on CUDA, with plain-PyTorch references of the same semantics (Hugging Face's LlamaRMSNorm / LlamaMLP order:
the sum rounded to the model dtype, the norm in float32, rounded, then times the weight in the model dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rmsnorm_reference(x, res, w, eps: float):
    r = x if res is None else res + x
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(r.dtype), r


def silu_mul_reference(gu: torch.Tensor) -> torch.Tensor:
    n = gu.shape[-1] // 2
    return torch.nn.functional.silu(gu[..., :n]) * gu[..., n:]


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, N, eps, HAS_RES: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0)
    if HAS_RES:
        r = (x.to(tl.float32) + tl.load(res_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(rout_ptr + row * N + cols, r, mask=m)
    else:
        r = x
    h = r.to(tl.float32)
    var = tl.sum(h * h, 0) / N
    y = (h * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    tl.store(out_ptr + row * N + cols, (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(gu_ptr + row * 2 * N + cols, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * N + N + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * N + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def _use_triton(t: torch.Tensor, fused: bool) -> bool:
    return fused and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def add_rmsnorm(x, res, w, eps: float, fused: bool = True):
    """(RMSNorm(res + x) * w, res + x); res None: (RMSNorm(x) * w, x)."""
    if not _use_triton(x, fused) or w.dtype != x.dtype:
        return add_rmsnorm_reference(x, res, w, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty_like(x2)
    rout = torch.empty_like(x2) if res is not None else x2
    r2 = res.reshape(-1, n).contiguous() if res is not None else x2
    block = triton.next_power_of_2(n)
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, w, out, rout, n, eps, HAS_RES=res is not None, BLOCK=block,
                                       num_warps=8 if block >= 4096 else 4)
    return out.view(x.shape), rout.view(x.shape)


def silu_mul(gu: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """SiLU(gu[..., :n]) * gu[..., n:] for gu (..., 2n) (the fused gate / up output)."""
    if not _use_triton(gu, fused):
        return silu_mul_reference(gu)
    n = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * n).contiguous()
    out = torch.empty(g2.shape[0], n, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](g2, out, n, BLOCK=block, num_warps=4)
    return out.view(*gu.shape[:-1], n)


def self_check(device, dtype=torch.bfloat16) -> str | None:
    """None if the Triton ops match their references on `device`, else the first mismatch (one line)."""
    g = torch.Generator(device=device).manual_seed(0)
    for n in (64, 4096, 5000):
        x = torch.randn(3, n, generator=g, device=device).to(dtype)
        r = torch.randn(3, n, generator=g, device=device).to(dtype)
        w = (torch.rand(n, generator=g, device=device) + 0.5).to(dtype)
        for res in (None, r):
            a, ar = add_rmsnorm(x, res, w, 1e-5)
            b, br = add_rmsnorm_reference(x, res, w, 1e-5)
            tol = 2e-2 * b.float().abs().max()
            if (ar.float() - br.float()).abs().max() > tol or (a.float() - b.float()).abs().max() > tol:
                return f"add_rmsnorm mismatch at n={n}"
        gu = torch.randn(3, 2 * n, generator=g, device=device).to(dtype)
        a, b = silu_mul(gu), silu_mul_reference(gu)
        if (a.float() - b.float()).abs().max() > 2e-2 * b.float().abs().max() + 1e-3:
            return f"silu_mul mismatch at n={n}"
    return None
