"""FlatQuant block-wise calibration (paper §3.1, Eq. 4; Appendix B.1).

For each decoder layer in turn: compute its full-precision outputs on the calibration inputs, install
learnable transforms (P_a, P_o⊗P_v, P_h, P_ug, P_d), channel scales and clipping thresholds, and train
them with AdamW + cosine decay to minimise MSE(full-precision output, quantized output). The next
layer's inputs are this layer's full-precision outputs. Each finished layer is checkpointed, so an
interrupted run resumes where it stopped and ends with the same result.

With weight_quantizer "gptq" the training still sees RTN weights (as in the paper); once every layer is
trained, GPTQ (flatquant/methods/gptq.py) replaces the weights layer by layer on the same calibration windows.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flatquant import mixed
from flatquant.calib import artifacts as artifacts
from flatquant.calib.layerwise import capture_layer_inputs, layer_input_absmax, run_layerwise, store_dtype
from flatquant.calib.train_step import HostBatches, LayerStepper, autocast, layer_output
from flatquant.config import CalibConfig, ConfigError, QuantConfig
from flatquant.core.modules import (LayerTransforms, cast_weights, freeze, install_attention_hook, module_key,
                                    quantize_layer)
from flatquant.core.transforms import ChannelScale, FactorView, KroneckerAffine, step_cache
from flatquant.errors import CheckpointError, NonFiniteError
from flatquant.memory import trim_heap
from flatquant.methods import gptq
from flatquant.methods.smoothquant import site_scales
from flatquant.models.families import Family, family_for
from flatquant.models.moe import unrouted_sites

__all__ = ["calibrate", "calibrate_layer", "capture_layer_inputs", "layer_transforms", "load_calibrated",
           "load_calibrated_with_report", "train_layer"]


def layer_transforms(model_config, cfg: CalibConfig, generator: torch.Generator,
                     init_scales: dict[str, torch.Tensor] | None = None, layer: nn.Module | None = None,
                     routed=None) -> LayerTransforms:
    """The learnable transforms of one decoder layer, as the ablation flags ask (LT, PS).

    layer: sizes the sites from the layer itself (an MoE layer has one down site per expert); routed: the
    per-expert sites that get a transform (default all); the others keep none (identity)."""
    family = family_for(model_config)
    sites = family.layer_sites(layer) if layer is not None else family.sites
    hidden = model_config.hidden_size
    inter = family.site_width(layer, "down_in") if layer is not None and "down_in" in sites \
        else model_config.intermediate_size
    heads = model_config.num_attention_heads
    head_dim = family.head_dim(model_config)
    par = "svd" if cfg.recipe == "svd-amp" else "direct"
    init_scales = init_scales or {}

    def affine(n, site=None, **kw):
        t = KroneckerAffine(n, parameterization=par, init=cfg.init, learn_scale=cfg.learn_scale and site is not None,
                            generator=generator, **kw)
        if t.scale is not None and site in init_scales:
            with torch.no_grad():
                t.scale.copy_(init_scales[site])
        return t

    def scale_only(n, site):
        return ChannelScale(init_scales.get(site, torch.ones(n)), learnable=True) if cfg.learn_scale else None

    dense_down = "down_in" in sites
    extra_sites = [x for x in sites if "." in x and (routed is None or x in routed)]
    if not cfg.learn_transform:  # ablation rows without LT: scales (PS) at most
        return LayerTransforms(attn_in=scale_only(hidden, "attn_in"), mlp_in=scale_only(hidden, "mlp_in"),
                               down_in=scale_only(inter, "down_in") if dense_down else None,
                               extra={x: scale_only(family.site_width(layer, x), x) for x in extra_sites})
    o_in = affine(heads * head_dim, factors=(heads, head_dim), skip_p2_online=True)
    return LayerTransforms(
        attn_in=affine(hidden, "attn_in"), o_in=o_in, v_head=FactorView(o_in),
        mlp_in=affine(hidden, "mlp_in"), down_in=affine(inter, "down_in") if dense_down else None,
        k_head=affine(head_dim, factors=(1, head_dim)),
        extra={x: affine(family.site_width(layer, x), x) for x in extra_sites},
    )


@torch.no_grad()
def _mse(layer, inps, targets, kwargs, batch_size, amp, fetch=None) -> float:
    fetch = fetch or HostBatches(inps.device)
    total = torch.zeros((), device=fetch.device)
    with step_cache(layer):  # the transforms are fixed during the pass: evaluate them once
        for s in range(0, inps.shape[0], batch_size):
            part = slice(s, s + batch_size)
            with autocast(amp, fetch.device):
                out = layer_output(layer(fetch(inps, part).float(), **kwargs))
            total += torch.sum((out.float() - fetch(targets, part).float()) ** 2)
    return total.item() / targets.numel()


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_layer(layer: nn.Module, inps, targets, kwargs, cfg: CalibConfig, amp: bool,
                generator: torch.Generator, log=print, timings: dict | None = None,
                history: list | None = None, device: torch.device | None = None) -> tuple[float, float, bool]:
    """Train the layer's transform, scale and clipping parameters. Returns (loss_before, loss_after, finite).

    history: if a list is given, it receives the mean training loss of each epoch.
    timings: if a dict is given, it receives wall-clock seconds of each phase (GPU-synchronised):
    loss_before, setup (optimizer, CUDA graph capture), each epoch, loss_after.
    device: the compute device when inps/targets live in host memory (moved over one mini-batch at a time)."""
    fetch = HostBatches(device if device is not None else inps.device)
    tick = _clock(fetch.device) if timings is not None else 0.0

    def lap(key):
        nonlocal tick
        if timings is not None:
            now = _clock(fetch.device)
            if key == "epoch":
                timings.setdefault("epoch", []).append(now - tick)
            else:
                timings[key] = now - tick
            tick = now
    for p in layer.parameters():
        p.requires_grad_(False)
    transform_params, clip_params = [], []
    for name, p in layer.named_parameters():
        if "clip_logit" in name:
            clip_params.append(p)
        elif name.startswith("fq_transforms."):
            transform_params.append(p)
    if not cfg.learn_transform:
        transform_params = [p for n, p in layer.named_parameters()
                            if n.endswith(".scale") and n.startswith("fq_transforms.")]
    for p in transform_params + clip_params:
        p.requires_grad_(True)
    loss_before = _mse(layer, inps, targets, kwargs, cfg.batch_size, amp, fetch)
    lap("loss_before")
    groups = [g for g in ({"params": transform_params, "lr": cfg.lr}, {"params": clip_params, "lr": cfg.clip_lr})
              if g["params"]]
    if not groups:
        return loss_before, loss_before, math.isfinite(loss_before)
    n = inps.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    first = torch.arange(min(cfg.batch_size, n), device=inps.device)
    stepper = LayerStepper(layer, groups, kwargs, amp, cfg.weight_decay, fetch(inps, first), fetch(targets, first),
                           cuda_graph=cfg.cuda_graph, log=log, loss=cfg.loss)
    lap("setup")
    step = 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size].to(inps.device)
            stepper.step(fetch(inps, idx), fetch(targets, idx), step, total)
            step += 1
        if not stepper.all_finite():
            return loss_before, float("nan"), False
        if history is not None:
            history.append(stepper.epoch_loss())
        lap("epoch")
    for p in layer.parameters():
        p.requires_grad_(False)
    loss_after = _mse(layer, inps, targets, kwargs, cfg.batch_size, amp, fetch)
    lap("loss_after")
    return loss_before, loss_after, math.isfinite(loss_after)


def _host_copy(layer: nn.Module) -> nn.Module:
    """A copy of the layer whose tensors live in CPU memory (no second copy on the compute device)."""
    memo = {id(p): nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
            for p in layer.parameters()}
    memo.update({id(b): b.to("cpu", copy=True) for b in layer.buffers()})
    return copy.deepcopy(layer, memo)


def calibrate_layer(layer: nn.Module, family: Family, model_config, qcfg: QuantConfig, cfg: CalibConfig,
                    inps: torch.Tensor, kwargs: dict, seed: int, amp: bool, saved: dict | None = None,
                    log=print, index: int = 0, timings: dict | None = None, device: torch.device | None = None,
                    targets: torch.Tensor | None = None):
    """Quantize one decoder layer and train (or load) its FlatQuant parameters.

    Returns (quantized layer, full-precision outputs, report row). The layer comes back in float32 and
    unfrozen; a NaN/inf loss under mixed precision is retried once in float32 from the same start.
    timings: see train_layer. device, targets: inps (and the targets buffer the outputs go to) may live in
    host memory while the layer computes on `device` (streamed calibration: no whole activation set on it)."""
    device = torch.device(device) if device is not None else inps.device
    layer = layer.float()
    targets, stats = layer_input_absmax(layer, family, inps, kwargs, cfg.batch_size,
                                        out=torch.empty_like(inps) if targets is None else targets)
    original = _host_copy(layer) if saved is None and amp else None  # only a mixed-precision retry needs it
    use_amp = amp
    trained = None
    while True:
        gen = torch.Generator().manual_seed(seed)  # per layer: a resumed run equals an uninterrupted one
        transforms = layer_transforms(model_config, cfg, gen, site_scales(layer, family, stats, cfg.scale_alpha),
                                      layer=layer, routed=set(stats))
        quantize_layer(layer, family, qcfg, transforms, learnable_clip=cfg.learn_clip, index=index,
                       split_kv_clip=cfg.kv_clip_split)
        layer.to(device)
        if saved is not None:
            artifacts.load_layer_state(layer, saved, index)
            before = after = _mse(layer, inps, targets, kwargs, cfg.batch_size, use_amp, HostBatches(device))
            break
        start = {k: v.clone() for k, v in artifacts.layer_state(layer).items()}  # kept if training ends worse
        history: list[float] = []
        before, after, finite = train_layer(layer, inps, targets, kwargs, cfg, use_amp, gen, log=log, history=history,
                                            timings=timings, device=device)
        if finite and after > before:
            trained, after = after, before
            layer.load_state_dict(start, strict=False)
        if finite or not use_amp:
            break
        log(f"layer {index}: loss became NaN/inf under mixed precision; retrying in float32")
        use_amp = False
        layer, original = original.to(device), None
    if not math.isfinite(after):
        raise NonFiniteError(f"layer {index}: calibration diverged (NaN/inf loss) even in float32")
    row = {"layer": index, "loss_before": before, "loss_after": after, "resumed": saved is not None, "amp": use_amp}
    unrouted = unrouted_sites(family.layer_sites(layer), stats)
    if unrouted:  # MoE experts no calibration token was routed to: identity transforms
        row["unrouted_experts"] = [int(x.split(".")[1]) for x in unrouted]
    if saved is None and trained is not None:
        row["loss_trained"] = trained  # training ended worse than the start: the start was kept
    if saved is None and history:
        row["epoch_losses"] = history
    return layer, targets, row


def calibrate(model: nn.Module, qcfg: QuantConfig, windows: torch.Tensor, cfg: CalibConfig, seed: int = 0,
              progress: bool = True, out_dir: str | Path | None = None, resume: bool = True,
              log=None) -> dict:
    """Calibrate FlatQuant on `windows` (nsamples, seqlen) and quantize `model` in place.

    out_dir: if given, the learned parameters are saved there (safetensors per layer + JSON settings)
    and a run interrupted earlier resumes from the layers already saved. Returns the report:
    {"calib_layers": one row per layer (losses, resumed, and with GPTQ its output errors), "gptq": GPTQ's
    settings and time (with GPTQ weights only)}."""
    if windows is None:
        raise ValueError("flatquant needs calibration windows")
    family = family_for(model)
    layers = family.decoder_layers(model)
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    amp = cfg.recipe == "svd-amp" and device.type == "cuda"
    log = log or (lambda msg: tqdm.write(msg))
    store = artifacts.LayerStore(out_dir, model.config, qcfg, cfg) if out_dir is not None else None
    if store is not None and not resume:
        store.clear()

    install_attention_hook(model)
    with_gptq = qcfg.weight_quantizer == "gptq"
    states = []  # with GPTQ: each layer's learned float32 tensors, for GPTQ's target weights

    def step(i, layer, inps, kwargs):
        saved = store.load_layer(i) if store is not None and resume else None
        layer, targets, row = calibrate_layer(layer, family, model.config, qcfg, cfg, inps, kwargs,
                                              seed * 100003 + i, amp, saved=saved, log=log, index=i)
        layers[i] = layer
        if store is not None and saved is None:
            store.set_epoch_losses(i, row.get("epoch_losses"))
            store.save_layer(i, layer)
        elif store is not None and store.epoch_losses(i) is not None:  # resumed: the saved history
            row["epoch_losses"] = store.epoch_losses(i)
        if with_gptq:
            states.append(artifacts.layer_state(layer))
        freeze(layer, dtype=model_dtype)
        cast_weights(layer, model_dtype)
        trim_heap()  # training's transients, freed: else the resident set grows layer by layer
        log(f"layer {i:3d}: mse {row['loss_before']:.4g} -> {row['loss_after']:.4g}"
            + (" (resumed)" if saved is not None else "")
            + (f" (training reached {row['loss_trained']:.4g}; kept the initial parameters)"
               if "loss_trained" in row else "")
            + (f" (experts with no calibration tokens, identity transforms: {row['unrouted_experts']})"
               if "unrouted_experts" in row else ""))
        return targets, row  # full-precision outputs feed the next layer

    report = run_layerwise(model, family, windows, step, dtype=store_dtype(model), desc="flatquant layers",
                           progress=progress)
    out = {"calib_layers": report}
    if with_gptq:  # an interrupted GPTQ pass reruns whole: each layer's inputs depend on the GPTQ layers before it
        g = gptq.apply_gptq(model, windows, qcfg, batch_size=cfg.batch_size, progress=progress, log=log,
                       restore=lambda j, lay: artifacts.load_layer_state(lay, states[j], j),
                       on_layer_done=(lambda j, lay: store.save_layer(j, lay)) if store is not None else None)
        for row, r in zip(report, g["layers"]):
            row["gptq_rtn_err"], row["gptq_err"] = r["rtn_err"], r["gptq_err"]
        out["gptq"] = {k: v for k, v in g.items() if k != "layers"}
    if store is not None:
        store.finish(report, out.get("gptq"))
    return out


def load_calibrated(model: nn.Module, out_dir: str | Path, qcfg: QuantConfig | None = None,
                    calib: torch.Tensor | None = None, batch_size: int = 4, progress: bool = False,
                    log=None) -> nn.Module:
    """Quantize `model` with FlatQuant parameters saved by `calibrate` (no recalibration); returns it.

    qcfg may change the bit widths used at evaluation; the transforms are reused as learned. Weights:
    RTN, or with qcfg.weight_quantizer "gptq" the saved GPTQ weights when they were made with the same
    weight settings (artifacts.gptq_plan), else GPTQ runs now on `calib` (post-hoc GPTQ on the
    learned transforms)."""
    load_calibrated_with_report(model, out_dir, qcfg, calib, batch_size, progress, log)
    return model


def load_calibrated_with_report(model: nn.Module, out_dir: str | Path, qcfg: QuantConfig | None = None,
                                calib: torch.Tensor | None = None, batch_size: int = 4, progress: bool = False,
                                log=None) -> dict:
    """`load_calibrated`, returning the report instead: {"gptq": ...} where GPTQ weights were loaded
    ("loaded_from") or computed now, else {}."""
    meta = artifacts.read_meta(out_dir)
    saved_q, cfg = QuantConfig.from_dict(meta["quant"]), CalibConfig.from_dict(meta["calib"])
    qcfg = qcfg or saved_q
    plan = artifacts.gptq_plan(meta, qcfg)
    if plan == "run" and calib is None:
        raise ConfigError(f"{out_dir} holds no GPTQ weights for these settings, and GPTQ needs calibration "
                          "windows to compute them")
    family = family_for(model)
    artifacts.check_model_matches(meta, model.config)
    mixed.check(qcfg, family, len(family.decoder_layers(model)))
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    install_attention_hook(model)
    store = artifacts.LayerStore(out_dir, model.config, saved_q, cfg, check_existing=False)
    states = []
    for i, layer in enumerate(family.decoder_layers(model)):
        saved = store.load_layer(i)
        if saved is None:
            raise CheckpointError(f"{out_dir}: parameters for layer {i} are missing")
        layer.float()
        keys = {k.split(".")[1] for k in saved if k.startswith("fq_transforms.")}
        routed = {x for x in family.layer_sites(layer) if module_key(x) in keys}
        transforms = layer_transforms(model.config, cfg, torch.Generator().manual_seed(0), layer=layer,
                                      routed=routed)
        quantize_layer(layer, family, qcfg, transforms, learnable_clip=cfg.learn_clip, index=i,
                       split_kv_clip=cfg.kv_clip_split)
        layer.to(device)
        artifacts.load_layer_state(layer, saved, i, gptq=plan == "saved")
        if plan == "run":
            states.append(saved)
        freeze(layer, dtype=model_dtype)
        cast_weights(layer, model_dtype)
    if plan == "run":
        return {"gptq": gptq.apply_gptq(model, calib, qcfg, batch_size=batch_size, progress=progress, log=log,
                                   restore=lambda j, lay: artifacts.load_layer_state(lay, states[j], j))}
    if plan == "saved":
        return {"gptq": {**meta.get("gptq", {}), "loaded_from": str(out_dir)}}
    return {}
