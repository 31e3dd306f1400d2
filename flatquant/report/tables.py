"""The accuracy tables of docs/RESULTS.md (part of flatquant.report.document), one function per section:

* ppl_section: Table 1 layout - perplexity per bit setting and method, WikiText-2 and C4 (proxy), one table
  per (model, seqlen); only the base rows (no variant, or the main run: variant "paper-recipe").
* zeroshot_section: Table 2 layout - ARC-C, ARC-E, HellaSwag, LAMBADA, PIQA, WinoGrande, Avg.
* ablation_section (variants "ablation:<row>"): Table 3 layout - LT / PS / LCT, WikiText-2, C4.
* recipe_section (variants "recipe:<name>"): Table 4 layout - ppl, calibration time, peak GPU memory.
* other_variants_section: every other variant, so nothing is silently dropped.
* calib_cost_section (kind "calib_cost", benchmarks/bench_calib_layer.py): one compact table.
"""
from __future__ import annotations

import re

from flatquant.report.common import (
    DATASET_NOTES,
    DATASETS,
    MAIN_VARIANTS,
    RECIPE,
    _ablation_groups,
    _ablation_key,
    _bits,
    _calib_txt,
    _caption,
    _distinct,
    _distinct_calib,
    _fmt_mib,
    _fmt_ppl,
    _fmt_scalar,
    _fmt_seconds,
    _full_windows,
    _group_sort,
    _is_fp16,
    _is_gptq,
    _is_other_variant,
    _is_recipe,
    _method_key,
    _method_label,
    _method_wq_label,
    _model_name,
    _num,
    _ppl_groups,
    _ppl_records,
    _present_datasets,
    _row_records,
    _row_sort,
    _table,
    _variant_groups,
    _wq_key,
    _wq_label,
    _wq_suffix,
    _zs_groups,
    _zs_tasks,
)

ABLATION_FLAGS = [("lt", "LT"), ("ps", "PS"), ("lct", "LCT")]
SECTIONS = {  # heading and introduction of each section with one table per (model, seqlen)
    "ppl": ("Perplexity (Table 1 layout)",
         "Lower is better. Non-overlapping windows of `seqlen` tokens (GPTQ/QuaRot/FlatQuant protocol). "
         "**Bold**: best in its bit setting. A value marked with `(n=...)` used fewer windows than the "
         "rest of its column."),
    "ablation": ("Ablation (Table 3 layout)",
         "Perplexity (lower is better) as FlatQuant's components are added to RTN W4A4KV4: LT = learnable "
         "Kronecker transforms, PS = per-channel scaling, LCT = learnable clipping thresholds. **Bold**: best "
         "in its column."),
    "recipe": ("Training recipes (Table 4 layout)",
         "FlatQuant W4A4KV4 calibrated with each training recipe: perplexity, calibration time and peak GPU "
         "memory (largest CUDA allocation over the run: calibration and evaluation)."),
}
RECIPE_NOTES = {"svd-amp": "SVD-form transforms (Cayley-orthogonal factors), bf16 mixed precision",
                "direct-fp32": "full matrices with an explicit inverse, float32"}


# --------------------------------------------------------------------------------------------- cells
def _section(groups: dict, key: str) -> tuple[list[str], list]:
    """A section's heading and introduction (none when it has no groups), and its groups in table order."""
    title, intro = SECTIONS[key]
    return ([f"## {title}", "", intro, ""] if groups else []), sorted(groups.items(), key=_group_sort)


def _data_txt(recs, seqlen) -> str:
    present = _present_datasets(recs)
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


def _lead_cells(r, last_bits) -> tuple[list[str], str]:
    """The Bits / Method / W quantizer cells of a Table 1 or 2 row (the bit setting only where it changes
    from ``last_bits``) and the row's bit setting."""
    bits = "FP16" if _is_fp16(r) else _bits(r)
    return [f"**{bits}**" if bits != last_bits else "", _method_label(r), _wq_label(r)], bits


# --------------------------------------------------------------------------------------------- sections
def _main_recipe_txt(recs, costs: bool = True) -> str:
    """Caption text for the main-variant rows: what they stand for and (``costs``) calibration time and memory."""
    out, seen = [], set()
    for r in sorted(recs, key=lambda r: (_wq_key(r), _method_key(r), str(r.get("dataset")))):
        v = r.get("variant")
        if v not in MAIN_VARIANTS or (r.get("method"), _wq_label(r), v) in seen:
            continue
        seen.add((r.get("method"), _wq_label(r), v))
        parts = [_calib_txt(r.get("calib"))]
        if costs and _num(r.get("quantize_seconds")):
            parts.append(f"calibration time {_fmt_seconds(r['quantize_seconds'])}")
        if costs and _num(r.get("peak_gpu_mib")):
            parts.append(f"peak GPU memory {_fmt_mib(r['peak_gpu_mib'])}")
        out.append(f"{_method_wq_label(r)} uses the {MAIN_VARIANTS[v]}: " + ", ".join(p for p in parts if p))
    return ". ".join(out)


def ppl_section(records) -> list[str]:
    out, groups = _section(_ppl_groups(records), "ppl")
    for (model, seqlen), rows in groups:
        recs = _row_records(rows)
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
            cells, last_bits = _lead_cells(next(iter(row.values())), last_bits)
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
    recs = _row_records(rows)
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
    """'FlatQuant (full paper recipe) in Table 1: WikiText-2 29.51, C4 (proxy) 36.76' for the caption (the RTN
    row: ablation and recipe rows use RTN weights)."""
    main = [r for r in _ppl_records(records) if r.get("variant") in MAIN_VARIANTS and not _is_gptq(r)
            and str(r.get("model")) == model and r.get("seqlen") == seqlen]
    if not main:
        return "The full-recipe row is in Table 1 (not recorded for this model)."
    vals = ", ".join(f"{label} {_fmt_ppl(r['ppl'])}" for ds, label in DATASETS for r in main if r.get("dataset") == ds)
    calib = main[0].get("calib") or {}
    recipe = (f", {calib.get('nsamples')} × {calib.get('seqlen')}, {calib.get('epochs')} epochs"
              if calib.get("nsamples") else "")
    return f"The full-recipe row ({_method_label(main[0])}{recipe}) is in Table 1: {vals}."


def ablation_section(records) -> list[str]:
    out, groups = _section(_ablation_groups(records), "ablation")
    for (model, seqlen), rows in groups:
        rows = dict(sorted(rows.items(), key=lambda kv: _ablation_key(kv[0])))
        table, recs = _variant_table(rows, flags=True)
        calibrated = [r for r in recs if r.get("calib")]
        out += [f"### {_model_name(model)} - seqlen {seqlen}, {_bits(recs[0])}", "", table, "",
                (f"Reduced recipe: {_distinct_calib(calibrated)} (the RTN row is not calibrated). "
                 f"{_main_ref(records, model, seqlen)} " + _caption(recs, _data_txt(recs, seqlen))), ""]
    return out


def recipe_section(records) -> list[str]:
    groups = _variant_groups(records, _is_recipe, lambda r: str(r["variant"])[len(RECIPE):] + _wq_suffix(r))
    out, groups = _section(groups, "recipe")
    for (model, seqlen), rows in groups:
        recs = _row_records(rows)
        full_windows = _full_windows(recs)
        table_rows = []
        for label, row in sorted(rows.items(), key=lambda kv: ((list(RECIPE_NOTES) + [kv[0]]).index(kv[0]), kv[0])):
            r0 = row.get("wikitext2") or next(iter(row.values()))
            secs = r0.get("calib_seconds", r0.get("quantize_seconds"))
            table_rows.append([f"`{label}`", RECIPE_NOTES.get(label.split(" (")[0], "-")]
                              + [_ppl_cell(row.get(ds), full_windows) for ds, _ in DATASETS]
                              + [_fmt_seconds(secs), _fmt_mib(r0.get("peak_gpu_mib"))])
        header = ["Recipe", "Parameterisation"] + [lab for _, lab in DATASETS] + ["Calibration time", "Peak GPU memory"]
        out += [f"### {_model_name(model)} - seqlen {seqlen}, {_bits(recs[0])}", "",
                _table(header, table_rows, ["l", "l"] + ["r"] * (len(DATASETS) + 2)), "",
                (f"Reduced recipe: {_distinct_calib(recs, False)}. {_main_ref(records, model, seqlen)} "
                 + _caption(recs, _data_txt(recs, seqlen))), ""]
    return out


def other_variants_section(records) -> list[str]:
    groups = _variant_groups(records, _is_other_variant, _method_wq_label)
    out = ["## Other variants", ""] if groups else []
    for (model, seqlen), rows in sorted(groups.items(), key=_group_sort):
        table, recs = _variant_table(dict(sorted(rows.items())))
        out += [f"### {_model_name(model)} - seqlen {seqlen}", "", table, "",
                f"Calibration: {_distinct_calib(recs)}. " + _caption(recs, _data_txt(recs, seqlen)), ""]
    return out


def zeroshot_section(records) -> list[str]:
    groups = _zs_groups(records)
    if not groups:
        return []
    out = ["## Zero-shot accuracy (Table 2 layout)", "",
           ("Accuracy in % (higher is better), lm-eval-harness, 0-shot. acc_norm for ARC-C, ARC-E, HellaSwag "
            "and PIQA; acc for LAMBADA and WinoGrande (as in the paper). Avg is the mean over the tasks shown."), ""]
    for (model, limit), recs in groups:
        present = _zs_tasks(recs)
        rows, last_bits, ns = [], None, {}
        for r in recs:
            cells, last_bits = _lead_cells(r, last_bits)
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


def calib_cost_section(records) -> list[str]:
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

