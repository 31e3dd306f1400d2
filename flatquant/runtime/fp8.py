"""FP8 W8A8 linear (the end-to-end baseline): per-output-channel e4m3 weights, per-token e4m3 activations.

The activation quantizer is one Triton pass per row (amax, scale = amax / 448, x / scale cast to e4m3), its
rows padded to a multiple of 16 (zeros) for cuBLASLt; the GEMM is torch._scaled_mm with row-wise scales
(scale_a (M, 1), scale_b (1, N)) and a bf16 output. `quantize_fp8_reference` and the CPU path of
`Fp8Linear` give the same semantics in plain PyTorch. `prologue_fp8` fuses the decoder's residual add + RMSNorm
or SiLU(gate) * up into that pass (`prologue_fp8_reference`: the unfused ops, then the quantizer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from flatquant.kernels._triton_utils import mask_and

FP8_MAX = 448.0
MIN_SCALE = 1e-12


def quantize_fp8_reference(x2: torch.Tensor, pad_to: int = 1):
    """(M, K) -> codes float8_e4m3fn (M_pad, K) and scales float32 (M_pad, 1); padded rows are zero."""
    m = x2.shape[0]
    mp = -(-m // pad_to) * pad_to
    xf = torch.zeros(mp, x2.shape[1], dtype=torch.float32, device=x2.device)
    xf[:m] = x2.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(MIN_SCALE) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = mask_and(cols < K, row < M)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(q_ptr + row.to(tl.int64) * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + row, scale)


def quantize_fp8(x2: torch.Tensor, pad_to: int = 16):
    """One Triton launch with the semantics of `quantize_fp8_reference`."""
    m, k = x2.shape
    mp = -(-m // pad_to) * pad_to
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(mp, k, dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty(mp, 1, dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(k)
    _quant_kernel[(mp,)](x2, q, s, m, k, x2.stride(0), BLOCK=block, num_warps=16 if block >= 8192 else 8)
    return q, s


def prologue_fp8_reference(mode: str, x, res=None, w=None, eps: float = 1e-6, pad_to: int = 16):
    """(codes, scales, residual or None) of `prologue_fp8`: the unfused ops, then `quantize_fp8_reference`."""
    from flatquant.runtime.fused_ops import add_rmsnorm_reference, silu_mul_reference

    r = None
    h = silu_mul_reference(x) if mode == "silu" else None
    if mode != "silu":
        h, r = add_rmsnorm_reference(x, res, w, eps)
    q, s = quantize_fp8_reference(h.reshape(-1, h.shape[-1]), pad_to)
    return q, s, r


@triton.jit
def _prologue_fp8_kernel(x_ptr, r_ptr, w_ptr, rout_ptr, q_ptr, s_ptr, M, K, eps, MODE: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = row < M
    m = mask_and(cols < K, ok)
    if MODE == 2:  # SiLU(gate) * up, each rounded to the model dtype as fused_ops does
        g = tl.load(x_ptr + row * 2 * K + cols, mask=m, other=0.0)
        u = tl.load(x_ptr + row * 2 * K + K + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        sg = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        h = (sg.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    else:  # (residual add +) RMSNorm * w in HF's order
        xv = tl.load(x_ptr + row * K + cols, mask=m, other=0.0)
        if MODE == 1:
            rv = (xv.to(tl.float32) + tl.load(r_ptr + row * K + cols, mask=m, other=0.0).to(tl.float32)).to(xv.dtype)
            tl.store(rout_ptr + row * K + cols, rv, mask=m)
        else:
            rv = xv
        hf = rv.to(tl.float32)
        y = (hf * tl.math.rsqrt(tl.sum(hf * hf, 0) / K + eps)).to(xv.dtype)
        h = (y.to(tl.float32) * tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)).to(xv.dtype)
    x = h.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + row, scale)


def prologue_fp8(mode: str, x: torch.Tensor, res=None, w=None, eps: float = 1e-6, pad_to: int = 16):
    """One launch: mode "norm" (RMSNorm(res + x) * w, residual returned) or "silu" (x = gate|up) -> FP8 codes
    (M_pad, K), scales (M_pad, 1), residual (M, K) or None; semantics of `prologue_fp8_reference`."""
    if mode not in ("norm", "silu"):
        raise ValueError(f"mode must be 'norm' or 'silu', got {mode!r}")
    k = x.shape[-1] // (2 if mode == "silu" else 1)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    mp = -(-m // pad_to) * pad_to
    q = torch.empty(mp, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(mp, 1, dtype=torch.float32, device=x.device)
    kmode, r2, rout, wc = 2, x2, x2, x2
    if mode == "norm":
        wc = w.contiguous()
        kmode = 0 if res is None else 1
        if res is not None:
            r2, rout = res.reshape(-1, k).contiguous(), torch.empty_like(x2)
    block = triton.next_power_of_2(k)
    _prologue_fp8_kernel[(mp,)](x2, r2, wc, rout, q, s, m, k, float(eps), MODE=kmode, BLOCK=block,
                                num_warps=16 if block >= 8192 else 8)
    return q, s, None if mode == "silu" else rout


class Fp8Linear(nn.Module):
    """y = (Q(x) · sa) (W_q · sw)ᵀ in bf16. Buffers: weight (out, in) float8_e4m3fn, weight_scale (1, out) float32.
    fast_accum: Hopper's fast FP8 accumulation (what serving engines use) where torch._scaled_mm takes it."""

    fast_accum_ok: bool | None = None  # None: not tried yet on this process's GPU

    def __init__(self, in_features: int, out_features: int, device=None, fast_accum: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = in_features, out_features, fast_accum
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, **kw) -> Fp8Linear:
        m = cls(w.shape[1], w.shape[0], device=w.device, **kw)
        q, s = quantize_fp8_reference(w)
        m.weight.copy_(q)
        m.weight_scale.copy_(s.reshape(1, -1))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        q, s = quantize_fp8(x2) if x.is_cuda else quantize_fp8_reference(x2)
        return self.gemm_codes(q, s, x2.shape[0], x.dtype).reshape(*shape[:-1], self.out_features)

    def gemm_codes(self, q: torch.Tensor, s: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
        """(m, out) from activation codes q (M_pad, in) e4m3 and scales s (M_pad, 1) (`quantize_fp8`'s output,
        or a fused pass writing the same), in `dtype`."""
        if q.is_cuda:
            fast = self.fast_accum and Fp8Linear.fast_accum_ok is not False
            try:
                y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale,
                                     out_dtype=torch.bfloat16, use_fast_accum=fast)
            except RuntimeError:
                if not fast:
                    raise
                Fp8Linear.fast_accum_ok = False  # this build refuses it with row-wise scales: plain accumulation
                return self.gemm_codes(q, s, m, dtype)
            if fast:
                Fp8Linear.fast_accum_ok = True
            y = y[0] if isinstance(y, tuple) else y
        else:
            y = ((q.float() * s) @ (self.weight.float() * self.weight_scale.t()).t()).to(torch.bfloat16)
        return y[:m].to(dtype)
