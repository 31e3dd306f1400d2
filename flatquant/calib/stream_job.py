"""`flatquant quantize --offload cpu|disk` and `torchrun ... -m flatquant quantize`: calibration only.

The model is streamed layer by layer (calib.offload) and calibrated by calib.streaming, into the work
folder `<output>.partial`, renamed to `<output>` when complete; a rerun resumes from the layers saved
there (with any number of processes). Baselines and evaluation need the whole model in memory, so they
are left to `flatquant eval --params <output>`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from flatquant.calib import artifacts, distributed, offload
from flatquant.calib.streaming import calibrate_streaming, layer_seconds, together
from flatquant.config import PRESETS, CalibConfig, ConfigError, QuantConfig, calib_preset, method_config
from flatquant.errors import FlatQuantError, ModelError


def _log(msg: str) -> None:
    print(msg, flush=True)


def streaming_configs(args, device: str, mode: str) -> tuple[QuantConfig, CalibConfig]:
    """The FlatQuant and calibration settings of a streamed `quantize` (as the in-memory path builds them)."""
    settings = dict(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                    weight_quantizer=args.weight_quantizer)
    preset = args.preset or ("paper" if device.startswith("cuda") else "cpu-quick")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in {"nsamples": args.calib_samples, "seqlen": args.calib_seqlen,
                                   "epochs": args.epochs, "recipe": args.recipe}.items() if v is not None}
    ccfg = calib_preset(preset, seed=args.seed, offload=mode, **overrides)
    qcfg = method_config("flatquant", **{k: v for k, v in settings.items() if v is not None},
                         w_clip_search=False, calib=ccfg)
    return qcfg, ccfg


def open_source(model: str, mode: str, device: str, dtype):
    """The layer source of a model spec: a folder's safetensors shards; a GGUF file held in CPU memory
    (`--offload cpu` only)."""
    import torch

    from flatquant.models.loading import default_dtype, load_model, model_location

    kind, path, _config = model_location(model)
    dtype = dtype or default_dtype(device)
    if kind == "folder":
        return offload.ShardedSource(path, torch.device(device), dtype)
    if kind == "gguf":
        if mode == "disk":
            raise ModelError(f"{path}: --offload disk streams safetensors shards and a GGUF file cannot be "
                             "streamed; use --offload cpu (the model is held in CPU memory)")
        return offload.ModuleSource(load_model(model, device="cpu", dtype=dtype)[0], device)
    raise ModelError(f"--offload and torchrun need a local model folder or .gguf file, not a hub id ({model})")


def _stamp_or_check(work: Path, source, qcfg: QuantConfig, ccfg: CalibConfig, no_resume: bool) -> None:
    """A new work folder's flatquant.json names the model (its fingerprint, as the in-memory path writes
    it); a folder being resumed must have been calibrated on the same model."""
    import json

    from flatquant.calib.integrity import model_fingerprint
    from flatquant.errors import CheckpointError
    from flatquant.io import atomic_write_text

    fp = offload.shard_fingerprint(source) if isinstance(source, offload.ShardedSource) \
        else model_fingerprint(source.model)
    if not no_resume and (work / artifacts.META).is_file():
        artifacts.check_saved_calibration(work, source.config, qcfg, ccfg)
        saved = artifacts.read_meta(work).get("model_fingerprint")
        if saved and saved != fp:
            raise CheckpointError(f"{work} was calibrated on a different model (fingerprint {saved}, this model "
                                  f"{fp}); use --no-resume to recalibrate it, or another --output")
        return
    store = artifacts.LayerStore(work, source.config, qcfg, ccfg, check_existing=False)
    store.meta["model_fingerprint"] = fp
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / artifacts.META, json.dumps(store.meta, indent=2) + "\n")


def quantize_streaming(args) -> int:
    """The streamed `quantize` command (see the module docstring); returns the exit status."""
    import torch

    from flatquant import io
    from flatquant.models.families import family_for
    from flatquant.models.loading import is_gguf, load_tokenizer, model_location
    from flatquant.runner import calibration_data

    dist, device = distributed.setup(args.device)
    try:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
        mode = "cpu" if args.offload == "none" else args.offload  # torchrun without --offload: CPU memory
        qcfg, ccfg = streaming_configs(args, device, mode)
        out = Path(args.output)
        if mode == "disk" and is_gguf(args.model):
            raise ModelError(f"{args.model}: --offload disk streams safetensors shards and a GGUF file cannot be "
                             "streamed; use --offload cpu (the model is held in CPU memory)")
        family_for(model_location(args.model)[2])  # unknown architecture: one line before any work
        if not args.no_resume and (out / artifacts.META).is_file() and artifacts.read_meta(out).get("complete"):
            if dist.main:
                print(f"flatquant: {out} already holds a finished calibration (--no-resume recalibrates)",
                      file=sys.stderr)
            return 0
        work = io.partial_folder(out)
        if dist.main and args.no_resume:
            io.discard_partial(out)
        dist.barrier()
        windows = calibration_data(load_tokenizer(args.model), ccfg, args.data_dir)
        source = open_source(args.model, mode, device, getattr(torch, args.dtype) if args.dtype else None)
        together(dist, "the resume check", (lambda: _stamp_or_check(work, source, qcfg, ccfg, args.no_resume))
                  if dist.main else lambda: None)
        if dist.main:
            _log(f"flatquant: calibrating {source.num_layers} layers streamed from {args.model} "
                 f"(offload {mode}, {dist.world} process(es), {device})")
        t = time.time()
        report = calibrate_streaming(source, qcfg, windows, ccfg, work, mode=mode, seed=args.seed,
                                     resume=not args.no_resume, dist=dist, log=_log)
        if dist.main:
            io.commit_folder(out)
            _log(f"flatquant: {len(report['calib_layers'])} layers in {time.time() - t:.1f} s (median "
                 f"{layer_seconds(report['calib_layers']):.1f} s per trained layer); parameters saved to {out}/")
            _log(f"evaluate with: flatquant eval --method flatquant --model {args.model} --params {out}")
        dist.barrier()
        return 0
    except FlatQuantError:
        raise
    except Exception as e:
        if dist.world > 1:  # a rank's own failure: one line, and torchrun stops the others
            raise FlatQuantError(f"rank {dist.rank}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        raise
    finally:
        distributed.teardown(dist)
