"""Elementwise ops of the static decoder: residual add + RMSNorm, SiLU(gate) · up and the rotary embedding,
one Triton launch each on CUDA, with plain-PyTorch references of the same semantics (Hugging Face's
LlamaRMSNorm / LlamaMLP / apply_rotary_pos_emb order: the sum rounded to the model dtype, the norm in float32,
rounded, then times the weight in the model dtype; RoPE's two products and their sum each rounded).
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


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) * cos + rotate_half(x) * sin, cos / sin (1, S, D) (HF's apply_rotary_pos_emb)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


@triton.jit
def _rne_cast(v, DT: tl.constexpr):
    """float32 -> DT rounding to nearest even (bf16 by integer ops: the interpreter's cast truncates)."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, out2_ptr, S, H, SPLIT, sx_b, sx_s, sc_s, HALF: tl.constexpr,
                 HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Heads [0, SPLIT) of token t go to out (T, SPLIT, D), heads [SPLIT, H) to out2 (T, H - SPLIT, D)."""
    t = tl.program_id(0)  # token b * S + s
    b = t // S
    s = t % S
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, HALF_PAD)
    m = (hh[:, None] < H) & (j[None, :] < HALF)
    xb = x_ptr + b.to(tl.int64) * sx_b + s.to(tl.int64) * sx_s + hh[:, None] * (2 * HALF) + j[None, :]
    x1 = tl.load(xb, mask=m, other=0.0)
    x2 = tl.load(xb + HALF, mask=m, other=0.0)
    DT = x1.dtype
    cb = s.to(tl.int64) * sc_s + j
    c1 = tl.load(cos_ptr + cb, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cb + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cb, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cb + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    a, c = x1.to(tl.float32), x2.to(tl.float32)
    o1 = _rne_cast(_rne_cast(a * c1, DT).to(tl.float32) + _rne_cast(-c * s1, DT).to(tl.float32), DT)
    o2 = _rne_cast(_rne_cast(c * c2, DT).to(tl.float32) + _rne_cast(a * s2, DT).to(tl.float32), DT)
    first = hh[:, None] < SPLIT
    ob = out_ptr + (t.to(tl.int64) * SPLIT + hh[:, None]) * (2 * HALF) + j[None, :]
    tl.store(ob, o1, mask=m & first)
    tl.store(ob + HALF, o2, mask=m & first)
    ob2 = out2_ptr + (t.to(tl.int64) * (H - SPLIT) + hh[:, None] - SPLIT) * (2 * HALF) + j[None, :]
    tl.store(ob2, o1, mask=m & (hh[:, None] >= SPLIT))
    tl.store(ob2 + HALF, o2, mask=m & (hh[:, None] >= SPLIT))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = True, split: int | None = None):
    """`rope_reference` in one launch; x may be a strided view whose (H, D) block is contiguous per token (the
    q / k columns of the fused qkv output). split None: one (B, S, H, D) tensor; else the heads [0, split)
    and [split, H) as two tensors, each contiguous on the fused path (views of one result otherwise)."""
    b, s, h, d = x.shape
    if (not _use_triton(x, fused) or cos.dtype != x.dtype or d % 2 or x.stride(3) != 1 or x.stride(2) != d
            or cos.shape[-2] not in (1, s)):
        out = rope_reference(x, cos, sin)
        return out if split is None else (out[:, :, :split], out[:, :, split:])
    sp = h if split is None else split
    out = torch.empty((b, s, sp, d), dtype=x.dtype, device=x.device)
    out2 = torch.empty((b, s, h - sp, d), dtype=x.dtype, device=x.device)
    c2, s2 = cos.reshape(-1, d), sin.reshape(-1, d)
    if c2.stride(-1) != 1 or s2.stride() != c2.stride():
        c2, s2 = c2.contiguous(), s2.contiguous()
    if b * s * h:
        block_h = min(triton.next_power_of_2(h), 16)
        _rope_kernel[(b * s, triton.cdiv(h, block_h))](x, c2, s2, out, out2, s, h, sp, x.stride(0), x.stride(1),
                                                       c2.stride(0) if c2.shape[0] > 1 else 0, HALF=d // 2,
                                                       HALF_PAD=triton.next_power_of_2(d // 2), BLOCK_H=block_h,
                                                       num_warps=4)
    return out if split is None else (out, out2)


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
    qkv = torch.randn(2, 5, 8 * 128, generator=g, device=device).to(dtype) * 3
    qk = qkv[..., :6 * 128].view(2, 5, 6, 128)
    cs = [torch.randn(1, 5, 128, generator=g, device=device).to(dtype) for _ in range(2)]
    for c, sn in ((cs[0], cs[1]), (cs[0][:, 2:3], cs[1][:, 2:3])):
        if not torch.equal(rope(qk if c.shape[1] > 1 else qk[:, :1], c, sn),
                           rope_reference(qk if c.shape[1] > 1 else qk[:, :1], c, sn)):
            return "rope mismatch"
    return None
