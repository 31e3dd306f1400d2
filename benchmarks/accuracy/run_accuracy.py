"""Accuracy runs behind the results tables (meant for the GPU; --quick makes a CPU smoke run).

Parts (run in this order, each writes JSON records to --results-dir):
  baselines  fp16, rtn, smoothquant, quarot at W4A16, W16A4, KV4, W4A4KV4, W8A8KV8 on WikiText-2 and C4
  flatquant  FlatQuant W4A4KV4 with the full paper recipe (parameters saved in --work-dir)
  zeroshot   six lm-eval tasks at W4A4KV4 for fp16, rtn, smoothquant, quarot and the saved flatquant
  ablation   Table 3 rows (+LT, +LT+PS, +LT+LCT, all) with a reduced recipe
  recipes    Table 4: SVD + mixed precision vs direct inverse + float32 (reduced recipe): ppl, time, memory
  gptq       GPTQ weights at W4A4KV4: FlatQuant with the full recipe (trained with RTN weights, then GPTQ on the
             same windows; parameters in --work-dir/flatquant_w4a4kv4_gptq) and QuaRot (with the clip search):
             WikiText-2 and C4 perplexity and the six zero-shot tasks
  longcalib  FlatQuant + GPTQ at W4A4KV4 with a larger calibration budget (--long-nsamples windows,
             --long-epochs epochs; variant "calib-<n>x<seqlen>-e<epochs>"): perplexity and zero-shot
Example:
  python benchmarks/accuracy/run_accuracy.py --model /root/stage/model.gguf --data-dir .data --parts baselines,flatquant
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flatquant.config import CalibConfig, calib_preset, method_config
from flatquant.models.loading import load_model
from flatquant.results import write_record
from flatquant.runner import EvalSpec, calibration_data, run_config

SETTINGS = {"W4A16KV16": (4, 16, 16), "W16A4KV16": (16, 4, 16), "W16A16KV4": (16, 16, 4),
            "W4A4KV4": (4, 4, 4), "W8A8KV8": (8, 8, 8)}
BASELINES = ("rtn", "smoothquant", "quarot")
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande"]
QUICK = dict(nsamples=4, seqlen=64, epochs=2, batch_size=2)  # --quick: a CPU smoke run's recipe
# Reduced recipe for the ablation and recipe tables (the full recipe is the `flatquant` part).
REDUCED = dict(nsamples=32, epochs=5)
ABLATIONS = {"+LT": dict(learn_transform=True, learn_scale=False, learn_clip=False),
             "+LT+PS": dict(learn_transform=True, learn_scale=True, learn_clip=False),
             "+LT+LCT": dict(learn_transform=True, learn_scale=False, learn_clip=True),
             "+LT+PS+LCT": dict(learn_transform=True, learn_scale=True, learn_clip=True)}


def qconfig(method: str, bits=(4, 4, 4), **settings):
    """The method's config (its own defaults, e.g. weight clip search for quarot/smoothquant) at `bits`."""
    return method_config(method, **dict(zip(("w_bits", "a_bits", "kv_bits"), bits)), **settings)


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--work-dir", default="out/accuracy")
    ap.add_argument("--parts", default="baselines,flatquant,zeroshot,ablation,recipes")
    ap.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default: all)")
    ap.add_argument("--zeroshot-batch-size", type=int, default=32, help="lm-eval batch size")
    ap.add_argument("--long-nsamples", type=int, default=256, help="longcalib: calibration windows")
    ap.add_argument("--long-epochs", type=int, default=30, help="longcalib: epochs")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run: few windows, tiny recipe")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, device=device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    if args.quick:
        spec = EvalSpec(datasets=["wikitext2", "c4"], seqlen=128, max_windows=2, batch_size=2, data_dir=args.data_dir)
        full = CalibConfig(**QUICK)
        reduced = CalibConfig(**{**QUICK, "epochs": 1})
        limit = args.limit or 2
    else:
        spec = EvalSpec(datasets=["wikitext2", "c4"], seqlen=2048, batch_size=8, data_dir=args.data_dir)
        full = calib_preset("paper")
        reduced = calib_preset("paper", **REDUCED)
        limit = args.limit
    calib = calibration_data(tok, full, args.data_dir)
    calib_reduced = calib[: reduced.nsamples, : reduced.seqlen]
    common = dict(results_dir=args.results_dir, progress=False)
    fq_params = work / "flatquant_w4a4kv4"
    w4a4 = qconfig("flatquant")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def ppl_txt(recs):
        return [round(r["ppl"], 3) for r in recs if r.get("kind") == "ppl"]

    if "baselines" in parts:
        recs = run_config(model, tok, args.model_name, "fp16", qconfig("fp16"), spec, **common)
        log(f"fp16: {[round(r['ppl'], 3) for r in recs]}")
        for tag, bits in SETTINGS.items():
            for method in BASELINES:
                q = qconfig(method, bits)
                recs = run_config(model, tok, args.model_name, method, q, spec, ccfg=full, calib=calib, **common)
                log(f"{method} {tag}: {[round(r['ppl'], 3) for r in recs]}")

    if "flatquant" in parts:
        _peak_reset()
        recs = run_config(model, tok, args.model_name, "flatquant", w4a4, spec, ccfg=full, calib=calib,
                          params_dir=str(fq_params), variant="paper-recipe", results_dir=None, progress=True)
        for r in recs:
            write_record({**r, "peak_gpu_mib": _peak_mib()}, args.results_dir)
        log(f"flatquant W4A4KV4 (paper recipe, {recs[0]['quantize_seconds']:.0f}s calib): "
            f"{[round(r['ppl'], 3) for r in recs]}")

    if "zeroshot" in parts:
        zs = EvalSpec(datasets=[], tasks=TASKS, limit=limit, data_dir=args.data_dir,
                      zeroshot_batch_size=args.zeroshot_batch_size)
        runs = [(m, qconfig(m)) for m in ("fp16", *BASELINES)]
        if (fq_params / "flatquant.json").is_file():
            runs.append(("flatquant", w4a4))
        for method, q in runs:
            recs = run_config(model, tok, args.model_name, method, q, zs, ccfg=full, calib=calib,
                              params_dir=str(fq_params) if method == "flatquant" else None,
                              variant="paper-recipe" if method == "flatquant" else None, **common)
            log(f"zero-shot {method}: avg {recs[-1]['average']:.2f}")

    if "ablation" in parts:
        recs = run_config(model, tok, args.model_name, "rtn", qconfig("rtn"), spec, variant="ablation:RTN", **common)
        log(f"ablation RTN: {[round(r['ppl'], 3) for r in recs]}")
        for name, flags in ABLATIONS.items():
            cfg = replace(reduced, **flags)
            recs = run_config(model, tok, args.model_name, "flatquant", w4a4, spec, ccfg=cfg, calib=calib_reduced,
                              variant=f"ablation:{name}", **common)
            log(f"ablation {name}: {[round(r['ppl'], 3) for r in recs]}")

    if "recipes" in parts:
        for recipe in ("svd-amp", "direct-fp32"):
            cfg = replace(reduced, recipe=recipe)
            _peak_reset()
            t = time.time()
            recs = run_config(model, tok, args.model_name, "flatquant", w4a4, spec, ccfg=cfg, calib=calib_reduced,
                              variant=f"recipe:{recipe}", results_dir=None, progress=False)
            for r in recs:
                write_record({**r, "calib_seconds": recs[0]["quantize_seconds"], "peak_gpu_mib": _peak_mib(),
                              "wall_seconds": round(time.time() - t, 1)}, args.results_dir)
            log(f"recipe {recipe}: {[round(r['ppl'], 3) for r in recs]} calib {recs[0]['quantize_seconds']:.0f}s "
                f"peak {_peak_mib()} MiB")

    gq = replace(w4a4, weight_quantizer="gptq")
    zs_gptq = EvalSpec(datasets=[], tasks=TASKS, limit=limit, data_dir=args.data_dir,
                       zeroshot_batch_size=args.zeroshot_batch_size)

    def flatquant_gptq(ccfg, windows, params, variant, what):
        """Calibrate FlatQuant (RTN in training, then GPTQ) into `params`; perplexity, then zero-shot on the
        saved parameters (their GPTQ weights are loaded, not recomputed)."""
        _peak_reset()
        t = time.time()
        recs = run_config(model, tok, args.model_name, "flatquant", gq, spec, ccfg=ccfg, calib=windows,
                          params_dir=params, variant=variant, results_dir=None, progress=True)
        for r in recs:
            write_record({**r, "peak_gpu_mib": _peak_mib()}, args.results_dir)
        log(f"{what}: flatquant W4A4KV4 ({ccfg.nsamples} x {ccfg.seqlen}, {ccfg.epochs} epochs + GPTQ, "
            f"{recs[0]['quantize_seconds']:.0f}s calib): {ppl_txt(recs)} (wall {time.time() - t:.0f}s)")
        t = time.time()
        recs = run_config(model, tok, args.model_name, "flatquant", gq, zs_gptq, ccfg=ccfg, calib=windows,
                          params_dir=params, variant=variant, **common)
        log(f"{what}: zero-shot flatquant: avg {recs[-1]['average']:.2f} (wall {time.time() - t:.0f}s)")

    if "gptq" in parts:
        flatquant_gptq(full, calib, str(work / "flatquant_w4a4kv4_gptq"), "paper-recipe", "gptq")
        t = time.time()  # one GPTQ pass for both: perplexity and zero-shot records of the same quantized model
        both = replace(spec, tasks=TASKS, limit=limit, zeroshot_batch_size=args.zeroshot_batch_size)
        recs = run_config(model, tok, args.model_name, "quarot", qconfig("quarot", weight_quantizer="gptq"), both, ccfg=full,
                          calib=calib, **common)
        log(f"gptq: quarot W4A4KV4 (GPTQ): {ppl_txt(recs)}, zero-shot avg {recs[-1]['average']:.2f} "
            f"(GPTQ {recs[0]['quantize_seconds']:.0f}s, wall {time.time() - t:.0f}s)")

    if "longcalib" in parts:
        long = replace(full, nsamples=args.long_nsamples, epochs=args.long_epochs)
        windows = calibration_data(tok, long, args.data_dir)
        name = f"calib-{long.nsamples}x{long.seqlen}-e{long.epochs}"
        flatquant_gptq(long, windows, str(work / f"flatquant_w4a4kv4_gptq_{name}"), name, "longcalib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
