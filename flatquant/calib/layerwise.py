"""The layer-wise pipeline: capture the first decoder layer's inputs once, then for each layer in turn run
it on its inputs and pass its outputs on as the next layer's inputs.

FlatQuant calibration (train each layer on its full-precision inputs), GPTQ (each layer's Hessians from the
outputs of the GPTQ layers before it) and SmoothQuant's activation statistics all run on this loop; only
what happens to each layer differs (the `step` they pass).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from flatquant.calib.train_step import run_layer
from flatquant.models.families import Family


class _Captured(Exception):
    pass


def store_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the layer activations are kept in: the model's on a GPU, float32 on the CPU."""
    p = next(model.parameters())
    return p.dtype if p.device.type == "cuda" else torch.float32


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, family: Family, windows: torch.Tensor, dtype: torch.dtype,
                         out: torch.Tensor | None = None):
    """Run the model up to its first decoder layer for each window; return (inputs, layer kwargs). out: a
    buffer (e.g. in host memory) the inputs are written to, one window at a time."""
    layers = family.decoder_layers(model)
    device = next(model.parameters()).device
    inps = out if out is not None else torch.empty(windows.shape[0], windows.shape[1], model.config.hidden_size,
                                                   dtype=dtype, device=device)
    kwargs_seen: dict = {}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        inps[hook.i] = hs[0].to(dtype)
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(windows.shape[0]):  # batch 1: position embeddings then broadcast over any batch
            hook.i = i
            try:
                model(windows[i:i + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen["use_cache"] = False
    return inps, kwargs_seen


# step(i, layer, inputs, kwargs) -> (the next layer's inputs, a result for this layer)
Step = Callable[[int, nn.Module, torch.Tensor, dict], tuple[torch.Tensor, object]]


def run_layerwise(model: nn.Module, family: Family, windows: torch.Tensor, step: Step,
                  dtype: torch.dtype | None = None, desc: str = "layers", progress: bool = False) -> list:
    """Capture the inputs of the first layer (kept in `dtype`, default `store_dtype`), then call `step` on
    each decoder layer with its inputs; returns the steps' results, one per layer."""
    layers = family.decoder_layers(model)
    inps, kwargs = capture_layer_inputs(model, family, windows, dtype or store_dtype(model))
    results = []
    for i in tqdm(range(len(layers)), desc=desc, disable=not progress):
        inps, result = step(i, layers[i], inps, kwargs)
        results.append(result)
    return results


def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()


@torch.no_grad()
def layer_input_absmax(layer: nn.Module, family: Family, inps: torch.Tensor, kwargs: dict, batch_size: int,
                       dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None):
    """Run a (not yet quantized) layer over `inps` (outputs into `out`, see run_layer) and record the
    per-channel max |x| at each input site. Returns (out, {site: absmax})."""
    stats: dict[str, torch.Tensor] = {}

    def record(site, x):
        m = _absmax(x)
        stats[site] = m if site not in stats else torch.maximum(stats[site], m)

    hooks = []
    for site in family.layer_sites(layer):  # a site absent from the stats saw no tokens (an unrouted expert)
        module, where = family.site_reader(layer, site)
        if where == "out":  # a norm's output is the site's input
            hooks.append(module.register_forward_hook(lambda _m, _a, o, s=site: record(s, o)))
        else:
            hooks.append(module.register_forward_pre_hook(lambda _m, a, s=site: record(s, a[0])))
    try:
        out = run_layer(layer, inps, kwargs, batch_size, dtype, out=out)
    finally:
        for h in hooks:
            h.remove()
    return out, stats
