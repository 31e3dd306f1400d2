"""FP8 W8A8 linear (the end-to-end baseline): per-output-channel e4m3 weights, per-token e4m3 activations.

The activation quantizer is one Triton pass per row (amax, scale = amax / 448, x / scale cast to e4m3), its
rows padded to a multiple of 16 (zeros) for cuBLASLt; the GEMM is torch._scaled_mm with row-wise scales
(scale_a (M, 1), scale_b (1, N)) and a bf16 output. `quantize_fp8_reference` and the CPU path of
`Fp8Linear` give the same semantics in plain PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

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
    m = (cols < K) & (row < M)
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
        m = x2.shape[0]
        if x.is_cuda:
            q, s = quantize_fp8(x2)
            fast = self.fast_accum and Fp8Linear.fast_accum_ok is not False
            try:
                y = torch._scaled_mm(q, self.weight.t(), scale_a=s, scale_b=self.weight_scale,
                                     out_dtype=torch.bfloat16, use_fast_accum=fast)
            except RuntimeError:
                if not fast:
                    raise
                Fp8Linear.fast_accum_ok = False  # this build refuses it with row-wise scales: plain accumulation
                return self.forward(x)
            if fast:
                Fp8Linear.fast_accum_ok = True
            y = y[0] if isinstance(y, tuple) else y
        else:
            q, s = quantize_fp8_reference(x2)
            y = ((q.float() * s) @ (self.weight.float() * self.weight_scale.t()).t()).to(torch.bfloat16)
        return y[:m].to(x.dtype).reshape(*shape[:-1], self.out_features)
