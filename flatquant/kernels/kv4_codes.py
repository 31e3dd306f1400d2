"""Packed KV4 code bytes as tensor-core operands, for `kv4_attention`'s decode kernel: the low and high
nibble of each byte (element 2j and 2j + 1 of head_dim) as 16 + code in bf16 / fp16 ("biased", by logic
ops; "prmt", four bytes at a time in inline PTX) or as the code itself ("exact", through float32)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl


@triton.jit
def _nibble_f32(c):
    """2**23 + c as float32 for an int32 c in [0, 255] (OR into the mantissa: no int-to-float conversion)."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _codes16(c, LOW: tl.constexpr, FP16: tl.constexpr):
    """Nibbles of packed bytes c (int16, 0..255) as 16 + code in bf16 (or fp16), exactly: the code goes into
    the top mantissa bits of 16.0 (two logic ops and an OR per element; no int-to-float conversion)."""
    if FP16:  # 16 + code = 0x4C00 | code << 6
        bits = ((c << 6) if LOW else (c << 2)) & 0x3C0
        return (bits | 0x4C00).to(tl.float16, bitcast=True)
    else:  # 16 + code = 0x4180 | code << 3
        bits = ((c << 3) if LOW else (c >> 1)) & 0x78
        return (bits | 0x4180).to(tl.bfloat16, bitcast=True)


_PRMT = ("{{\n.reg .b32 x01, x23, z;\nmov.b32 z, 0;\nprmt.b32 x01, $4, z, 0x4140;\nprmt.b32 x23, $4, z, 0x4342;\n"
         "shl.b32 $0, x01, {lo}; and.b32 $0, $0, {m}; or.b32 $0, $0, {b};\n"
         "shl.b32 $1, x23, {lo}; and.b32 $1, $1, {m}; or.b32 $1, $1, {b};\n"
         "{hop}.b32 $2, x01, {hi}; and.b32 $2, $2, {m}; or.b32 $2, $2, {b};\n"
         "{hop}.b32 $3, x23, {hi}; and.b32 $3, $3, {m}; or.b32 $3, $3, {b};\n}}")
_PRMT_BF16 = tl.constexpr(_PRMT.format(lo=3, hop="shr", hi=1, m="0x00780078", b="0x41804180"))
_PRMT_FP16 = tl.constexpr(_PRMT.format(lo=6, hop="shl", hi=2, m="0x03C003C0", b="0x4C004C00"))


@triton.jit
def _codes16_prmt(c8, FP16: tl.constexpr, INTERP: tl.constexpr):
    """`_codes16` (low, high) of uint8 bytes c8, four bytes per 32-bit register on the GPU: two byte
    permutes spread them over 16-bit halves, then a shift, an AND and an OR make two codes at once."""
    if INTERP:
        c = c8.to(tl.int16)
        return _codes16(c, True, FP16), _codes16(c, False, FP16)
    else:
        if FP16:
            return tl.inline_asm_elementwise(_PRMT_FP16, "=r,=r,=r,=r,r", [c8],
                                             dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_PRMT_BF16, "=r,=r,=r,=r,r", [c8],
                                             dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _codes_exact(c, LOW: tl.constexpr, DT: tl.constexpr):
    """Nibbles of packed bytes c (int32) as the code itself in DT (through float32: 2**23 + code - 2**23)."""
    nib = (c & 15) if LOW else (c >> 4)
    return (_nibble_f32(nib) - 8388608.0).to(DT)
