"""Fused Kronecker transform + per-token quantization (Triton): the entry point `fused_transform_quantize`
(dispatch.py) and its kernels, one module each: block.py, split.py (decode), chunked.py (prefill, factors
that are not powers of two), token.py (per-token and tiled corner cases); common.py is what they share."""
from __future__ import annotations

from flatquant.kernels.transform.dispatch import (
    KERNELS,
    default_kernel,
    fused_transform_quantize,
    unfused_transform_quantize_torch,
)

__all__ = ["KERNELS", "default_kernel", "fused_transform_quantize", "unfused_transform_quantize_torch"]
