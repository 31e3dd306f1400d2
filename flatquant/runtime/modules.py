"""Modules of the packed W4A4KV4 model, swapped into a Hugging Face model through the family registry.

Per decoder layer (names from flatquant.models.families):
    input norm (channel scale of P_a folded in) -> attn.fq_qkv: one W4A4Linear over the q, k, v rows
        (online P_a = P1 ⊗ P2 and the activation clip inside it); q_proj / k_proj / v_proj become
        SiteProjection views: the first call computes the fused output for its input tensor, the siblings
        read it (keyed by the input tensor's identity), and recompute it when the key does not match.
    attn.o_proj: W4A4Linear with P_o (P1 only; P_v is folded into v_proj's rows)
    attn.fq_kv: PackedKV (key transform P_h, query factors P_h^-T, K and V clip values)
    post-attention norm (P_ug's scale folded in) -> mlp.fq_gate_up (gate, up rows) -> SiteProjection views
    mlp.down_proj: W4A4Linear with P_d (its channel scale folded into up_proj's rows)
An MoE layer's MLP is a PackedMoE instead (flatquant/runtime/moe.py): 16-bit router, one shared P_ug site,
per-expert packed gate/up and down (each its own P_d).
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.kernels.linear import W4A4Linear
from flatquant.models.families import family_for
from flatquant.runtime import layout
from flatquant.runtime.moe import convert_block


class SiteGroup:
    """The fused linear of one shared input site and the last output it computed (the stash)."""

    def __init__(self, fused: W4A4Linear, roles: tuple[str, ...]):
        self.fused = fused
        self.roles = roles
        self.stash = None  # (input tensor, fused output, roles not yet served)

    def output(self, x: torch.Tensor, role: str) -> torch.Tensor:
        st = self.stash
        if st is None or st[0] is not x or role not in st[2]:
            st = (x, self.fused(x), set(self.roles))
        st[2].discard(role)
        self.stash = st if st[2] else None  # dropped once every sibling has read it
        return st[1]


class SiteProjection(nn.Module):
    """One projection (q, k, v, gate or up): rows [start, stop) of its site's fused W4A4Linear."""

    def __init__(self, group: SiteGroup, role: str, start: int, stop: int):
        super().__init__()
        self.__dict__["group"] = group  # the fused linear is registered on the attention / MLP module
        self.role, self.start, self.stop = role, start, stop
        self.in_features, self.out_features = group.fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.role)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"{self.role}: rows [{self.start}, {self.stop}) of the fused site"


def _factor(n: int | None) -> torch.Tensor | None:
    return None if n is None else torch.zeros(n, n, dtype=torch.float32)


class PackedKV(nn.Module):
    """KV-cache quantization of one attention: k -> Q(k P_h), q -> q P_h^-T, v -> Q(v) (4-bit, asymmetric)."""

    def __init__(self, key_factors: dict):
        super().__init__()
        for side in ("key", "query"):
            self.register_buffer(f"{side}_p1", _factor(key_factors.get("p1")))
            self.register_buffer(f"{side}_p2", _factor(key_factors.get("p2")))
        self.register_buffer("k_clip", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_clip", torch.ones((), dtype=torch.float32))
        self.backend = "auto"  # KV4 kernels: auto (Triton on CUDA) | triton | reference (set_runtime_backend)

    def transform_key(self, k: torch.Tensor) -> torch.Tensor:
        return _kron(k, self.key_p1, self.key_p2)

    def transform_query(self, q: torch.Tensor) -> torch.Tensor:
        return _kron(q, self.query_p1, self.query_p2)


def _kron(x, p1, p2):
    """kron_apply(x, p1, p2) as 2-D matmuls over all tokens at once (a broadcast matmul on (..., 1, n2) would
    run as a batched GEMM of one row per token)."""
    if p1 is None and p2 is None:
        return x
    shape, n = x.shape, x.shape[-1]
    n1 = p1.shape[0] if p1 is not None else n // p2.shape[0]
    n2 = n // n1
    y = x.reshape(-1, n2)
    if p2 is not None:
        y = y @ p2.to(x.dtype)
    if p1 is not None:  # p1ᵀ X per token: the (n2, n1) transpose of each token's X times p1
        y = (y.reshape(-1, n1, n2).transpose(1, 2).reshape(-1, n1) @ p1.to(x.dtype))
        y = y.reshape(-1, n2, n1).transpose(1, 2)
    return y.reshape(shape)


def _linear(in_f: int, out_f: int, bias: bool, factors: dict | None) -> W4A4Linear:
    factors = factors or {}
    return W4A4Linear(in_f, out_f, bias=bias, bits=4, p1=_factor(factors.get("p1")), p2=_factor(factors.get("p2")))


def _has_bias(*mods) -> bool:
    return any(getattr(m, "bias", None) is not None for m in mods)


def convert_model(model: nn.Module, qc: dict, device: str | torch.device = "meta") -> nn.Module:
    """Swap the projections of every decoder layer for the packed modules (empty, on `device`).

    The norms, embeddings and lm_head stay; the caller loads the checkpoint's tensors afterwards."""
    if (qc.get("w_bits"), qc.get("a_bits"), qc.get("kv_bits")) != (4, 4, 4):
        raise ValueError("the packed runtime supports W4A4KV4 only")
    family = family_for(model)
    sites = qc["sites"]
    with torch.device(device):
        for layer in family.decoder_layers(model):
            lin = family.linears(layer)
            attn, mlp = family.attention(layer), family.mlp_module(layer)
            moe_layer = family.is_moe_layer(layer)  # its MLP becomes a PackedMoE (flatquant/runtime/moe.py)
            if moe_layer:
                if "moe" not in qc:
                    raise ValueError("an MoE layer, but the quantization block has no 'moe' entry")
                setattr(layer, family.mlp, convert_block(mlp, qc["moe"]))
            shared = (layout.FUSED_QKV, family.sites["attn_in"], attn, "attn_in"), \
                (layout.FUSED_GATE_UP, family.sites["mlp_in"], mlp, "mlp_in")
            for fused_name, roles, parent, site in shared[:1] if moe_layer else shared:
                rows = [lin[r].out_features for r in roles]
                fused = _linear(lin[roles[0]].in_features, sum(rows), _has_bias(*(lin[r] for r in roles)),
                                sites.get(site))
                parent.add_module(fused_name, fused)
                group = SiteGroup(fused, roles)
                start = 0
                for role, n in zip(roles, rows):
                    family.set_linear(layer, role, SiteProjection(group, role, start, start + n))
                    start += n
            for site in ("o_in",) if moe_layer else ("o_in", "down_in"):
                (role,) = family.sites[site]
                old = lin[role]
                family.set_linear(layer, role, _linear(old.in_features, old.out_features, _has_bias(old),
                                                       sites.get(site)))
            attn.add_module(layout.KV_MODULE, PackedKV(qc["key_transform"]))
    return model


def packed_linears(model: nn.Module) -> list[W4A4Linear]:
    return [m for m in model.modules() if isinstance(m, W4A4Linear)]


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedKV) for m in model.modules())
