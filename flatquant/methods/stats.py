"""Activation statistics gathered with forward hooks over calibration windows."""
from __future__ import annotations

import torch


@torch.no_grad()
def input_absmax(model, family, windows: torch.Tensor, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, the per-channel max |x| at the inputs of q/k/v, gate/up, o_proj and down_proj."""
    stats: list[dict[str, torch.Tensor]] = []
    hooks = []

    def record(i, key):
        def hook(_mod, args, output=None):
            x = output if output is not None else args[0]
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
            prev = stats[i].get(key)
            stats[i][key] = m if prev is None else torch.maximum(prev, m)
        return hook

    for i, layer in enumerate(family.decoder_layers(model)):
        stats.append({})
        lin = family.linears(layer)
        for norm, site in (("input", "attn_in"), ("post", "mlp_in")):  # a norm's output is the site's input
            hooks.append(family.norm(layer, norm).register_forward_hook(
                lambda m, a, o, f=record(i, site): f(m, a, o)))
        hooks.append(lin["o_proj"].register_forward_pre_hook(record(i, "o_in")))
        hooks.append(lin["down_proj"].register_forward_pre_hook(record(i, "down_in")))
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats
