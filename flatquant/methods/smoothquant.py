"""SmoothQuant baseline: per-channel scales c_j = max|X_j|^α / max|W_j|^(1-α), α = 0.5.

Scales sit where they can be folded offline: the q/k/v input (into input_layernorm), the gate/up
input (into post_attention_layernorm) and the down_proj input (into up_proj's rows). The o_proj
input is left unscaled, as its producer (attention) cannot absorb a scale under GQA.
"""
from __future__ import annotations

import torch

from flatquant.core.modules import LayerTransforms
from flatquant.core.transforms import ChannelScale
from flatquant.methods.stats import input_absmax

ALPHA = 0.5
SCALED_SITES = ("attn_in", "mlp_in", "down_in")  # o_in: attention cannot absorb a scale under GQA


def smooth_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().abs().amax(0).float().cpu() for w in weights]).amax(0)
    c = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return c.clamp(min=1e-5)


def site_scales(layer, family, stats: dict[str, torch.Tensor], alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """The scale of each site that can fold one (SCALED_SITES), from its activation max |x| and the weights
    of the projections that read it."""
    return {site: smooth_scale(stats[site], [m.weight for m in family.site_linears(layer, site)], alpha)
            for site in family.layer_sites(layer) if family.site_kind(site) in SCALED_SITES and site in stats}


def build_transforms(model, family, cfg, calib=None, seed: int = 0) -> list[LayerTransforms]:
    if calib is None:
        raise ValueError("smoothquant needs calibration windows for its activation statistics")
    stats = input_absmax(model, family, calib)
    out = []
    for i, layer in enumerate(family.decoder_layers(model)):
        scales = {site: ChannelScale(c) for site, c in site_scales(layer, family, stats[i]).items()}
        base = {k: scales.pop(k) for k in SCALED_SITES if k in scales}
        out.append(LayerTransforms(**base, extra=scales))  # extra: per-expert sites of an MoE layer
    return out
