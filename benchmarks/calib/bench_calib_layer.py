"""Calibration cost of one Llama-3-8B- (or SmolLM2-) shaped decoder layer (random weights), extrapolated to the model.

Builds one LlamaDecoderLayer with Llama-3-8B sizes (hidden 4096, MLP 14336, 32 heads, 8 KV heads), or
SmolLM2-135M sizes, in float16 on the GPU, random calibration inputs (nsamples x seqlen tokens), and runs
FlatQuant's per-layer calibration for --epochs epochs. Each phase is timed (CUDA-synchronised wall clock:
the work is many kernels per step): the fixed per-layer costs (setup, the two loss passes, CUDA graph
capture) once, and the median epoch, which is extrapolated to the full recipe (15 epochs) and to all
layers. Peak GPU memory is torch.cuda.max_memory_allocated over the run.
Writes one JSON record (kind "calib_cost") to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flatquant.calib.layerwise import layer_input_absmax
from flatquant.config import QuantConfig, calib_preset
from flatquant.core.modules import ATTN_IMPL, quantize_layer, register_attention
from flatquant.io import atomic_write_text
from flatquant.methods.flatquant import layer_transforms, train_layer
from flatquant.methods.smoothquant import site_scales
from flatquant.models.families import FAMILIES
from flatquant.results import provenance

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, rope_theta=500000.0, max_position_embeddings=8192, vocab_size=128256),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, rope_theta=100000.0, max_position_embeddings=8192, vocab_size=49152),
}
PAPER_REFERENCE = {"llama3-8b": "LLaMA-3-8B, one GPU: 0.9 h and about 26 GB (paper Sec. 4.1, Table 5)"}


def _check_graph(layer, inps, targets, kwargs, cfg, device) -> None:
    """Developer aid: eager and CUDA-graph training from the same start must follow the same trajectory."""
    import copy

    n = min(inps.shape[0], 4 * cfg.batch_size)
    amp = device == "cuda" and cfg.recipe == "svd-amp"
    res = {}
    for graph in (False, True):
        lay = copy.deepcopy(layer)
        t = time.time()
        res[graph] = train_layer(lay, inps[:n], targets[:n], kwargs, replace(cfg, epochs=2, cuda_graph=graph), amp,
                                 torch.Generator().manual_seed(1))
        print(f"check-graph cuda_graph={graph}: loss before/after/finite {res[graph]} ({time.time() - t:.2f}s)")


def _profile(layer, inps, targets, kwargs, cfg, device) -> None:
    """Developer aid: where the time of a few training steps goes (kernels, CPU ops, synchronisations)."""
    from torch.profiler import ProfilerActivity, profile

    small = replace(cfg, epochs=1)
    n = min(inps.shape[0], 4 * cfg.batch_size)
    train_layer(layer, inps[:n], targets[:n], kwargs, small, device == "cuda", torch.Generator().manual_seed(1))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        train_layer(layer, inps[:n], targets[:n], kwargs, small, device == "cuda", torch.Generator().manual_seed(1))
        if device == "cuda":
            torch.cuda.synchronize()
    ev = prof.key_averages()
    sort = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2, help="epochs actually run (the rest is extrapolated)")
    ap.add_argument("--recipe", default="svd-amp", choices=["svd-amp", "direct-fp32"])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default=None, help="default: results/calib_cost_<shape>-layer.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--no-cuda-graph", action="store_true", help="train eagerly (no CUDA graph replay)")
    ap.add_argument("--check-graph", action="store_true",
                    help="train copies eagerly and from a CUDA graph on 16 samples; report both losses")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the training steps")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    sizes = dict(SHAPES[args.shape])
    args.out = args.out or f"results/calib_cost_{args.shape}-layer.json"
    if args.small:
        sizes.update(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    if not torch.cuda.is_available() and not args.small:
        print("bench_calib_layer: needs a CUDA GPU (use --small for a CPU smoke run)", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    register_attention()
    config = LlamaConfig(**sizes)
    config._attn_implementation = ATTN_IMPL
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=torch.float16)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    cfg = replace(calib_preset("paper"), nsamples=args.nsamples, seqlen=args.seqlen, recipe=args.recipe,
                  epochs=args.epochs, cuda_graph=not args.no_cuda_graph)
    store_dtype = torch.float16 if device == "cuda" else torch.float32
    inps = torch.randn(args.nsamples, args.seqlen, sizes["hidden_size"], device=device, dtype=store_dtype)
    rope = LlamaRotaryEmbedding(config).to(device)
    pos = torch.arange(args.seqlen, device=device)[None]
    kwargs = {"position_embeddings": rope(inps[:1].float(), pos), "attention_mask": None, "use_cache": False}
    family = FAMILIES["llama"]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    layer = layer.float()
    targets, stats = layer_input_absmax(layer, family, inps, kwargs, cfg.batch_size, out=torch.empty_like(inps))
    transforms = layer_transforms(config, cfg, torch.Generator().manual_seed(0), site_scales(layer, family, stats))
    quantize_layer(layer, family, QuantConfig(4, 4, 4), transforms, learnable_clip=True)
    layer.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    setup_s = time.time() - t0
    if args.profile:
        _profile(layer, inps, targets, kwargs, cfg, device)
    if args.check_graph:
        _check_graph(layer, inps, targets, kwargs, cfg, device)
    t1 = time.time()
    phases: dict = {}
    before, after, finite = train_layer(layer, inps, targets, kwargs, cfg, cfg.recipe == "svd-amp" and device == "cuda",
                                        torch.Generator().manual_seed(0), timings=phases)
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t1
    # Fixed costs (setup, two loss passes, graph capture) once; the epoch time (median of those run) x 15.
    per_epoch = statistics.median(phases["epoch"])
    fixed = setup_s + phases["loss_before"] + phases["setup"] + phases["loss_after"]
    layer_full = fixed + 15 * per_epoch
    steps_per_epoch = -(-args.nsamples // cfg.batch_size)
    n_layers = sizes["num_hidden_layers"]
    record = {
        **provenance(device), "kind": "calib_cost", "shape": f"{args.shape} decoder layer (random weights)",
        "recipe": args.recipe, "cuda_graph": cfg.cuda_graph,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs_run": args.epochs,
        "setup_seconds": round(setup_s, 2), "train_seconds": round(train_s, 2),
        "phase_seconds": {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
                          for k, v in phases.items()},
        "seconds_per_epoch": round(per_epoch, 3), "fixed_seconds_per_layer": round(fixed, 2),
        "layer_seconds_15_epochs": round(layer_full, 1),
        "ms_per_step": round(1000 * per_epoch / steps_per_epoch, 2),
        "layers": n_layers, "model_minutes_extrapolated": round(n_layers * layer_full / 60, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "loss_before": before, "loss_after": after, "finite": finite,
        "paper_reference": PAPER_REFERENCE.get(args.shape),
    }
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
