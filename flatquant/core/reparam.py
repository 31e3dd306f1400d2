"""Reparameterisation: fold every offline part of the learned transforms into the model's weights.

After calibration the quantized model still recomputes W·P⁻ᵀ from the learnable factors. Folding does,
in float64: W' = Q(T_out · (W diag(c)) · P⁻ᵀ) for every projection (or its GPTQ weight, already in that
domain), moves the channel scales c into input_layernorm (P_a), post_attention_layernorm (P_ug) and
up_proj's rows (P_d), and leaves online only the small Kronecker factors, the activation quantizers and
the KV-cache transform. Per-row symmetric quantization is scale-equivariant, so moving c_d into up_proj's
quantized rows is exact. In an MoE layer P_ug's scale goes into post_attention_layernorm too, and the
16-bit router (and shared-expert gate) that read that norm's untransformed output take c back in their
input columns; each expert's c_d goes into its own up rows (the shared expert's into its up_proj).
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.core.modules import NormWithSite, QuantLinear, freeze, module_key, unfreeze
from flatquant.core.quantizer import Quantizer
from flatquant.models import moe
from flatquant.models.families import family_for


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    family = family_for(model)
    for layer in family.decoder_layers(model):
        if not hasattr(layer, "fq_transforms"):
            continue
        dtype = next(layer.parameters()).dtype
        unfreeze(layer)
        layer.double()
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                w, b = m.effective_weight_and_bias(dtype=torch.float64)
                m.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    m.bias = nn.Parameter(b, requires_grad=False)
                m.__dict__["in_transform"] = None
                m.__dict__["out_transform"] = None
                m.w_quantizer = Quantizer(16)  # the weight now holds its quantized values
                m.clear_gptq()  # GPTQ weights included: they are what `w` holds now
        t = layer.fq_transforms
        for site in family.layer_sites(layer):  # a scale moves into the norm or projection producing the site
            norm, producer, readers = fold_targets(family, layer, site)
            if norm is None and producer is None:
                continue  # o_in: attention cannot absorb a scale
            key = module_key(site)
            c = t[key].fold_scale() if key in t else None
            if c is None:
                continue
            c = c.to(torch.float64)
            if norm is not None:
                (norm.norm if isinstance(norm, NormWithSite) else norm).weight.div_(c)
                for m in readers:  # 16-bit readers of the untransformed norm output (MoE router) undo it
                    m.weight.mul_(c)
            else:
                lin, rows = producer  # the up half of a fused gate/up
                lin.weight[rows].div_(c.unsqueeze(1))
                if lin.bias is not None:
                    lin.bias[rows].div_(c)
        freeze(layer, dtype=dtype)
        layer.to(dtype)
    return model


def fold_targets(family, layer: nn.Module, site: str):
    """(norm, (producer, rows), readers) that absorb the channel scale of `site`: the norm feeding it (and,
    in an MoE layer, the 16-bit router / shared-expert gate reading that norm's output), or the projection
    rows producing it (up_proj; in an MoE layer each expert's up rows, the shared expert's up_proj)."""
    if family.is_moe_layer(layer) and site != "attn_in" and site != "o_in":
        block = family.mlp_module(layer)
        if site == "mlp_in":
            return family.norm(layer, "post"), None, moe.raw_readers(block)
        return None, moe.down_producer(block, site), []
    norm = family.site_norm(site, layer)
    if norm is not None:
        return family.norm(layer, norm), None, []
    if site in family.producer:
        lin = family.linears(layer)[family.producer[site]]
        return None, (lin, family.producer_rows(site, lin)), []
    return None, None, []
