"""Plain-PyTorch reference of the KV4 cache: the semantics `kv4_attention` (Triton) must reproduce.

Cache layout, one tensor set per decoder layer (see /work/tools/KV4_INTERFACE.md):
  k_codes, v_codes : uint8   (B, Hkv, S_max, D // 2)  unsigned 4-bit codes in [0, 15], two per byte:
                                                     element 2j in the LOW nibble, element 2j+1 in the HIGH one
  k_scale, v_scale : float32 (B, Hkv, S_max)
  k_zero,  v_zero  : float32 (B, Hkv, S_max)          integer-valued zero points
  lengths          : int32   (B,)                     valid tokens per sequence (0 allowed)

Quantization is `flatquant.core.quantizer.quantize_asymmetric(x, bits=4, alpha=clip)` along head_dim in
float32, so dequantize_kv(*quantize_kv(x, c), x.dtype) equals Quantizer(4, symmetric=False, clip_ratio=c)(x)
bit for bit. Note the nibble order differs from `reference.pack_int4` (halves, signed codes): the KV
codes are unsigned and interleaved pairwise.
"""
from __future__ import annotations

import math

import torch

from flatquant.core.quantizer import quantize_asymmetric

KV_BITS = 4
KV_MAXQ = 2**KV_BITS - 1


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes in [0, 15] (..., D) -> (..., D // 2) uint8, element 2j low nibble, 2j+1 high nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_pairs`: (..., D // 2) uint8 -> (..., D) uint8 codes in [0, 15]."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def check_head_dim(d: int) -> None:
    if d % 2:
        raise ValueError(f"KV4 packing needs an even head_dim, got {d}")


@torch.no_grad()
def quantize_kv(x: torch.Tensor, clip: float | torch.Tensor = 1.0):
    """x (..., D) -> (codes uint8 (..., D // 2), scale float32 (...), zero float32 (...))."""
    check_head_dim(x.shape[-1])
    alpha = clip.detach().float() if isinstance(clip, torch.Tensor) else float(clip)
    codes, scale, zero = quantize_asymmetric(x.detach(), KV_BITS, alpha)
    return pack_pairs(codes), scale.squeeze(-1).float(), zero.squeeze(-1).float()


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(code - zero) * scale in float32, then cast to dtype (the fake quantizer's order)."""
    c = unpack_pairs(codes).float()
    return ((c - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).to(dtype)


def check_decode_shapes(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths) -> tuple[int, ...]:
    """(B, Hq, Hkv, S_max, D) after checking the interface's shapes and dtypes; ValueError otherwise."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    check_head_dim(d)
    if k_codes.dim() != 4 or k_codes.shape[0] != b or k_codes.shape[3] != d // 2:
        raise ValueError(f"k_codes must be (B={b}, Hkv, S_max, D//2={d // 2}), got {tuple(k_codes.shape)}")
    _, hkv, s_max, _ = k_codes.shape
    if tuple(v_codes.shape) != tuple(k_codes.shape):
        raise ValueError(f"v_codes shape {tuple(v_codes.shape)} != k_codes shape {tuple(k_codes.shape)}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if t.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8, got {t.dtype}")
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if tuple(t.shape) != (b, hkv, s_max):
            raise ValueError(f"{name} must be (B, Hkv, S_max) = {(b, hkv, s_max)}, got {tuple(t.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if tuple(lengths.shape) != (b,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integers of shape (B,) = ({b},), got {lengths.dtype} {tuple(lengths.shape)}")
    return b, hq, hkv, s_max, d


def decode_attention_f32(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths,
                         sm_scale: float | None = None) -> torch.Tensor:
    """`decode_attention` before the final cast: float32 (B, Hq, D)."""
    _, hq, hkv, s_max, d = check_decode_shapes(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > s_max):
        raise ValueError(f"lengths must lie in [0, S_max={s_max}]")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    g = hq // hkv
    k = dequantize_kv(k_codes, k_scale, k_zero).repeat_interleave(g, dim=1)  # (B, Hq, S, D) float32
    v = dequantize_kv(v_codes, v_scale, v_zero).repeat_interleave(g, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * sm_scale
    valid = torch.arange(s_max, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row (length 0) gives zeros
    return torch.einsum("bhs,bhsd->bhd", p, v)


def decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths,
                     sm_scale: float | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over the KV4 cache positions [0, lengths[b]).

    q (B, Hq, D); query head h reads kv head h // (Hq // Hkv); softmax in float32; output (B, Hq, D) in
    q.dtype; a sequence of length 0 gives zeros. sm_scale None = 1 / sqrt(D)."""
    return decode_attention_f32(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths,
                                sm_scale).to(q.dtype)
