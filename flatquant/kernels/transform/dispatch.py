"""Fused Kronecker transform + per-token symmetric quantization: the entry point and the kernel choice.

For each token x (n = n1 * n2): Y = P1ᵀ x.reshape(n1, n2) P2, scale = max(alpha * max|Y| / maxq, 1e-8),
codes = clamp(round_half_even(Y / scale)), written as packed int4 (byte j = element j | element j + n/2
<< 4, `flatquant.kernels.reference`) or one code per byte, plus the float32 scale. Semantics:
`reference.transform_quantize_reference`. P2 = None (single-sided, e.g. o_proj head mixing) skips the
first product; P1 = None uses an identity P1.

Precision: the dots multiply in the activation dtype (fp16/bf16 on tensor cores; float32 inputs use exact
IEEE float32 dots). T = X P2 is rounded once to the half dtype for the second product (default; the
reference with `round_intermediate=True`), or, with `split_intermediate=True` (token / tiled kernels
only), kept as hi + lo half-precision parts (~float32 accuracy).
"""
from __future__ import annotations

import torch

from flatquant.kernels._triton_utils import interpreting, next_pow2, num_sms, triton_dtype
from flatquant.kernels.reference import dot_dtype_for
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig
from flatquant.kernels.transform.block import launch_block
from flatquant.kernels.transform.chunked import chunked_supported, launch_chunked
from flatquant.kernels.transform.common import ONCHIP_MAX_ELEMENTS, plan
from flatquant.kernels.transform.split import launch_split, split_programs
from flatquant.kernels.transform.token import launch_token

KERNELS = ("block", "chunked", "split", "token", "tiled")


def default_kernel(m: int, n1: int, n2: int, has_p2: bool, device: torch.device, onchip: bool = True,
                   split_intermediate: bool = False, config: dict | None = None,
                   routes: RouteConfig = DEFAULT_ROUTES) -> str:
    """The kernel `fused_transform_quantize` takes for m tokens of n1 x n2 factors when none is named. With
    an even n1, on-chip factors and split_intermediate off: "split" for at most routes.split_max_m tokens with
    padded factor tiles of at least routes.split_min_tile elements (while its programs fit on the SMs);
    "chunked" at prefill where a factor is not a power of two (routes.chunked_prefill, `chunked_supported`);
    else "block". Otherwise "token" with the factors on chip, else "tiled"."""
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    if not (onchip and n1 % 2 == 0 and not split_intermediate):
        return "token" if onchip else "tiled"
    if m <= routes.split_max_m and n1p * n2p >= routes.split_min_tile:
        if interpreting() or m * split_programs(n2, config, routes)[1] <= num_sms(device):
            return "split"
    if m > routes.split_max_m and routes.chunked_prefill and (n1p != n1 or n2p != n2):
        if chunked_supported(n1, n2, has_p2):
            return "chunked"
    return "block"


def fused_transform_quantize(x: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                             alpha: float = 1.0, bits: int = 4, *, split_intermediate: bool = False,
                             onchip_max_elements: int | None = None, tiles: tuple[int, int, int] | None = None,
                             num_programs: int | None = None, out_format: str | None = None,
                             kernel: str | None = None, config: dict | None = None,
                             routes: RouteConfig | None = None):
    """Triton fused transform + quantize. x (..., n) contiguous-able, fp16/bf16/fp32, on CUDA (or any
    device under TRITON_INTERPRET=1). Returns (stored codes, scale) like the reference:
    (..., n/2) uint8 packed int4 (or (..., n) int8 for bits=8) and float32 scale of shape x.shape[:-1].
    P1 / P2 are read row-major in the activation's dot dtype; others (another dtype, or a column-major Q
    from torch.linalg.qr) are converted on every call, one extra kernel each, which at decode costs as
    much as the transform itself. `W4A4Linear` caches converted factors; direct callers should too.

    split_intermediate: keep T = X P2 in float32 as two half-precision parts for the second product
    (per-token kernel only, ~float32 accuracy) instead of rounding it once to the half dtype (default;
    the same rounding as the model's own bf16 matmuls).

    kernel: None picks one (`default_kernel`, steered by `routes`, default DEFAULT_ROUTES): "split"
    (split.py, each token over several programs; one with config CB >= n2), "chunked" (chunked.py, n1 in
    power-of-two chunks), "block" (block.py, several tokens per step, big dots), "token" (token.py, the
    per-token on-chip kernel) or "tiled" (token.py, corner cases). config: block-kernel overrides ({"BT",
    "num_warps", "num_stages", "programs_per_sm", "maxnreg", "prefetch"}; `block_config`; maxnreg caps the
    registers per thread), chunked-kernel overrides (`chunked_config`), split-kernel overrides ({"CB",
    "num_warps"}: Y columns per program, warps).
    onchip_max_elements / tiles (BN, BK, BR) override the on-chip vs tiled choice (tests force the
    corner-case path with small values).

    out_format: None / "packed" (the stored format above), or, for the cuBLASLt GEMM routes, the same
    codes unpacked one per byte in natural element order: "int8" ((..., n) int8, for torch._int_mm) or
    "fp8" ((..., n) float8_e4m3fn, 4 bits only, for torch._scaled_mm). Unpacked output writes n bytes
    per token instead of n/2 but saves the GEMM a separate unpack pass (read n/2 + write n bytes).
    """
    fmt = out_format or ("packed" if bits == 4 else "int8")
    if fmt not in ("packed", "int8", "fp8") or (fmt != "int8" and bits == 8):
        raise ValueError(f"out_format {out_format!r} is not valid for {bits} bits")
    n = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n1, n2, pack, h, s, rlo = plan(n, p1, p2, bits, packed=fmt == "packed")
    routes = routes or DEFAULT_ROUTES
    dd = dot_dtype_for(x.dtype)
    if p1 is None:
        p1 = torch.eye(n1, device=x.device, dtype=dd)
    p1c = p1.to(device=x.device, dtype=dd).contiguous()
    p2c = p2.to(device=x.device, dtype=dd).contiguous() if p2 is not None else p1c  # dummy when absent
    out_dt = {"packed": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    out = torch.empty((m, n // 2 if pack else n), device=x.device, dtype=out_dt)
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    interp = interpreting()
    n1p, n2p = next_pow2(n1), next_pow2(n2)
    limit = ONCHIP_MAX_ELEMENTS if onchip_max_elements is None else onchip_max_elements
    onchip = tiles is None and max(n1p * n2p, n2p * n2p if p2 is not None else 0) <= limit
    if kernel is None:
        kernel = default_kernel(m, n1, n2, p2 is not None, x.device, onchip, split_intermediate, config, routes)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'block', 'chunked', 'split', 'token' or 'tiled', got {kernel!r}")
    alpha32 = float(torch.tensor(float(alpha), dtype=torch.float32))
    if kernel == "chunked":
        if split_intermediate or tiles is not None:
            raise ValueError("the chunked kernel needs split_intermediate=False and on-chip factors")
        launch_chunked(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp,
                       num_programs, config)
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    if kernel == "split":
        if n1 % 2 or split_intermediate or n1p * n2p > limit:
            raise ValueError("the split kernel needs an even n1, split_intermediate=False and on-chip factors")
        launch_split(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp, config,
                     routes)
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    if kernel == "block":
        if n1 % 2 or split_intermediate or n1p * n2p > limit:
            raise ValueError("the block kernel needs an even n1, split_intermediate=False and on-chip factors")
        launch_block(x2, p1c, p2c, p2 is not None, out, scale, alpha32, n1, n2, pack, bits, dd, interp,
                     num_programs, config, routes.pdl_trigger_code())
        return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)
    consts = dict(PACK=pack, SPLIT=bool(split_intermediate), IS_F32=dd == torch.float32, MAXQ=2 ** (bits - 1) - 1,
                  DT=triton_dtype(dd), INTERP=interp, TRIGGER=routes.pdl_trigger_code())
    launch_token(x2, p1c, p2c, p2 is not None, out, scale, alpha32, (n1, n2, h, s, rlo), consts, kernel == "token",
                 num_programs, tiles)
    return out.reshape(*lead, out.shape[-1]), scale.reshape(lead)


def unfused_transform_quantize_torch(x: torch.Tensor, p1: torch.Tensor | None, p2: torch.Tensor | None,
                                     alpha: float = 1.0, bits: int = 4):
    """The unfused PyTorch sequence (the paper's Table 6 baseline): matmul, matmul, quantize, pack.

    Intermediates are in x's dtype (as a model would run it). Used only as a benchmark baseline.
    """
    n = x.shape[-1]
    n1 = p1.shape[0] if p1 is not None else n // p2.shape[0]
    xr = x.reshape(-1, n1, n // n1)
    if p2 is not None:
        xr = torch.matmul(xr, p2)
    if p1 is not None:
        xr = torch.matmul(p1.t(), xr)
    y = xr.reshape(-1, n).float()
    maxq = 2 ** (bits - 1) - 1
    scale = (y.abs().amax(dim=-1, keepdim=True) * alpha / maxq).clamp(min=1e-8)
    q = torch.clamp(torch.round(y / scale), -maxq - 1, maxq).to(torch.int8)
    if bits == 4:
        q = ((q[:, : n // 2] & 0xF) | (q[:, n // 2:] << 4)).to(torch.uint8)
