"""Model-family registry: where the decoder layers, norms and projections of each architecture live.

This is the only place that knows model structure. Everything else asks a `Family` for modules by role.
Adding a Llama-like architecture is one entry here, never a copied modeling file.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from flatquant.errors import ModelError


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
    qkv_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)

    # ---- lookups -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.mlp)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The seven projections of a decoder layer, by role name."""
        attn, mlp = self.attention(layer), self.mlp_module(layer)
        return {
            "q_proj": getattr(attn, self.q_proj), "k_proj": getattr(attn, self.k_proj),
            "v_proj": getattr(attn, self.v_proj), "o_proj": getattr(attn, self.o_proj),
            "gate_proj": getattr(mlp, self.gate_proj), "up_proj": getattr(mlp, self.up_proj),
            "down_proj": getattr(mlp, self.down_proj),
        }

    def set_linear(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        parent = self.attention(layer) if role in ("q_proj", "k_proj", "v_proj", "o_proj") else self.mlp_module(layer)
        setattr(parent, getattr(self, role), module)

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
    "qwen2": Family("qwen2", ("qwen2",), qkv_bias=True),
    "qwen3": Family("qwen3", ("qwen3",), qk_norm=True),
}


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
