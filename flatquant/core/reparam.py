"""Reparameterisation: fold every offline part of the learned transforms into the model's weights.

After calibration the quantized model still recomputes W·P⁻ᵀ from the learnable factors. Folding does,
in float64: W' = Q(T_out · (W diag(c)) · P⁻ᵀ) for every projection (or its GPTQ weight, already in that
domain), moves the channel scales c into input_layernorm (P_a), post_attention_layernorm (P_ug) and
up_proj's rows (P_d), and leaves online only the small Kronecker factors, the activation quantizers and
the KV-cache transform. Per-row symmetric quantization is scale-equivariant, so moving c_d into up_proj's
quantized rows is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.models.families import family_for
from flatquant.core.modules import QuantLinear, freeze, unfreeze
from flatquant.core.quantizer import Quantizer


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
        lin = family.linears(layer)
        for site, norm in (("attn_in", family.norm(layer, "input")), ("mlp_in", family.norm(layer, "post"))):
            c = t[site].fold_scale() if site in t else None
            if c is not None:
                norm.norm.weight.div_(c.to(torch.float64))
        c = t["down_in"].fold_scale() if "down_in" in t else None
        if c is not None:
            lin["up_proj"].weight.div_(c.to(torch.float64).unsqueeze(1))
            if lin["up_proj"].bias is not None:
                lin["up_proj"].bias.div_(c.to(torch.float64))
        freeze(layer, dtype=dtype)
        layer.to(dtype)
    return model
