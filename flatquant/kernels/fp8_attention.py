"""Flash-decoding over an FP8 (e4m3) K/V cache: the codes are read as bytes and converted per tile inside
the kernel, so a decode step reads one byte per cached element (the eager path casts the whole cache to
bf16 first: a read, a write and a read of twice the bytes).

Semantics (`decode_attention_reference`): softmax(q · K / sqrt(D)) V over positions [0, lengths[b]) with
K, V = the cached codes cast to q's dtype (times kv_scale) — what SDPA on the cast cache computes; query head
h reads kv head h // (Hq / Hkv). Same grid, splits and combine as `kv4_attention` (its `_combine_kernel`).
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

from flatquant.kernels._triton_utils import _mm, interpreting
from flatquant.kernels.kv4_attention import LOG2E, _combine_kernel, _pow2, choose_splits

BLOCK_N = 64     # cache positions per inner step (K + V tiles of 64 x 128 bytes)
NUM_WARPS = 4
NUM_STAGES = 2


def decode_attention_reference(q, k, v, lengths, sm_scale: float | None = None, kv_scale: float = 1.0):
    """q (B, Hq, D); k, v float8_e4m3fn (B, Hkv, S_max, D); lengths (B,) -> (B, Hq, D) in q.dtype."""
    b, hq, d = q.shape
    hkv, s_max = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    cast = (lambda c: c.to(q.dtype)) if kv_scale == 1.0 else (lambda c: (c.float() * kv_scale).to(q.dtype))
    kf = cast(k).float().repeat_interleave(hq // hkv, dim=1)
    vf = cast(v).float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * sm_scale
    valid = torch.arange(s_max, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", p, vf).to(q.dtype)


@triton.jit
def _fp8_as(x8, DT: tl.constexpr, INTERP: tl.constexpr):
    """e4m3 bytes (uint8) -> DT, exactly (every e4m3 value is a bf16 / fp16 / fp32 value)."""
    if INTERP:  # bits into a float32 whose exponent is 120 too small, then rescaled (numpy keeps denormals)
        b = x8.to(tl.int32)
        v = ((b & 0x7F) << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36
        return tl.where((b & 0x80) != 0, -v, v).to(DT)
    else:
        return x8.to(tl.float8e4nv, bitcast=True).to(DT)


@triton.jit
def _fp8_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_base, sk_s, n0, end, qk_scale, d, dmask,
               BLOCK: tl.constexpr, IS_F32: tl.constexpr, INTERP: tl.constexpr):
    """One block of BLOCK cache positions with the online softmax (scores in log2 units)."""
    DT = q.dtype
    n = n0 + tl.arange(0, BLOCK)
    nmask = n < end
    off = kv_base + n[:, None].to(tl.int64) * sk_s + d[None, :]
    cm = nmask[:, None] & dmask[None, :]
    k = _fp8_as(tl.load(k_ptr + off, mask=cm, other=0), DT, INTERP)
    s = _mm(q, tl.trans(k), IS_F32, INTERP) * qk_scale
    s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * corr + tl.sum(p, 1)
    v = _fp8_as(tl.load(v_ptr + off, mask=cm, other=0), DT, INTERP)
    acc = acc * corr[:, None] + _mm(p.to(DT), v, IS_F32, INTERP)
    return m_new, l_i, acc


@triton.jit
def _fp8_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, opart_ptr, lse_ptr, qk_scale, v_scale, S_MAX,
                      SPLIT_LEN, NUM_SPLITS, sq_b, sq_h, so_b, so_h, sk_b, sk_h, sk_s,
                      HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr, BLOCK: tl.constexpr, DIRECT: tl.constexpr, IS_F32: tl.constexpr,
                      STAGES: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    heads = h * G + g
    qm = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :], mask=qm, other=0.0)
    DT = q.dtype
    kv_base = b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    n_iters = tl.cdiv(tl.maximum(end - start, 0), BLOCK)
    if INTERP:  # the interpreter cannot range() over loaded bounds
        it = 0
        while it < n_iters:
            m_i, l_i, acc = _fp8_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_base, sk_s, start + it * BLOCK, end,
                                       qk_scale, d, dmask, BLOCK, IS_F32, INTERP)
            it += 1
    else:
        for it in tl.range(0, n_iters, num_stages=STAGES):
            m_i, l_i, acc = _fp8_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_base, sk_s, start + it * BLOCK, end,
                                       qk_scale, d, dmask, BLOCK, IS_F32, INTERP)
    inv_l = tl.where(l_i > 0, v_scale / tl.where(l_i > 0, l_i, 1.0), 0.0)
    o = acc * inv_l[:, None]
    if DIRECT:
        tl.store(out_ptr + b.to(tl.int64) * so_b + heads[:, None] * so_h + d[None, :], o.to(DT), mask=qm)
    else:
        row = (b * (HKV * G) + heads).to(tl.int64) * NUM_SPLITS + split  # partials (B, Hq, splits, D)
        tl.store(opart_ptr + row[:, None] * D + d[None, :], o, mask=qm)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=gmask)


def decode_attention(q, k, v, lengths, sm_scale: float | None = None, kv_scale: float = 1.0, *,
                     num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """`decode_attention_reference` in Triton (CUDA, or the interpreter); lengths above S_max are clamped.
    The graph-safe split count comes from S_max (no host read of the lengths)."""
    b, hq, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k, v must be (B={b}, Hkv | {hq}, S_max, D={d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != torch.float8_e4m3fn or v.dtype != k.dtype or k.stride() != v.stride() or k.stride(-1) != 1:
        raise ValueError("k and v must be float8_e4m3fn with the same strides and a contiguous last dim")
    if q.device.type != "cuda" and not interpreting():
        return decode_attention_reference(q, k, v, lengths, sm_scale, kv_scale)
    hkv, s_max = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if b * hq == 0:
        return out
    if s_max == 0:
        return out.zero_()
    block_n = block_n or BLOCK_N
    ns = num_splits or choose_splits(b, hkv, s_max, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(s_max, ns), block_n) * block_n
    ns = triton.cdiv(s_max, split_len)
    direct = ns == 1
    opart = lse = out
    if not direct:
        opart = torch.empty(b, hq, ns, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, ns, dtype=torch.float32, device=q.device)
    g = hq // hkv
    k8, v8 = k.view(torch.uint8), v.view(torch.uint8)
    _fp8_split_kernel[(b * hkv, ns)](
        q, k8, v8, lengths.to(q.device), out, opart, lse, sm_scale * kv_scale * LOG2E, float(kv_scale), s_max,
        split_len, ns, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k8.stride(0), k8.stride(1),
        k8.stride(2), HKV=hkv, G=g, G_PAD=_pow2(g), D=d, D_PAD=_pow2(d), BLOCK=block_n, DIRECT=direct,
        IS_F32=q.dtype == torch.float32, STAGES=NUM_STAGES, INTERP=interpreting(), num_warps=NUM_WARPS)
    if not direct:
        _combine_kernel[(b * hq,)](opart, lse, out, ns, d, out.stride(0), out.stride(1),
                                   HQ=hq, NS_PAD=_pow2(ns, 2), D_PAD=_pow2(d), num_warps=4)
    return out
