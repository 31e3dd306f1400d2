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
* Kernels (results/kernels/*.json, lists of benchmark entries): see flatquant.report_kernels.
* Every other kind is listed generically, one table per kind, with all scalar fields.
* Each table and figure names the model or shapes, data, device and commit(s); a final section lists
  every record file with the command that produced it.

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
# variants shown as the method's main row (Table 1), with what they stand for
MAIN_VARIANTS = {"paper-recipe": "full paper recipe"}
ABLATION, RECIPE = "ablation:", "recipe:"
ABLATION_ORDER = ["RTN", "+LT", "+LT+PS", "+LT+LCT", "+LT+PS+LCT"]
ABLATION_FLAGS = [("lt", "LT"), ("ps", "PS"), ("lct", "LCT")]
RECIPE_NOTES = {"svd-amp": "SVD-form transforms (Cayley-orthogonal factors), bf16 mixed precision",
                "direct-fp32": "full matrices with an explicit inverse, float32"}
KERNEL_KIND = "kernel_bench"  # entries of results/kernels/*.json (lists), tagged when loaded


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


def _is_main(r: dict) -> bool:
    """A base row of Table 1: no variant, or the method's main run (e.g. FlatQuant's paper recipe)."""
    return not r.get("variant") or r.get("variant") in MAIN_VARIANTS


def _method_label(r: dict) -> str:
    m = str(r.get("method", "?"))
    label = METHOD_NAMES.get(m.lower(), m)
    if not _is_main(r):
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


def _fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.0f} s" if s >= 100 else f"{s:.1f} s"


def _fmt_mib(mib) -> str:
    if not isinstance(mib, (int, float)):
        return "-"
    return f"{mib:,.0f} MiB ({mib / 1024:.2f} GiB)"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


def _calib_txt(calib: dict | None, with_recipe: bool = True) -> str:
    """'128 x 2048-token calibration windows (`wiki-calib`), 15 epochs, recipe `svd-amp`' from a calib field."""
    if not isinstance(calib, dict):
        return ""
    parts = []
    if calib.get("nsamples") and calib.get("seqlen"):
        data = f" (`{calib['dataset']}`)" if calib.get("dataset") else ""
        parts.append(f"{calib['nsamples']} × {calib['seqlen']}-token calibration windows{data}")
    if calib.get("epochs"):
        parts.append(f"{calib['epochs']} epochs")
    if with_recipe and calib.get("recipe"):
        parts.append(f"recipe `{calib['recipe']}`")
    return ", ".join(parts)


def _distinct_calib(records, with_recipe: bool = True) -> str:
    vals = []
    for r in records:
        t = _calib_txt(r.get("calib"), with_recipe)
        if t and t not in vals:
            vals.append(t)
    return "; ".join(vals) if vals else "not recorded"


# --------------------------------------------------------------------------------------------- grouping
def _ppl_records(records, select=_is_main):
    return _latest([r for r in records if r.get("kind", "ppl") == "ppl" and "ppl" in r and select(r)])


def _ppl_groups(records):
    """{(model, seqlen): {row_key: {dataset: record}}} for the Table 1 rows (kind == 'ppl', main variants)."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for r in _ppl_records(records):
        row = (_bits(r), r.get("method"), r.get("weight_quantizer") if not _is_fp16(r) else None, r.get("variant"))
        groups[(str(r.get("model")), r.get("seqlen"))][row][str(r.get("dataset"))] = r
    return groups


def _variant_groups(records, select, label):
    """{(model, seqlen): {row label: {dataset: record}}} for the ppl records that `select` picks."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for r in _ppl_records(records, select):
        groups[(str(r.get("model")), r.get("seqlen"))][label(r)][str(r.get("dataset"))] = r
    return groups


def _is_ablation(r):
    return str(r.get("variant") or "").startswith(ABLATION)


def _is_recipe(r):
    return str(r.get("variant") or "").startswith(RECIPE)


def _is_other_variant(r):
    return not _is_main(r) and not _is_ablation(r) and not _is_recipe(r)


def _ablation_key(label: str):
    return (ABLATION_ORDER.index(label), "") if label in ABLATION_ORDER else (len(ABLATION_ORDER), label)


def _row_sort(row_key, recs):
    r = next(iter(recs.values()))
    return (0 if _is_fp16(r) else 1, _bits_key(row_key[0]), _method_key(r))


def _group_sort(kv):
    return (kv[0][0], kv[0][1] or 0)


def _zs_groups(records):
    groups: dict = defaultdict(list)
    for r in _latest([r for r in records if r.get("kind") == "zeroshot"]):
        groups[(str(r.get("model")), r.get("limit"))].append(r)
    return groups


def _full_windows(recs) -> dict:
    return {ds: max([r.get("windows") or 0 for r in recs if r.get("dataset") == ds], default=0) for ds, _ in DATASETS}


def _data_txt(recs, seqlen) -> str:
    present = [(ds, label) for ds, label in DATASETS if any(r.get("dataset") == ds for r in recs)]
    windows = _full_windows(recs)
    return (f"data: {'; '.join(DATASET_NOTES.get(ds, ds) for ds, _ in present)}; seqlen {seqlen}; windows: "
            + ", ".join(f"{label} {windows.get(ds) or '-'}" for ds, label in present))


def _ppl_cell(r, full_windows, best=None) -> str:
    if r is None:
        return "-"
    s = _fmt_ppl(r.get("ppl"))
    if best is not None and r.get("ppl") == best:
        s = f"**{s}**"
    ds = r.get("dataset")
    if full_windows.get(ds) and r.get("windows") and r["windows"] < full_windows[ds]:
        s += f" (n={r['windows']})"
    return s


# --------------------------------------------------------------------------------------------- markdown
def _main_recipe_txt(recs, costs: bool = True) -> str:
    """Caption text for the main-variant rows: what they stand for and (``costs``) calibration time and memory."""
    out, seen = [], set()
    for r in sorted(recs, key=lambda r: (_method_key(r), str(r.get("dataset")))):
        v = r.get("variant")
        if v not in MAIN_VARIANTS or (r.get("method"), v) in seen:
            continue
        seen.add((r.get("method"), v))
        parts = [_calib_txt(r.get("calib"))]
        if costs and _num(r.get("quantize_seconds")):
            parts.append(f"calibration time {_fmt_seconds(r['quantize_seconds'])}")
        if costs and _num(r.get("peak_gpu_mib")):
            parts.append(f"peak GPU memory {_fmt_mib(r['peak_gpu_mib'])}")
        out.append(f"{_method_label(r)} uses the {MAIN_VARIANTS[v]}: " + ", ".join(p for p in parts if p))
    return ". ".join(out)


def _ppl_section(records) -> list[str]:
    out = []
    groups = _ppl_groups(records)
    if not groups:
        return out
    out += ["## Perplexity (Table 1 layout)", "",
            ("Lower is better. Non-overlapping windows of `seqlen` tokens (GPTQ/QuaRot/FlatQuant protocol). "
             "**Bold**: best in its bit setting. A value marked with `(n=...)` used fewer windows than the "
             "rest of its column."), ""]
    for (model, seqlen), rows in sorted(groups.items(), key=_group_sort):
        recs = [r for row in rows.values() for r in row.values()]
        full_windows = _full_windows(recs)
        extra_ds = sorted({str(r.get("dataset")) for r in recs} - {d for d, _ in DATASETS})
        columns = DATASETS + [(d, d) for d in extra_ds]
        best: dict = {}
        for row_key, row in rows.items():
            for ds, _ in columns:
                r = row.get(ds)
                if r is not None and _num(r.get("ppl")):
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
                peers = sum(1 for k2, rr in rows.items() if k2[0] == row_key[0] and rr.get(ds) is not None)
                cells.append(_ppl_cell(row.get(ds), full_windows, best.get((row_key[0], ds)) if peers > 1 else None))
            table_rows.append(cells)
        header = ["Bits", "Method", "W quantizer"] + [label for _, label in columns]
        main_txt = _main_recipe_txt(recs)
        out += [f"### {_model_name(model)} - seqlen {seqlen}", "",
                _table(header, table_rows, ["l", "l", "l"] + ["r"] * len(columns)), "",
                (f"{main_txt}. " if main_txt else "") + _caption(recs, _data_txt(recs, seqlen)), ""]
    return out


def _variant_table(rows: dict, flags: bool = False) -> tuple[str, list[dict]]:
    """A table of ppl rows (label -> {dataset: record}); with `flags`, LT/PS/LCT tick columns from `calib`."""
    recs = [r for row in rows.values() for r in row.values()]
    full_windows = _full_windows(recs)
    best = {ds: min([float(r["ppl"]) for r in recs if r.get("dataset") == ds and _num(r.get("ppl"))], default=None)
            for ds, _ in DATASETS}
    table_rows = []
    for label, row in rows.items():
        calib = next((r.get("calib") for r in row.values() if isinstance(r.get("calib"), dict)), {})
        cells = [label] + ([("✓" if calib.get(k) else "") for k, _ in ABLATION_FLAGS] if flags else [])
        cells += [_ppl_cell(row.get(ds), full_windows, best[ds] if len(rows) > 1 else None) for ds, _ in DATASETS]
        table_rows.append(cells)
    header = ["Method"] + ([name for _, name in ABLATION_FLAGS] if flags else []) + [lab for _, lab in DATASETS]
    align = ["l"] + (["c"] * len(ABLATION_FLAGS) if flags else []) + ["r"] * len(DATASETS)
    return _table(header, table_rows, align), recs


def _main_ref(records, model, seqlen) -> str:
    """'FlatQuant (full paper recipe) in Table 1: WikiText-2 29.51, C4 (proxy) 36.76' for the caption."""
    main = [r for r in _ppl_records(records) if r.get("variant") in MAIN_VARIANTS
            and str(r.get("model")) == model and r.get("seqlen") == seqlen]
    if not main:
        return "The full-recipe row is in Table 1 (not recorded for this model)."
    vals = ", ".join(f"{label} {_fmt_ppl(r['ppl'])}" for ds, label in DATASETS for r in main if r.get("dataset") == ds)
    calib = main[0].get("calib") or {}
    recipe = (f", {calib.get('nsamples')} × {calib.get('seqlen')}, {calib.get('epochs')} epochs"
              if calib.get("nsamples") else "")
    return f"The full-recipe row ({_method_label(main[0])}{recipe}) is in Table 1: {vals}."


def _ablation_section(records) -> list[str]:
    groups = _variant_groups(records, _is_ablation, lambda r: str(r["variant"])[len(ABLATION):])
    if not groups:
        return []
    out = ["## Ablation (Table 3 layout)", "",
           ("Perplexity (lower is better) as FlatQuant's components are added to RTN W4A4KV4: LT = learnable "
            "Kronecker transforms, PS = per-channel scaling, LCT = learnable clipping thresholds. **Bold**: best "
            "in its column."), ""]
    for (model, seqlen), rows in sorted(groups.items(), key=_group_sort):
        rows = dict(sorted(rows.items(), key=lambda kv: _ablation_key(kv[0])))
        table, recs = _variant_table(rows, flags=True)
        calibrated = [r for r in recs if r.get("calib")]
        out += [f"### {_model_name(model)} - seqlen {seqlen}, {_bits(recs[0])}", "", table, "",
                (f"Reduced recipe: {_distinct_calib(calibrated)} (the RTN row is not calibrated). "
                 f"{_main_ref(records, model, seqlen)} " + _caption(recs, _data_txt(recs, seqlen))), ""]
    return out


def _recipe_section(records) -> list[str]:
    groups = _variant_groups(records, _is_recipe, lambda r: str(r["variant"])[len(RECIPE):])
    if not groups:
        return []
    out = ["## Training recipes (Table 4 layout)", "",
           ("FlatQuant W4A4KV4 calibrated with each training recipe: perplexity, calibration time and peak GPU "
            "memory (largest CUDA allocation over the run: calibration and evaluation)."), ""]
    for (model, seqlen), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        recs = [r for row in rows.values() for r in row.values()]
        full_windows = _full_windows(recs)
        table_rows = []
        for label, row in sorted(rows.items(), key=lambda kv: (list(RECIPE_NOTES) + [kv[0]]).index(kv[0])):
            r0 = row.get("wikitext2") or next(iter(row.values()))
            secs = r0.get("calib_seconds", r0.get("quantize_seconds"))
            table_rows.append([f"`{label}`", RECIPE_NOTES.get(label, "-")]
                              + [_ppl_cell(row.get(ds), full_windows) for ds, _ in DATASETS]
                              + [_fmt_seconds(secs), _fmt_mib(r0.get("peak_gpu_mib"))])
        header = ["Recipe", "Parameterisation"] + [lab for _, lab in DATASETS] + ["Calibration time", "Peak GPU memory"]
        out += [f"### {_model_name(model)} - seqlen {seqlen}, {_bits(recs[0])}", "",
                _table(header, table_rows, ["l", "l"] + ["r"] * (len(DATASETS) + 2)), "",
                (f"Reduced recipe: {_distinct_calib(recs, False)}. {_main_ref(records, model, seqlen)} "
                 + _caption(recs, _data_txt(recs, seqlen))), ""]
    return out


def _other_variants_section(records) -> list[str]:
    groups = _variant_groups(records, _is_other_variant, _method_label)
    out = ["## Other variants", ""] if groups else []
    for (model, seqlen), rows in sorted(groups.items(), key=_group_sort):
        table, recs = _variant_table(dict(sorted(rows.items())))
        out += [f"### {_model_name(model)} - seqlen {seqlen}", "", table, "",
                f"Calibration: {_distinct_calib(recs)}. " + _caption(recs, _data_txt(recs, seqlen)), ""]
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
        main_txt = _main_recipe_txt(recs, costs=False)  # zero-shot runs load the parameters of the ppl run
        out += [f"### {_model_name(model)} - limit {lim}", "",
                _table(header, rows, ["l", "l", "l"] + ["r"] * (len(present) + 1)), "",
                (f"{main_txt}. " if main_txt else "")
                + _caption(recs, f"lm-eval limit: {lim}; rows scored per task: {n_txt or '-'}"), ""]
    return out


CALIB_COST_COLUMNS = [  # (header, field or callable, align)
    ("Shape", "shape", "l"), ("Recipe", "recipe", "l"), ("CUDA graph", "cuda_graph", "c"),
    ("Samples", lambda r: f"{r.get('nsamples', '-')} × {r.get('seqlen', '-')}", "r"),
    ("ms / step", "ms_per_step", "r"), ("s / epoch", "seconds_per_epoch", "r"),
    ("Fixed s / layer", "fixed_seconds_per_layer", "r")]


def _calib_cost_section(records) -> list[str]:
    recs = [r for r in records if r.get("kind") == "calib_cost"]
    if not recs:
        return []
    extrap = sorted({k for r in recs for k in r if re.fullmatch(r"layer_seconds_\d+_epochs", k)},
                    key=lambda k: int(k.split("_")[2]))
    cols = CALIB_COST_COLUMNS + [(f"s / layer ({k.split('_')[2]} epochs)", k, "r") for k in extrap] + [
        ("Layers", "layers", "r"), ("Model min (extrapolated)", "model_minutes_extrapolated", "r"),
        ("Peak GPU GiB", "peak_gpu_gib", "r")]
    if any(r.get("paper_reference") for r in recs):
        cols.append(("Paper reference", "paper_reference", "l"))
    rows = [[_fmt_scalar(f(r) if callable(f) else r.get(f)) for _, f, _ in cols]
            for r in sorted(recs, key=lambda r: (str(r.get("shape")), str(r.get("recipe"))))]
    runs = _distinct(recs, "epochs_run")
    per_layer = (f"s / layer = fixed + {extrap[0].split('_')[2]} × s / epoch; " if extrap else "")
    return ["## Calibration cost (one decoder layer)", "",
            ("Calibration time of one decoder layer (random weights and inputs), measured by "
             "`benchmarks/bench_calib_layer.py` over a few epochs and extrapolated to the full number of epochs "
             "and to the whole model."), "",
            _table([h for h, _, _ in cols], rows, [a for _, _, a in cols]), "",
            (f"Measured over {runs} epoch(s) per shape; fixed = the once-per-layer costs (setup, CUDA graph "
             f"capture, the loss before and after training); {per_layer}model = layers × s / layer. "
             "Peak GPU memory is the largest CUDA allocation. "
             + _caption(recs)), ""]


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
    from .report_kernels import classify

    others = [r for r in records if r.get("kind", "ppl") not in ("ppl", "zeroshot", "calib_cost", KERNEL_KIND)
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
        cmd = _distinct([r for r in recs if r.get("command")], "command").replace("|", "\\|")
        date = max(str(r.get("date", "-")) for r in recs)
        rows.append([f"`{Path(path).name}`", kind, f"`{cmd}`" if cmd != "-" else "-",
                     _distinct(recs, "git_commit", _short_commit), _distinct(recs, "device"), date])
    return ["## Records", "", ("<details><summary>Every record behind the numbers above, with the command that "
                               f"produced it ({len(rows)} files)</summary>"), "",
            _table(["file", "kind", "command", "commit", "device", "date"], rows), "", "</details>", ""]


def render_markdown(records: list[dict], plots: list[str | Path] | None = None) -> str:
    """The RESULTS.md text. ``records``: result records and kernel-benchmark entries (kind "kernel_bench",
    see load_all); ``plots``: image paths (relative to the markdown file) to embed."""
    from .report_kernels import kernels_section

    records = list(records)
    lines = ["# Results", "",
             ("Generated by `python -m flatquant.report` from the records in `results/` "
              "(do not edit by hand; re-run the command)."), "",
             f"**Note.** {NOTE_SMOLLM2}", ""]
    if not records:
        lines += ["No results recorded yet.", ""]
    lines += _ppl_section(records)
    lines += _zs_section(records)
    lines += _ablation_section(records)
    lines += _recipe_section(records)
    lines += _other_variants_section(records)
    lines += _calib_cost_section(records)
    lines += kernels_section([r for r in records if r.get("kind") == KERNEL_KIND])
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


def _plot_caption(recs, data: str) -> str:
    return (f"model {_distinct(recs, 'model', _model_name)} | data: {data} | device: {_distinct(recs, 'device')} | "
            f"commit(s): {_distinct(recs, 'git_commit', _short_commit)}")


def _plot_ppl(plt, model, seqlen, rows, out_dir) -> Path:
    recs = [r for row in rows.values() for r in row.values()]
    datasets = [(d, l) for d, l in DATASETS if any(r.get("dataset") == d for r in recs)]
    tags = sorted({_bits(r) for r in recs if not _is_fp16(r)}, key=_bits_key)

    def plot_label(r):
        return _method_label(r) + ("" if _wq_label(r) in ("-", "RTN") else f" ({_wq_label(r)})")

    methods = []
    for _, row in sorted(rows.items(), key=lambda kv: _row_sort(*kv)):
        r0 = next(iter(row.values()))
        if not _is_fp16(r0) and plot_label(r0) not in methods:
            methods.append(plot_label(r0))
    fig, axes = plt.subplots(1, len(datasets), squeeze=False,
                             figsize=(max(5.0, 0.3 * len(rows) + 0.8 * len(tags)) * len(datasets), 4.8))
    colors = dict(zip(methods, _bar_colors(max(1, len(methods)))))
    for ax, (ds, ds_label) in zip(axes[0], datasets):
        fp16 = [r for r in recs if _is_fp16(r) and r.get("dataset") == ds]
        ymax, ymin = 0.0, float("inf")
        for ti, tag in enumerate(tags):
            # the bars present in this bit setting, centred on its tick, one colour per method
            here = sorted((row[ds] for row in rows.values() if ds in row and not _is_fp16(row[ds])
                           and _bits(row[ds]) == tag and _num(row[ds].get("ppl"))),
                          key=lambda r: methods.index(plot_label(r)))
            width = 0.8 / max(1, len(here)) if len(here) > 1 else 0.4
            for k, r in enumerate(here):
                x = ti - width * (len(here) - 1) / 2 + width * k
                y = float(r["ppl"])
                ymax, ymin = max(ymax, y), min(ymin, y)
                ax.bar([x], [y], width=width, color=colors[plot_label(r)], label=plot_label(r))
                ax.annotate(_fmt_ppl(y), (x, y), ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(here) > 2 else 0, xytext=(0, 2), textcoords="offset points")
        if fp16 and _num(fp16[0].get("ppl")):
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
    return _save_fig(fig, out_dir / f"ppl_{_slug(_model_name(model))}_seqlen{seqlen}.png")


def _plot_zeroshot(plt, model, limit, recs, out_dir) -> Path:
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
                                             "acc: LAMBADA/WinoGrande"), ha="center", va="top", fontsize=7, wrap=True)
    lim_slug = "full" if limit is None else _slug(limit)
    return _save_fig(fig, out_dir / f"zeroshot_{_slug(_model_name(model))}_limit-{lim_slug}.png")


def _plot_ablation(plt, records, model, seqlen, rows, out_dir) -> Path | None:
    """WikiText-2 perplexity per ablation row (log scale), with the FP16 and full-recipe levels as lines."""
    ds, ds_label = DATASETS[0]
    rows = [(label, row[ds]) for label, row in sorted(rows.items(), key=lambda kv: _ablation_key(kv[0]))
            if ds in row and _num(row[ds].get("ppl"))]
    if not rows:
        return None
    recs = [r for _, r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2.5), 4.4))
    ys = [float(r["ppl"]) for r in recs]
    ax.bar(range(len(rows)), ys, width=0.6, color=_bar_colors(len(rows)))
    for x, y in enumerate(ys):
        ax.annotate(_fmt_ppl(y), (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    refs = [r for r in _ppl_records(records) if str(r.get("model")) == model and r.get("seqlen") == seqlen
            and r.get("dataset") == ds and (_is_fp16(r) or r.get("variant") in MAIN_VARIANTS)]
    for r, style in zip(sorted(refs, key=_method_key), ("--", ":", "-.")):
        lab = "FP16" if _is_fp16(r) else f"{_method_label(r)}, {MAIN_VARIANTS[r['variant']]}"
        ax.axhline(float(r["ppl"]), color="black", ls=style, lw=1, label=f"{lab} = {_fmt_ppl(r['ppl'])}")
    lo, hi = min(ys + [float(r["ppl"]) for r in refs]), max(ys)
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.5, hi * 3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label for label, _ in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(f"{ds_label} perplexity (log scale)")
    ax.grid(axis="y", alpha=0.3)
    if refs:
        ax.legend(fontsize=8, loc="upper right")
    calib = _distinct_calib([r for r in recs if r.get("calib")], False)
    fig.suptitle(f"Ablation - {_model_name(model)} {_bits(recs[0])}, {ds_label}, seqlen {seqlen}", fontsize=11)
    ax.set_title(f"reduced recipe: {calib.replace('`', '')}", fontsize=8)
    fig.text(0.5, -0.02, _plot_caption(recs + refs, DATASET_NOTES.get(ds, ds)), ha="center", va="top", fontsize=7,
             wrap=True)
    return _save_fig(fig, out_dir / f"ablation_{_slug(_model_name(model))}_seqlen{seqlen}.png")


def make_plots(records: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG figures: perplexity per method and bit setting (log scale), zero-shot accuracy per task, the
    ablation, and the W4A4 linear speedup (flatquant.report_kernels)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .report_kernels import kernel_plots

    out_dir = Path(out_dir)
    paths: list[Path] = []
    figures = [lambda k=k, rows=rows: _plot_ppl(plt, *k, rows, out_dir)
               for k, rows in sorted(_ppl_groups(records).items(), key=_group_sort)]
    figures += [lambda k=k, recs=recs: _plot_zeroshot(plt, *k, recs, out_dir)
                for k, recs in sorted(_zs_groups(records).items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]
    groups = _variant_groups(records, _is_ablation, lambda r: str(r["variant"])[len(ABLATION):])
    figures += [lambda k=k, rows=rows: _plot_ablation(plt, records, *k, rows, out_dir)
                for k, rows in sorted(groups.items(), key=_group_sort)]
    for make in figures:
        path = make()
        plt.close("all")
        if path is not None:
            paths.append(path)
    paths += kernel_plots([r for r in records if r.get("kind") == KERNEL_KIND], out_dir)
    return paths


# --------------------------------------------------------------------------------------------- entry
def load_all(results_dir: str | Path = "results") -> list[dict]:
    """The result records (one JSON object per file) and the entries of the kernel-benchmark files (a JSON
    list per file, e.g. results/kernels/*.json), the latter tagged kind "kernel_bench" with their ``_path``."""
    records = load_records(results_dir)
    for p in sorted(Path(results_dir).rglob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, list):
            records += [{"kind": KERNEL_KIND, **e, "_path": str(p)} for e in data if isinstance(e, dict)]
    return records


def write_report(results_dir: str | Path = "results", out_md: str | Path = "docs/RESULTS.md",
                 plots_dir: str | Path = "docs/plots") -> list[Path]:
    """Read every record under ``results_dir``, write the plots and then the markdown (atomically).
    Returns the plot paths (the markdown is at ``out_md``)."""
    records = load_all(results_dir)
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
