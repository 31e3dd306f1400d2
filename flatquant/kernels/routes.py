"""RouteConfig: which kernel and GEMM route each W4A4 call takes, as one explicit, immutable value.

The defaults are the measured choices (docs/KERNELS.md, "Dispatch"). A caller that wants other routes
(a benchmark, a test) builds its own with `dataclasses.replace(DEFAULT_ROUTES, ...)` and passes it:
`W4A4Linear(..., routes=...)`, `set_backend(model, backend, routes=...)`, or the `routes=` argument of
`fused_transform_quantize`, `w4a4_gemm_decode` and `fused_decode_linear`. Nothing reads module globals.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ONE_BYTE_ROUTES = ("int_mm", "scaled_mm", "tma_int8", "tma_fp8")
TRITON_GEMM_ROUTES = ("int8", "fp8")
PDL_TRIGGERS = (None, "start", "end")
DECODE_MAX_M = 128  # the decode GEMM's largest M (gemm/decode.py)


def _frozen(m: Mapping | None) -> Mapping:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True, eq=False)
class RouteConfig:
    """Dispatch settings of the Triton backend (module docstring). Fields, by the part they steer:

    W4A4Linear's GEMM route by tokens M: `small_m_max` (the decode GEMM up to it; <= DECODE_MAX_M), `large_m_min` and
    `large_m_route` (cuBLASLt from it), `tma_m_min` and `tma_route` (the TMA GEMM from it; None: only where
    pinned), `fallback_routes` (tried in order where a route does not take the sizes), `triton_gemm_route`
    (the Triton GEMM's format), `fused_decode_max_m` (the one-launch decode kernel up to it; 0: off),
    `tma_configs` (format -> TMA GEMM config overrides).
    Fused transform: `split_max_m` / `split_min_tile` (the split kernel for at most that many tokens with
    padded factor tiles of at least that many elements), `chunked_prefill` (the chunked kernel at prefill
    where a factor is not a power of two), `pdl_trigger` (where a programmatic dependent may start:
    "start", "end" or None), `split_columns` / `split_warps` (the split kernel's Y columns per program, warps).
    Decode GEMM: `gemv_max_m` and `gemv_all_m_max_weights` (the dp4a kernel up to M = gemv_max_m, fewer M
    above that many weights), `pdl_gemv` / `pdl_mma` (launch as a programmatic dependent), `l2_prefetch_gemv`
    / `l2_prefetch_mma` (ask L2 for the weight before waiting), `mma_unpacked_activations` (codes one per
    byte for the tensor-core kernel), `decode_overrides` (kernel config keys over the default decode config),
    `fused_decode_l2_prefetch` (the one-launch kernel's L2 prefetch).
    """

    small_m_max: int = 32
    large_m_min: int = 33
    large_m_route: str = "scaled_mm"
    tma_m_min: int | None = None
    tma_route: str = "tma_int8"
    fallback_routes: tuple[str, ...] = ("scaled_mm", "int_mm", "tma_int8", "tma_fp8")
    triton_gemm_route: str = "int8"
    fused_decode_max_m: int = 0
    tma_configs: Mapping[str, Mapping] = field(default_factory=dict)
    split_max_m: int = 16
    split_min_tile: int = 128 * 128
    chunked_prefill: bool = True
    pdl_trigger: str | None = "start"
    split_columns: int = 32
    split_warps: int = 8
    gemv_max_m: int = 4
    gemv_all_m_max_weights: int = 4096 * 4096
    pdl_gemv: bool = True
    pdl_mma: bool = True
    l2_prefetch_gemv: bool = False
    l2_prefetch_mma: bool = False
    mma_unpacked_activations: bool = True
    decode_overrides: Mapping = field(default_factory=dict)
    fused_decode_l2_prefetch: bool = False

    def __post_init__(self):
        if self.large_m_route not in ONE_BYTE_ROUTES or self.tma_route not in ("tma_int8", "tma_fp8"):
            raise ValueError(f"large_m_route must be one of {ONE_BYTE_ROUTES} and tma_route tma_int8 / tma_fp8, "
                             f"got {self.large_m_route!r}, {self.tma_route!r}")
        if not set(self.fallback_routes) <= set(ONE_BYTE_ROUTES):
            raise ValueError(f"fallback_routes must be among {ONE_BYTE_ROUTES}, got {self.fallback_routes}")
        if not 0 <= self.small_m_max <= DECODE_MAX_M:
            raise ValueError(f"small_m_max must lie in [0, {DECODE_MAX_M}] (the decode GEMM's M), "
                             f"got {self.small_m_max}")
        if self.triton_gemm_route not in TRITON_GEMM_ROUTES:
            raise ValueError(f"triton_gemm_route must be one of {TRITON_GEMM_ROUTES}, got {self.triton_gemm_route!r}")
        if self.pdl_trigger not in PDL_TRIGGERS:
            raise ValueError(f"pdl_trigger must be None, 'start' or 'end', got {self.pdl_trigger!r}")
        object.__setattr__(self, "fallback_routes", tuple(self.fallback_routes))
        object.__setattr__(self, "tma_configs", _frozen({k: _frozen(v) for k, v in self.tma_configs.items()}))
        object.__setattr__(self, "decode_overrides", _frozen(self.decode_overrides))

    def pdl(self, kernel: str) -> bool:
        """Whether decode kernel "gemv" / "mma" launches as a programmatic dependent."""
        return self.pdl_gemv if kernel == "gemv" else self.pdl_mma

    def l2_prefetch(self, kernel: str) -> bool:
        """Whether decode kernel "gemv" / "mma" asks L2 for its weight slice before the PDL wait."""
        return self.l2_prefetch_gemv if kernel == "gemv" else self.l2_prefetch_mma

    def pdl_trigger_code(self) -> int:
        """pdl_trigger as the transform kernels' TRIGGER constexpr (0 none, 1 start, 2 end)."""
        return PDL_TRIGGERS.index(self.pdl_trigger)

    def as_dict(self) -> dict:
        """Plain values, for benchmark records."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["tma_configs"] = {k: dict(v) for k, v in self.tma_configs.items()}
        out["decode_overrides"] = dict(self.decode_overrides)
        out["fallback_routes"] = list(self.fallback_routes)
        return out


DEFAULT_ROUTES = RouteConfig()
