"""Model-family registry: where the decoder layers, norms and projections of each architecture live.

This is the only place that knows model structure. Everything else asks a `Family` for modules by role.
Adding a Llama-like architecture is one entry here, never a copied modeling file.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flatquant.errors import ModelError
from flatquant.models import moe

# The input sites of a decoder layer and the projections (by role) that read each one. attn_in and mlp_in
# are shared inputs behind a norm (NORM_SITES); o_in and down_in feed one projection each.
SITES: dict[str, tuple[str, ...]] = {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",),
                                     "mlp_in": ("gate_proj", "up_proj"), "down_in": ("down_proj",)}
NORM_SITES = {"attn_in": "input", "mlp_in": "post"}  # site -> the norm (Family.norm) that produces it
ROLES = tuple(r for roles in SITES.values() for r in roles)
ATTN_ROLES = SITES["attn_in"] + SITES["o_in"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # values of config.model_type that use this layout
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"  # feeds q/k/v: P_a and its scale sit behind it
    post_attn_norm: str = "post_attention_layernorm"  # feeds gate/up: P_ug
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    qk_norm: bool = False  # per-head RMSNorm on q and k inside attention, before RoPE (Qwen3)
    moe: bool = False  # sparse MoE blocks (router `gate`, fused 3-D `experts`): see flatquant/models/moe.py
    note: str = ""  # what is special about the family, for the README's table (family_table)
    fused_qkv: str | None = None  # one projection holding the q, k, v rows in that order (Phi-3: qkv_proj)
    fused_gate_up: str | None = None  # one projection holding the gate, then the up rows (Phi-3: gate_up_proj)

    # ---- site map --------------------------------------------------------------------------
    @property
    def sites(self) -> dict[str, tuple[str, ...]]:
        """Input site -> the projection roles that read it (in a fixed order); a fused projection is one role."""
        out = dict(SITES)
        if self.fused_qkv:
            out["attn_in"] = (self.fused_qkv,)
        if self.fused_gate_up:
            out["mlp_in"] = (self.fused_gate_up,)
        return out

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for roles in self.sites.values() for r in roles)

    @property
    def kv(self) -> tuple[str, str]:
        """The roles whose outputs are the KV cache (keys, values); with fused q/k/v, both that projection."""
        if self.fused_qkv:
            return self.fused_qkv, self.fused_qkv
        return SITES["attn_in"][1], SITES["attn_in"][2]

    def v_rows(self, layer: nn.Module) -> tuple[str, tuple[int, int] | None]:
        """(role, rows) of the value outputs, where P_v folds in: all of v_proj, or a row range of fused q/k/v."""
        if not self.fused_qkv:
            return self.kv[1], None
        conf = self.attention(layer).config
        hd = self.head_dim(conf)
        start = (conf.num_attention_heads + conf.num_key_value_heads) * hd
        return self.fused_qkv, (start, start + conf.num_key_value_heads * hd)

    @property
    def producer(self) -> dict[str, str]:
        """Site -> the projection whose output rows produce it (only where a scale folds into them)."""
        return {"down_in": self.fused_gate_up or SITES["mlp_in"][1]}

    def producer_rows(self, site: str, module: nn.Module) -> slice:
        """The rows of the producer of `site` that produce it (the up half of a fused gate/up)."""
        return slice(module.out_features // 2, None) if self.fused_gate_up else slice(None)

    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def site_norm(self, site: str, layer: nn.Module | None = None) -> str | None:
        """"input" / "post" for a site fed through a norm, None for a site fed by one projection (or, in an
        MoE layer, the gate/up site: the router reads the norm's untransformed output)."""
        if layer is not None and site == "mlp_in" and self.is_moe_layer(layer):
            return None
        return NORM_SITES.get(site)

    def site_linears(self, layer: nn.Module, site: str) -> list[nn.Module]:
        lin = self.linears(layer)
        return [lin[r] for r in self.layer_sites(layer)[site]]

    # ---- per-layer site map (MoE layers add one down_in site per expert) ------------------------------
    def is_moe_layer(self, layer: nn.Module) -> bool:
        return self.moe and moe.is_moe_block(self.prepare_layer(layer))

    def prepare_layer(self, layer: nn.Module) -> nn.Module:
        """Convert the layer's MoE block (if any) to flatquant's MoEBlock, once; returns the MLP module."""
        mlp = self.mlp_module(layer)
        if self.moe and moe.is_hf_moe(mlp):
            mlp = moe.MoEBlock.from_hf(mlp)
            setattr(layer, self.mlp, mlp)
        return mlp

    def layer_sites(self, layer: nn.Module) -> dict[str, tuple[str, ...]]:
        """Input site -> the roles that read it, for this layer (SITES for a dense layer)."""
        if not self.is_moe_layer(layer):
            return self.sites
        dense = self.sites
        return {"attn_in": dense["attn_in"], "o_in": dense["o_in"], **moe.mlp_sites(self.mlp_module(layer))}

    @staticmethod
    def site_kind(site: str) -> str:
        """The kind of transform a site takes: "down_in.3" (expert 3) -> "down_in"."""
        return site.split(".")[0]

    def base_role(self, role: str) -> str:
        """The dense role whose bit settings a role takes ("experts.3.down" -> "down_proj", qkv_proj -> q_proj)."""
        if role in (self.fused_qkv, self.fused_gate_up):
            return "q_proj" if role == self.fused_qkv else "gate_proj"
        return moe.base_role(role) if "." in role else role

    def site_width(self, layer: nn.Module, site: str) -> int:
        return self.site_linears(layer, site)[0].in_features

    def site_owner(self, layer: nn.Module, site: str) -> nn.Module | None:
        """The module that holds a shared site's ActSite when no norm wrapper does (MoE gate/up input)."""
        return self.mlp_module(layer) if site == "mlp_in" and self.is_moe_layer(layer) else None

    def site_reader(self, layer: nn.Module, site: str) -> tuple[nn.Module, str]:
        """(module, "out" | "in"): the site's input is that module's output or its first input."""
        norm = self.site_norm(site, layer)
        if norm is not None:
            return self.norm(layer, norm), "out"
        owner = self.site_owner(layer, site)
        return (owner if owner is not None else self.site_linears(layer, site)[0]), "in"

    def gptq_groups(self, layer: nn.Module) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
        """GPTQ key -> (module whose first input is the roles' transformed input, roles): one Hessian each.
        In an MoE layer each expert's gate/up gets its own (its routed tokens only)."""
        out = {}
        for site, roles in self.layer_sites(layer).items():
            norm, owner = self.site_norm(site, layer), self.site_owner(layer, site)
            if owner is not None:
                out.update(moe.gptq_groups(owner))
                continue
            holder = self.norm(layer, norm).site if norm is not None else self.linears(layer)[roles[0]].input_site
            out[site] = (holder.quantizer, roles)
        return out

    # ---- lookups -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.mlp)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The projections of a decoder layer by role name: seven in a dense layer; in an MoE layer the
        attention's four and each expert's (dotted paths inside the MoE block, e.g. "experts.3.down")."""
        attn = self.attention(layer)
        if self.is_moe_layer(layer):
            mlp = self.mlp_module(layer)
            return {**{r: getattr(attn, getattr(self, r)) for r in ATTN_ROLES}, **moe.linears(mlp)}
        mlp = self.mlp_module(layer)
        return {r: getattr(attn if self._in_attn(r) else mlp, self._attr(r)) for r in self.roles}

    def _attr(self, role: str) -> str:
        return getattr(self, role) if role in ROLES else role  # a fused projection's role is its name

    def _in_attn(self, role: str) -> bool:
        return role in ATTN_ROLES or role == self.fused_qkv

    def set_linear(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        if "." in role:  # an MoE role: a path inside the MoE block
            parent, name = role.rsplit(".", 1)
            setattr(_get(self.mlp_module(layer), parent), name, module)
            return
        parent = self.attention(layer) if self._in_attn(role) else self.mlp_module(layer)
        setattr(parent, self._attr(role), module)

    def norm(self, layer: nn.Module, which: str) -> nn.Module:
        return getattr(layer, self.input_norm if which == "input" else self.post_attn_norm)

    def set_norm(self, layer: nn.Module, which: str, module: nn.Module) -> None:
        setattr(layer, self.input_norm if which == "input" else self.post_attn_norm, module)


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama", "mistral")),
    "qwen2": Family("qwen2", ("qwen2",), note="q/k/v bias"),  # QuantLinear keeps any bias
    "qwen3": Family("qwen3", ("qwen3",), qk_norm=True, note="per-head q/k norm"),  # before RoPE and the KV hook
    "mixtral": Family("mixtral", ("mixtral",), moe=True, note="MoE: per-expert P_d, shared P_ug, 16-bit router"),
    "qwen2_moe": Family("qwen2_moe", ("qwen2_moe",), moe=True, note="MoE with a shared expert, q/k/v bias"),
    "qwen3_moe": Family("qwen3_moe", ("qwen3_moe",), qk_norm=True, moe=True, note="MoE, per-head q/k norm"),
    "phi3": Family("phi3", ("phi3",), fused_qkv="qkv_proj", fused_gate_up="gate_up_proj",
                   note="fused qkv_proj and gate_up_proj, kept fused"),
}


def family_table() -> str:
    """The README's table of supported families, rendered from the registry (a test keeps them equal)."""
    rows = ["| family (`flatquant/models/families.py`) | `config.model_type` |", "|---|---|"]
    for fam in FAMILIES.values():
        types = ", ".join(f"`{t}`" for t in fam.model_types)
        rows.append(f"| {fam.name} | {types}{f' ({fam.note})' if fam.note else ''} |")
    return "\n".join(rows)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for(model_or_config) -> Family:
    """The family of a model (or its config), or a ModelError listing what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise ModelError(f"unsupported architecture {model_type!r}; supported model types: "
                     f"{', '.join(supported_model_types())}")
