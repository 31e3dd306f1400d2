"""Calibration cost of one Llama-3-8B-shaped decoder layer (random weights), extrapolated to the model.

Builds one LlamaDecoderLayer with Llama-3-8B sizes (hidden 4096, MLP 14336, 32 heads, 8 KV heads) in
float16 on the GPU, random calibration inputs (nsamples x seqlen tokens), and runs FlatQuant's per-layer
calibration for --epochs epochs. Time per epoch is measured (CUDA-synchronised wall clock around whole
epochs: the work is many kernels per step), then extrapolated to the full recipe (15 epochs) and to all
32 layers. Peak GPU memory is torch.cuda.max_memory_allocated over the run.
Writes one JSON record (kind "calib_cost") to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatquant.calibrate import _init_scales, _input_absmax, layer_transforms, train_layer  # noqa: E402
from flatquant.config import QuantConfig, calib_preset  # noqa: E402
from flatquant.families import FAMILIES  # noqa: E402
from flatquant.modules import ATTN_IMPL, quantize_layer, register_attention  # noqa: E402
from flatquant.results import atomic_write_text, provenance  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=32, rope_theta=500000.0, max_position_embeddings=8192, vocab_size=128256)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2, help="epochs actually run (the rest is extrapolated)")
    ap.add_argument("--recipe", default="svd-amp", choices=["svd-amp", "direct-fp32"])
    ap.add_argument("--out", default="results/calib_cost_llama3-8b-layer.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    sizes = dict(LLAMA3_8B)
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
                  epochs=args.epochs)
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
    targets, stats = _input_absmax(layer, family, inps, kwargs, cfg.batch_size)
    transforms = layer_transforms(config, cfg, torch.Generator().manual_seed(0), _init_scales(layer, family, stats))
    quantize_layer(layer, family, QuantConfig(4, 4, 4), transforms, learnable_clip=True)
    layer.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    setup_s = time.time() - t0
    t1 = time.time()
    before, after, finite = train_layer(layer, inps, targets, kwargs, cfg, cfg.recipe == "svd-amp" and device == "cuda",
                                        torch.Generator().manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t1
    per_epoch = train_s / args.epochs  # includes the two loss evaluations, a slight overestimate
    layer_full = setup_s + 15 * per_epoch
    record = {
        **provenance(device), "kind": "calib_cost", "shape": "Llama-3-8B decoder layer (random weights)",
        "recipe": args.recipe, "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs_run": args.epochs,
        "setup_seconds": round(setup_s, 2), "train_seconds": round(train_s, 2),
        "seconds_per_epoch": round(per_epoch, 2), "layer_seconds_15_epochs": round(layer_full, 1),
        "model_minutes_32_layers_extrapolated": round(32 * layer_full / 60, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "loss_before": before, "loss_after": after, "finite": finite,
        "paper_reference": "LLaMA-3-8B, one GPU: 0.9 h and about 26 GB (paper Sec. 4.1, Table 5)",
    }
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
