"""Streamed calibration of a Llama-3-70B- (or 8B-) shaped model (random weights) on one GPU, extrapolated.

1. Writes a random model of the shape (hidden 8192, MLP 28672, 64 heads, 8 KV heads, vocab 128256; --layers
   decoder layers, default 8) as safetensors shards, one shard per layer, into --work (local disk; removed
   at the end unless --keep).
2. Calibrates it as `flatquant quantize --offload disk` does (calib.streaming: each layer read from its shard,
   activations in a disk memmap) with the paper's windows (128 x 2048, batch 4) and --epochs epochs, W4A4KV4.
3. Times the pieces the extrapolation needs on the first layers: GPTQ (--gptq-layers) and the
   full-precision pass of multi-process calibration (--fp-layers: load, forward, write the inputs memmap).
4. Writes one record per shape (kind "calib_scale") to --out, with the extrapolation to the full model on
   1 and on 8 GPUs and its formula:
       T_1 = L * (t_train + t_gptq)                                  (one process: FP outputs come from each step)
       T_N = L * t_fp + ceil(L / N) * t_train + L * t_gptq           (N processes: rank 0's FP pass first)
       t_train = median s/layer at --epochs + (15 - epochs) * median s/epoch   (the paper's 15 epochs)
Peak GPU memory is torch.cuda.max_memory_allocated, the largest of the three phases (each also recorded);
"targets_met" compares with issue 25's targets (peak GPU <= 40 GiB, 70B on 8 GPUs <= 45 min, 8B on 1 GPU
<= 20 min). With --epochs 15 (the paper's) nothing is extrapolated from seconds per epoch. Peak host memory
is the process's max RSS (memmapped activation pages it touched included).
`--smoke` runs the whole pipeline on the CPU with a tiny shape (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RecordWriter, base_fields

from flatquant.calib import offload
from flatquant.calib.artifacts import LayerStore
from flatquant.calib.layerwise import capture_layer_inputs, layer_input_absmax
from flatquant.calib.streaming import calibrate_streaming, gptq_streaming
from flatquant.config import CalibConfig, method_config

SHAPES = {  # full_layers: the real model's depth, for the extrapolation
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, full_layers=80),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, full_layers=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 full_layers=80),
}
PAPER_EPOCHS = 15
GIB = 2 ** 30


def write_model(folder: Path, shape: str, layers: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """A random Llama model of `shape` as safetensors shards (embeddings + final norm, then one per layer)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {k: v for k, v in SHAPES[shape].items() if k != "full_layers"}
    config = LlamaConfig(**sizes, num_hidden_layers=layers, rope_theta=500000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    shards: dict[str, list[str]] = {}
    for n in names:
        key = n.split(".")[2] if n.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(n)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, t0, nbytes = {}, time.time(), 0
    for k, (_key, group) in enumerate(sorted(shards.items(), key=lambda kv: (kv[0] != "rest", kv[0].zfill(6)))):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in group:
            if len(names[n]) == 1:  # norms
                t = torch.ones(names[n], dtype=dtype)
            else:
                t = (torch.randn(names[n], generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
            tensors[n] = t
            nbytes += t.numel() * t.element_size()
            weight_map[n] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1))
    return {"write_seconds": round(time.time() - t0, 1), "model_gib": round(nbytes / GIB, 2)}


def _write_child(folder, shape, layers, dtype, device, queue) -> None:
    queue.put(write_model(folder, shape, layers, dtype, device))


def _write_in_child(folder: Path, shape: str, layers: int, dtype: torch.dtype, device: str) -> dict:
    """write_model in a child process, so this process's peak host memory is the calibration's alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_write_child, args=(folder, shape, layers, dtype, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the model failed (exit status {proc.exitcode})")
    return result


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else math.nan


def fp_pass_seconds(source, windows, cfg, act_dtype, layers: int, work: Path) -> list[float]:
    """Seconds per layer of rank 0's full-precision pass (load the layer, run it, write its inputs memmap), as
    calib.streaming runs it: the activations in host memory, one mini-batch at a time on the device."""
    shape = (windows.shape[0], windows.shape[1], source.config.hidden_size)
    pin = source.device.type == "cuda"
    x, y = offload.host_empty(shape, act_dtype, pin), offload.host_empty(shape, act_dtype, pin)
    _, kwargs = capture_layer_inputs(source.skeleton(), source.family, windows, act_dtype, out=x)
    source.unload()
    out = []
    for i in range(min(layers, source.num_layers)):
        if source.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        offload.activations("disk", tuple(x.shape), x.dtype, work, "fp_probe").copy_(x)
        layer = source.layer(i).float()
        layer_input_absmax(layer, source.family, x, kwargs, cfg.batch_size, out=y)
        x, y = y, x
        del layer
        source.release(i)
        if source.device.type == "cuda":
            torch.cuda.synchronize()
        out.append(round(time.time() - t, 2))
    offload.drop_activations(work)
    return out


TARGETS = {"peak_gpu_gib": 40.0, "llama3-70b": ("gpus_8", 45.0), "llama3-8b": ("gpus_1", 20.0)}  # issue 25


def train_seconds(s_layer: float, s_epoch: float, epochs: int) -> float:
    """Seconds to train one layer with the paper's epochs, from a run of `epochs` epochs."""
    return s_layer + (PAPER_EPOCHS - epochs) * s_epoch


def extrapolate(full_layers: int, t_train: float, t_gptq: float, t_fp: float, gpus: int) -> float:
    """Minutes for the whole model on `gpus` GPUs (the module docstring's formula; GPTQ counted whole on
    every GPU count, though its per-group solves are split over the ranks)."""
    if gpus == 1:
        return full_layers * (t_train + t_gptq) / 60
    return (full_layers * t_fp + math.ceil(full_layers / gpus) * t_train + full_layers * t_gptq) / 60


def verdicts(shape: str, minutes: dict, peak_gpu: float | None) -> dict:
    """The issue's targets this record meets (None: not measured)."""
    out = {"peak_gpu_le_40_gib": None if peak_gpu is None else peak_gpu <= TARGETS["peak_gpu_gib"]}
    if shape in TARGETS:
        key, limit = TARGETS[shape]
        out[f"{key}_le_{limit:g}_min"] = minutes[key] <= limit
    return out


def run_shape(args, shape: str, device: str, dtype: torch.dtype, writer: RecordWriter) -> dict:
    work = Path(args.work) / shape
    model_dir = work / "model"
    print(f"[{shape}] writing a random {args.layers}-layer model to {model_dir}", flush=True)
    written = _write_in_child(model_dir, shape, args.layers, dtype, device)
    print(f"[{shape}] wrote {written['model_gib']} GiB in {written['write_seconds']} s", flush=True)
    cc = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, batch_size=args.batch_size,
                     offload="disk")
    qcfg = method_config("flatquant", calib=cc)
    windows = torch.randint(0, SHAPES[shape]["vocab_size"], (args.nsamples, args.seqlen),
                            generator=torch.Generator().manual_seed(0))
    source = offload.ShardedSource(model_dir, device, dtype)
    act_dtype = dtype if device.startswith("cuda") else torch.float32
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    params = work / "params"
    shutil.rmtree(params, ignore_errors=True)  # a left-over folder would resume its layers: no training timed
    report = calibrate_streaming(source, qcfg, windows, cc, params, mode="disk", log=print)
    calib_wall = time.time() - t0
    peak_calib = torch.cuda.max_memory_allocated() / GIB if cuda else None
    rows = report["calib_layers"]
    s_layer = _median([r["seconds"] for r in rows])
    s_epoch = _median([r.get("epoch_seconds") for r in rows])
    t_train = train_seconds(s_layer, s_epoch, args.epochs)
    print(f"[{shape}] calibrated {len(rows)} layers in {calib_wall:.0f} s (median {s_layer:.1f} s/layer, "
          f"{s_epoch:.2f} s/epoch, peak GPU {peak_calib or 0:.1f} GiB)", flush=True)
    writer.add({"kind": "calib_scale", "partial": True, "model_shape": shape, "world_size": 1, "offload": "disk",
                "layers_measured": len(rows), "s_per_layer": round(s_layer, 2), "s_per_epoch": round(s_epoch, 3),
                "layer_seconds": [r["seconds"] for r in rows],
                "peak_gpu_gib": round(peak_calib, 2) if peak_calib is not None else None})
    gq = method_config("flatquant", weight_quantizer="gptq", calib=cc)
    source.limit = args.gptq_layers
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = gptq_streaming(source, LayerStore(params, source.config, gq, cc, check_existing=False), gq, cc, windows,
                       act_dtype, log=print, mode="disk", work=work / "gptq")
    peak_gptq = torch.cuda.max_memory_allocated() / GIB if cuda else None
    t_gptq = _median([r["seconds"] for r in g["layers"]])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fp = fp_pass_seconds(source, windows, cc, act_dtype, args.fp_layers, work / "fp")
    t_fp = _median(fp)
    source.limit = None
    peak_fp = torch.cuda.max_memory_allocated() / GIB if cuda else None
    peak_all = None if not cuda else max(peak_calib, peak_gptq, peak_fp)
    full = SHAPES[shape]["full_layers"]
    minutes = {f"gpus_{n}": round(extrapolate(full, t_train, t_gptq, t_fp, n), 1) for n in (1, 8)}
    formula = (f"T_1 = L*(t_train + t_gptq); T_N = L*t_fp + ceil(L/N)*t_train + L*t_gptq; L={full}, "
               f"t_train = {s_layer:.1f} s/layer at {args.epochs} epoch(s) + ({PAPER_EPOCHS}-{args.epochs}) x "
               f"{s_epoch:.2f} s/epoch = {t_train:.1f} s, t_gptq = {t_gptq:.1f} s (median of {len(g['layers'])}), "
               f"t_fp = {t_fp:.1f} s (median of {len(fp)}); T_1 = {minutes['gpus_1']} min, T_8 = {minutes['gpus_8']} min")
    print(f"[{shape}] {formula}", flush=True)
    rec = {
        "kind": "calib_scale", "model_shape": {"shape": shape, **{k: v for k, v in SHAPES[shape].items()},
                                               "layers_written": args.layers, "dtype": str(dtype).replace("torch.", "")},
        "world_size": 1, "offload": "disk", "layers_measured": len(rows), "s_per_layer": round(s_layer, 2),
        "s_per_epoch": round(s_epoch, 3), "epochs_run": args.epochs, "paper_epochs": PAPER_EPOCHS,
        "s_per_layer_paper": round(t_train, 2), "s_gptq_per_layer": round(t_gptq, 2), "s_fp_per_layer": round(t_fp, 2),
        "layer_seconds": [r["seconds"] for r in rows], "calib_wall_s": round(calib_wall, 1),
        "peak_gpu_gib": round(peak_all, 2) if peak_all is not None else None,
        "peak_gpu_gib_phases": None if not cuda else {"calibration": round(peak_calib, 2),
                                                      "gptq": round(peak_gptq, 2), "fp_pass": round(peak_fp, 2)},
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "extrapolated_min": minutes, "extrapolation": formula,
        "targets_met": verdicts(shape, minutes, peak_all),
        "calib": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                  "recipe": cc.recipe, "bits": "W4A4KV4"},
        "model_write": written, "smoke": bool(args.smoke),
    }
    writer.records.pop()  # the partial record of this shape, replaced by the whole one
    writer.add(rec)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama3-70b", help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers written and calibrated")
    ap.add_argument("--epochs", type=int, default=1, help="epochs run per layer (the rest of 15 is extrapolated)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gptq-layers", type=int, default=1, help="layers GPTQ is timed on")
    ap.add_argument("--fp-layers", type=int, default=1, help="layers the full-precision pass is timed on")
    ap.add_argument("--work", default="/tmp/flatquant-calib-scale", help="local folder for the model and activations")
    ap.add_argument("--out", default="results/calib_scale.json", help="JSON list of records")
    ap.add_argument("--keep", action="store_true", help="keep the written model and parameters")
    ap.add_argument("--smoke", action="store_true", help="the whole pipeline on the CPU with a tiny shape")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.layers, args.nsamples, args.seqlen, args.batch_size = "tiny", 2, 4, 32, 2
        args.gptq_layers, args.fp_layers = 1, 1
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            print("calib_scale.py: needs a CUDA GPU (or --smoke); refusing to run.", file=sys.stderr)
            return 1
        device, dtype = "cuda", torch.bfloat16
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}")
    base = base_fields()
    if args.smoke:
        base["device"] = "cpu"
    writer = RecordWriter(args.out, base)
    for s in shapes:
        run_shape(args, s, device, dtype, writer)
    print(f"wrote {len(writer.records)} record(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
