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

from flatquant.core.modules import QuantLinear, freeze, unfreeze
from flatquant.core.quantizer import Quantizer
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
        lin = family.linears(layer)
        for site in family.layer_sites(layer):  # a scale moves into the norm or projection producing the site
            norm = family.site_norm(site, layer)
            if norm is None and site not in family.producer:
                continue  # o_in: attention cannot absorb a scale; MoE sites keep theirs online
            c = t[site].fold_scale() if site in t else None
            if c is None:
                continue
            c = c.to(torch.float64)
            if norm is not None:
                family.norm(layer, norm).norm.weight.div_(c)
            else:
                producer = lin[family.producer[site]]
                rows = family.producer_rows(site, producer)  # the up half of a fused gate/up
                producer.weight[rows].div_(c.unsqueeze(1))
                if producer.bias is not None:
                    producer.bias[rows].div_(c)
        freeze(layer, dtype=dtype)
        layer.to(dtype)
    return model
