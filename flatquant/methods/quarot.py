"""QuaRot-style baseline: randomized Hadamard rotations on every linear input and on K per head.

As in QuaRot: the q/k/v and gate/up inputs, the down_proj input and the o_proj input (heads ⊗ head_dim,
the head_dim part folded into v_proj) are rotated; queries and keys are rotated per head so the KV
cache is quantized in the rotated basis. Where no Hadamard matrix of a size can be built, a random
orthogonal factor is used instead. Weight clip-ratio search is enabled by the caller (QuantConfig).
"""
from __future__ import annotations

import torch

from flatquant.core.modules import LayerTransforms
from flatquant.core.transforms import FactorView, FixedKronecker


def build_transforms(model, family, cfg, calib=None, seed: int = 0) -> list[LayerTransforms]:
    gen = torch.Generator().manual_seed(seed)
    conf = model.config
    hidden = conf.hidden_size
    heads = conf.num_attention_heads
    head_dim = family.head_dim(conf)
    out = []
    for layer in family.decoder_layers(model):
        o_in = FixedKronecker.random_hadamard(heads * head_dim, gen, factors=(heads, head_dim), signs=False,
                                              skip_p2_online=True)
        out.append(LayerTransforms(
            attn_in=FixedKronecker.random_hadamard(hidden, gen),
            o_in=o_in,
            v_head=FactorView(o_in),
            mlp_in=FixedKronecker.random_hadamard(hidden, gen),
            down_in=FixedKronecker.random_hadamard(family.site_width(layer, "down_in"), gen)
            if "down_in" in family.layer_sites(layer) else None,
            k_head=FixedKronecker.random_hadamard(head_dim, gen, factors=(1, head_dim), signs=False),
            extra={s: FixedKronecker.random_hadamard(family.site_width(layer, s), gen)  # MoE: one per expert
                   for s in family.layer_sites(layer) if "." in s},
        ))
    return out
