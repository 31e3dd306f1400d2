"""The KV4 cache's write path in one Triton launch per K or V: quantize (kv4_reference.quantize_kv), store the
codes, scales and zeros into the cache at a position read on the device, and optionally return the
dequantized new rows (what prefill attention reads). Replaces ~15 eager ops (amax, amin, div, round, clamp,
pack, index_copy, unpack, float32 multiply, cast) per tensor and layer.

Exactness: the reference on CUDA divides by the scalar 15 as a multiply by its float32 reciprocal (PyTorch's
scalar-divisor path), on the CPU as a division; the kernel does the same per device (RECIP). `gpu_ok` checks
bit equality on the device once; callers fall back to the reference where it fails.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

from flatquant.kernels import kv4_reference as ref
from flatquant.kernels._triton_utils import interpreting
from flatquant.kernels.kv4_attention import _pow2, _rne

INV15 = float(np.float32(1.0) / np.float32(15.0))  # float32 1 / 15, as PyTorch's CUDA division by a scalar


@triton.jit
def _cast(v, DT: tl.constexpr):
    """float32 -> DT rounding to nearest even (bf16 by integer ops: the interpreter's cast truncates)."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _write_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, deq_ptr, clip_ptr, pos_ptr, n_rows, H, S, CAP, D2,
                  sxb, sxh, sxs, BLOCK_R: tl.constexpr, D2_PAD: tl.constexpr, HAS_POS: tl.constexpr,
                  DEQ: tl.constexpr, RECIP: tl.constexpr, INV: tl.constexpr, INTERP: tl.constexpr):
    """Rows r = (b, h, s) of x (B, H, S, 2 * D2) -> cache row (b, h, pos + s) of codes / scale / zero."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D2_PAD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D2)
    r64 = rows.to(tl.int64)
    b, h, s = r64 // (H * S), (r64 // S) % H, r64 % S
    base = x_ptr + (b * sxb + h * sxh + s * sxs)[:, None] + 2 * cols[None, :]
    xe = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(clip_ptr)
    big = float("inf")
    xmax = tl.maximum(tl.max(tl.where(mask, xe, -big), 1), tl.max(tl.where(mask, xo, -big), 1))
    xmin = tl.minimum(tl.min(tl.where(mask, xe, big), 1), tl.min(tl.where(mask, xo, big), 1))
    xmax = tl.maximum(xmax, 0.0) * alpha
    xmin = tl.minimum(xmin, 0.0) * alpha
    if RECIP:
        scale = tl.maximum((xmax - xmin) * INV, 1e-8)
    else:
        scale = tl.maximum(tl.math.div_rn(xmax - xmin, 15.0), 1e-8)
    zero = _rne(tl.math.div_rn(-xmin, scale), INTERP)
    ce = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xe, scale[:, None]), INTERP) + zero[:, None], 0.0), 15.0)
    co = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xo, scale[:, None]), INTERP) + zero[:, None], 0.0), 15.0)
    packed = ce.to(tl.int32) | (co.to(tl.int32) << 4)
    off = tl.load(pos_ptr).to(tl.int64) if HAS_POS else 0
    dst = (b * H + h) * CAP + off + s
    tl.store(codes_ptr + dst[:, None] * D2 + cols[None, :], packed.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + dst, scale, mask=rmask)
    tl.store(zero_ptr + dst, zero, mask=rmask)
    if DEQ:
        dq = deq_ptr + r64[:, None] * (2 * D2) + 2 * cols[None, :]
        tl.store(dq, _cast((ce - zero[:, None]) * scale[:, None], deq_ptr.dtype.element_ty), mask=mask)
        tl.store(dq + 1, _cast((co - zero[:, None]) * scale[:, None], deq_ptr.dtype.element_ty), mask=mask)


def _clip_tensor(clip, device) -> torch.Tensor:
    if isinstance(clip, torch.Tensor):
        return clip.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(clip), dtype=torch.float32, device=device)


def write_kv_reference(x, clip, codes, scale, zero, pos: torch.Tensor | None = None, dequant: bool = False):
    """The semantics: quantize x (B, H, S, D) with kv4_reference.quantize_kv, store into the cache tensors
    codes (B, H, CAP, D/2), scale / zero (B, H, CAP) at positions [pos, pos + S) (pos: a 1-element integer
    tensor; None = 0); returns the dequantized x in x.dtype if `dequant`, else None."""
    c, sc, z = ref.quantize_kv(x, clip)
    s = x.shape[2]
    if pos is None:
        codes[:, :, :s], scale[:, :, :s], zero[:, :, :s] = c, sc, z
    else:
        idx = pos.reshape(-1)[:1].long() + torch.arange(s, device=x.device)
        for dst, t in ((codes, c), (scale, sc), (zero, z)):
            dst.index_copy_(2, idx, t)
    return ref.dequantize_kv(c, sc, z, x.dtype) if dequant else None


def write_kv(x, clip, codes, scale, zero, pos: torch.Tensor | None = None, dequant: bool = False):
    """`write_kv_reference` in one Triton launch (CUDA, or the interpreter)."""
    if x.dim() != 4 or codes.shape[:2] != x.shape[:2] or codes.shape[3] * 2 != x.shape[3]:
        raise ValueError(f"x (B, H, S, D) {tuple(x.shape)} does not match the cache codes {tuple(codes.shape)}")
    ref.check_head_dim(x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, s, d = x.shape
    cap = codes.shape[2]
    deq = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device) if dequant else None
    n = b * h * s
    if n == 0:
        return deq
    if not (codes.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        raise ValueError("the cache tensors must be contiguous")
    d2_pad = _pow2(d // 2, 1)
    block_r = max(1, min(32, 4096 // d2_pad))
    recip = x.is_cuda and not interpreting()
    _write_kernel[(triton.cdiv(n, block_r),)](
        x, codes, scale, zero, deq if dequant else x, _clip_tensor(clip, x.device), pos if pos is not None else x,
        n, h, s, cap, d // 2, x.stride(0), x.stride(1), x.stride(2), BLOCK_R=block_r, D2_PAD=d2_pad,
        HAS_POS=pos is not None, DEQ=dequant, RECIP=recip, INV=INV15, INTERP=interpreting())
    return deq


@functools.cache
def gpu_ok(device: torch.device) -> bool:
    """Whether `write_kv` equals `write_kv_reference` bit for bit on `device` (random data, bf16 and fp32,
    a tensor clip, a prefill and a decode write)."""
    g = torch.Generator(device=device).manual_seed(0)
    for dt in (torch.bfloat16, torch.float32):
        x = (torch.randn(2, 3, 37, 128, generator=g, device=device) * 2).to(dt)
        x[0, 0, 0] = 0
        clip = torch.tensor(0.93, device=device)
        pos = torch.tensor([5], device=device)
        for p in (None, pos):
            outs = []
            for fn in (write_kv, write_kv_reference):
                cache = (torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=device),
                         torch.zeros(2, 3, 64, device=device), torch.zeros(2, 3, 64, device=device))
                outs.append((fn(x, clip, *cache, pos=p, dequant=True),) + cache)
            if not all(torch.equal(a, b) for a, b in zip(*outs)):
                return False
    return True
