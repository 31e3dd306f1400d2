"""The data behind the flatness figures (rendered by flatquant.report.figure_plots):

* flatness_data: sorted per-channel magnitudes (Frobenius norm of each input channel, paper Fig. 1 and
  Appendix D.1) of one decoder layer's weights and activations at each input site, as they are, after
  per-channel scaling (SmoothQuant's scale), after a randomized Hadamard (QuaRot) and after the learned
  FlatQuant transform of a saved parameter folder; activations from a few calibration windows.
* error_landscape: the MSE between each decoder layer's output in the full-precision model and in the model
  quantized by each method (the error propagated from the layers before, paper Fig. 2), per layer and
  per token position.
* loss_history: the per-epoch training losses saved with the parameters (flatquant.json "epoch_losses").
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from flatquant.calib import artifacts
from flatquant.calib.train_step import layer_output
from flatquant.config import METHOD_CONFIGS, CalibConfig, ConfigError, QuantConfig, as_method_config
from flatquant.core.transforms import ChannelScale, Transform, kron_apply
from flatquant.errors import CheckpointError
from flatquant.models.families import family_for

SITE_LABELS = {"attn_in": "q/k/v input", "o_in": "o_proj input", "mlp_in": "gate/up input",
               "down_in": "down_proj input"}
TRANSFORMS = ("original", "per-channel scaling", "Hadamard (QuaRot)", "FlatQuant")
LANDSCAPE_METHODS = {"rtn": "RTN (no transform)", "smoothquant": "per-channel scaling (SmoothQuant)",
                     "quarot": "Hadamard (QuaRot)", "flatquant": "FlatQuant"}


class _Stop(Exception):
    pass


def sorted_channel_norms(x: torch.Tensor, dim: int = 0) -> list[float]:
    """The Frobenius norm of each channel (over `dim`, the tokens or output rows), in descending order."""
    norms = torch.linalg.vector_norm(x.double(), dim=dim).sort(descending=True).values
    return [float(f"{v:.5g}") for v in norms.tolist()]  # 5 digits: the figure's JSON stays small


def flatness_distance(d: list[float]) -> float:
    """The paper's flatness metric ||d - d'||_2 (d' = ||d||_2 / sqrt(N), all channels equal), divided by ||d||_2
    so that transforms that rescale a tensor compare: 0 = perfectly flat."""
    v = torch.tensor(d, dtype=torch.float64)
    norm = v.norm()
    if norm == 0:
        return 0.0
    return float((v - norm / v.numel() ** 0.5).norm() / norm)


def apply_full(t: Transform | None, x: torch.Tensor) -> torch.Tensor:
    """x / c @ (P1 ⊗ P2) with both factors, also where P2 is folded upstream at run time (o_proj's P_v)."""
    if t is None:
        return x
    c = t.channel_scale()
    if c is not None:
        x = x / c.to(x.dtype)
    p1, p2 = t.matrices()
    return kron_apply(x, None if p1 is None else p1.to(x.dtype), None if p2 is None else p2.to(x.dtype))


def site_weight(layer, family, site: str) -> torch.Tensor:
    """The weights of the projections reading `site`, stacked by output row: (sum of outputs, in)."""
    return torch.cat([m.weight.detach().float().cpu() for m in family.site_linears(layer, site)], 0)


@torch.no_grad()
def capture_sites(model, windows: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """The inputs of decoder layer `index`'s sites over the windows: {site: (tokens, channels) float32 CPU}.
    The model runs one window at a time and stops after that layer."""
    family = family_for(model)
    layers = family.decoder_layers(model)
    if not 0 <= index < len(layers):
        raise ConfigError(f"--layer {index}: the model has layers 0..{len(layers) - 1}")
    layer = layers[index]
    seen: dict[str, list] = {s: [] for s in family.sites}
    hooks = []
    for site, roles in family.sites.items():
        norm = family.site_norm(site)
        if norm is not None:
            hooks.append(family.norm(layer, norm).register_forward_hook(
                lambda _m, _a, o, s=site: seen[s].append(o.detach().float().cpu().reshape(-1, o.shape[-1]))))
        else:
            hooks.append(family.linears(layer)[roles[0]].register_forward_pre_hook(
                lambda _m, a, s=site: seen[s].append(a[0].detach().float().cpu().reshape(-1, a[0].shape[-1]))))

    def stop(*_):
        raise _Stop

    hooks.append(layer.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for i in range(windows.shape[0]):
            try:
                model(windows[i:i + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {s: torch.cat(v, 0) for s, v in seen.items()}


def saved_layer_transforms(model, params: str | Path, index: int) -> dict[str, Transform]:
    """The learned transforms of layer `index` in a saved FlatQuant folder, by site."""
    from flatquant.methods.flatquant import layer_transforms

    meta = artifacts.check_finished(params)
    artifacts.check_model_matches(meta, model.config)
    cfg = CalibConfig.from_dict(meta["calib"])
    store = artifacts.LayerStore(params, model.config, QuantConfig.from_dict(meta["quant"]), cfg, check_existing=False)
    state = store.load_layer(index)
    if state is None:
        raise CheckpointError(f"{params}: parameters for layer {index} are missing")
    modules = layer_transforms(model.config, cfg, torch.Generator().manual_seed(0)).as_module_dict()
    prefix = "fq_transforms."
    wanted = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in modules.state_dict() if k not in wanted]
    if missing:
        raise CheckpointError(f"{params}: layer {index} lacks the saved transform parameter {missing[0]}")
    modules.load_state_dict(wanted, strict=False)
    modules.requires_grad_(False)
    return {site: modules[site] for site in SITE_LABELS if site in modules}


@torch.no_grad()
def flatness_data(model, windows: torch.Tensor, index: int, params: str | Path, seed: int = 0) -> dict:
    """{"layer", "tokens", "sites": {site: {"weights"|"activations": {transform: sorted channel norms}}}}."""
    from flatquant.methods import quarot
    from flatquant.methods.smoothquant import smooth_scale

    family = family_for(model)
    layer = family.decoder_layers(model)[index]
    learned = saved_layer_transforms(model, params, index)
    acts = capture_sites(model, windows, index)
    hadamard = quarot.build_transforms(model, family, None, seed=seed)[index]
    out = {"layer": index, "tokens": int(next(iter(acts.values())).shape[0]), "sites": {}}
    for site in SITE_LABELS:
        x, w = acts[site], site_weight(layer, family, site)
        scale = ChannelScale(smooth_scale(x.abs().amax(0), [w]))
        chosen = {"original": None, "per-channel scaling": scale, "Hadamard (QuaRot)": getattr(hadamard, site),
                  "FlatQuant": learned.get(site)}
        entry: dict = {"weights": {}, "activations": {}}
        for name, t in chosen.items():
            if name == "FlatQuant" and t is None:
                continue  # an ablation folder without a transform at this site
            entry["activations"][name] = sorted_channel_norms(apply_full(t, x), 0)
            entry["weights"][name] = sorted_channel_norms(w if t is None else t.transform_weight(w), 0)
        out["sites"][site] = entry
    return out


def _method_config(saved: QuantConfig, method: str) -> QuantConfig:
    """The saved bit settings for `method`, RTN weights, and the method's own weight clip search."""
    search = METHOD_CONFIGS[method]().w_clip_search
    return as_method_config(dataclasses.replace(saved, weight_quantizer="rtn", w_clip_search=search), method)


@torch.no_grad()
def _layer_outputs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output over the windows: [layer] -> (windows, tokens, hidden) float32 CPU."""
    layers = family_for(model).decoder_layers(model)
    outs: list[list] = [[] for _ in layers]
    hooks = [lay.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append(layer_output(o).float().cpu()))
             for i, lay in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for w in range(windows.shape[0]):
            model(windows[w:w + 1].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o, 0) for o in outs]


@torch.no_grad()
def error_landscape(model, windows: torch.Tensor, params: str | Path, methods=tuple(LANDSCAPE_METHODS),
                    seed: int = 0) -> dict:
    """{"bits", "methods": {method: {"per_layer": [mse], "per_position": [[mse per token] per layer]}}}: each
    method quantizes a copy of `model` at the saved folder's bit settings (RTN weights for every method)."""
    from flatquant import api
    from flatquant.methods.flatquant import load_calibrated

    meta = artifacts.check_finished(params)
    artifacts.check_model_matches(meta, model.config)
    saved = QuantConfig.from_dict(meta["quant"])
    ref = _layer_outputs(model, windows)
    out = {"bits": saved.tag, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "methods": {}}
    for method in methods:
        if method not in LANDSCAPE_METHODS:
            raise ConfigError(f"unknown method {method!r} for the error landscape; choose from "
                              f"{', '.join(LANDSCAPE_METHODS)}")
        q = copy.deepcopy(model)
        if method == "flatquant":
            load_calibrated(q, params, dataclasses.replace(saved, weight_quantizer="rtn"))
        else:
            api.quantize(q, _method_config(saved, method), calib=windows, seed=seed, progress=False)
        got = _layer_outputs(q, windows)
        del q
        per_pos = [((g - r) ** 2).mean(dim=(0, 2)) for g, r in zip(got, ref)]
        out["methods"][method] = {"per_layer": [float(p.mean()) for p in per_pos],
                                  "per_position": [[float(f"{v:.5g}") for v in p.tolist()] for p in per_pos]}
    return out


def loss_history(params: str | Path) -> dict:
    """{"epoch_losses": {layer: [loss per epoch]}, "before_after": {layer: (loss before, loss after)}}:
    the per-epoch history where the folder has one (empty for older folders), and the report's losses."""
    meta = artifacts.check_finished(params)
    rows = [r for r in meta.get("report") or [] if isinstance(r, dict) and isinstance(r.get("layer"), int)]
    return {"epoch_losses": artifacts.epoch_losses(meta),
            "before_after": {r["layer"]: (r.get("loss_before"), r.get("loss_after")) for r in rows},
            "epochs": (meta.get("calib") or {}).get("epochs")}
