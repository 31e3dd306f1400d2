"""Command line: a thin layer over the Python API.

    flatquant quantize --model smollm2-135m --preset cpu-quick --output out/smollm2-w4a4kv4
    flatquant eval --model smollm2-135m --method quarot --w-bits 4 --a-bits 4 --kv-bits 4 --dataset wikitext2
    flatquant report
User errors (bad model, bits, data, checkpoint, path) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import METHODS, PRESETS, ConfigError, QuantConfig, calib_preset
from .errors import FlatQuantError

PRESET_EVAL_WINDOWS = {"cpu-quick": 8, "tiny": 2}  # quick presets also cap the perplexity windows


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name, model directory, .gguf file or hub id")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--w-clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight clip-ratio search (default: on for quarot/smoothquant)")
    p.add_argument("--dataset", default="wikitext2", help="comma-separated: wikitext2, c4, or text file paths")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (lm-eval), e.g. arc_easy,piqa")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: at most this many examples per task")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="perplexity: at most this many windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="data folder (default: $FLATQUANT_DATA_DIR or ../shared/data)")
    p.add_argument("--results-dir", default="results", help="where JSON records go ('' = none)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="calibration recipe preset")
    p.add_argument("--calib-samples", type=int, default=None)
    p.add_argument("--calib-seqlen", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--recipe", default=None, choices=["svd-amp", "direct-fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatquant", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate FlatQuant, save its parameters, compare with baselines")
    _add_common(q)
    q.add_argument("--output", required=True, help="folder for the learned parameters (safetensors + JSON)")
    q.add_argument("--no-resume", action="store_true", help="recalibrate even if --output holds saved layers")
    q.add_argument("--compare", default="fp16,rtn,quarot", help="baselines evaluated next to flatquant ('' = none)")
    e = sub.add_parser("eval", help="quantize with one method and evaluate perplexity / zero-shot")
    _add_common(e)
    e.add_argument("--method", default="fp16", choices=METHODS)
    e.add_argument("--params", default=None, help="flatquant: folder saved by `flatquant quantize`")
    r = sub.add_parser("report", help="render results/*.json into docs/RESULTS.md and plots")
    r.add_argument("--results-dir", default="results")
    r.add_argument("--out", default="docs/RESULTS.md")
    r.add_argument("--plots-dir", default="docs/plots")
    return parser


def _check_writable(path: str | Path) -> None:
    p = Path(path)
    probe = p if p.exists() else next((a for a in p.parents if a.exists()), Path("."))
    if (p.exists() and not p.is_dir()) or not os.access(probe, os.W_OK):
        raise FlatQuantError(f"cannot write to {path}")


def _setup(args):
    import torch

    from .models import load_model

    qcfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits)
    if args.results_dir:
        _check_writable(args.results_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    preset = args.preset or ("paper" if device.startswith("cuda") else "cpu-quick")
    overrides = {k: v for k, v in {"nsamples": args.calib_samples, "seqlen": args.calib_seqlen,
                                   "epochs": args.epochs, "recipe": args.recipe}.items() if v is not None}
    ccfg = calib_preset(preset, seed=args.seed, **overrides)
    from .runner import EvalSpec

    max_windows = args.max_windows if args.max_windows is not None else PRESET_EVAL_WINDOWS.get(preset)
    spec = EvalSpec(datasets=[d for d in args.dataset.split(",") if d], seqlen=args.seqlen, max_windows=max_windows,
                    batch_size=args.batch_size, tasks=[t for t in args.tasks.split(",") if t], limit=args.limit,
                    data_dir=args.data_dir)
    from . import data

    data.resolve_data_dir(args.data_dir)  # fail early, before loading the model
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    return qcfg, ccfg, spec, model, tokenizer


def _clip_search(args, method: str) -> bool:
    return args.w_clip_search if args.w_clip_search is not None else method in ("quarot", "smoothquant")


def _print_table(records: list[dict]) -> None:
    rows = [r for r in records if r.get("kind") == "ppl"]
    if rows:
        print(f"\n{'method':<12} {'bits':<12} {'dataset':<10} {'windows':>7} {'ppl':>10}")
        for r in rows:
            print(f"{r['method']:<12} W{r['w_bits']}A{r['a_bits']}KV{r['kv_bits']:<5} {r['dataset']:<10} "
                  f"{r['windows']:>7} {r['ppl']:>10.3f}")
    for r in records:
        if r.get("kind") == "zeroshot":
            tasks = ", ".join(f"{k}={v['value']:.1f}" for k, v in r["tasks"].items())
            print(f"{r['method']:<12} zero-shot avg={r['average']:.2f} ({tasks})")


def cmd_eval(args) -> int:
    from dataclasses import replace

    from .runner import calibration_data, run_config

    qcfg, ccfg, spec, model, tok = _setup(args)
    if args.method == "fp16":
        qcfg = QuantConfig(16, 16, 16)
    qcfg = replace(qcfg, w_clip_search=_clip_search(args, args.method))
    needs_calib = args.method == "smoothquant" or (args.method == "flatquant" and not args.params)
    calib = calibration_data(tok, ccfg, args.data_dir) if needs_calib else None
    records = run_config(model, tok, args.model, args.method, qcfg, spec, ccfg=ccfg, calib=calib,
                         params_dir=args.params, results_dir=args.results_dir or None, seed=args.seed,
                         progress=not args.no_progress)
    _print_table(records)
    return 0


def cmd_quantize(args) -> int:
    from dataclasses import replace

    from .runner import calibration_data, run_config

    _check_writable(args.output)
    if args.no_resume is False and Path(args.output).is_dir() and any(Path(args.output).iterdir()) \
            and not (Path(args.output) / "flatquant.json").is_file():
        raise FlatQuantError(f"{args.output} exists and is not a flatquant parameter folder")
    qcfg, ccfg, spec, model, tok = _setup(args)
    calib = calibration_data(tok, ccfg, args.data_dir)
    out = Path(args.output)
    # Calibrate into a temporary sibling folder (per-layer checkpoints live there until done),
    # then rename: the output folder only ever holds a complete calibration.
    work = out.with_name(out.name + ".partial")
    if args.no_resume and work.exists():
        import shutil

        shutil.rmtree(work)
    records = []
    for method in [m for m in args.compare.split(",") if m]:
        if method not in METHODS or method == "flatquant":
            raise ConfigError(f"--compare takes baselines from {', '.join(m for m in METHODS if m != 'flatquant')}")
        q = QuantConfig(16, 16, 16) if method == "fp16" else replace(qcfg, w_clip_search=_clip_search(args, method))
        records += run_config(model, tok, args.model, method, q, spec, ccfg=ccfg, calib=calib,
                              results_dir=args.results_dir or None, seed=args.seed, progress=not args.no_progress)
    if (out / "flatquant.json").is_file():
        params = out
    else:
        params = work
    records += run_config(model, tok, args.model, "flatquant", replace(qcfg, w_clip_search=False), spec, ccfg=ccfg,
                          calib=calib, params_dir=str(params), results_dir=args.results_dir or None, seed=args.seed,
                          progress=not args.no_progress)
    if params == work:
        if out.exists():
            out.rmdir()  # empty folder left by the user
        work.rename(out)
    _print_table(records)
    print(f"\nFlatQuant parameters saved to {out}/")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    paths = write_report(args.results_dir, args.out, args.plots_dir)
    print(f"wrote {args.out}" + (f" and {len(paths)} plot(s)" if paths else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "report": cmd_report}[args.command](args)
    except FlatQuantError as e:
        print(f"flatquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flatquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
