"""PNG rendering of the flatness figures (data from flatquant.report.figures) and the report section that
embeds them. Each PNG has a JSON file of the same name next to it: the plotted numbers and their provenance
(command, commit, device), so every number in the figure comes from a file a command wrote.

Names: flatness_<model>_layer<L>.png, error_landscape_<model>.png, loss_history_<model>.png.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import flatquant.report.common as rc
from flatquant.io import atomic_write_text
from flatquant.report.figures import LANDSCAPE_METHODS, SITE_LABELS, TRANSFORMS, flatness_distance

KINDS = ("flatness", "error_landscape", "loss_history")
STYLES = {"original": ("black", "-"), "per-channel scaling": ("tab:orange", "-"),
          "Hadamard (QuaRot)": ("tab:blue", "-"), "FlatQuant": ("tab:green", "-")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _caption(info: dict) -> str:
    return (f"model {info.get('model', '?')} | params {info.get('params', '?')} | device: {info.get('device', '?')} "
            f"| commit: {rc._short_commit(info.get('git_commit'))}")


def _save(fig, out_dir: Path, stem: str, data: dict, info: dict) -> Path:
    path = rc._save_fig(fig, out_dir / f"{stem}.png")
    atomic_write_text(out_dir / f"{stem}.json", json.dumps({**info, "figure": path.name, "data": data}) + "\n")
    return path


def plot_flatness(data: dict, out_dir: str | Path, info: dict) -> Path:
    """Weights (top row) and activations (bottom row) of each site: channel norms sorted, one curve per
    transform, the relative flatness distance in the legend."""
    plt = _pyplot()
    sites = [s for s in SITE_LABELS if s in data["sites"]]
    fig, axes = plt.subplots(2, len(sites), squeeze=False, figsize=(4.2 * len(sites), 7.0))
    for col, site in enumerate(sites):
        for row, kind in enumerate(("weights", "activations")):
            ax = axes[row][col]
            for name in TRANSFORMS:
                d = data["sites"][site][kind].get(name)
                if not d:
                    continue
                color, ls = STYLES[name]
                ax.plot(range(len(d)), d, color=color, ls=ls, lw=1.2,
                        label=f"{name} (flatness {flatness_distance(d):.3f})")
            ax.set_yscale("log")
            ax.set_title(f"{'W' if kind == 'weights' else 'X'}: {SITE_LABELS[site]}", fontsize=10)
            ax.set_xlabel("channel (sorted by magnitude)", fontsize=8)
            if col == 0:
                ax.set_ylabel("channel Frobenius norm (log)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="upper right")
    fig.suptitle(f"Channel magnitudes of layer {data['layer']}, sorted (activations: {data['tokens']} calibration "
                 "tokens)", fontsize=12)
    fig.text(0.5, -0.01, _caption(info) + " | flatness = ||d - d'|| / ||d||, 0 = flat", ha="center", va="top",
             fontsize=7, wrap=True)
    fig.tight_layout()
    return _save(fig, Path(out_dir), f"flatness_{rc._slug(info.get('model', 'model'))}_layer{data['layer']}", data,
                 info)


def plot_error_landscape(data: dict, out_dir: str | Path, info: dict) -> Path:
    """Left: the MSE of each layer's output per method (log). Then one heatmap per method: layer x token."""
    import matplotlib.colors as mcolors

    plt = _pyplot()
    methods = [m for m in LANDSCAPE_METHODS if m in data["methods"]]
    fig, axes = plt.subplots(1, 1 + len(methods), squeeze=False, figsize=(4.5 * (1 + len(methods)), 4.2))
    ax = axes[0][0]
    for m in methods:
        ys = data["methods"][m]["per_layer"]
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=LANDSCAPE_METHODS[m])
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    _integer_axis(ax.xaxis)
    ax.set_ylabel("MSE of the layer output vs FP (log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    vals = [v for m in methods for row in data["methods"][m]["per_position"] for v in row if v > 0 and math.isfinite(v)]
    norm = mcolors.LogNorm(vmin=min(vals), vmax=max(vals)) if vals else None
    for k, m in enumerate(methods):
        a = axes[0][1 + k]
        im = a.imshow(data["methods"][m]["per_position"], aspect="auto", origin="lower", norm=norm, cmap="viridis")
        a.set_title(LANDSCAPE_METHODS[m], fontsize=9)
        a.set_xlabel("token position")
        _integer_axis(a.yaxis)
        if k == 0:
            a.set_ylabel("layer")
    if methods:
        fig.colorbar(im, ax=[axes[0][1 + k] for k in range(len(methods))], fraction=0.02, label="MSE (log)")
    fig.suptitle(f"Quantization error across layers, {data['bits']} (RTN weights; {data['windows']} windows of "
                 f"{data['seqlen']} tokens)", fontsize=12)
    fig.text(0.5, -0.02, _caption(info), ha="center", va="top", fontsize=7, wrap=True)
    return _save(fig, Path(out_dir), f"error_landscape_{rc._slug(info.get('model', 'model'))}", data, info)


def plot_loss_history(data: dict, out_dir: str | Path, info: dict) -> Path:
    """The training loss per epoch of each layer (log), coloured by layer. A folder saved without the history
    gets the report's loss before and after training per layer instead, and the title says so."""
    plt = _pyplot()
    hist = {int(k): v for k, v in data.get("epoch_losses", {}).items()}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if hist:
        cmap = plt.get_cmap("viridis")
        n = max(hist) + 1
        for layer, losses in sorted(hist.items()):
            ax.plot(range(1, len(losses) + 1), losses, color=cmap(layer / max(1, n - 1)), lw=1, marker=".", ms=3)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, n - 1)))
        _integer_axis(fig.colorbar(sm, ax=ax, label="layer").ax.yaxis)
        ax.set_xlabel("epoch")
        _integer_axis(ax.xaxis)
        ax.set_ylabel("mean training loss (MSE, log)")
        title = "FlatQuant training loss per epoch, each layer"
    else:
        ba = {int(k): v for k, v in data.get("before_after", {}).items()}
        xs = sorted(ba)
        for j, label in enumerate(("before training", "after training")):
            ax.plot(xs, [ba[x][j] for x in xs], marker="o", ms=3, label=label)
        ax.set_xlabel("layer")
        _integer_axis(ax.xaxis)
        ax.set_ylabel("layer output MSE (log)")
        ax.legend(fontsize=8)
        title = "per-epoch loss history missing in this folder (saved before it was recorded): loss per layer"
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.text(0.5, -0.02, _caption(info), ha="center", va="top", fontsize=7, wrap=True)
    return _save(fig, Path(out_dir), f"loss_history_{rc._slug(info.get('model', 'model'))}",
                 {**data, "history_missing": not hist}, info)


def figures_section(figures_dir: str | Path, out_md: str | Path) -> list[str]:
    """Markdown embedding the figure PNGs found in `figures_dir` (each with its JSON), paths relative to the
    markdown file; nothing when there are none."""
    d = Path(figures_dir)
    pngs = sorted(p for p in d.glob("*.png") if p.stem.startswith(KINDS) and p.with_suffix(".json").is_file()) \
        if d.is_dir() else []
    if not pngs:
        return []
    out = ["## Flatness figures", "",
           ("Written by `flatquant plot` from saved FlatQuant parameters (each PNG's numbers and command are in the "
            "JSON file next to it)."), ""]
    base = Path(out_md).parent
    for p in pngs:
        info = json.loads(p.with_suffix(".json").read_text())
        note = ""
        if p.stem.startswith("loss_history") and (info.get("data") or {}).get("history_missing"):
            note = " (per-epoch history missing in that folder: loss before/after per layer)"
        rel = Path(os.path.relpath(p, base if str(base) else "."))
        out += [f"![{p.stem}]({rel.as_posix()})", "",
                f"*{p.stem}*{note}: `{info.get('command', '-')}`; {_caption(info)}.", ""]
    return out
