"""W4A4Linear: fused transform + quantize of the input, then the integer GEMM with scale epilogue.

    y = Q_a(x @ kron(P1, P2)) · Q_w(W)ᵀ (+ bias)

The weight given here must ALREADY be transformed by the caller (W' = W P⁻ᵀ, see
`flatquant.core.transforms`); it is quantized offline, symmetric per output channel. The activation
transform (P1, P2; None = identity) and the clip factor alpha are applied at run time.

Two backends with the same semantics (`flatquant.kernels.reference`):
- "reference": plain PyTorch, any device (CPU included), float32 math;
- "triton": the Triton kernels (CUDA, or the interpreter under TRITON_INTERPRET=1).
Switch with `module.backend = "triton"` or `set_backend(model, "triton")`.

GEMM route dispatch (Triton backend), by the number of tokens M = x.numel() / in_features, steered by the
layer's `routes` (a `flatquant.kernels.routes.RouteConfig`; DEFAULT_ROUTES unless given):
- M <= routes.fused_decode_max_m (0 by default: off) where that kernel takes the case (`uses_fused_decode`):
  transform, quantize and GEMV in one launch (fused_decode.py);
- M <= routes.small_m_max (16, decode): "decode" (gemm/decode.py: reads the packed int4 weight);
- M >= routes.tma_m_min (None: off): routes.tma_route ("tma_int8" / "tma_fp8": the TMA GEMM on one-byte
  codes, gemm/tma.py; Hopper+, K % 16 == 0);
- M >= routes.large_m_min: routes.large_m_route ("scaled_mm": cuBLASLt FP8 with row-wise scales; "int_mm":
  cuBLASLt INT8 + scale epilogue; gemm/cublas.py); where the chosen route does not take the sizes / output
  dtype / bits, the next of routes.fallback_routes that does, else the Triton GEMM;
- otherwise (and as the last fallback) the Triton GEMM `w4a4_gemm` on routes.triton_gemm_route.
`gemm_route` pins one route for every M: "int8" / "fp8" (Triton GEMM), "decode" (M <= 16 only, else
the Triton GEMM), "int_mm", "scaled_mm", "tma_int8", "tma_fp8" (falling back like "auto" where
unsupported). The cuBLAS and TMA routes need the weight unpacked to one byte per code: it is built once and
cached in the layer (`_cast_cache`; the packed `qweight` stays the stored/state_dict format). That cache
costs N·K bytes per layer on top of the N·K/2 packed bytes; `clear_cache()` drops it.
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.core.quantizer import quantize_symmetric
from flatquant.kernels import reference as ref
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig

BACKENDS = ("reference", "triton")
GEMM_ROUTES = ("auto", "int8", "fp8", "decode", "int_mm", "scaled_mm", "tma_int8", "tma_fp8")
# The code format each one-byte-code route reads: the fused kernel writes activations in it directly.
CODE_FORMAT = {"int_mm": "int8", "scaled_mm": "fp8", "tma_int8": "int8", "tma_fp8": "fp8"}


def one_byte_gemm(route: str):
    """The GEMM of a CODE_FORMAT route: (a_codes, sa, w_codes, sw, bias, out_dtype) -> (M, N)."""
    from flatquant.kernels.gemm import cublas
    from flatquant.kernels.gemm.tma import tma_gemm

    return {"int_mm": cublas.int_mm_gemm, "scaled_mm": cublas.scaled_mm_gemm}.get(route, tma_gemm)


class W4A4Linear(nn.Module):
    """Drop-in replacement for nn.Linear with int4 (or int8) weights and activations.

    Buffers: qweight (out, in/2) uint8 packed (int8 (out, in) for 8 bits), weight_scale (out,) float32,
    bias (out,) float32 or None, p1 (n1, n1) / p2 (n2, n2) float32 or None, alpha (scalar float32).
    `routes` (RouteConfig, not saved) steers the Triton backend's kernel choices.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 p1: torch.Tensor | None = None, p2: torch.Tensor | None = None, alpha: float = 1.0,
                 backend: str = "reference", gemm_route: str | None = None, split_intermediate: bool = False,
                 out_dtype: torch.dtype | None = None, routes: RouteConfig | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        if gemm_route not in (None,) + GEMM_ROUTES:
            raise ValueError(f"gemm_route must be one of {GEMM_ROUTES}, got {gemm_route!r}")
        self.gemm_route = gemm_route
        self.split_intermediate = split_intermediate
        self.out_dtype = out_dtype
        kw = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, kw, dtype=torch.uint8 if bits == 4 else torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self._check_factors(p1, p2)
        self.register_buffer("p1", None if p1 is None else p1.detach().float().clone())
        self.register_buffer("p2", None if p2 is None else p2.detach().float().clone())
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self._cast_cache: dict = {}
        self.backend = backend
        self.routes = routes or DEFAULT_ROUTES

    # ------------------------------------------------------------------------------ building ---
    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, p1: torch.Tensor | None = None,
                   p2: torch.Tensor | None = None, act_clip: float | torch.Tensor = 1.0, bits: int = 4,
                   weight_clip: float | torch.Tensor = 1.0, backend: str = "reference", **kwargs) -> W4A4Linear:
        """From an (already transformed) float weight (out, in). weight_clip: scalar or (out,)/(out, 1)."""
        out_f, in_f = weight.shape
        alpha = float(act_clip.detach().float().reshape(()) if isinstance(act_clip, torch.Tensor) else act_clip)
        m = cls(in_f, out_f, bias=bias is not None, bits=bits, p1=p1, p2=p2, alpha=alpha, backend=backend, **kwargs)
        wc = weight_clip
        if isinstance(wc, torch.Tensor) and wc.dim() > 0:
            wc = wc.detach().float().reshape(out_f, 1).to(weight.device)
        codes, scale = quantize_symmetric(weight.detach().float(), bits, wc)
        m.qweight = ref.pack_codes(codes, bits)
        m.weight_scale = scale.reshape(-1).contiguous()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m.to(weight.device)

    def _check_factors(self, p1, p2):
        n = self.in_features
        n1 = p1.shape[0] if p1 is not None else (n // p2.shape[0] if p2 is not None else None)
        if n1 is not None:
            n2 = n // n1
            if n1 * n2 != n or (p1 is not None and tuple(p1.shape) != (n1, n1)) or \
                    (p2 is not None and tuple(p2.shape) != (n2, n2)):
                raise ValueError(f"factors {None if p1 is None else tuple(p1.shape)} x "
                                 f"{None if p2 is None else tuple(p2.shape)} do not match in_features={n}")

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def _apply(self, fn, *args, **kwargs):
        self._cast_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cast_cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _alpha(self) -> float:
        if "alpha" not in self._cast_cache:  # one host read, not one per forward
            self._cast_cache["alpha"] = float(self.alpha)
        return self._cast_cache["alpha"]

    def _factors(self, dtype: torch.dtype):
        """P1, P2 rounded to the dtype the kernels multiply in (cached per dtype)."""
        dd = ref.dot_dtype_for(dtype)
        key = (dd, None if self.p1 is None else self.p1.device)
        if key not in self._cast_cache:
            self._cast_cache[key] = tuple(None if p is None else p.to(dd).contiguous() for p in (self.p1, self.p2))
        return self._cast_cache[key]

    def clear_cache(self) -> None:
        """Drop the cached casts (factors, unpacked weight codes); they are rebuilt on demand."""
        self._cast_cache = {}

    def _weight_codes(self, fmt: str) -> torch.Tensor:
        """qweight unpacked to one code per byte (int8 or float8 e4m3), cached: the weight is static."""
        key = ("wcodes", fmt, self.qweight.device)
        if key not in self._cast_cache:
            from flatquant.kernels.gemm.cublas import unpack_int4_codes

            dt = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
            self._cast_cache[key] = (unpack_int4_codes(self.qweight, dt) if self.bits == 4
                                     else self.qweight.view(torch.int8).contiguous())
        return self._cast_cache[key]

    def gemm_route_for(self, m: int, out_dtype: torch.dtype, device: torch.device) -> str:
        """The route the Triton backend takes for M tokens (see the module docstring)."""
        rc = self.routes
        want = self.gemm_route or "auto"
        if want in ("int8", "fp8"):
            return want
        if want == "decode" or (want == "auto" and m <= rc.small_m_max):
            return "decode" if m <= rc.small_m_max else rc.triton_gemm_route
        if want == "auto" and m < rc.large_m_min:
            return rc.triton_gemm_route
        if want == "auto":
            want = rc.tma_route if rc.tma_m_min is not None and m >= rc.tma_m_min else rc.large_m_route
        for r in (want,) + tuple(r for r in rc.fallback_routes if r != want):
            if self.route_takes(r, m, out_dtype, device):
                return r
        return rc.triton_gemm_route

    def route_takes(self, route: str, m: int, out_dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a one-byte-code route (CODE_FORMAT) takes this layer's sizes, M, output dtype and bits."""
        from flatquant.kernels.gemm.cublas import route_supported
        from flatquant.kernels.gemm.tma import tma_supported

        n, k = self.out_features, self.in_features
        if CODE_FORMAT[route] == "fp8" and self.bits != 4:
            return False  # int8 codes are not exact in e4m3
        if route.startswith("tma_"):
            return tma_supported(m, n, k, device)
        return route_supported(route, m, n, k, out_dtype, device)

    def uses_fused_decode(self, x2: torch.Tensor) -> bool:
        """Whether the Triton backend runs `x2` ((M, in)) through the one-launch decode kernel
        (`fused_decode.py`: M <= routes.fused_decode_max_m, route auto/decode, a case that kernel takes)."""
        if (self._backend != "triton" or x2.shape[0] > self.routes.fused_decode_max_m or self.split_intermediate
                or (self.gemm_route or "auto") not in ("auto", "decode")):
            return False  # (the cheap checks first: this runs on every forward)
        from flatquant.kernels import fused_decode

        p1, p2 = self._factors(x2.dtype)
        return fused_decode.supported(x2.shape[0], self.in_features, self.out_features, p1, p2, self.bits, x2,
                                      self.qweight)

    def dequantized_weight(self) -> torch.Tensor:
        return ref.unpack_codes(self.qweight, self.bits).float() * self.weight_scale[:, None]

    # ------------------------------------------------------------------------------- forward ---
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {x.shape[-1]}")
        out_dtype = self.out_dtype or x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        p1, p2 = self._factors(x.dtype)
        alpha = self._alpha()
        if self._backend == "reference":
            a, sa = ref.transform_quantize_reference(x2, p1, p2, alpha, self.bits,
                                                     round_intermediate=not self.split_intermediate)
            y = ref.w4a4_gemm_reference(a, sa, self.qweight, self.weight_scale, self.bias, out_dtype, self.bits)
        elif self.uses_fused_decode(x2):
            from flatquant.kernels import fused_decode

            y = fused_decode.fused_decode_linear(x2, p1, p2, alpha, self.qweight, self.weight_scale, self.bias,
                                                 out_dtype, routes=self.routes)
        else:
            from flatquant.kernels.gemm.decode import activation_format, w4a4_gemm_decode
            from flatquant.kernels.gemm.w4a4_gemm import w4a4_gemm
            from flatquant.kernels.transform import fused_transform_quantize

            route = self.gemm_route_for(x2.shape[0], out_dtype, x.device)
            # one-byte-code routes: the fused kernel writes the codes unpacked (int8 / fp8), no unpack pass.
            fmt = CODE_FORMAT.get(route)
            if route == "decode":  # the tensor-core decode kernel takes the codes one per byte (no unpack)
                fmt = activation_format(x2.shape[0], self.out_features, self.in_features // 2, x.device, self.bits,
                                        self.routes)
            a, sa = fused_transform_quantize(x2, p1, p2, alpha, self.bits, split_intermediate=self.split_intermediate,
                                             out_format=fmt, routes=self.routes)
            if route == "decode":
                y = w4a4_gemm_decode(a, sa, self.qweight, self.weight_scale, self.bias, out_dtype, self.bits,
                                     routes=self.routes)
            elif route.startswith("tma_"):
                y = one_byte_gemm(route)(a, sa, self._weight_codes(fmt), self.weight_scale, self.bias, out_dtype,
                                         config=self.routes.tma_configs.get(fmt))
            elif fmt is not None:
                y = one_byte_gemm(route)(a, sa, self._weight_codes(fmt), self.weight_scale, self.bias, out_dtype)
            else:
                y = w4a4_gemm(a, sa, self.qweight, self.weight_scale, self.bias, out_dtype, self.bits, route=route)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        f = lambda p: None if p is None else tuple(p.shape)
        return (f"in={self.in_features}, out={self.out_features}, W{self.bits}A{self.bits}, "
                f"bias={self.bias is not None}, p1={f(self.p1)}, p2={f(self.p2)}, "
                f"alpha={float(self.alpha):.4g}, backend={self._backend}")


def set_backend(module: nn.Module, backend: str, routes: RouteConfig | None = None) -> nn.Module:
    """Switch every W4A4Linear inside `module` to `backend` ("reference" | "triton"), and to `routes` if given."""
    for m in module.modules():
        if isinstance(m, W4A4Linear):
            m.backend = backend
            if routes is not None:
                m.routes = routes
    return module
