"""Pure-PyTorch reference of the W4A4 kernels: the semantics the Triton kernels must reproduce.

Everything here runs on any device (CPU included) and is the `backend="reference"` path of
`W4A4Linear`.

Packing layout (int4, used for activations AND weights)
-------------------------------------------------------
A row of K codes (K even) is stored as K/2 bytes. Byte j holds element j in its low nibble and element
j + K/2 in its high nibble, both as 4-bit two's complement:

    packed[..., j] = (q[..., j] & 0xF) | ((q[..., j + K/2] & 0xF) << 4)

so a GEMM over K is dot(A_lo, B_lo) + dot(A_hi, B_hi) with A_lo = low nibbles (elements [0, K/2)) and
A_hi = high nibbles (elements [K/2, K)), with no interleaving. Packed tensors are torch.uint8.
8-bit codes are not packed: they are stored as torch.int8, one per byte.

Transform + quantize semantics (float32 math)
---------------------------------------------
x (..., n) with n = n1 * n2 -> X (..., n1, n2) -> Y = P1ᵀ X P2 -> y (..., n) (= x @ kron(P1, P2)),
then symmetric per-token quantization of y (`flatquant.core.quantizer.quantize_symmetric`):
scale = max(alpha * max|y| / maxq, 1e-8), q = clamp(round_half_even(y / scale), -maxq - 1, maxq).
P1 = None or P2 = None means identity (P2 = None is the single-sided o_proj head-mixing transform).

The kernels multiply in the activation's dtype when it is fp16/bf16 (tensor cores): the factors are
rounded to that dtype first, so the reference does the same (`dot_dtype`); the products are then
exact in float32 and only the float32 summation order differs. The intermediate T = X P2 is kept in
float32 (the kernel splits it into a high and a low half-precision part for the second product);
`round_intermediate=True` models the faster variant that rounds T to the half dtype instead.
"""
from __future__ import annotations

import math

import torch

from flatquant.core.quantizer import quantize_symmetric

HALF_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------ factors ---

def kron_factors(n: int) -> tuple[int, int]:
    """(n1, n2), n1 * n2 = n, n1 <= n2, n1 + n2 minimal (same rule as flatquant.core.transforms)."""
    try:
        from flatquant.core.transforms import kron_factors as _kf

        return _kf(n)
    except ImportError:  # pragma: no cover - transforms.py not there yet
        n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        return n1, n // n1


def dot_dtype_for(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels multiply in: the activation's dtype if half precision, else float32."""
    return x_dtype if x_dtype in HALF_DTYPES else torch.float32


# ------------------------------------------------------------------------------------ packing ---

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [-8, 7] along the last dim (even length K) into (..., K/2) uint8."""
    k = codes.shape[-1]
    if k % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {k}")
    q = codes.to(torch.int16)
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    lo = q[..., : k // 2] & 0xF
    hi = q[..., k // 2:] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., K/2) uint8 -> (..., K) int8 codes in [-8, 7]."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.cat([lo, hi], dim=-1).to(torch.int8)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage format for `bits`: packed uint8 for 4 bits, int8 for 8 bits."""
    _check_bits(bits)
    return pack_int4(codes) if bits == 4 else codes.to(torch.int8)


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int8 codes."""
    _check_bits(bits)
    return unpack_int4(stored) if bits == 4 else stored.to(torch.int8)


# ------------------------------------------------------------------------- transform/quantize ---

def kron_transform_reference(x: torch.Tensor, p1: torch.Tensor | None, p2: torch.Tensor | None,
                             round_intermediate: bool = False) -> torch.Tensor:
    """y = x @ kron(P1, P2) on the last dim, in float32, with the kernels' operand rounding.

    Returns a float32 tensor of x's shape.
    """
    n = x.shape[-1]
    dd = dot_dtype_for(x.dtype)
    if p1 is not None:
        n1 = p1.shape[0]
    elif p2 is not None:
        n1 = n // p2.shape[0]
    else:
        return x.float()
    n2 = n // n1
    if n1 * n2 != n:
        raise ValueError(f"factors do not match the size {n}")
    xr = x.to(dd).float().reshape(*x.shape[:-1], n1, n2)
    if p2 is not None:
        xr = torch.matmul(xr, p2.to(dd).float())
        if round_intermediate and dd in HALF_DTYPES:
            xr = xr.to(dd).float()
    if p1 is not None:
        xr = torch.matmul(p1.to(dd).float().t(), xr)
    return xr.reshape(x.shape)


def transform_quantize_reference(x: torch.Tensor, p1: torch.Tensor | None = None,
                                 p2: torch.Tensor | None = None, alpha: float = 1.0, bits: int = 4,
                                 round_intermediate: bool = False):
    """Reference of the fused kernel. x (..., n) -> (stored codes, scale).

    stored: (..., n/2) uint8 (4 bits, layout above) or (..., n) int8 (8 bits);
    scale: float32 of shape x.shape[:-1] (one per token).
    """
    y = kron_transform_reference(x, p1, p2, round_intermediate)
    codes, scale = quantize_symmetric(y, bits, _alpha32(alpha))
    return pack_codes(codes, bits), scale.squeeze(-1)


def quantize_weight_reference(w: torch.Tensor, bits: int = 4, alpha: float | torch.Tensor = 1.0):
    """Symmetric per-output-channel weight quantization: w (out, in) -> (stored codes, scale (out,))."""
    codes, scale = quantize_symmetric(w.float(), bits, alpha)
    return pack_codes(codes, bits), scale.squeeze(-1)


def _alpha32(alpha) -> torch.Tensor | float:
    """The clip factor as the float32 value the kernels see."""
    if isinstance(alpha, torch.Tensor):
        return alpha.detach().float()
    return torch.tensor(float(alpha), dtype=torch.float32)


# ------------------------------------------------------------------------------------- GEMM ---

def w4a4_gemm_reference(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                        bits: int = 4) -> torch.Tensor:
    """y[m, n] = (sum_k qa[m, k] qw[n, k]) * sa[m] * sw[n] (+ bias[n]) -> out_dtype.

    a: (M, K/2) uint8 packed (or (M, K) int8 for 8 bits), a_scale (M,); w: (N, K/2), w_scale (N,).
    The integer sum is exact (float64), the epilogue is float32 in the order above.
    """
    qa = unpack_codes(a, bits).double()
    qw = unpack_codes(w, bits).double()
    acc = (qa @ qw.t()).float()
    y = acc * a_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(out_dtype)


def w4a4_linear_reference(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None, p1: torch.Tensor | None, p2: torch.Tensor | None,
                          alpha: float = 1.0, bits: int = 4, out_dtype: torch.dtype | None = None,
                          round_intermediate: bool = False) -> torch.Tensor:
    """The whole W4A4 linear: transform + quantize activations, integer GEMM, scales, bias."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    a, sa = transform_quantize_reference(x2, p1, p2, alpha, bits, round_intermediate)
    od = out_dtype or (x.dtype if x.dtype in HALF_DTYPES else torch.float32)
    y = w4a4_gemm_reference(a, sa, w_packed, w_scale, bias, od, bits)
    return y.reshape(*shape[:-1], w_scale.shape[0])
