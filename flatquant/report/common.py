"""What the report modules share (flatquant.report.document, report_tables, report_plots, report_kernels): the
display constants, the formatters, the record grouping and sort orders, and the figure helpers."""
from __future__ import annotations

import math
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

METHOD_NAMES = {"fp16": "FP16", "rtn": "RTN", "smoothquant": "SmoothQuant", "quarot": "QuaRot",
                "flatquant": "FlatQuant", "gptq": "GPTQ", "spinquant": "SpinQuant"}
METHOD_ORDER = ["fp16", "rtn", "smoothquant", "gptq", "quarot", "spinquant", "flatquant"]
WQ_ORDER = ["rtn", "gptq"]  # within a bit setting: the RTN rows, then the GPTQ rows (the paper's Table 1/2)
BITS_ORDER = ["W16A16KV16", "W4A16KV16", "W3A16KV16", "W16A4KV16", "W16A16KV4", "W16A16KV3",
              "W4A4KV16", "W4A4KV4", "W4A8KV8", "W8A8KV8", "W4A4KV8"]
DATASETS = [("wikitext2", "WikiText-2"), ("c4", "C4 (proxy)")]
DATASET_NOTES = {"wikitext2": "WikiText-2 raw test", "c4": "C4 validation proxy (first 1,100 docs, 256 windows)"}
TASKS = [("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"), ("hellaswag", "HellaSwag"),
         ("lambada_openai", "LAMBADA"), ("piqa", "PIQA"), ("winogrande", "WinoGrande")]
# variants shown as the method's main row (Table 1), with what they stand for
MAIN_VARIANTS = {"paper-recipe": "full paper recipe"}
ABLATION, RECIPE = "ablation:", "recipe:"
ABLATION_ORDER = ["RTN", "+LT", "+LT+PS", "+LT+LCT", "+LT+PS+LCT"]
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


SETTING_FIELDS = ("k_bits", "v_bits", "w_group_size", "w_asym", "kv_group_size", "mixed", "trained_bits")


def _kv_pair(r: dict) -> tuple:
    """(K bits, V bits): records without them quantize both at kv_bits."""
    kv = r.get("kv_bits", 16)
    return (r.get("k_bits") or kv, r.get("v_bits") or kv)


def _trained_tag(r: dict) -> str | None:
    """The bit setting the parameters were trained at ('W4A4KV4'), from a string or a dict; None if not recorded."""
    t = r.get("trained_bits")
    if isinstance(t, (list, tuple)) and len(t) == 3:  # (w, a, kv)
        t = dict(zip(("w_bits", "a_bits", "kv_bits"), t))
    if isinstance(t, dict):
        return _bits(t) if _bits(t) != "-" else None
    return str(t) if t else None


def _is_setting(r: dict) -> bool:
    """A record of the paper's other settings (Tables 11-15: groups, K != V bits, per-layer mixed precision,
    parameters trained at other bits): kept out of the Table 1/2 layouts, which cannot tell them apart."""
    return bool(r.get("w_group_size") or r.get("kv_group_size") or r.get("mixed")
                or len(set(_kv_pair(r))) > 1 or (_trained_tag(r) not in (None, _bits(r))))


def _setting_key(r: dict) -> tuple:
    """The Tables 11-15 settings of a record, with absent fields as their defaults (old records compare equal)."""
    trained = _trained_tag(r)
    return (_kv_pair(r), r.get("w_group_size") or None, bool(r.get("w_asym")), r.get("kv_group_size") or None,
            str(r.get("mixed") or ""), None if trained == _bits(r) else trained)


def _is_base(r: dict) -> bool:
    return _is_main(r) and not _is_setting(r)


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


def _wq_suffix(r: dict) -> str:
    """' (GPTQ)' where the weight quantizer is not the default RTN: labels that have no W-quantizer column."""
    return "" if _wq_label(r) in ("-", "RTN") else f" ({_wq_label(r)})"


def _method_wq_label(r: dict) -> str:
    """'FlatQuant (GPTQ)', 'QuaRot', 'FlatQuant [seed-1]': method, variant and a non-RTN weight quantizer."""
    return _method_label(r) + _wq_suffix(r)


def _is_gptq(r: dict) -> bool:
    return _wq_label(r) == "GPTQ"


def _wq_key(r: dict):
    wq = "-" if _wq_label(r) == "-" else str(r.get("weight_quantizer") or "rtn").lower()
    return (WQ_ORDER.index(wq) if wq in WQ_ORDER else (-1 if wq == "-" else len(WQ_ORDER)), wq)


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


def _commands(records) -> str:
    """The distinct commands of the records, escaped for a table cell ("-" if none)."""
    return _distinct([r for r in records if r.get("command")], "command").replace("|", "\\|")


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
    """One record per configuration: the one over the most windows, then the newest by date - a re-run
    replaces the older number, but a run capped to fewer windows never hides a full one."""
    best: dict = {}
    for r in records:
        key = (r.get("kind"), r.get("model"), r.get("method"), _bits(r), r.get("weight_quantizer"),
               r.get("variant"), r.get("dataset"), r.get("seqlen"), r.get("limit"),
               _setting_key(r))
        rank = (r.get("windows") if isinstance(r.get("windows"), int) else 0, str(r.get("date", "")))
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, r)
    best = {k: r for k, (_, r) in best.items()}
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
def _ppl_records(records, select=_is_base):
    return _latest([r for r in records if r.get("kind", "ppl") == "ppl" and "ppl" in r and select(r)])


def _row_key(r):
    """A Table 1 row: bit setting, method, weight quantizer (not for FP16) and variant."""
    return (_bits(r), r.get("method"), r.get("weight_quantizer") if not _is_fp16(r) else None, r.get("variant"))


def _variant_groups(records, select, label):
    """{(model, seqlen): {row label: {dataset: record}}} for the ppl records that `select` picks."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for r in _ppl_records(records, select):
        groups[(str(r.get("model")), r.get("seqlen"))][label(r)][str(r.get("dataset"))] = r
    return groups


def _ppl_groups(records):
    """{(model, seqlen): {row_key: {dataset: record}}} for the Table 1 rows (kind == 'ppl', main variants)."""
    return _variant_groups(records, _is_base, _row_key)


def _ablation_groups(records):
    """{(model, seqlen): {ablation row ('+LT', ...): {dataset: record}}}."""
    return _variant_groups(records, _is_ablation, lambda r: str(r["variant"])[len(ABLATION):] + _wq_suffix(r))


def _row_records(rows: dict) -> list[dict]:
    """The records of a group's rows ({row: {dataset: record}})."""
    return [r for row in rows.values() for r in row.values()]


def _is_ablation(r):
    return str(r.get("variant") or "").startswith(ABLATION)


def _is_recipe(r):
    return str(r.get("variant") or "").startswith(RECIPE)


def _is_other_variant(r):
    return not _is_main(r) and not _is_ablation(r) and not _is_recipe(r) and not _is_setting(r)


def _ablation_key(label: str):
    return (ABLATION_ORDER.index(label), "") if label in ABLATION_ORDER else (len(ABLATION_ORDER), label)


def _rec_sort(r):
    """FP16 first, then by bit setting, weight quantizer (RTN rows before GPTQ rows) and method."""
    return (0 if _is_fp16(r) else 1, _bits_key(_bits(r)), _wq_key(r), _method_key(r))


def _row_sort(row_key, row):
    return _rec_sort(next(iter(row.values())))


def _group_sort(kv):
    return (kv[0][0], kv[0][1] or 0)


def _zs_groups(records) -> list:
    """[((model, limit), records)] of the zero-shot records, sorted by model and limit, each group's records
    by _rec_sort."""
    groups: dict = defaultdict(list)
    for r in _latest([r for r in records if r.get("kind") == "zeroshot" and not _is_setting(r)]):
        groups[(str(r.get("model")), r.get("limit"))].append(r)
    return [(k, sorted(recs, key=_rec_sort))
            for k, recs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]


def _zs_tasks(recs) -> list[tuple[str, str]]:
    """(task, label) of the tasks the records score: the paper's in its order, then any others by name."""
    present = [(t, label) for t, label in TASKS if any(t in (r.get("tasks") or {}) for r in recs)]
    return present + [(t, t) for t in sorted({t for r in recs for t in (r.get("tasks") or {})} - {t for t, _ in TASKS})]


def _present_datasets(recs) -> list[tuple[str, str]]:
    """(dataset, label) of DATASETS that the records cover."""
    return [(ds, label) for ds, label in DATASETS if any(r.get("dataset") == ds for r in recs)]


def _full_windows(recs) -> dict:
    return {ds: max([r.get("windows") or 0 for r in recs if r.get("dataset") == ds], default=0) for ds, _ in DATASETS}


# --------------------------------------------------------------------------------------------- figures
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

