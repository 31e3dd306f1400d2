"""Activation statistics of a model over calibration windows, gathered layer by layer."""
from __future__ import annotations

import torch

from flatquant.calib.layerwise import layer_input_absmax, run_layerwise


@torch.no_grad()
def input_absmax(model, family, windows: torch.Tensor, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, the per-channel max |x| at the inputs of q/k/v, gate/up, o_proj and down_proj.
    Activations stay in the model's dtype between layers, as in a forward pass of the whole model."""
    dtype = next(model.parameters()).dtype

    def step(_i, layer, inps, kwargs):  # outputs overwrite the inputs batch by batch
        return layer_input_absmax(layer, family, inps, kwargs, batch_size, dtype, out=inps)

    return run_layerwise(model, family, windows, step, dtype=dtype)
