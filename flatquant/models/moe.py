"""Sparse mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE) in a form the quantizer can place sites in.

transformers stores a block's experts as one module with 3-D parameters (gate_up_proj [E, 2I, H], down_proj
[E, H, I]) next to a top-k router `gate` (and, in Qwen2-MoE, a dense `shared_expert` with a sigmoid
`shared_expert_gate`). `MoEBlock.from_hf` re-expresses such a block without copying weights: each expert is an
`ExpertMLP` whose two linears are views of the 3-D parameters, so the quantizer can swap each for a QuantLinear.

Sites (see models/families.py): the router and the shared expert's gate read the norm's untransformed output at
full precision; every expert's gate/up (and the shared expert's gate/up) read one shared transformed, quantized
input (`input_site`: P_ug and one activation quantizer); each expert's down projection has its own site
"down_in.<e>" (its own P_d), the shared expert's "down_in.shared". Each expert only sees its routed tokens, so
no expert's activations exist for tokens not routed to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_hf_moe(mlp: nn.Module) -> bool:
    """A transformers sparse MoE block: a router `gate` and fused 3-D `experts` parameters."""
    experts = getattr(mlp, "experts", None)
    return (not isinstance(mlp, MoEBlock) and hasattr(mlp, "gate") and experts is not None
            and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor))


def is_moe_block(mlp: nn.Module) -> bool:
    return isinstance(mlp, MoEBlock)


class Linear16(nn.Module):
    """A bias-free linear over a weight it does not own (a view of a fused 3-D expert parameter)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class ExpertMLP(nn.Module):
    """One expert: down(act(gate) * up) with gate/up fused in one (2I, H) projection."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, act_fn):
        super().__init__()
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn
        self.tap = nn.Identity()  # hook point: the expert's transformed, not yet quantized, gate/up input

    def forward(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        if pre is not None:
            self.tap(pre)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act_fn(gate) * up)


class MoEBlock(nn.Module):
    """Router (kept at 16 bits) + experts (+ optional shared expert), one shared gate/up input site."""

    def __init__(self, router: nn.Module, experts: list[ExpertMLP], shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.input_site = None  # an ActSite once quantized: P_ug and the activation quantizer
        self.token_counts: torch.Tensor | None = None  # routed tokens per expert, while counting

    @classmethod
    def from_hf(cls, block: nn.Module) -> MoEBlock:
        ex = block.experts
        gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()
        experts = [ExpertMLP(Linear16(gu[e]), Linear16(dn[e]), ex.act_fn) for e in range(gu.shape[0])]
        return cls(block.gate, experts, getattr(block, "shared_expert", None),
                   getattr(block, "shared_expert_gate", None))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        _, weights, index = self.gate(x)  # full precision, untransformed
        site = self.input_site
        xt = x if site is None or site.transform is None else site.transform(x)
        xq = xt if site is None else site.quantizer(xt)
        out = torch.zeros_like(x)
        counts = torch.bincount(index.reshape(-1), minlength=self.num_experts)
        if self.token_counts is not None:
            self.token_counts += counts.to(self.token_counts.device)
        for e in torch.nonzero(counts).flatten().tolist():
            tok, pos = torch.where(index == e)
            expert = self.experts[e]
            pre = xt[tok] if expert.tap._forward_pre_hooks else None
            y = expert(xq[tok], pre) * weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if self.shared_expert is not None:
            y = self.shared_expert(xq)
            if self.shared_expert_gate is not None:
                y = torch.sigmoid(self.shared_expert_gate(x)) * y
            out = out + y
        return out.reshape(shape)


SHARED_ROLES = ("gate_proj", "up_proj", "down_proj")


def linears(block: MoEBlock) -> dict[str, nn.Module]:
    """Role (a path inside the block) -> projection: each expert's gate_up and down, the shared expert's three."""
    out = {}
    for e, ex in enumerate(block.experts):
        out[f"experts.{e}.gate_up"], out[f"experts.{e}.down"] = ex.gate_up, ex.down
    if block.shared_expert is not None:
        out.update({f"shared_expert.{r}": getattr(block.shared_expert, r) for r in SHARED_ROLES})
    return out


def mlp_sites(block: MoEBlock) -> dict[str, tuple[str, ...]]:
    """The MLP's sites: one shared gate/up input, then one down input per expert (and the shared expert)."""
    up = tuple(f"experts.{e}.gate_up" for e in range(block.num_experts))
    sites = {"mlp_in": up, **{f"down_in.{e}": (f"experts.{e}.down",) for e in range(block.num_experts)}}
    if block.shared_expert is not None:
        sites["mlp_in"] = up + ("shared_expert.gate_proj", "shared_expert.up_proj")
        sites["down_in.shared"] = ("shared_expert.down_proj",)
    return sites


def base_role(role: str) -> str:
    """The dense role an MoE role takes its bit settings from."""
    last = role.rsplit(".", 1)[-1]
    return {"gate_up": "gate_proj", "down": "down_proj"}.get(last, last)


def gptq_groups(block: MoEBlock) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """One Hessian per expert's gate/up (its routed tokens, read at its tap) and one for the shared expert's
    gate/up (all tokens, read at the shared site's quantizer)."""
    out = {f"mlp_in.{e}": (ex.tap, (f"experts.{e}.gate_up",)) for e, ex in enumerate(block.experts)}
    if block.shared_expert is not None:
        out["mlp_in.shared"] = (block.input_site.quantizer, ("shared_expert.gate_proj", "shared_expert.up_proj"))
    return out


def raw_readers(block: MoEBlock) -> list[nn.Module]:
    """The 16-bit linears reading the norm's untransformed output (router, shared expert's gate): a channel
    scale folded into that norm is undone in their input columns."""
    return [m for m in (block.gate, block.shared_expert_gate) if m is not None]


def down_producer(block: MoEBlock, site: str) -> tuple[nn.Module, slice]:
    """(projection, rows) whose output is a down site's input: the up half of expert e's gate_up, or the
    shared expert's up_proj; a down site's channel scale folds into those rows."""
    if site == "down_in.shared":
        return block.shared_expert.up_proj, slice(None)
    gate_up = block.experts[int(site.split(".")[1])].gate_up
    return gate_up, slice(gate_up.out_features // 2, None)


def unrouted_sites(sites, seen) -> list[str]:
    """The per-expert down sites that got no calibration tokens (no statistics were seen for them)."""
    return [s for s in sites if s.startswith("down_in.") and s != "down_in.shared" and s not in seen]


__all__ = ["ExpertMLP", "Linear16", "MoEBlock", "base_role", "down_producer", "gptq_groups", "is_hf_moe",
           "is_moe_block", "linears", "mlp_sites", "raw_readers", "unrouted_sites"]
