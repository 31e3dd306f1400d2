"""W4A4 kernels: fused Kronecker transform + quantize, int4 GEMM on INT8/FP8 tensor cores, W4A4Linear.

Pure-PyTorch reference (always available, any device): `flatquant.kernels.reference`.
Triton kernels (need `triton`; CUDA, or the CPU interpreter with TRITON_INTERPRET=1):
`fused_transform_quantize`, `w4a4_gemm`, `w4a4_gemm_decode` (M <= 16), and the cuBLASLt routes
`int_mm_gemm` / `scaled_mm_gemm`, `tma_gemm`. Layout: transform/ (fused transform + quantize kernels),
gemm/ (the GEMMs), fused_decode.py (one-launch decode linear), linear.py (W4A4Linear), routes.py
(RouteConfig: which kernel each call takes). Design notes: docs/KERNELS.md.
"""
from __future__ import annotations

from flatquant.kernels.linear import BACKENDS, W4A4Linear, set_backend
from flatquant.kernels.reference import (
    kron_transform_reference,
    pack_codes,
    pack_int4,
    quantize_weight_reference,
    transform_quantize_reference,
    unpack_codes,
    unpack_int4,
    w4a4_gemm_reference,
    w4a4_linear_reference,
)
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig

try:
    import triton  # noqa: F401 - only whether it is installed matters

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:
    from flatquant.kernels.fused_decode import fused_decode_linear
    from flatquant.kernels.gemm import (
        DEFAULT_GEMM_ROUTE,
        ROUTES,
        int_mm_gemm,
        scaled_mm_gemm,
        tma_gemm,
        unpack_int4_codes,
        w4a4_gemm,
        w4a4_gemm_decode,
    )
    from flatquant.kernels.transform import fused_transform_quantize, unfused_transform_quantize_torch

__all__ = [
    "BACKENDS",
    "DEFAULT_ROUTES",
    "HAS_TRITON",
    "RouteConfig",
    "W4A4Linear",
    "kron_transform_reference",
    "pack_codes",
    "pack_int4",
    "quantize_weight_reference",
    "set_backend",
    "transform_quantize_reference",
    "unpack_codes",
    "unpack_int4",
    "w4a4_gemm_reference",
    "w4a4_linear_reference",
]
if HAS_TRITON:
    __all__ += [
        "DEFAULT_GEMM_ROUTE",
        "ROUTES",
        "fused_decode_linear",
        "fused_transform_quantize",
        "int_mm_gemm",
        "scaled_mm_gemm",
        "tma_gemm",
        "unfused_transform_quantize_torch",
        "unpack_int4_codes",
        "w4a4_gemm",
        "w4a4_gemm_decode",
    ]
