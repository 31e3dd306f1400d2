"""The one verb: `quantize(model, QuantConfig, method=...)` turns a Hugging Face causal LM into a
fake-quantized one in place (weights, activations and KV cache), ready for evaluation."""
from __future__ import annotations

import torch
from torch import nn

from flatquant.config import METHODS, CalibConfig, ConfigError, QuantConfig
from flatquant.models.families import family_for
from flatquant.methods import BASELINES
from flatquant.core.modules import LayerTransforms, freeze, install_attention_hook, quant_linears, quantize_layer


def quantize(model: nn.Module, config: QuantConfig, method: str = "rtn", calib: torch.Tensor | None = None,
             calib_config: CalibConfig | None = None, seed: int = 0, progress: bool = True,
             artifacts: str | None = None, resume: bool = True) -> nn.Module:
    """Quantize `model` in place and return it.

    method: 'fp16' (nothing), 'rtn', 'smoothquant', 'quarot' or 'flatquant'.
    calib: calibration windows (nsamples, seqlen) — needed by smoothquant, flatquant and GPTQ weights
    (config.weight_quantizer == "gptq"; FlatQuant trains with RTN weights, then runs GPTQ on the same windows).
    artifacts: for flatquant, a folder for the learned parameters and per-layer checkpoints.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    family = family_for(model)
    if method == "fp16":
        return model
    if config.weight_quantizer == "gptq" and calib is None:  # before any change to the model
        raise ConfigError("weight_quantizer 'gptq' needs calibration windows (calib=...)")
    if method == "flatquant":
        from flatquant.methods.flatquant import calibrate

        return calibrate(model, config, calib, calib_config or CalibConfig(), seed=seed, progress=progress,
                         out_dir=artifacts, resume=resume)
    per_layer = BASELINES[method](model, family, config, calib, seed)
    apply_transforms(model, family, config, per_layer)
    finalize(model, config)
    if config.weight_quantizer == "gptq":  # after the clip search: GPTQ uses the searched grid
        from flatquant.methods.gptq import apply_gptq

        apply_gptq(model, calib, config, progress=progress)
    return model


def apply_transforms(model: nn.Module, family, config: QuantConfig, per_layer: list[LayerTransforms],
                     learnable_clip: bool = False) -> None:
    device = next(model.parameters()).device
    for layer, transforms in zip(family.decoder_layers(model), per_layer):
        quantize_layer(layer, family, config, transforms, learnable_clip)
        layer.to(device)
    install_attention_hook(model)


@torch.no_grad()
def finalize(model: nn.Module, config: QuantConfig) -> None:
    """Optional weight clip search (of the RTN grid, which GPTQ then also uses), then cache every quantized
    weight for fast evaluation."""
    if config.w_clip_search:
        for m in quant_linears(model):
            m.unfreeze()
            w, _ = m.effective_weight_and_bias(quantize=False)
            m.w_quantizer.search_clip(w)
    freeze(model)

