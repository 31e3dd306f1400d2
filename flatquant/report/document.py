"""Turn results records (results/*.json, see flatquant.results) into docs/RESULTS.md and PNG plots.

The markdown reads like a paper's results section; every number comes from a record.

* Perplexity (kind "ppl"): the paper's Table 1 layout - rows = method (+ weight quantizer), grouped by
  bit setting, columns WikiText-2 and C4 (proxy); one table per (model, seqlen). Only the base rows:
  records without a ``variant`` and the main FlatQuant run (variant "paper-recipe", shown as "FlatQuant").
* Ablation (variants "ablation:<row>"): Table 3 layout - LT / PS / LCT, WikiText-2, C4.
* Training recipes (variants "recipe:<name>"): Table 4 layout - ppl, calibration time, peak GPU memory.
  Any other variant gets a table of its own, so nothing is silently dropped.
* Zero-shot (kind "zeroshot"): Table 2 layout - ARC-C, ARC-E, HellaSwag, LAMBADA, PIQA, WinoGrande, Avg.
* Calibration cost (kind "calib_cost", benchmarks/bench_calib_layer.py): one compact table.
* Kernels (results/kernels/*.json, lists of benchmark entries): see flatquant.report.kernels.
* Every other kind is listed generically, one table per kind, with all scalar fields.
* Each table and figure names the model or shapes, data, device and commit(s); a final section lists
  every record file with the command that produced it.

This module loads the records, assembles the document (the generic tables and the Records section are
here) and writes it; the accuracy tables are in flatquant.report.tables, the figures in
flatquant.report.plots, the shared formatters and grouping in flatquant.report.common.

    flatquant report [--results-dir results] [--out docs/RESULTS.md] [--plots-dir docs/plots]
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from flatquant.io import atomic_write_text
from flatquant.report.common import KERNEL_KIND, _caption, _commands, _distinct, _fmt_scalar, _short_commit, _table
from flatquant.report.e2e import e2e_section
from flatquant.report.figure_plots import figures_section
from flatquant.report.kernels import classify, kernels_section
from flatquant.report.plots import make_plots
from flatquant.report.runtime import is_runtime_record, runtime_section
from flatquant.report.settings_tables import settings_sections
from flatquant.report.tables import (
    ablation_section,
    calib_cost_section,
    other_variants_section,
    ppl_section,
    recipe_section,
    zeroshot_section,
)
from flatquant.results import load_records

__all__ = ["KERNEL_KIND", "load_all", "make_plots", "render_markdown", "write_report"]

NOTE_SMOLLM2 = (
    "The SmolLM2 'FP16' baseline is the dequantized Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf): its linear "
    "weights already lie on a 4-bit grid (asymmetric, groups of 32), so weight-only results look better than "
    "they would on a true FP16 checkpoint. Activation and KV-cache quantization are unaffected."
)
PROVENANCE_KEYS = ("device", "git_commit", "command", "date", "torch", "_path")


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
    others = [r for r in records if r.get("kind", "ppl") not in ("ppl", "zeroshot", "calib_cost", KERNEL_KIND, "e2e")
              or (r.get("kind", "ppl") == "ppl" and "ppl" not in r)
              or (r.get("kind") == KERNEL_KIND and classify(r) is None)]
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
    by_file: dict = defaultdict(list)
    for r in records:
        by_file[str(r.get("_path", "-"))].append(r)
    rows = []
    for path, recs in sorted(by_file.items()):
        kind = _distinct(recs, "kind")
        if len(recs) > 1:
            kind += f" ({len(recs)} entries)"
        cmd = _commands(recs)
        date = max(str(r.get("date", "-")) for r in recs)
        rows.append([f"`{Path(path).name}`", kind, f"`{cmd}`" if cmd != "-" else "-",
                     _distinct(recs, "git_commit", _short_commit), _distinct(recs, "device"), date])
    return ["## Records", "", ("<details><summary>Every record behind the numbers above, with the command that "
                               f"produced it ({len(rows)} files)</summary>"), "",
            _table(["file", "kind", "command", "commit", "device", "date"], rows), "", "</details>", ""]


def render_markdown(records: list[dict], plots: list[str | Path] | None = None,
                    figures: list[str] | None = None) -> str:
    """The RESULTS.md text. ``records``: result records and kernel-benchmark entries (kind "kernel_bench",
    see load_all); ``plots``: image paths (relative to the markdown file) to embed; ``figures``: the lines of
    the flatness-figures section (figure_plots.figures_section)."""
    runtime = [r for r in records if is_runtime_record(r)]
    records = [r for r in records if not is_runtime_record(r)]
    lines = ["# Results", "",
             ("Generated by `flatquant report` from the records in `results/` "
              "(do not edit by hand; re-run the command)."), "",
             f"**Note.** {NOTE_SMOLLM2}", ""]
    if not records:
        lines += ["No results recorded yet.", ""]
    lines += ppl_section(records)
    lines += zeroshot_section(records)
    lines += settings_sections(records)
    lines += ablation_section(records)
    lines += recipe_section(records)
    lines += other_variants_section(records)
    lines += calib_cost_section(records)
    lines += kernels_section([r for r in records if r.get("kind") == KERNEL_KIND])
    lines += e2e_section(records)
    lines += runtime_section(runtime)
    lines += _other_section(records)
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            p = Path(p)
            lines += [f"![{p.stem}]({p.as_posix()})", ""]
    lines += figures or []
    lines += _provenance_section(records + runtime)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- entry
ARCHIVE_DIR = "archive"

def load_all(results_dir: str | Path = "results") -> list[dict]:
    """The result records (one JSON object per file) and the entries of the kernel-benchmark files (a JSON
    list per file, e.g. results/kernels/*.json), the latter tagged kind "kernel_bench" with their ``_path``."""
    records = [r for r in load_records(results_dir) if not _archived(r["_path"], results_dir)]
    for p in sorted(Path(results_dir).rglob("*.json")):
        if _archived(p, results_dir):
            continue
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, list):
            records += [{"kind": KERNEL_KIND, **e, "_path": str(p)} for e in data if isinstance(e, dict)]
    return records


def _archived(path, results_dir) -> bool:
    """Files under <results_dir>/archive/ (superseded runs, e.g. another device's kernel timings) are kept
    for reference but not rendered: a table must not mix two runs' timings."""
    try:
        rel = Path(path).resolve().relative_to(Path(results_dir).resolve())
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0] == ARCHIVE_DIR


def write_report(results_dir: str | Path = "results", out_md: str | Path = "docs/RESULTS.md",
                 plots_dir: str | Path = "docs/plots", figures_dir: str | Path | None = None) -> list[Path]:
    """Read every record under ``results_dir``, write the plots and then the markdown (atomically), embedding
    the flatness figures found in ``figures_dir``. Returns the plot paths (the markdown is at ``out_md``)."""
    records = load_all(results_dir)
    out_md = Path(out_md)
    plots = make_plots(records, plots_dir) if records else []
    rel = [Path(os.path.relpath(p, out_md.parent if str(out_md.parent) else ".")) for p in plots]
    figures = figures_section(figures_dir, out_md) if figures_dir is not None else []
    atomic_write_text(out_md, render_markdown(records, rel, figures))
    return plots
