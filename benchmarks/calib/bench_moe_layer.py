"""Calibration cost of one MoE decoder layer (Mixtral-8x7B or Qwen3-30B-A3B shapes, random weights).

Builds the family's decoder layer from its transformers config class on the GPU (float16), converts its MoE
block as flatquant does (models/moe.py: a shared P_ug site after the 16-bit router, one P_d per expert),
and runs FlatQuant's per-layer calibration for --epochs epochs on random inputs (nsamples x seqlen tokens).
Training is eager: the routed token counts change every step, which a CUDA graph cannot replay.
Each phase is timed (CUDA-synchronised); the median epoch (after the first, which warms up, when more
than one ran) is extrapolated to the paper's 15 epochs and,
per sample, to the paper's 128 samples (stated in the record); peak GPU memory is
torch.cuda.max_memory_allocated over the run. Writes one JSON record (kind "calib_cost") per shape.
--smoke: tiny sizes on the CPU (for the tests).
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
from flatquant.models.moe import unrouted_sites
from flatquant.results import provenance

SHAPES = {  # published model sizes; layers = decoder layers of the whole model
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                                     num_hidden_layers=32, rope_theta=1e6, max_position_embeddings=32768,
                                     vocab_size=32000)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        num_hidden_layers=48, max_position_embeddings=40960,
                                        vocab_size=151936)),
}
SMOKE = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=32, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
PAPER_EPOCHS, PAPER_NSAMPLES = 15, 128


def build_layer(shape: str, smoke: bool, device: str):
    """(decoder layer in float16 on `device` (float32 on the CPU), its config, the family)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    family, sizes = SHAPES[shape]
    sizes = dict(sizes)
    if smoke:
        sizes.update({k: v for k, v in SMOKE.items() if k in sizes or k == "head_dim"})
        sizes.update(num_experts_per_tok=2, **({"num_local_experts": 4} if family == "mixtral" else {"num_experts": 8}))
    if family == "mixtral":
        sizes.pop("head_dim", None)
        config, cls = MixtralConfig(**sizes), MixtralDecoderLayer
    else:
        config, cls = Qwen3MoeConfig(**sizes), Qwen3MoeDecoderLayer
    config._attn_implementation = ATTN_IMPL
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        layer = cls(config, layer_idx=0).to(dtype)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.02)
                elif "norm" in name:
                    p.fill_(1.0)
    return layer, config, FAMILIES[family]


def run_shape(shape: str, args, device: str) -> dict:
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    layer, config, family = build_layer(shape, args.smoke, device)
    rotary = MixtralRotaryEmbedding if family.name == "mixtral" else Qwen3MoeRotaryEmbedding
    cfg = replace(calib_preset("paper"), nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs,
                  cuda_graph=False, batch_size=min(calib_preset("paper").batch_size, args.nsamples))
    store_dtype = torch.float16 if device == "cuda" else torch.float32
    inps = torch.randn(args.nsamples, args.seqlen, config.hidden_size, device=device, dtype=store_dtype)
    rope = rotary(config).to(device)
    pos = torch.arange(args.seqlen, device=device)[None]
    kwargs = {"position_embeddings": rope(inps[:1].float(), pos), "attention_mask": None, "use_cache": False}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    layer = layer.float()
    targets, stats = layer_input_absmax(layer, family, inps, kwargs, cfg.batch_size, out=torch.empty_like(inps))
    sites = family.layer_sites(layer)
    transforms = layer_transforms(config, cfg, torch.Generator().manual_seed(0), site_scales(layer, family, stats),
                                  layer=layer, routed=set(stats))
    quantize_layer(layer, family, QuantConfig(4, 4, 4), transforms, learnable_clip=True)
    layer.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    setup_s = time.time() - t0
    phases: dict = {}
    t1 = time.time()
    amp = device == "cuda" and cfg.recipe == "svd-amp"
    before, after, finite = train_layer(layer, inps, targets, kwargs, cfg, amp, torch.Generator().manual_seed(0),
                                        timings=phases, log=lambda m: None)
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t1
    per_epoch = statistics.median(phases["epoch"][1:] or phases["epoch"])  # the first epoch warms up
    per_epoch_paper = per_epoch * PAPER_NSAMPLES / args.nsamples  # steps scale with the samples
    fixed = setup_s + phases["loss_before"] + phases["setup"] + phases["loss_after"]
    layer_full = fixed * PAPER_NSAMPLES / args.nsamples + PAPER_EPOCHS * per_epoch_paper
    steps_per_epoch = -(-args.nsamples // cfg.batch_size)
    n_experts = len(family.mlp_module(layer).experts)
    return {
        **provenance(device), "kind": "calib_cost",
        "shape": f"{shape} MoE decoder layer (random weights){' [smoke sizes]' if args.smoke else ''}",
        "family": family.name, "experts": n_experts, "experts_per_token": config.num_experts_per_tok,
        "recipe": cfg.recipe, "cuda_graph": False, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "batch_size": cfg.batch_size, "epochs_run": args.epochs,
        "setup_seconds": round(setup_s, 2), "train_seconds": round(train_s, 2),
        "phase_seconds": {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
                          for k, v in phases.items()},
        "seconds_per_epoch": round(per_epoch, 3), "epoch_timing": "median of the epochs after the first", "ms_per_step": round(1000 * per_epoch / steps_per_epoch, 2),
        "extrapolation": f"{PAPER_EPOCHS} epochs of {PAPER_NSAMPLES} samples x {args.seqlen} tokens: fixed costs "
                         f"and epoch time scaled by {PAPER_NSAMPLES}/{args.nsamples} samples",
        "layer_seconds_paper_recipe": round(layer_full, 1), "layers": config.num_hidden_layers,
        "model_hours_extrapolated": round(config.num_hidden_layers * layer_full / 3600, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "unrouted_experts": len(unrouted_sites(sites, stats)),
        "loss_before": before, "loss_after": after, "finite": finite,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="all", choices=["all", *SHAPES])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2, help="epochs actually run (the rest is extrapolated)")
    ap.add_argument("--out-dir", default="results", help="writes calib_cost_<shape>-moe-layer.json there")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seqlen 16, 4 samples)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.nsamples, args.seqlen, args.epochs = min(args.nsamples, 4), min(args.seqlen, 16), min(args.epochs, 2)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_moe_layer: needs a CUDA GPU (use --smoke for a CPU run)", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    register_attention()
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        record = run_shape(shape, args, device)
        out = Path(args.out_dir) / f"calib_cost_{shape}-moe-layer.json"
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
