"""`flatquant plot`: the flatness figures of a saved FlatQuant parameter folder (and the same from
`flatquant report --params`): channel magnitudes of one layer, the error landscape, the loss per epoch.

    flatquant plot --params out/smollm2-w4a4kv4 --model smollm2-135m --layer 5 --out-dir docs/figures
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flatquant.config import ConfigError

WHAT = ("flatness", "landscape", "loss")


def add_figure_args(p: argparse.ArgumentParser, required: bool, default_name=None) -> None:
    """The options shared by `plot` and `report` (where --params is optional: no figures without it).
    default_name: --model -> the name in file names (the CLI's default_model_name, passed in: no import cycle)."""
    p.set_defaults(figure_default_name=default_name)
    p.add_argument("--params", required=required, default=None,
                   help="folder saved by `flatquant quantize`" + ("" if required else " (figures only when given)"))
    p.add_argument("--model", default=None,
                   help="the model the parameters belong to (needed for the flatness and landscape figures)")
    p.add_argument("--model-name", default=None, help="name in the figure file names (default: from --model)")
    p.add_argument("--layer", type=int, default=0, help="decoder layer of the channel-magnitude figure")
    p.add_argument("--what", default=",".join(WHAT), help=f"comma-separated figures: {', '.join(WHAT)}")
    p.add_argument("--windows", type=int, default=4, help="calibration windows for activations and errors")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--calib-dataset", default="wiki-calib", help="where the windows come from")
    p.add_argument("--data-dir", default=None, help="data folder (default: $FLATQUANT_DATA_DIR or ../shared/data)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and of the Hadamard signs")


def add_parsers(sub, check_writable, default_name) -> dict:
    """Register `plot`; check_writable(folder) and default_name(model) come from flatquant.cli."""
    from flatquant.cli_help import _Help

    p = sub.add_parser("plot", help="flatness figures (PNG) from saved FlatQuant parameters", formatter_class=_Help)
    add_figure_args(p, required=True, default_name=default_name)
    p.set_defaults(check_writable=check_writable)
    p.add_argument("--out-dir", default="docs/figures", help="folder for the PNGs and their JSON data")
    return {"plot": cmd_plot}


def _kinds(what: str) -> list[str]:
    kinds = [w.strip() for w in what.split(",") if w.strip()]
    bad = [k for k in kinds if k not in WHAT]
    if bad or not kinds:
        raise ConfigError(f"--what: unknown figure {bad[0] if bad else what!r}; choose from {', '.join(WHAT)}")
    return kinds


def make_figures(params: str | Path, out_dir: str | Path, kinds=WHAT, model=None, windows=None,
                 model_name: str | None = None, layer: int = 0, seed: int = 0) -> list[Path]:
    """Compute and write the figures in `kinds`; `model` (and calibration `windows`) are needed for
    "flatness" and "landscape". Returns the PNG paths."""
    from flatquant.calib import artifacts
    from flatquant.report import figure_plots as fp
    from flatquant.report import figures
    from flatquant.results import provenance

    artifacts.check_finished(params)
    if model is not None:
        artifacts.check_model_matches(artifacts.read_meta(params), model.config)
    if any(k != "loss" for k in kinds) and (model is None or windows is None):
        raise ConfigError("the flatness and landscape figures need --model (the loss figure needs only --params)")
    device = next(model.parameters()).device if model is not None else "cpu"
    info = {**provenance(device), "model": model_name or Path(str(params)).name, "params": str(params)}
    paths = []
    if "loss" in kinds:
        paths.append(fp.plot_loss_history(figures.loss_history(params), out_dir, info))
    if "flatness" in kinds:
        paths.append(fp.plot_flatness(figures.flatness_data(model, windows, layer, params, seed), out_dir, info))
    if "landscape" in kinds:
        paths.append(fp.plot_error_landscape(figures.error_landscape(model, windows, params, seed=seed), out_dir, info))
    return paths


def run_from_args(args, out_dir: str | Path) -> list[Path]:
    """Load what the arguments name and write the figures (shared by `plot` and `report --params`)."""
    import torch

    from flatquant import data
    from flatquant.calib import artifacts

    kinds = _kinds(args.what)
    artifacts.check_finished(args.params)
    for name in ("windows", "seqlen"):
        if getattr(args, name) < (2 if name == "seqlen" else 1):
            raise ConfigError(f"--{name} must be at least {2 if name == 'seqlen' else 1}, got {getattr(args, name)}")
    if args.layer < 0:
        raise ConfigError(f"--layer must be at least 0, got {args.layer}")
    model = windows = None
    name = args.model_name
    if any(k != "loss" for k in kinds):
        if not args.model:
            raise ConfigError("the flatness and landscape figures need --model (or --what loss)")
        from flatquant.models.loading import load_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        data.resolve_data_dir(args.data_dir)
        model, tok = load_model(args.model, device=device)
        artifacts.check_model_matches(artifacts.read_meta(args.params), model.config)
        layers = model.config.num_hidden_layers
        if args.layer >= layers:
            raise ConfigError(f"--layer {args.layer}: the model has layers 0..{layers - 1}")
        windows = data.calibration_windows(tok, args.calib_dataset, args.windows, args.seqlen, args.seed, args.data_dir)
        namer = getattr(args, "figure_default_name", None) or (lambda m: Path(m).name)
        name = name or namer(args.model)
    return make_figures(args.params, out_dir, kinds, model, windows, name, args.layer, args.seed)


def cmd_plot(args) -> int:
    args.check_writable(args.out_dir)
    paths = run_from_args(args, args.out_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
