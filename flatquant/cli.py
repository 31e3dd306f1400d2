"""Command line: a thin layer over the Python API.

    flatquant quantize --model smollm2-135m --preset cpu-quick --output out/smollm2-w4a4kv4
    flatquant eval --model smollm2-135m --method quarot --w-bits 4 --a-bits 4 --kv-bits 4 --dataset wikitext2
    flatquant report
User errors (bad model, bits, data, checkpoint, path) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from flatquant.config import METHODS, PRESETS, WEIGHT_QUANTIZERS, CalibConfig, ConfigError, QuantConfig, calib_preset
from flatquant.errors import CheckpointError, DataError, FlatQuantError

PRESET_EVAL_WINDOWS = {"cpu-quick": 8, "tiny": 2}  # quick presets also cap the perplexity windows
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
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--w-clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight clip-ratio search (default: on for quarot/smoothquant)")
    p.add_argument("--weight-quantizer", default=None, choices=WEIGHT_QUANTIZERS,
                   help="rtn (default) or gptq (closed-form updates on the calibration windows; with --params: "
                        "the saved weights' quantizer)")
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
    parser = _Parser(prog="flatquant", description=__doc__.split("\n")[0])
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
    from flatquant.runtime.cli_commands import add_parsers

    parser.runtime_commands = add_parsers(sub)  # export, generate
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


def _check_params(params: str) -> dict:
    """The settings of a finished `flatquant quantize --output` folder; CheckpointError otherwise."""
    from flatquant.calib.artifacts import read_meta

    if not Path(params).is_dir():
        raise CheckpointError(f"--params {params}: no such folder (create it with `flatquant quantize --output`)")
    meta = read_meta(params)
    if not meta.get("complete"):
        raise CheckpointError(f"--params {params}: the calibration there is unfinished "
                              "(finish it with `flatquant quantize --output` on that folder)")
    return meta


def _setup(args):
    import torch

    from flatquant.models.loading import load_model

    qcfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                       weight_quantizer=args.weight_quantizer or "rtn")
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
    ccfg = calib_preset(preset, seed=args.seed, **overrides)
    from flatquant.runner import EvalSpec

    max_windows = args.max_windows if args.max_windows is not None else PRESET_EVAL_WINDOWS.get(preset)
    spec = EvalSpec(datasets=[d for d in args.dataset.split(",") if d], seqlen=args.seqlen, max_windows=max_windows,
                    batch_size=args.batch_size, tasks=[t for t in args.tasks.split(",") if t], limit=args.limit,
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
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    for ds in spec.datasets:  # tokenized once, here: a text shorter than one window fails before any work
        ids = data.eval_tokens(tokenizer, ds, data_dir=args.data_dir, seqlen=args.seqlen)
        if ids.shape[1] < args.seqlen:
            raise DataError(f"{ds} has {ids.shape[1]} tokens, fewer than one window of --seqlen {args.seqlen}")
        spec.tokens[ds] = ids
    return qcfg, ccfg, spec, model, tokenizer


def _clip_search(args, method: str) -> bool:
    return args.w_clip_search if args.w_clip_search is not None else method in ("quarot", "smoothquant")


def _print_table(records: list[dict]) -> None:
    rows = [r for r in records if r.get("kind") == "ppl"]
    if rows:
        print(f"\n{'method':<12} {'bits':<12} {'dataset':<10} {'windows':>7} {'ppl':>10}  weights")
        for r in rows:
            bits = f"W{r['w_bits']}A{r['a_bits']}KV{r['kv_bits']}"
            print(f"{r['method']:<12} {bits:<12} {r['dataset']:<10} {r['windows']:>7} {r['ppl']:>10.3f}  "
                  f"{r.get('weight_quantizer', '-')}")
    for r in records:
        if r.get("kind") == "zeroshot":
            tasks = ", ".join(f"{k}={v['value']:.1f}" for k, v in r["tasks"].items())
            print(f"{r['method']:<12} zero-shot avg={r['average']:.2f} ({tasks}) weights "
                  f"{r.get('weight_quantizer', '-')}")


def _model_name(args) -> str:
    return args.model_name or default_model_name(args.model)


def _check_layer_files(folder: Path, meta: dict) -> None:
    """Each saved layer file has a readable safetensors header (a truncated file fails here, early)."""
    from safetensors import safe_open

    layers = meta.get("layers_done", []) if not meta.get("complete") else \
        range(int(meta.get("sizes", {}).get("num_hidden_layers") or 0))
    for i in layers:
        path = folder / "layers" / f"layer_{i:03d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{folder}: parameters for layer {i} are missing ({path.name})")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({type(e).__name__})") from None


def _check_saved_calibration(folder: Path, model, qcfg: QuantConfig, ccfg: CalibConfig | None) -> dict:
    """Saved parameters in `folder` fit `model` (sizes) and, when ccfg is given, the requested settings."""
    from flatquant.calib.artifacts import check_model_matches, read_meta

    meta = read_meta(folder)
    if not isinstance(meta.get("sizes"), dict) or not isinstance(meta.get("calib"), dict) \
            or not isinstance(meta.get("quant"), dict):
        raise CheckpointError(f"{folder}/flatquant.json: missing sizes/quant/calib settings")
    check_model_matches(meta, model.config)
    quant_differs = QuantConfig.normalized(meta["quant"]) != qcfg.to_dict()  # older files lack newer fields
    if ccfg is not None and (quant_differs or CalibConfig.recipe_settings(meta["calib"])
                             != CalibConfig.recipe_settings(ccfg.to_dict())):
        key = "quantization settings (bits, weight quantizer)" if quant_differs else "calibration settings"
        raise CheckpointError(f"{folder} holds a calibration with other {key}; "
                              "use --no-resume to replace it, or another --output")
    _check_layer_files(folder, meta)
    return meta


def cmd_eval(args) -> int:
    from dataclasses import replace

    from flatquant.runner import calibration_data, run_config

    if args.params is not None:
        if args.method != "flatquant":
            raise ConfigError("--params only applies to --method flatquant")
        _check_params(args.params)
    qcfg, ccfg, spec, model, tok = _setup(args)
    if args.method == "fp16":
        qcfg = QuantConfig(16, 16, 16)
    qcfg = replace(qcfg, w_clip_search=_clip_search(args, args.method))
    calib_cfg = ccfg  # the preset's windows: what GPTQ and smoothquant calibrate on
    saved_gptq = False
    if args.params is not None:
        meta = _check_saved_calibration(Path(args.params), model, qcfg, None)
        ccfg = CalibConfig.from_dict(meta["calib"])  # the record names the recipe the parameters came from
        saved_q = QuantConfig.from_dict(meta["quant"])
        if args.weight_quantizer in (None, saved_q.weight_quantizer):  # default: the saved weights as they are
            qcfg = replace(qcfg, weight_quantizer=saved_q.weight_quantizer, gptq_damp=saved_q.gptq_damp,
                           gptq_block=saved_q.gptq_block, gptq_act_order=saved_q.gptq_act_order)
        saved_gptq = qcfg.weight_quantizer == "gptq" and saved_q.gptq_settings() == qcfg.gptq_settings()
    gptq_now = args.method != "fp16" and qcfg.weight_quantizer == "gptq" and not saved_gptq
    needs_calib = args.method == "smoothquant" or (args.method == "flatquant" and not args.params) or gptq_now
    calib = calibration_data(tok, calib_cfg, args.data_dir) if needs_calib else None
    records = run_config(model, tok, _model_name(args), args.method, qcfg, spec, ccfg=ccfg, calib=calib,
                         params_dir=args.params, results_dir=args.results_dir or None, seed=args.seed,
                         progress=not args.no_progress)
    _print_table(records)
    return 0


def cmd_quantize(args) -> int:
    from dataclasses import replace

    from flatquant.calib.artifacts import META
    from flatquant.runner import calibration_data, run_config

    out = Path(args.output)
    _check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise FlatQuantError(f"{out} exists and is not a flatquant parameter folder; choose another --output")
    baselines = [m for m in args.compare.split(",") if m]
    for method in baselines:
        if method not in METHODS or method == "flatquant":
            raise ConfigError(f"--compare: unknown baseline {method!r}; choose from "
                              f"{', '.join(m for m in METHODS if m != 'flatquant')}")
    qcfg, ccfg, spec, model, tok = _setup(args)
    fq_cfg = replace(qcfg, w_clip_search=False)
    # Calibrate into a temporary sibling folder (per-layer checkpoints live there until done),
    # then rename: the output folder only ever holds a complete calibration.
    work = out.with_name(out.name + ".partial")
    reuse = not args.no_resume and (out / META).is_file()
    for folder in ([] if args.no_resume else [out, work]):
        if (folder / META).is_file():  # saved parameters must fit, before any work is done
            _check_saved_calibration(folder, model, fq_cfg, ccfg)
    calib = calibration_data(tok, ccfg, args.data_dir)
    if args.no_resume and work.exists():
        shutil.rmtree(work)
    name = _model_name(args)
    records = []
    for method in baselines:
        q = QuantConfig(16, 16, 16) if method == "fp16" else replace(qcfg, w_clip_search=_clip_search(args, method))
        records += run_config(model, tok, name, method, q, spec, ccfg=ccfg, calib=calib,
                              results_dir=args.results_dir or None, seed=args.seed, progress=not args.no_progress)
    params = out if reuse else work
    records += run_config(model, tok, name, "flatquant", fq_cfg, spec, ccfg=ccfg,
                          calib=calib, params_dir=str(params), results_dir=args.results_dir or None, seed=args.seed,
                          progress=not args.no_progress)
    if params == work:
        if (out / META).is_file():
            shutil.rmtree(out)  # --no-resume: the new calibration replaces the old one
        elif out.exists():
            out.rmdir()  # empty folder left by the user
        work.rename(out)
    _print_table(records)
    print(f"\nFlatQuant parameters saved to {out}/")
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
    paths = write_report(args.results_dir, args.out, args.plots_dir)
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
    except KeyboardInterrupt:
        print("flatquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
