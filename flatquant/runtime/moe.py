"""Packed W4A4 mixture-of-experts block: the fake-quant MoEBlock (flatquant/models/moe.py) on int4 weights.

    post norm (P_ug's channel scale folded in) -> x
    router `gate` (16 bits, reads x; its columns carry P_ug's scale back) -> top-k experts and weights
    fq_in: x -> Q_a(x P_ug) once for all tokens (one shared transform and clip for every expert's gate/up)
    per expert e: gather its tokens' codes -> gate_up GEMM (CodesLinear) -> act(gate)·up -> down
        (W4A4Linear with the expert's own P_d; c_d folded into its up rows) -> × router weight -> scatter-add
    shared expert (Qwen2-MoE): the same codes -> fq_gate_up -> down_proj, × sigmoid(shared_expert_gate(x))
Per-token quantization is row-wise, so quantizing every token once and gathering equals the fake-quant model
quantizing each expert's gathered tokens. The checkpoint names are this module tree's (docs/CHECKPOINT.md).
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.kernels import reference as ref
from flatquant.kernels.linear import W4A4Linear

SHARED_IN = "fq_in"  # under the MoE block: P_ug factors and the activation clip of every expert's gate/up


def _factor(n: int | None) -> torch.Tensor | None:
    return None if n is None else torch.zeros(n, n, dtype=torch.float32)


def packed_linear(in_f: int, out_f: int, bias: bool, factors: dict | None) -> W4A4Linear:
    factors = factors or {}
    return W4A4Linear(in_f, out_f, bias=bias, bits=4, p1=_factor(factors.get("p1")), p2=_factor(factors.get("p2")))


class CodesLinear(W4A4Linear):
    """An expert's int4 gate/up weights; its GEMM reads activation codes quantized once at the block's shared
    site (no transform or clip of its own: the `alpha`, `p1`, `p2` buffers stay unset)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, bits=4)
        self.alpha = None

    def forward(self, a: torch.Tensor, sa: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.backend == "reference":
            return ref.w4a4_gemm_reference(a, sa, self.qweight, self.weight_scale, self.bias, out_dtype, 4)
        from flatquant.kernels.gemm.w4a4_gemm import w4a4_gemm

        return w4a4_gemm(a, sa, self.qweight, self.weight_scale, self.bias, out_dtype, 4,
                         route=self.routes.triton_gemm_route)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W4 on shared A4 codes, backend={self.backend}"


class SharedSite(nn.Module):
    """P_ug (online Kronecker factors) and the activation clip shared by every expert's gate/up input."""

    def __init__(self, factors: dict | None):
        super().__init__()
        factors = factors or {}
        self.register_buffer("p1", _factor(factors.get("p1")))
        self.register_buffer("p2", _factor(factors.get("p2")))
        self.register_buffer("alpha", torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor, backend: str, routes) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed int4 codes (M, n/2), per-token scale (M,)) of x (M, n)."""
        dd = ref.dot_dtype_for(x.dtype)
        p1, p2 = (None if p is None else p.to(dd).contiguous() for p in (self.p1, self.p2))
        alpha = float(self.alpha)
        if backend == "reference":
            return ref.transform_quantize_reference(x, p1, p2, alpha, 4, round_intermediate=True)
        from flatquant.kernels.transform import fused_transform_quantize

        return fused_transform_quantize(x, p1, p2, alpha, 4, routes=routes)


class PackedExpert(nn.Module):
    """One expert: down(act(gate) · up), gate/up on the shared codes."""

    def __init__(self, gate_up: CodesLinear, down: W4A4Linear, act_fn):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.__dict__["act_fn"] = act_fn

    def forward(self, a: torch.Tensor, sa: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        gate, up = self.gate_up(a, sa, dtype).chunk(2, dim=-1)
        return self.down(self.act_fn(gate) * up)


class PackedSharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: fq_gate_up (gate rows, then up rows) on the shared codes, down_proj."""

    def __init__(self, fq_gate_up: CodesLinear, down_proj: W4A4Linear, act_fn):
        super().__init__()
        self.fq_gate_up, self.down_proj = fq_gate_up, down_proj
        self.__dict__["act_fn"] = act_fn

    def forward(self, a: torch.Tensor, sa: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        gate, up = self.fq_gate_up(a, sa, dtype).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class PackedMoE(nn.Module):
    """Router (16 bits) + packed experts (+ shared expert and its 16-bit sigmoid gate)."""

    def __init__(self, router: nn.Module, experts: list[PackedExpert], fq_in: SharedSite,
                 shared_expert: PackedSharedExpert | None = None, shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.gate = router
        self.add_module(SHARED_IN, fq_in)
        self.experts = nn.ModuleList(experts)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        _, weights, index = self.gate(x)
        lead = self.experts[0].gate_up
        a, sa = getattr(self, SHARED_IN)(x, lead.backend, lead.routes)
        out = torch.zeros_like(x)
        counts = torch.bincount(index.reshape(-1), minlength=len(self.experts))
        for e in torch.nonzero(counts).flatten().tolist():  # per expert: gather, GEMMs, weighted scatter-add
            tok, pos = torch.where(index == e)
            y = self.experts[e](a[tok], sa[tok], x.dtype) * weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if self.shared_expert is not None:
            y = self.shared_expert(a, sa, x.dtype)
            if self.shared_expert_gate is not None:
                y = torch.sigmoid(self.shared_expert_gate(x)) * y
            out = out + y
        return out.reshape(shape)


def convert_block(block: nn.Module, moe_qc: dict) -> PackedMoE:
    """The empty packed block (current device context) for a flatquant MoEBlock; moe_qc: the quantization
    block's "moe" entry ({"sites": {"mlp_in": ..., "down_in": ..., "down_in.shared": ...}})."""
    sites = moe_qc["sites"]
    hidden = block.experts[0].gate_up.in_features
    experts = []
    for ex in block.experts:
        gu, dn = ex.gate_up, ex.down
        experts.append(PackedExpert(CodesLinear(hidden, gu.out_features, gu.bias is not None),
                                    packed_linear(dn.in_features, dn.out_features, dn.bias is not None,
                                                  sites.get("down_in")), ex.act_fn))
    shared = None
    if block.shared_expert is not None:
        se = block.shared_expert
        rows = se.gate_proj.out_features + se.up_proj.out_features
        bias = se.gate_proj.bias is not None or se.up_proj.bias is not None
        shared = PackedSharedExpert(CodesLinear(hidden, rows, bias),
                                    packed_linear(se.down_proj.in_features, se.down_proj.out_features,
                                                  se.down_proj.bias is not None, sites.get("down_in.shared")),
                                    se.act_fn)
    return PackedMoE(block.gate, experts, SharedSite(sites.get("mlp_in")), shared, block.shared_expert_gate)


__all__ = ["CodesLinear", "PackedExpert", "PackedMoE", "PackedSharedExpert", "SharedSite", "convert_block",
           "packed_linear"]
