"""The one verb: `quantize(model, config)` turns a Hugging Face causal LM into a fake-quantized one in place
(weights, activations and KV cache), ready for evaluation. The method is the config's type
(RTNConfig, SmoothQuantConfig, QuaRotConfig, FlatQuantConfig, FP16Config); a small registry (QUANTIZERS)
maps each type's method to the function that applies it."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flatquant import mixed
from flatquant.config import CalibConfig, ConfigError, FlatQuantConfig, QuantConfig, as_method_config
from flatquant.core.modules import LayerTransforms, freeze, install_attention_hook, quant_linears, quantize_layer
from flatquant.methods import flatquant as flatquant_method
from flatquant.methods import gptq, quarot, rtn, smoothquant
from flatquant.models.families import family_for


def quantize(model: nn.Module, config: QuantConfig, method: str | None = None, calib: torch.Tensor | None = None,
             calib_config: CalibConfig | None = None, seed: int = 0, progress: bool = True,
             artifacts: str | None = None, resume: bool = True) -> nn.Module:
    """Quantize `model` in place with the method of `config` and return it (see `quantize_with_report`)."""
    quantize_with_report(model, config, method, calib, calib_config, seed, progress, artifacts, resume)
    return model


def quantize_with_report(model: nn.Module, config: QuantConfig, method: str | None = None,
                         calib: torch.Tensor | None = None, calib_config: CalibConfig | None = None, seed: int = 0,
                         progress: bool = True, artifacts: str | None = None, resume: bool = True) -> dict:
    """Quantize `model` in place; return what the method reports ({"calib_layers": [...]} for FlatQuant,
    {"gptq": {...}} with GPTQ weights; {} otherwise).

    config: a method config (FlatQuantConfig(...), QuaRotConfig(...), ...), or a plain QuantConfig with
    method='fp16' (nothing), 'rtn' (default), 'smoothquant', 'quarot' or 'flatquant' (it keeps its settings).
    calib: calibration windows (nsamples, seqlen) — needed by smoothquant, flatquant and GPTQ weights
    (config.weight_quantizer == "gptq"; FlatQuant trains with RTN weights, then runs GPTQ on the same windows).
    calib_config: FlatQuant's recipe, replacing the config's `calib` when given.
    artifacts: for flatquant, a folder for the learned parameters and per-layer checkpoints.
    """
    config = as_method_config(config, method)
    family = family_for(model)  # unknown architecture: a clear error before anything else
    mixed.check(config, family, len(family.decoder_layers(model)))  # what the mixed precision cannot honour
    if config.method == "fp16":  # no change
        return {}
    if config.weight_quantizer == "gptq" and calib is None:  # before any change to the model
        raise ConfigError("weight_quantizer 'gptq' needs calibration windows (calib=...)")
    return QUANTIZERS[config.method](model, config, calib, calib_config=calib_config, seed=seed, progress=progress,
                 artifacts=artifacts, resume=resume)


def _baseline(build_transforms) -> Callable[..., dict]:
    """A method that places fixed transforms (built from the model and calibration windows), then optionally
    searches the weight clip ratios and runs GPTQ."""
    def apply(model, config: QuantConfig, calib, seed: int = 0, progress: bool = True, **_) -> dict:
        family = family_for(model)
        apply_transforms(model, family, config, build_transforms(model, family, config, calib, seed))
        finalize(model, config)
        if config.weight_quantizer == "gptq":  # after the clip search: GPTQ uses the searched grid
            return {"gptq": gptq.apply_gptq(model, calib, config, progress=progress)}
        return {}
    return apply


def _flatquant(model, config: FlatQuantConfig, calib, calib_config: CalibConfig | None = None, seed: int = 0,
               progress: bool = True, artifacts: str | None = None, resume: bool = True) -> dict:
    return flatquant_method.calibrate(model, config, calib, calib_config or config.calib, seed=seed, progress=progress,
                     out_dir=artifacts, resume=resume)


# The method of a config type (its `method` class attribute, e.g. QuaRotConfig.method == "quarot") -> its function.
QUANTIZERS: dict[str, Callable[..., dict]] = {
    "rtn": _baseline(rtn.build_transforms),
    "smoothquant": _baseline(smoothquant.build_transforms),
    "quarot": _baseline(quarot.build_transforms),
    "flatquant": _flatquant,
}


def apply_transforms(model: nn.Module, family, config: QuantConfig, per_layer: list[LayerTransforms],
                     learnable_clip: bool = False) -> None:
    device = next(model.parameters()).device
    for i, (layer, transforms) in enumerate(zip(family.decoder_layers(model), per_layer)):
        quantize_layer(layer, family, config, transforms, learnable_clip, index=i)
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
