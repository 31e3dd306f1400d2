"""End-to-end jobs behind the CLI: quantize a model with a method, evaluate it, write result records.

`run_config` is the Python entry point for "one row of a results table"; the CLI and the benchmark
scripts call it, so every record is produced the same way.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flatquant import data as data_mod
from flatquant.api import quantize_with_report
from flatquant.calib import artifacts
from flatquant.config import CalibConfig, QuantConfig
from flatquant.memory import release_memory
from flatquant.methods.flatquant import load_calibrated_with_report
from flatquant.results import write_record


@dataclass
class EvalSpec:
    """What to measure on each quantized model."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 8
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    zeroshot_batch_size: int = 32
    data_dir: str | None = None
    tokens: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # dataset -> (1, N), if tokenized


def calibration_data(tokenizer, ccfg: CalibConfig, data_dir=None) -> torch.Tensor:
    return data_mod.calibration_windows(tokenizer, ccfg.dataset, nsamples=ccfg.nsamples, seqlen=ccfg.seqlen,
                                        seed=ccfg.seed, data_dir=data_dir)


def evaluate(model, tokenizer, spec: EvalSpec, base_record: dict, results_dir: str | Path | None,
             progress: bool = True) -> list[dict]:
    """Perplexity on each dataset and zero-shot tasks; one record each (written if results_dir)."""
    from flatquant.eval.perplexity import perplexity
    from flatquant.guards import check_finite_ppl

    records = []
    device = next(model.parameters()).device
    for ds in spec.datasets:
        ids = spec.tokens.get(ds)
        if ids is None:
            ids = data_mod.eval_tokens(tokenizer, ds, data_dir=spec.data_dir, seqlen=spec.seqlen)
        t = time.time()
        res = perplexity(model, ids, seqlen=spec.seqlen, max_windows=spec.max_windows,
                         batch_size=spec.batch_size, device=device, progress=progress,
                         desc=f"{base_record.get('method', '')} ppl {ds}")
        check_finite_ppl(base_record.get("method", "model"), ds, res["ppl"])  # NaN/inf: an error, never a record
        rec = {**base_record, "kind": "ppl", "dataset": ds, "seqlen": spec.seqlen, "windows": res["windows"],
               "max_windows": spec.max_windows, "ppl": res["ppl"], "eval_seconds": round(time.time() - t, 2)}
        records.append(rec)
    if spec.tasks:
        from flatquant.eval.zeroshot import evaluate_zeroshot

        t = time.time()
        zs = evaluate_zeroshot(model, tokenizer, spec.tasks, data_dir=spec.data_dir, limit=spec.limit,
                               batch_size=spec.zeroshot_batch_size, device=device)
        average = zs.pop("average", None)
        records.append({**base_record, "kind": "zeroshot", "tasks": zs, "average": average, "limit": spec.limit,
                        "eval_seconds": round(time.time() - t, 2)})
    if results_dir is not None:
        for rec in records:
            write_record(rec, results_dir)
    return records


def run_config(base_model, tokenizer, model_name: str, method: str, qcfg: QuantConfig, spec: EvalSpec,
               ccfg: CalibConfig | None = None, calib: torch.Tensor | None = None, params_dir: str | None = None,
               results_dir: str | Path | None = "results", variant: str | None = None, seed: int = 0,
               progress: bool = True, extra: dict | None = None) -> list[dict]:
    """Quantize a copy of `base_model` (sharing its float weights; fp16: the model itself) and evaluate it.
    For flatquant, `params_dir` holding a finished calibration is reused (with qcfg.weight_quantizer "gptq"
    and no GPTQ weights saved for these settings, GPTQ then runs on `calib`); otherwise it is calibrated
    (and saved there when given)."""
    release_memory()  # what loading and tokenizing freed, before this method's peak
    model = base_model if method == "fp16" else _weight_sharing_copy(base_model)  # fp16 changes nothing
    t = time.time()
    trained_bits = None  # the bits reused parameters were trained at
    if method == "flatquant" and params_dir and (Path(params_dir) / artifacts.META).is_file() \
            and artifacts.read_meta(params_dir).get("complete"):
        trained_bits = QuantConfig.from_dict(artifacts.read_meta(params_dir)["quant"]).tag
        report = load_calibrated_with_report(model, params_dir, qcfg, calib=calib, progress=progress)
    else:
        report = quantize_with_report(model, qcfg, method=method, calib=calib, calib_config=ccfg, seed=seed,
                                      progress=progress, artifacts=params_dir)
    quant_seconds = time.time() - t
    base = {"model": model_name, "method": method, "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits,
            "kv_bits": qcfg.kv_bits, "weight_quantizer": qcfg.weight_quantizer if method != "fp16" else "-",
            "w_clip_search": qcfg.w_clip_search, "quantize_seconds": round(quant_seconds, 2), "seed": seed,
            **settings_fields(qcfg), "trained_bits": trained_bits}
    if variant:
        base["variant"] = variant
    if method in ("flatquant", "smoothquant") and ccfg is not None:
        base["calib"] = {"nsamples": ccfg.nsamples, "seqlen": ccfg.seqlen, "dataset": ccfg.dataset,
                         **({"epochs": ccfg.epochs, "recipe": ccfg.recipe, "lt": ccfg.learn_transform,
                             "ps": ccfg.learn_scale, "lct": ccfg.learn_clip, "scale_alpha": ccfg.scale_alpha,
                             "kv_clip_split": ccfg.kv_clip_split, "loss": ccfg.loss,
                             "weight_decay": ccfg.weight_decay} if method == "flatquant" else {})}
    # FlatQuant's per-layer losses ("calib_layers"); GPTQ's windows, settings and per-layer output errors
    # (FlatQuant: in calib_layers), or where its weights were loaded from ("gptq")
    base.update(report)
    base.update(extra or {})
    _drop_unquantized_weights(model)
    records = evaluate(model, tokenizer, spec, base, results_dir, progress)
    del model
    release_memory()
    return records


def settings_fields(qcfg: QuantConfig) -> dict:
    """The record fields of the settings beyond w/a/kv bits (older records lack them: the defaults)."""
    return {"k_bits": qcfg.key_bits(), "v_bits": qcfg.value_bits(), "w_group_size": qcfg.w_group_size,
            "w_asym": qcfg.w_asym, "kv_group_size": qcfg.kv_group_size, "mixed": qcfg.mixed}


def _weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters are new Parameter objects over the same storage: quantization
    replaces a copy's tensors (never writes into them), so the float weights are not held twice."""
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _drop_unquantized_weights(model) -> None:
    """Frozen quantized linears compute from their cached weight only: free the float weight they keep
    (this copy is evaluated and then discarded), so evaluation does not hold every linear twice."""
    from flatquant.core.modules import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear) and m._cached is not None and m.weight is not None:
            m.weight.data = torch.empty(0, dtype=m.weight.dtype, device=m.weight.device)
