"""Turn results records (results/*.json, see flatquant.results) into docs/RESULTS.md and PNG plots.

* Perplexity (kind "ppl"): the paper's Table 1 layout - rows = method (+ weight quantizer), grouped by
  bit setting, columns WikiText-2 and C4 (proxy); one table per (model, seqlen).
* Zero-shot (kind "zeroshot"): Table 2 layout - ARC-C, ARC-E, HellaSwag, LAMBADA, PIQA, WinoGrande, Avg;
  one table per (model, limit).
* Every other kind (calibration time, ablation, kernels, ...) is listed generically, one table per
  kind, with all scalar fields, so nothing is silently dropped.
* Each table and figure names the model, data, windows/limit, device and commit(s); a final section
  lists every record file with the command that produced it.

    python -m flatquant.report [results_dir] [out_md] [plots_dir]
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from .results import atomic_write_text, load_records

NOTE_SMOLLM2 = (
    "The SmolLM2 'FP16' baseline is the dequantized Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf): its linear "
    "weights already lie on a 4-bit grid (asymmetric, groups of 32), so weight-only results look better than "
    "they would on a true FP16 checkpoint. Activation and KV-cache quantization are unaffected."
)

METHOD_NAMES = {"fp16": "FP16", "rtn": "RTN", "smoothquant": "SmoothQuant", "quarot": "QuaRot",
                "flatquant": "FlatQuant", "gptq": "GPTQ", "spinquant": "SpinQuant"}
METHOD_ORDER = ["fp16", "rtn", "smoothquant", "gptq", "quarot", "spinquant", "flatquant"]
BITS_ORDER = ["W16A16KV16", "W4A16KV16", "W3A16KV16", "W16A4KV16", "W16A16KV4", "W16A16KV3",
              "W4A4KV16", "W4A4KV4", "W4A8KV8", "W8A8KV8", "W4A4KV8"]
DATASETS = [("wikitext2", "WikiText-2"), ("c4", "C4 (proxy)")]
DATASET_NOTES = {"wikitext2": "WikiText-2 raw test", "c4": "C4 validation proxy (first 1,100 docs, 256 windows)"}
TASKS = [("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"), ("hellaswag", "HellaSwag"),
         ("lambada_openai", "LAMBADA"), ("piqa", "PIQA"), ("winogrande", "WinoGrande")]
PROVENANCE_KEYS = ("device", "git_commit", "command", "date", "torch", "_path")


# --------------------------------------------------------------------------------------------- helpers
def _bits(r: dict) -> str:
    if all(k in r for k in ("w_bits", "a_bits", "kv_bits")):
        return f"W{r['w_bits']}A{r['a_bits']}KV{r['kv_bits']}"
    return "-"


def _bits_key(tag: str):
    if tag in BITS_ORDER:
        return (0, BITS_ORDER.index(tag), tag)
    return (1, 0, tag)


def _is_fp16(r: dict) -> bool:
    return r.get("method") == "fp16" or _bits(r) == "W16A16KV16"


def _method_label(r: dict) -> str:
    m = str(r.get("method", "?"))
    label = METHOD_NAMES.get(m.lower(), m)
    if r.get("variant"):
        label += f" [{r['variant']}]"
    return label


def _wq_label(r: dict) -> str:
    if _is_fp16(r) or r.get("w_bits", 16) >= 16:
        return "-"
    wq = str(r.get("weight_quantizer") or "rtn")
    return wq.upper() if len(wq) <= 5 else wq


def _method_key(r: dict):
    m = str(r.get("method", "")).lower()
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m,
            str(r.get("weight_quantizer") or ""), str(r.get("variant") or ""))


def _model_name(m) -> str:
    """A record's model (or the record itself) for display: local paths shortened to their file name."""
    if isinstance(m, dict):
        m = m.get("model", "?")
    m = str(m if m is not None else "?")
    if m.startswith(("/", "./", "../", "~")) or m.endswith(".gguf"):
        return Path(m).name or m
    return m


def _short_commit(c) -> str:
    c = str(c or "unknown")
    dirty = c.endswith("+dirty")
    base = c[:-6] if dirty else c
    return (base[:10] if re.fullmatch(r"[0-9a-f]{11,}", base) else base) + ("+dirty" if dirty else "")


def _distinct(records, key, fmt=str) -> str:
    vals = []
    for r in records:
        v = fmt(r.get(key))
        if v not in vals:
            vals.append(v)
    return ", ".join(vals) if vals else "-"


def _fmt_ppl(x) -> str:
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x < 100:
        return f"{x:.2f}"
    if x < 1e4:
        return f"{x:.1f}"
    return f"{x:.2e}"


def _fmt_scalar(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)) else f"{v:.4f}".rstrip("0").rstrip(".")
    s = str(v).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 80 else s[:77] + "..."


def _latest(records: list[dict]) -> list[dict]:
    """One record per configuration (the newest by date) - a re-run replaces the older number."""
    best: dict = {}
    for r in records:
        key = (r.get("kind"), r.get("model"), r.get("method"), _bits(r), r.get("weight_quantizer"),
               r.get("variant"), r.get("dataset"), r.get("seqlen"), r.get("limit"))
        if key not in best or str(r.get("date", "")) >= str(best[key].get("date", "")):
            best[key] = r
    return list(best.values())


def _caption(records, extra: str = "") -> str:
    parts = [f"Model: `{_distinct([r for r in records if r.get('model')], 'model', _model_name)}`"] \
        if any(r.get("model") for r in records) else []
    if extra:
        parts.append(extra)
    parts.append(f"device: {_distinct(records, 'device')}")
    parts.append(f"commit(s): {_distinct(records, 'git_commit', _short_commit)}")
    return "; ".join(parts) + "."


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(s)).strip("-") or "x"


# --------------------------------------------------------------------------------------------- grouping
def _ppl_groups(records):
    """{(model, seqlen): {row_key: {dataset: record}}} for kind == 'ppl'."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for r in _latest([r for r in records if r.get("kind", "ppl") == "ppl" and "ppl" in r]):
        row = (_bits(r), r.get("method"), r.get("weight_quantizer") if not _is_fp16(r) else None, r.get("variant"))
        groups[(str(r.get("model")), r.get("seqlen"))][row][str(r.get("dataset"))] = r
    return groups


def _row_sort(row_key, recs):
    r = next(iter(recs.values()))
    return (0 if _is_fp16(r) else 1, _bits_key(row_key[0]), _method_key(r))


def _zs_groups(records):
    groups: dict = defaultdict(list)
    for r in _latest([r for r in records if r.get("kind") == "zeroshot"]):
        groups[(str(r.get("model")), r.get("limit"))].append(r)
    return groups


# --------------------------------------------------------------------------------------------- markdown
def _ppl_section(records) -> list[str]:
    out = []
    groups = _ppl_groups(records)
    if not groups:
        return out
    out += ["## Perplexity (Table 1 layout)", "",
            ("Lower is better. Non-overlapping windows of `seqlen` tokens (GPTQ/QuaRot/FlatQuant protocol). "
             "**Bold**: best in its bit setting. A value marked with `(n=...)` used fewer windows than the "
             "rest of its column."), ""]
    for (model, seqlen), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        recs = [r for row in rows.values() for r in row.values()]
        full_windows = {ds: max([r.get("windows") or 0 for r in recs if r.get("dataset") == ds], default=0)
                        for ds, _ in DATASETS}
        extra_ds = sorted({str(r.get("dataset")) for r in recs} - {d for d, _ in DATASETS})
        columns = DATASETS + [(d, d) for d in extra_ds]
        best: dict = {}
        for row_key, row in rows.items():
            for ds, _ in columns:
                r = row.get(ds)
                if r is not None and isinstance(r.get("ppl"), (int, float)) and math.isfinite(r["ppl"]):
                    k = (row_key[0], ds)
                    best[k] = min(best.get(k, float("inf")), float(r["ppl"]))
        table_rows = []
        last_bits = None
        for row_key, row in sorted(rows.items(), key=lambda kv: _row_sort(*kv)):
            r0 = next(iter(row.values()))
            bits = "FP16" if _is_fp16(r0) else row_key[0]
            cells = [f"**{bits}**" if bits != last_bits else "", _method_label(r0), _wq_label(r0)]
            last_bits = bits
            for ds, _ in columns:
                r = row.get(ds)
                if r is None:
                    cells.append("-")
                    continue
                s = _fmt_ppl(r.get("ppl"))
                peers = sum(1 for k2, rr in rows.items() if k2[0] == row_key[0] and rr.get(ds) is not None)
                if peers > 1 and r.get("ppl") == best.get((row_key[0], ds)):
                    s = f"**{s}**"
                if full_windows.get(ds) and r.get("windows") and r["windows"] < full_windows[ds]:
                    s += f" (n={r['windows']})"
                cells.append(s)
            table_rows.append(cells)
        header = ["Bits", "Method", "W quantizer"] + [label for _, label in columns]
        windows_txt = ", ".join(f"{label} {full_windows.get(ds) or '-'}" for ds, label in columns
                                if any(r.get("dataset") == ds for r in recs))
        data_txt = "; ".join(DATASET_NOTES.get(ds, ds) for ds, _ in columns
                             if any(r.get("dataset") == ds for r in recs))
        out += [f"### {_model_name(model)} - seqlen {seqlen}", "",
                _table(header, table_rows, ["l", "l", "l"] + ["r"] * len(columns)), "",
                _caption(recs, f"data: {data_txt}; seqlen {seqlen}; windows: {windows_txt}"), ""]
    return out


def _zs_section(records) -> list[str]:
    out = []
    groups = _zs_groups(records)
    if not groups:
        return out
    out += ["## Zero-shot accuracy (Table 2 layout)", "",
            ("Accuracy in % (higher is better), lm-eval-harness, 0-shot. acc_norm for ARC-C, ARC-E, HellaSwag "
             "and PIQA; acc for LAMBADA and WinoGrande (as in the paper). Avg is the mean over the tasks shown."), ""]
    for (model, limit), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        recs = sorted(recs, key=lambda r: (0 if _is_fp16(r) else 1, _bits_key(_bits(r)), _method_key(r)))
        present = [(t, label) for t, label in TASKS if any(t in (r.get("tasks") or {}) for r in recs)]
        extra = sorted({t for r in recs for t in (r.get("tasks") or {})} - {t for t, _ in TASKS})
        present += [(t, t) for t in extra]
        rows, last_bits, ns = [], None, {}
        for r in recs:
            bits = "FP16" if _is_fp16(r) else _bits(r)
            cells = [f"**{bits}**" if bits != last_bits else "", _method_label(r), _wq_label(r)]
            last_bits = bits
            for t, _ in present:
                res = (r.get("tasks") or {}).get(t)
                if not res:
                    cells.append("-")
                    continue
                cells.append(f"{float(res['value']):.2f}")
                if res.get("n") is not None:
                    ns.setdefault(t, set()).add(res["n"])
            avg = r.get("average")
            cells.append(f"{float(avg):.2f}" if isinstance(avg, (int, float)) else "-")
            rows.append(cells)
        header = ["Bits", "Method", "W quantizer"] + [label for _, label in present] + ["Avg"]
        n_txt = ", ".join(f"{dict(present).get(t, t)} {'/'.join(str(n) for n in sorted(v))}" for t, v in ns.items())
        lim = "none (full task sets)" if limit is None else str(limit)
        out += [f"### {_model_name(model)} - limit {lim}", "",
                _table(header, rows, ["l", "l", "l"] + ["r"] * (len(present) + 1)), "",
                _caption(recs, f"lm-eval limit: {lim}; rows scored per task: {n_txt or '-'}"), ""]
    return out


def _flatten(d: dict, prefix: str = "", depth: int = 0) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 2:
            out.update(_flatten(v, key + ".", depth + 1))
        elif isinstance(v, (list, tuple)):
            s = json.dumps(v)
            out[key] = s if len(s) <= 60 else f"[{len(v)} items]"
        elif isinstance(v, dict):
            out[key] = "{...}"
        else:
            out[key] = v
    return out


def _other_section(records) -> list[str]:
    others = [r for r in records if r.get("kind", "ppl") not in ("ppl", "zeroshot")
              or (r.get("kind", "ppl") == "ppl" and "ppl" not in r)]
    if not others:
        return []
    out = ["## Other results", ""]
    by_kind: dict = defaultdict(list)
    for r in others:
        by_kind[str(r.get("kind", "?"))].append(r)
    for kind, recs in sorted(by_kind.items()):
        flat = [_flatten({k: v for k, v in r.items() if k not in PROVENANCE_KEYS and k != "kind"}) for r in recs]
        cols: list[str] = []
        for f in flat:
            for k in f:
                if k not in cols:
                    cols.append(k)
        first = [c for c in ("model", "method", "w_bits", "a_bits", "kv_bits", "variant") if c in cols]
        cols = first + [c for c in cols if c not in first]
        rows = [[_fmt_scalar(f.get(c)) for c in cols] for f in flat]
        out += [f"### {kind}", "", _table(cols, rows), "", _caption(recs), ""]
    return out


def _provenance_section(records) -> list[str]:
    if not records:
        return []
    rows = []
    for r in sorted(records, key=lambda r: str(r.get("_path", ""))):
        cmd = str(r.get("command", "-")).replace("|", "\\|")
        rows.append([f"`{Path(str(r.get('_path', '-'))).name}`", str(r.get("kind", "ppl")),
                     f"`{cmd}`" if cmd != "-" else "-", _short_commit(r.get("git_commit")),
                     str(r.get("device", "-")), str(r.get("date", "-"))])
    return ["## Records", "", ("<details><summary>Every record behind the numbers above, with the command that "
                               f"produced it ({len(records)} files)</summary>"), "",
            _table(["file", "kind", "command", "commit", "device", "date"], rows), "", "</details>", ""]


def render_markdown(records: list[dict], plots: list[str | Path] | None = None) -> str:
    """The RESULTS.md text. ``plots``: image paths (relative to the markdown file) to embed."""
    records = list(records)
    lines = ["# Results", "",
             ("Generated by `python -m flatquant.report` from the records in `results/` "
              "(do not edit by hand; re-run the command)."), "",
             f"**Note.** {NOTE_SMOLLM2}", ""]
    if not records:
        lines += ["No results recorded yet.", ""]
    lines += _ppl_section(records)
    lines += _zs_section(records)
    lines += _other_section(records)
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            p = Path(p)
            lines += [f"![{p.stem}]({p.as_posix()})", ""]
    lines += _provenance_section(records)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- plots
def _save_fig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _bar_colors(n):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def make_plots(records: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG figures: perplexity per method and bit setting (log scale) and zero-shot accuracy per task."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths: list[Path] = []

    for (model, seqlen), rows in sorted(_ppl_groups(records).items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        recs = [r for row in rows.values() for r in row.values()]
        datasets = [(d, l) for d, l in DATASETS if any(r.get("dataset") == d for r in recs)]
        bit_tags = sorted({("FP16" if _is_fp16(r) else _bits(r)) for r in recs},
                          key=lambda t: (0, 0, "") if t == "FP16" else _bits_key(t))
        def plot_label(r):
            return _method_label(r) + ("" if _wq_label(r) in ("-", "RTN") else f" ({_wq_label(r)})")

        methods = []
        for row_key, row in sorted(rows.items(), key=lambda kv: _row_sort(*kv)):
            r0 = next(iter(row.values()))
            if not _is_fp16(r0) and plot_label(r0) not in methods:
                methods.append(plot_label(r0))
        tags = [t for t in bit_tags if t != "FP16"]
        fig, axes = plt.subplots(1, len(datasets), squeeze=False,
                                 figsize=(max(5.0, 0.3 * len(rows) + 0.8 * len(tags)) * len(datasets), 4.8))
        colors = dict(zip(methods, _bar_colors(max(1, len(methods)))))
        for ax, (ds, ds_label) in zip(axes[0], datasets):
            fp16 = [r for r in recs if _is_fp16(r) and r.get("dataset") == ds]
            ymax, ymin = 0.0, float("inf")
            for ti, tag in enumerate(tags):
                # the bars present in this bit setting, centred on its tick, one colour per method
                here = sorted((row[ds] for row in rows.values() if ds in row and not _is_fp16(row[ds])
                               and _bits(row[ds]) == tag and isinstance(row[ds].get("ppl"), (int, float))
                               and math.isfinite(row[ds]["ppl"])), key=lambda r: methods.index(plot_label(r)))
                width = 0.8 / max(1, len(here)) if len(here) > 1 else 0.4
                for k, r in enumerate(here):
                    x = ti - width * (len(here) - 1) / 2 + width * k
                    y = float(r["ppl"])
                    ymax, ymin = max(ymax, y), min(ymin, y)
                    ax.bar([x], [y], width=width, color=colors[plot_label(r)], label=plot_label(r))
                    ax.annotate(_fmt_ppl(y), (x, y), ha="center", va="bottom", fontsize=7,
                                rotation=90 if len(here) > 2 else 0, xytext=(0, 2), textcoords="offset points")
            if fp16 and isinstance(fp16[0].get("ppl"), (int, float)):
                y0 = float(fp16[0]["ppl"])
                ymax, ymin = max(ymax, y0), min(ymin, y0)
                ax.axhline(y0, color="black", ls="--", lw=1, label="FP16 baseline")
            ax.set_yscale("log")
            if 0 < ymin <= ymax:
                ax.set_ylim(ymin / 2, ymax * 6)  # short bars stay visible; room for the value labels
            ax.set_xticks(range(len(tags)))
            ax.set_xticklabels(tags, fontsize=9)
            ax.set_xlim(-0.6, len(tags) - 0.4)
            ax.set_ylabel("perplexity (log scale, lower is better)")
            win = max([r.get("windows") or 0 for r in recs if r.get("dataset") == ds], default=0)
            base = f"; FP16 = {_fmt_ppl(fp16[0]['ppl'])}" if fp16 else ""
            ax.set_title(f"{ds_label} ({win} windows of {seqlen} tokens{base})", fontsize=10)
            ax.grid(axis="y", which="major", alpha=0.3)
        handles, labels = [], []
        for ax in axes[0]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(labels)),
                   fontsize=8, frameon=False)
        fig.suptitle(f"Perplexity - {_model_name(model)}, seqlen {seqlen}", fontsize=12)
        fig.text(0.5, -0.09, _plot_caption(recs, "; ".join(DATASET_NOTES.get(d, d) for d, _ in datasets)),
                 ha="center", va="top", fontsize=7, wrap=True)
        paths.append(_save_fig(fig, out_dir / f"ppl_{_slug(_model_name(model))}_seqlen{seqlen}.png"))
        plt.close(fig)

    for (model, limit), recs in sorted(_zs_groups(records).items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        recs = sorted(recs, key=lambda r: (0 if _is_fp16(r) else 1, _bits_key(_bits(r)), _method_key(r)))
        present = [(t, l) for t, l in TASKS if any(t in (r.get("tasks") or {}) for r in recs)]
        present += [(t, t) for t in sorted({t for r in recs for t in (r.get("tasks") or {})} - {t for t, _ in TASKS})]
        labels_x = [l for _, l in present] + ["Avg"]
        fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(labels_x) * max(1, len(recs)) / 3), 4.6))
        width = 0.8 / max(1, len(recs))
        colors = _bar_colors(max(1, len(recs)))
        for i, r in enumerate(recs):
            ys = [float((r.get("tasks") or {}).get(t, {}).get("value", float("nan"))) for t, _ in present]
            ys.append(float(r["average"]) if isinstance(r.get("average"), (int, float)) else float("nan"))
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(labels_x))]
            lab = ("FP16" if _is_fp16(r) else f"{_method_label(r)} {_bits(r)}") + (
                "" if _wq_label(r) in ("-", "RTN") else f" ({_wq_label(r)})")
            ax.bar(xs, ys, width=width, color=colors[i], label=lab)
        ax.set_xticks(range(len(labels_x)))
        ax.set_xticklabels(labels_x)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(recs) > 4 else 1, loc="upper right")
        lim = "full task sets" if limit is None else f"limit {limit} rows/task"
        fig.suptitle(f"Zero-shot accuracy - {_model_name(model)} ({lim})", fontsize=12)
        fig.text(0.5, -0.02, _plot_caption(recs, "lm-eval 0-shot; acc_norm: ARC-C/ARC-E/HellaSwag/PIQA, "
                                                 "acc: LAMBADA/WinoGrande"), ha="center", va="top", fontsize=7,
                 wrap=True)
        lim_slug = "full" if limit is None else _slug(limit)
        paths.append(_save_fig(fig, out_dir / f"zeroshot_{_slug(_model_name(model))}_limit-{lim_slug}.png"))
        plt.close(fig)
    return paths


def _plot_caption(recs, data: str) -> str:
    return (f"model {_distinct(recs, 'model', _model_name)} | data: {data} | device: {_distinct(recs, 'device')} | "
            f"commit(s): {_distinct(recs, 'git_commit', _short_commit)}")


# --------------------------------------------------------------------------------------------- entry
def write_report(results_dir: str | Path = "results", out_md: str | Path = "docs/RESULTS.md",
                 plots_dir: str | Path = "docs/plots") -> list[Path]:
    """Read every record under ``results_dir``, write the plots and then the markdown (atomically).
    Returns the plot paths (the markdown is at ``out_md``)."""
    records = load_records(results_dir)
    out_md = Path(out_md)
    plots = make_plots(records, plots_dir) if records else []
    rel = [Path(os.path.relpath(p, out_md.parent if str(out_md.parent) else ".")) for p in plots]
    atomic_write_text(out_md, render_markdown(records, rel))
    return plots


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out_md = args[1] if len(args) > 1 else "docs/RESULTS.md"
    plots = write_report(*args[:3])
    print(f"wrote {out_md} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
