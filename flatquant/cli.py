"""Command line: a thin layer over the Python API.

    flatquant quantize --model smollm2-135m --preset cpu-quick --output out/smollm2-w4a4kv4
    flatquant eval --model smollm2-135m --method quarot --w-bits 4 --a-bits 4 --kv-bits 4 --dataset wikitext2
    flatquant report
Records go to flatquant-results/ unless --results-dir says otherwise (results/ holds the published ones).
User errors (bad model, bits, data, checkpoint, path) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from flatquant.cli_help import EXAMPLES, USER_RESULTS, _Help
from flatquant.cli_settings import add_settings_options, calib_overrides, quant_settings
from flatquant.config import (
    METHODS,
    PRESET_EVAL_WINDOWS,
    PRESETS,
    WEIGHT_QUANTIZERS,
    CalibConfig,
    ConfigError,
    QuantConfig,
    calib_preset,
    method_config,
)
from flatquant.errors import DataError, FlatQuantError

BUILTIN_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct"}  # name recorded in results for built-in models
_GGUF_QUANT_TAG = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit status 2), not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_model_name(model: str) -> str:
    """The model name recorded in results when --model-name is not given: the built-in model's name,
    a model folder's name, a GGUF file's name without extension and quantization tag, or a hub id's name."""
    if model in BUILTIN_NAMES:
        return BUILTIN_NAMES[model]
    p = Path(model).expanduser()
    name = (p.resolve().name if p.exists() else p.name) or str(model)
    if name.lower().endswith(".gguf"):
        name = _GGUF_QUANT_TAG.sub("", name[: -len(".gguf")])
    return name


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name, model directory, .gguf file or hub id")
    p.add_argument("--model-name", default=None,
                   help="model name recorded in results (default: derived from --model, e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits, 2-16 (16 = not quantized)")
    p.add_argument("--a-bits", type=int, default=4, help="activation bits, 2-16 (16 = not quantized)")
    p.add_argument("--kv-bits", type=int, default=4, help="KV-cache bits, 2-16 (16 = not quantized)")
    p.add_argument("--w-clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight clip-ratio search (default: on for quarot/smoothquant)")
    p.add_argument("--weight-quantizer", default=None, choices=WEIGHT_QUANTIZERS,
                   help="rtn (default) or gptq (closed-form updates on the calibration windows; with --params: "
                        "the saved weights' quantizer)")
    add_settings_options(p)
    p.add_argument("--dataset", default="wikitext2", help="comma-separated: wikitext2, c4, or text file paths")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (lm-eval), e.g. arc_easy,piqa")
    p.add_argument("--limit", type=int, default=None,
                   help="zero-shot: at most this many examples per task (default: all)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--max-windows", type=int, default=None,
                   help="perplexity: at most this many windows (default: all; 8 with --preset cpu-quick, 2 with tiny)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="perplexity windows per forward pass (default: 8 on a GPU, 1 on a CPU to save memory)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $FLATQUANT_DATA_DIR or ../shared/data)")
    p.add_argument("--results-dir", default=USER_RESULTS,
                   help="where JSON records go ('' = none; the project's published records live in results/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="model precision (default: float16 on a GPU, float32 on a CPU)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="calibration recipe preset (default: paper on a GPU, cpu-quick on a CPU)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the preset's)")
    p.add_argument("--calib-seqlen", type=int, default=None,
                   help="tokens per calibration window (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="calibration epochs per layer (default: the preset's)")
    p.add_argument("--recipe", default=None, choices=["svd-amp", "direct-fp32"],
                   help="training recipe (default: the preset's, svd-amp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and transforms")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flatquant", description=__doc__.split("\n")[0], epilog=EXAMPLES, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate FlatQuant, save its parameters, compare with baselines",
                       formatter_class=_Help)
    _add_common(q)
    q.add_argument("--output", required=True, help="folder for the learned parameters (safetensors + JSON); required")
    q.add_argument("--no-resume", action="store_true", help="recalibrate even if --output holds saved layers")
    q.add_argument("--compare", default="fp16,rtn,quarot", help="baselines evaluated next to flatquant ('' = none)")
    q.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="models larger than the GPU: stream decoder layers one at a time from the safetensors "
                        "shards, calibration activations in CPU memory (cpu) or a disk memmap (disk); "
                        "calibration only (evaluate with `eval --params`). Under torchrun, layers are "
                        "trained in parallel over the processes")
    e = sub.add_parser("eval", help="quantize with one method and evaluate perplexity / zero-shot",
                       formatter_class=_Help)
    _add_common(e)
    e.add_argument("--method", default="fp16", choices=METHODS, help="quantization method")
    e.add_argument("--params", default=None, help="flatquant: folder saved by `flatquant quantize`")
    r = sub.add_parser("report", help="render results/*.json into docs/RESULTS.md and plots", formatter_class=_Help)
    r.add_argument("--results-dir", default="results", help="folder of JSON records to render (read recursively)")
    r.add_argument("--out", default="docs/RESULTS.md", help="markdown file to write")
    r.add_argument("--plots-dir", default="docs/plots", help="folder for the PNG plots")
    r.add_argument("--figures-dir", default="docs/figures", help="folder of the flatness figures (embedded if present)")
    from flatquant.report.plot_cli import add_figure_args
    from flatquant.report.plot_cli import add_parsers as add_plot_parser
    from flatquant.runtime.cli_commands import add_parsers

    add_figure_args(r, required=False, default_name=default_model_name)  # --params: `plot`'s figures first
    parser.runtime_commands = {**add_parsers(sub), **add_plot_parser(sub, _check_writable, default_model_name)}
    return parser


def _check_writable(path: str | Path, what: str = "folder") -> None:
    """FlatQuantError unless `path` is (or can be created as) a writable folder (what="folder"), or a
    file that can be written (what="file"). Checked before any work, so nothing is left half-written."""
    p = Path(path).expanduser()
    if p.exists() and (p.is_dir() if what == "file" else not p.is_dir()):
        raise FlatQuantError(f"cannot write to {path}: it exists and is not a {what}")
    if p.exists():  # an existing file is overwritten in its folder; an existing folder is written into
        probe = p.parent if what == "file" else p
    else:
        probe = next((a for a in p.parents if a.exists()), Path("."))
    if not probe.is_dir():
        raise FlatQuantError(f"cannot write to {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlatQuantError(f"cannot write to {path}: {probe} is not writable")


def _setup(args, precheck: tuple = ()):
    import torch

    from flatquant import guards
    from flatquant.calib.integrity import check_finite_weights
    from flatquant.models.loading import load_model

    # None = the method's default (method_config), so the CLI and `XConfig()` in Python agree
    settings = dict(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                    weight_quantizer=args.weight_quantizer, w_clip_search=args.w_clip_search, **quant_settings(args))
    QuantConfig(**{k: v for k, v in settings.items() if v is not None})  # bad bits: fail before any work
    for name in ("seqlen", "max_windows", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seqlen" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {2 if name == 'seqlen' else 1}, "
                              f"got {value}")
    if args.results_dir:
        _check_writable(args.results_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    preset = args.preset or ("paper" if device.startswith("cuda") else "cpu-quick")
    overrides = {k: v for k, v in {"nsamples": args.calib_samples, "seqlen": args.calib_seqlen,
                                   "epochs": args.epochs, "recipe": args.recipe}.items() if v is not None}
    overrides.update(calib_overrides(args))
    ccfg = calib_preset(preset, seed=args.seed, **overrides)
    from flatquant.runner import EvalSpec

    max_windows = args.max_windows if args.max_windows is not None else PRESET_EVAL_WINDOWS.get(preset)
    spec = EvalSpec(datasets=[d for d in args.dataset.split(",") if d], seqlen=args.seqlen, max_windows=max_windows,
                    batch_size=args.batch_size or (8 if dev.type == "cuda" else 1),
                    tasks=[t for t in args.tasks.split(",") if t], limit=args.limit,
                    data_dir=args.data_dir)
    from flatquant import data

    data.resolve_data_dir(args.data_dir)  # fail early, before loading the model
    for ds in spec.datasets:  # missing file or unknown name: fail before loading the model
        data.load_text(ds, args.data_dir)
    if spec.tasks:
        from flatquant.eval import zeroshot

        spec.tasks = zeroshot.normalize_tasks(spec.tasks)
        zeroshot.stock_tasks_dir()  # lm-eval installed?
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    guards.precheck_params(list(precheck), args.model)  # saved parameters vs config.json, before the weights
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    check_finite_weights(model, args.model)
    from flatquant import mixed
    from flatquant.models.families import family_for

    family = family_for(model)  # mixed precision it cannot honour: fail before any work
    mixed.check(QuantConfig(**{k: v for k, v in settings.items() if v is not None}), family,
                len(family.decoder_layers(model)))
    for ds in spec.datasets:  # tokenized once, here: a text shorter than one window fails before any work
        ids = data.eval_tokens(tokenizer, ds, data_dir=args.data_dir, seqlen=args.seqlen)
        if ids.shape[1] < args.seqlen:
            raise DataError(f"{ds} has {ids.shape[1]} tokens, fewer than one window of --seqlen {args.seqlen}")
        spec.tokens[ds] = ids
    return settings, ccfg, spec, model, tokenizer


def _print_table(records: list[dict], results_dir: str | None = None) -> None:
    from flatquant.guards import summary_lines
    from flatquant.results import bits_tag

    rows = [r for r in records if r.get("kind") == "ppl"]
    if rows:
        print(f"\n{'method':<12} {'bits':<12} {'dataset':<10} {'windows':>7} {'ppl':>10}  weights")
        for r in rows:
            bits = bits_tag(r)
            print(f"{r['method']:<12} {bits:<12} {r['dataset']:<10} {r['windows']:>7} {r['ppl']:>10.3f}  "
                  f"{r.get('weight_quantizer', '-')}")
    for r in records:
        if r.get("kind") == "zeroshot":
            tasks = ", ".join(f"{k}={v['value']:.1f}" for k, v in r["tasks"].items())
            print(f"{r['method']:<12} zero-shot avg={r['average']:.2f} ({tasks}) weights "
                  f"{r.get('weight_quantizer', '-')}")
    print("\n" + "\n".join(summary_lines(records, results_dir)))


def _model_name(args) -> str:
    return args.model_name or default_model_name(args.model)


def cmd_eval(args) -> int:
    from flatquant.calib import artifacts
    from flatquant.runner import calibration_data, run_config

    if args.params is not None:
        if args.method != "flatquant":
            raise ConfigError("--params only applies to --method flatquant")
        artifacts.check_finished(args.params)
    settings, ccfg, spec, model, tok = _setup(args, precheck=(Path(args.params),) if args.params else ())
    qcfg = method_config(args.method, **settings, **({"calib": ccfg} if args.method == "flatquant" else {}))
    calib_cfg = ccfg  # the preset's windows: what GPTQ and smoothquant calibrate on
    gptq = "run" if qcfg.weight_quantizer == "gptq" else None
    extra = None
    if args.params is not None:
        meta = artifacts.check_saved_calibration(Path(args.params), model.config, qcfg, None)
        from flatquant.guards import params_note

        extra, note = params_note(args.params, qcfg, model)  # trained bits and model fingerprint, recorded
        if note:
            print(f"flatquant: {note}", file=sys.stderr)
        ccfg = CalibConfig.from_dict(meta["calib"])  # the record names the recipe the parameters came from
        qcfg = artifacts.eval_weight_settings(qcfg, meta, args.weight_quantizer)
        gptq = artifacts.gptq_plan(meta, qcfg)
    needs_calib = args.method == "smoothquant" or (args.method == "flatquant" and not args.params) or gptq == "run"
    calib = calibration_data(tok, calib_cfg, args.data_dir) if needs_calib else None
    records = run_config(model, tok, _model_name(args), args.method, qcfg, spec, ccfg=ccfg, calib=calib,
                         params_dir=args.params, results_dir=args.results_dir or None, seed=args.seed,
                         progress=not args.no_progress, extra=extra)
    _print_table(records, args.results_dir)
    return 0


def cmd_quantize(args) -> int:
    from flatquant import guards, io
    from flatquant.calib import artifacts
    from flatquant.runner import calibration_data, run_config

    out = Path(args.output)
    _check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not (out / artifacts.META).is_file():
        raise FlatQuantError(f"{out} exists and is not a flatquant parameter folder; choose another --output")
    from flatquant.calib.distributed import world_from_env

    if args.offload != "none" or world_from_env() > 1:  # streamed layers and/or several processes
        from flatquant.calib.stream_job import quantize_streaming

        return quantize_streaming(args)
    baselines = [m for m in args.compare.split(",") if m]
    for method in baselines:
        if method not in METHODS or method == "flatquant":
            raise ConfigError(f"--compare: unknown baseline {method!r}; choose from "
                              f"{', '.join(m for m in METHODS if m != 'flatquant')}")
    work = io.partial_folder(out)
    settings, ccfg, spec, model, tok = _setup(args, precheck=() if args.no_resume else (out, work))
    fq_cfg = method_config("flatquant", **{**settings, "w_clip_search": False}, calib=ccfg)
    # Calibrate into the work folder <output>.partial (per-layer checkpoints live there until done), then
    # rename: the output folder only ever holds a complete calibration.
    reuse = not args.no_resume and (out / artifacts.META).is_file()
    for folder in ([] if args.no_resume else [out, work]):
        if (folder / artifacts.META).is_file():  # saved parameters must fit, before any work is done
            artifacts.check_saved_calibration(folder, model.config, fq_cfg, ccfg)
            guards.check_fingerprint(folder, model)
    if reuse:
        print(f"flatquant: reusing the finished calibration in {out} (--no-resume recalibrates)", file=sys.stderr)
    calib = calibration_data(tok, ccfg, args.data_dir)
    if args.no_resume:
        io.discard_partial(out)
    name = _model_name(args)
    records = []
    for method in baselines:
        records += run_config(model, tok, name, method, method_config(method, **settings), spec, ccfg=ccfg,
                              calib=calib, results_dir=args.results_dir or None, seed=args.seed,
                              progress=not args.no_progress)
    params = out if reuse else work
    if params == work and not (work / artifacts.META).is_file():
        guards.stamp_fingerprint(work, model, fq_cfg, ccfg)  # resuming checks it
    records += run_config(model, tok, name, "flatquant", fq_cfg, spec, ccfg=ccfg,
                          calib=calib, params_dir=str(params), results_dir=args.results_dir or None, seed=args.seed,
                          progress=not args.no_progress)
    if params == work:
        io.commit_folder(out)  # --no-resume: the new calibration replaces the old one
    _print_table(records, args.results_dir)
    print(f"FlatQuant parameters saved to {out}/")
    return 0


def cmd_report(args) -> int:
    from flatquant.report.document import write_report
    from flatquant.results import load_records

    if not Path(args.results_dir).is_dir():
        raise DataError(f"results folder {args.results_dir} not found (pass --results-dir)")
    if not load_records(args.results_dir):
        raise DataError(f"no result records (*.json) in {args.results_dir}")
    _check_writable(args.out, "file")
    _check_writable(args.plots_dir)
    if args.params:
        from flatquant.report.plot_cli import run_from_args

        _check_writable(args.figures_dir)
        run_from_args(args, args.figures_dir)
    paths = write_report(args.results_dir, args.out, args.plots_dir, args.figures_dir)
    print(f"wrote {args.out}" + (f" and {len(paths)} plot(s)" if paths else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "report": cmd_report,
                **parser.runtime_commands}[args.command](args)
    except FlatQuantError as e:
        print(f"flatquant: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable folder, full disk, ...: one line, no traceback
        print(f"flatquant: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from safetensors import SafetensorError

        if not isinstance(e, SafetensorError):
            raise
        print(f"flatquant: error: safetensors: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flatquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
