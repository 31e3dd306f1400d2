"""Quantized building blocks and the one function that installs them into a decoder layer.

Per decoder layer (paper Fig. 3b), with Transform objects that any method supplies:
    input_norm -> [P_a, Q_a] -> q/k/v (weights W P_a⁻ᵀ, v rows also take P_v)
    keys after RoPE -> P_h -> Q_kv ; queries -> P_h⁻ᵀ ; values (already × P_v) -> Q_kv
    attn output -> [P_o (online), Q_a] -> o_proj (weight W (P_o ⊗ P_v)⁻ᵀ)
    post_attn_norm -> [P_ug, Q_a] -> gate/up
    act(gate)·up -> [P_d, Q_a] -> down_proj
A shared input (q/k/v, gate/up) is transformed and quantized once, in a wrapper around its norm, as the
deployed kernel does. KV quantization hooks attention through transformers' AttentionInterface.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from flatquant.config import ConfigError, QuantConfig
from flatquant.core.quantizer import Quantizer, dequantize
from flatquant.core.transforms import Transform, kron_apply
from flatquant.mixed import check_shared_sites
from flatquant.models.families import Family

ATTN_IMPL = "flatquant"


class ActSite(nn.Module):
    """Online part of a linear input: transform, then per-token activation quantization."""

    def __init__(self, transform: Transform | None, quantizer: Quantizer):
        super().__init__()
        self.__dict__["transform"] = transform  # owned by the layer's `fq_transforms`; not registered twice
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        return self.quantizer(x)


class NormWithSite(nn.Module):
    """A norm followed by the shared input site of the projections it feeds (q/k/v or gate/up)."""

    def __init__(self, norm: nn.Module, site: ActSite):
        super().__init__()
        self.norm = norm
        self.site = site

    @property
    def weight(self):  # some code reads layer.input_layernorm.weight
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.site(self.norm(x))


class QuantLinear(nn.Module):
    """y = site(x) @ Q_w(T_out · W · T_in⁻ᵀ)ᵀ + b', where site/transforms are optional.

    `in_transform` is the inverse side of the input transform, `out_transform` (P_v, per head) rotates
    the output rows; both are recomputed every call while training and folded away by `fold()`.
    GPTQ weights (`set_gptq`): integer codes with a scale (and zero) per output row, already in the
    transformed domain, replace Q_w(T_out · W · T_in⁻ᵀ) while they are set.
    """

    GPTQ_BUFFERS = ("gptq_codes", "gptq_scale", "gptq_zero")

    def __init__(self, linear: nn.Linear, w_quantizer: Quantizer, input_site: ActSite | None = None,
                 in_transform: Transform | None = None, out_transform: Transform | None = None,
                 out_rows: tuple[int, int] | None = None):
        super().__init__()
        self.out_rows = out_rows  # the rows out_transform applies to (the v rows of a fused q/k/v); None = all
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.w_quantizer = w_quantizer
        self.input_site = input_site
        self.__dict__["in_transform"] = in_transform
        self.__dict__["out_transform"] = out_transform
        for name in self.GPTQ_BUFFERS:  # buffers: they follow .to() and land in state_dict once set
            self.register_buffer(name, None)
        self._cached = None  # (weight, bias) once frozen for evaluation

    @property
    def has_gptq(self) -> bool:
        return self.gptq_codes is not None

    @torch.no_grad()
    def set_gptq(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """Use GPTQ weights: codes (out, in) integers, scale and zero (out, 1) or (out, groups);
        weight = (codes - zero) * scale."""
        shape = (self.out_features, self.in_features)
        groups = scale.shape[-1] if scale.dim() == 2 else 0  # (out, in / group size) with weight groups
        if tuple(codes.shape) != shape or scale.shape[0] != shape[0] or not groups or shape[1] % groups \
                or (zero is not None and zero.shape != scale.shape):
            raise ValueError(f"GPTQ codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit a "
                             f"{shape} weight")
        if codes.is_floating_point():
            raise ValueError("GPTQ codes must be an integer tensor")
        dev = self.weight.device
        self.gptq_codes = codes.to(dev)
        self.gptq_scale = scale.to(dev, torch.float32)
        self.gptq_zero = None if zero is None else zero.to(dev, torch.float32)
        self._cached = None

    def clear_gptq(self) -> None:
        for name in self.GPTQ_BUFFERS:
            setattr(self, name, None)
        self._cached = None

    def gptq_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The dequantized GPTQ weight, computed in float32 and returned in `dtype`."""
        return dequantize(self.gptq_codes, self.gptq_scale, self.gptq_zero).to(dtype)

    def effective_weight_and_bias(self, dtype=torch.float32, quantize: bool = True):
        b = None if self.bias is None else self.bias.to(dtype)
        if b is not None and self.out_transform is not None:
            b = transform_rows(b.unsqueeze(-1), self.out_transform, self.out_rows).squeeze(-1)
        if quantize and self.has_gptq:
            return self.gptq_weight(dtype), b
        w = self.weight.to(dtype)
        if self.in_transform is not None:
            w = self.in_transform.transform_weight(w)
        if self.out_transform is not None:
            w = transform_rows(w, self.out_transform, self.out_rows)
        return (self.w_quantizer(w) if quantize else w), b

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype | None = None) -> None:
        """Cache the quantized weight (evaluation): transforms stop being recomputed per call.
        Computed in float32, stored in `dtype` (default: the weight's dtype)."""
        dtype = dtype or self.weight.dtype
        w, b = self.effective_weight_and_bias()
        self._cached = (w.to(dtype), None if b is None else b.to(dtype))

    def unfreeze(self) -> None:
        self._cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_site is not None:
            x = self.input_site(x)
        w, b = self._cached if self._cached is not None else self.effective_weight_and_bias()
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def transform_rows(w: torch.Tensor, t: Transform, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply a head_dim transform P to the output rows of a (heads*head_dim, in) weight, head by head:
    y_head -> y_head P  means  W_head -> Pᵀ W_head. rows: only rows [start, stop) (the rest unchanged)."""
    if rows is not None:
        a, b = rows
        return torch.cat([w[:a], transform_rows(w[a:b], t), w[b:]])
    hd = t.n
    out, n_in = w.shape
    wr = w.reshape(out // hd, hd, n_in).transpose(1, 2)  # (heads, in, hd): rows are y-space vectors
    return t(wr).transpose(1, 2).reshape(out, n_in)


class KVQuant(nn.Module):
    """Keys after RoPE: k -> Q(k P_h), q -> q P_h⁻ᵀ (scores unchanged); values -> Q(v)."""

    def __init__(self, key_transform: Transform | None, k_quantizer: Quantizer, v_quantizer: Quantizer):
        super().__init__()
        self.__dict__["key_transform"] = key_transform
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer

    def forward(self, query, key, value):
        if self.key_transform is not None:
            key = self.key_transform(key)
            query = self.key_transform.transform_weight(query)
        return query, self.k_quantizer(key), self.v_quantizer(value)


# ---------------------------------------------------------------------- attention hook ---

def _flatquant_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kv = getattr(module, "fq_kv", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def register_attention(name: str = ATTN_IMPL, fn=None) -> None:
    """Make `name` a known attention implementation (with sdpa's mask builder) in transformers; by default
    the fake-quant model's `flatquant` attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn or _flatquant_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:  # older transformers build masks without the registry
        pass


def install_attention_hook(model: nn.Module) -> None:
    """Route attention through `_flatquant_attention` (sdpa underneath) via the public registries."""
    register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPL)
    else:
        model.config._attn_implementation = ATTN_IMPL


# -------------------------------------------------------------------- layer installation ---

@dataclass
class LayerTransforms:
    """The transforms a method places in one decoder layer; None = no transform at that site."""

    attn_in: Transform | None = None  # P_a: shared q/k/v input
    o_in: Transform | None = None  # P_o (⊗ P_v): o_proj input
    mlp_in: Transform | None = None  # P_ug: shared gate/up input
    down_in: Transform | None = None  # P_d: down_proj input
    k_head: Transform | None = None  # P_h: keys after RoPE, per head
    v_head: Transform | None = None  # P_v: values per head, folded into v_proj rows
    extra: dict[str, Transform | None] = field(default_factory=dict)  # per-layer sites, e.g. "down_in.3" (MoE)

    def get(self, site: str) -> Transform | None:
        return self.extra.get(site) if site in self.extra else getattr(self, site, None)

    def as_module_dict(self) -> nn.ModuleDict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update({module_key(site): t for site, t in self.extra.items()})
        return nn.ModuleDict({k: t for k, t in out.items() if t is not None})


def module_key(site: str) -> str:
    """The key of a site's transform in a layer's `fq_transforms` ("down_in.3" -> "down_in_3")."""
    return site.replace(".", "_")


def _act_quantizer(bits: int, cfg: QuantConfig, learnable_clip: bool) -> Quantizer:
    return Quantizer(bits, symmetric=not cfg.a_asym, clip_ratio=cfg.a_clip_ratio, learnable_clip=learnable_clip)


def _weight_quantizer(bits: int, cfg: QuantConfig, lin: nn.Linear, learnable_clip: bool) -> Quantizer:
    g = cfg.w_group_size
    if g is not None and lin.in_features % g:
        raise ConfigError(f"weight group size {g} does not divide a projection's {lin.in_features} inputs")
    return Quantizer(bits, symmetric=not cfg.w_asym, group_size=g, learnable_clip=learnable_clip,
                     clip_shape=(lin.out_features, 1))


def quantize_layer(layer: nn.Module, family: Family, cfg: QuantConfig, transforms: LayerTransforms,
                   learnable_clip: bool = False, index: int | None = None, split_kv_clip: bool = False) -> None:
    """Replace the projections (every site of family.layer_sites), the two norms and the attention of
    `layer` with quantized versions. index: the decoder layer's number (per-layer mixed precision);
    split_kv_clip: separate learnable lower/upper KV clip factors.

    Idempotence guard: a layer is installed once (a second call raises)."""
    if hasattr(layer, "fq_transforms"):
        raise RuntimeError("layer is already quantized")
    check_shared_sites(cfg, family, index)
    layer.fq_transforms = transforms.as_module_dict()
    lin = family.linears(layer)
    v_role, v_rows = family.v_rows(layer)
    for site, roles in family.layer_sites(layer).items():
        t_in = transforms.get(site)
        act = ActSite(t_in, _act_quantizer(cfg.act_bits(family.base_role(roles[0]), index), cfg, learnable_clip))
        norm, owner = family.site_norm(site, layer), family.site_owner(layer, site)
        if norm is not None:  # a shared input: transformed and quantized once, behind its norm
            family.set_norm(layer, norm, NormWithSite(family.norm(layer, norm), act))
        elif owner is not None:  # a shared input inside a block (MoE: after the full-precision router)
            owner.input_site = act
        for role in roles:
            wq = _weight_quantizer(cfg.weight_bits(family.base_role(role), index), cfg, lin[role], learnable_clip)
            out_t = transforms.v_head if role == v_role else None  # P_v folds into the value rows
            family.set_linear(layer, role, QuantLinear(lin[role], wq, None if norm or owner else act,
                                                       in_transform=t_in, out_transform=out_t,
                                                       out_rows=v_rows if role == v_role else None))
    attn, g = family.attention(layer), cfg.kv_group_size
    head_dim = getattr(attn, "head_dim", None)
    if g is not None and head_dim is not None and (g > head_dim or head_dim % g):
        raise ConfigError(f"KV group size {g} does not divide the head dimension {head_dim}")
    g = None if g == head_dim else g  # one group per head: the default
    kv_q = dict(symmetric=not cfg.kv_asym, clip_ratio=cfg.kv_clip_ratio, learnable_clip=learnable_clip,
                group_size=g, split_clip=split_kv_clip)
    attn.fq_kv = KVQuant(transforms.k_head, Quantizer(cfg.key_bits(index), **kv_q),
                         Quantizer(cfg.value_bits(index), **kv_q))


def quant_linears(module: nn.Module) -> list[QuantLinear]:
    return [m for m in module.modules() if isinstance(m, QuantLinear)]


def freeze(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Evaluation mode for quantized modules: transforms and quantized weights computed once
    (at the parameters' precision) and stored in `dtype`."""
    for m in quant_linears(module):  # weights first: they read the transforms unfrozen, at full precision
        m.freeze(dtype)
    for m in module.modules():
        if isinstance(m, Transform):
            m.freeze(dtype)


@torch.no_grad()
def cast_weights(layer: nn.Module, dtype: torch.dtype) -> None:
    """Cast a frozen layer's model tensors (weights, norms, biases) to `dtype`. The transforms', quantizers'
    and GPTQ tensors keep their precision, so a later fold or export computes exactly what `freeze` did."""
    kept = {id(sub) for m in layer.modules() if isinstance(m, (Transform, Quantizer)) for sub in m.modules()}
    for m in layer.modules():
        if id(m) in kept:
            continue
        keep = QuantLinear.GPTQ_BUFFERS if isinstance(m, QuantLinear) else ()
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and t.is_floating_point() and name not in keep:
                t.data = t.data.to(dtype)


def unfreeze(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (Transform, QuantLinear)):
            m.unfreeze()


__all__ = [
    "ActSite",
    "KVQuant",
    "LayerTransforms",
    "NormWithSite",
    "QuantLinear",
    "cast_weights",
    "freeze",
    "install_attention_hook",
    "kron_apply",
    "module_key",
    "quant_linears",
    "quantize_layer",
    "transform_rows",
    "unfreeze",
]
