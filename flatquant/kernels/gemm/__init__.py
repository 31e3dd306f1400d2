"""The W4A4 GEMMs (Triton / cuBLASLt): w4a4_gemm.py (Triton, packed int4, any M), decode.py and
decode_kernels.py (M <= 16, packed weight read directly), cublas.py (cuBLASLt INT8 / FP8 on one-byte codes,
large M), tma.py (Hopper TMA GEMM on one-byte codes, large M)."""
from __future__ import annotations

from flatquant.kernels.gemm.cublas import int_mm_gemm, scaled_mm_gemm, unpack_int4_codes
from flatquant.kernels.gemm.decode import activation_format, w4a4_gemm_decode
from flatquant.kernels.gemm.tma import tma_gemm
from flatquant.kernels.gemm.w4a4_gemm import DEFAULT_GEMM_ROUTE, ROUTES, w4a4_gemm

__all__ = ["DEFAULT_GEMM_ROUTE", "ROUTES", "activation_format", "int_mm_gemm", "scaled_mm_gemm", "tma_gemm",
           "unpack_int4_codes", "w4a4_gemm", "w4a4_gemm_decode"]
