"""The paper's other settings (Tables 11-15) from the ppl and zero-shot records, in the paper's layouts
(part of flatquant.report.document). Only what records exist is rendered; a missing cell shows "-".

* Table 11 (weight-only): W4A16 / W3A16 x RTN, GPTQ, GPTQ-g<group>, QuaRot, FlatQuant-RTN, FlatQuant-GPTQ.
* Table 12 (KV-only, per method): K bits x V bits, WikiText-2, C4 and zero-shot; Table 13: method x K/V bits,
  WikiText-2 of every model.
* Table 14 (W3A3KV3, next to W4A4KV4): QuaRot vs FlatQuant, perplexity and zero-shot.
* Table 15 (train once): parameters trained at W4A4KV4, evaluated at W4 / A4 / KV4 alone and together.

Records lacking the newer fields take their defaults (k_bits = v_bits = kv_bits, no groups, trained at the
evaluated bits). As in Table 1, a perplexity over fewer windows than the rest of its column is marked
"(n=...)", a zero-shot score with another lm-eval limit than the rest of its table "(limit ...)", and each
caption names the devices and commits of its cells.
"""
from __future__ import annotations

from collections import defaultdict

from flatquant.report.common import (
    DATASETS,
    MAIN_VARIANTS,
    METHOD_NAMES,
    METHOD_ORDER,
    TASKS,
    _bits,
    _caption,
    _distinct,
    _fmt_ppl,
    _full_windows,
    _is_fp16,
    _kv_pair,
    _latest,
    _model_name,
    _setting_key,
    _table,
    _trained_tag,
)

KV_CHOICES = (4, 3, 2)
TABLE15 = "W4A4KV4"


def _ppl(records):
    return _latest([r for r in records if r.get("kind", "ppl") == "ppl" and "ppl" in r])


def _zs(records):
    return _latest([r for r in records if r.get("kind") == "zeroshot"])


def _main_run(r) -> bool:
    return not r.get("variant") or r.get("variant") in MAIN_VARIANTS


def _plain_eval(r) -> bool:
    """Evaluated with the bits it was trained at (or untrained), one bit width per tensor kind, no mixing."""
    trained = _setting_key(r)[5]
    return trained is None and not r.get("mixed")


def _wq(r) -> str:
    return str(r.get("weight_quantizer") or "rtn").lower()


def _group_txt(r) -> str:
    g = r.get("w_group_size")
    return (f"-g{g}" if g else "") + (" asym" if r.get("w_asym") else "")


def _variant_txt(r) -> str:
    v = r.get("variant")
    return f" [{v}]" if v and v != "paper-recipe" else ""


def _weight_only_label(r) -> str:
    m = str(r.get("method", "?")).lower()
    if _is_fp16(r):
        return "FP16"
    if m in ("rtn", "gptq"):
        base = "GPTQ" if _wq(r) == "gptq" else "RTN"
    elif m == "flatquant":
        base = f"FlatQuant-{_wq(r).upper()}"
    else:
        base = METHOD_NAMES.get(m, m) + ("-GPTQ" if _wq(r) == "gptq" else "")
    return base + _group_txt(r) + _variant_txt(r)


def _label_key(r):
    m = str(r.get("method", "")).lower()
    m = "rtn" if m == "gptq" else m
    return (0 if _is_fp16(r) else 1, METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m,
            _wq(r) == "gptq", r.get("w_group_size") or 0, bool(r.get("w_asym")), str(r.get("variant") or ""))


def _ppl_cell(r, full: dict) -> str:
    if r is None:
        return "-"
    s = _fmt_ppl(r.get("ppl"))
    if full.get(r.get("dataset")) and r.get("windows") and r["windows"] < full[r.get("dataset")]:
        s += f" (n={r['windows']})"
    return s


def _zs_cells(r, tasks, limits: set) -> list[str]:
    """The task scores and average of a zero-shot record ("-" where absent); a limit unlike the table's
    others is marked on the average."""
    if r is None:
        return ["-"] * (len(tasks) + 1)
    cells = [f"{float(r['tasks'][t]['value']):.2f}" if (r.get("tasks") or {}).get(t) else "-" for t, _ in tasks]
    avg = r.get("average")
    cell = f"{float(avg):.2f}" if isinstance(avg, (int, float)) else "-"
    if len(limits) > 1 and cell != "-":
        cell += f" (limit {r.get('limit') if r.get('limit') is not None else 'none'})"
    return cells + [cell]


def _present_tasks(zs) -> list:
    return [(t, lab) for t, lab in TASKS if any(t in (r.get("tasks") or {}) for r in zs)]


def _by_model(records) -> dict:
    """{(model, seqlen): (ppl records, zero-shot records of that model)}."""
    ppl, zs = defaultdict(list), defaultdict(list)
    for r in _ppl(records):
        ppl[(str(r.get("model")), r.get("seqlen"))].append(r)
    for r in _zs(records):
        zs[str(r.get("model"))].append(r)
    keys = set(ppl) | {(m, None) for m in zs if not any(k[0] == m for k in ppl)}
    return {k: (ppl.get(k, []), zs.get(k[0], [])) for k in sorted(keys, key=lambda k: (k[0], k[1] or 0))}


def _heading(title, model, seqlen) -> str:
    return f"### {title} - {_model_name(model)}" + (f", seqlen {seqlen}" if seqlen else "")


def _captions(recs, zs_recs=()) -> str:
    extra = []
    windows = {lab: w for (ds, lab), w in zip(DATASETS, _full_windows(recs).values()) if w}
    if windows:
        extra.append("windows: " + ", ".join(f"{k} {v}" for k, v in windows.items()))
    if zs_recs:
        extra.append(f"lm-eval limit: {_distinct(zs_recs, 'limit', lambda v: 'none' if v is None else str(v))}")
    return _caption(list(recs) + list(zs_recs), "; ".join(extra))


# --------------------------------------------------------------------------------------------- Table 11
def weight_only_section(records) -> list[str]:
    out = []
    for (model, seqlen), (ppl, _) in _by_model(records).items():
        recs = [r for r in ppl if r.get("a_bits") == 16 and _kv_pair(r) == (16, 16) and _plain_eval(r)
                and (_is_fp16(r) or r.get("w_bits", 16) < 16)]
        if not any(not _is_fp16(r) for r in recs):
            continue
        wbits = sorted({r["w_bits"] for r in recs if not _is_fp16(r)}, reverse=True)
        rows: dict = defaultdict(dict)
        for r in recs:
            rows[_weight_only_label(r)][(16 if _is_fp16(r) else r["w_bits"], r.get("dataset"))] = r
        full = _full_windows(recs)
        body = []
        for label, row in sorted(rows.items(), key=lambda kv: _label_key(next(iter(kv[1].values())))):
            cells = [label]
            for ds, _ in DATASETS:
                for w in wbits:
                    r = row.get((w, ds)) or (row.get((16, ds)) if label == "FP16" else None)
                    cells.append(_ppl_cell(r, full))
            body.append(cells)
        header = ["Method"] + [f"{lab} W{w}A16" for _, lab in DATASETS for w in wbits]
        out += [_heading("Weight-only quantization (Table 11 layout)", model, seqlen), "",
                _table(header, body, ["l"] + ["r"] * (len(header) - 1)), "",
                "Perplexity, lower is better; activations and KV cache in 16 bits. " + _captions(recs), ""]
    return (["## Weight-only quantization (Table 11 layout)", ""] + out) if out else []


# --------------------------------------------------------------------------------------------- Tables 12, 13
def _kv_only(r) -> bool:
    return r.get("w_bits") == 16 and r.get("a_bits") == 16 and _plain_eval(r)


def kv_section(records) -> list[str]:
    out, t13 = [], defaultdict(dict)
    for (model, seqlen), (ppl, zs) in _by_model(records).items():
        recs, zrecs = [r for r in ppl if _kv_only(r)], [r for r in zs if _kv_only(r)]
        tasks = _present_tasks(zrecs)
        limits = {r.get("limit") for r in zrecs}
        for method in ("quarot", "flatquant"):
            mine = [r for r in recs if r.get("method") == method and _kv_pair(r) != (16, 16)]
            zmine = [r for r in zrecs if r.get("method") == method and _kv_pair(r) != (16, 16)]
            if not mine and not zmine:
                continue
            fp = [r for r in recs if _is_fp16(r)]
            zfp = [r for r in zrecs if _is_fp16(r)]
            pairs = [(16, 16)] + [(k, v) for k in KV_CHOICES for v in KV_CHOICES]
            pairs += sorted({_kv_pair(r) for r in mine + zmine} - set(pairs), reverse=True)
            full = _full_windows(recs)
            body = []
            for k, v in pairs:
                src, zsrc = (fp, zfp) if (k, v) == (16, 16) else (mine, zmine)
                cell = {r.get("dataset"): r for r in src if _kv_pair(r) == (k, v) or (k, v) == (16, 16)}
                z = next((r for r in zsrc if _kv_pair(r) == (k, v) or (k, v) == (16, 16)), None)
                if not cell and z is None:
                    continue
                body.append([str(k), str(v)] + [_ppl_cell(cell.get(ds), full) for ds, _ in DATASETS]
                            + (_zs_cells(z, tasks, limits) if zrecs else []))
                if seqlen and cell.get("wikitext2") is not None:
                    t13[("fp16" if (k, v) == (16, 16) else method, k, v)][_model_name(model)] = cell["wikitext2"]
            header = ["K bits", "V bits"] + [lab for _, lab in DATASETS] + \
                ([lab for _, lab in tasks] + ["Avg"] if zrecs else [])
            used = mine + zmine + fp + zfp
            groups = _distinct(mine + zmine, "kv_group_size", lambda g: f"groups of {g}" if g else "per head")
            out += [_heading(f"KV-cache-only quantization, {METHOD_NAMES[method]} (Table 12 layout)", model, seqlen),
                    "", _table(header, body, ["r", "r"] + ["r"] * (len(header) - 2)), "",
                    f"Weights and activations in 16 bits; keys and values asymmetric, {groups}. "
                    + _captions([r for r in used if r.get("kind", "ppl") == "ppl"],
                                [r for r in used if r.get("kind") == "zeroshot"]), ""]
    if t13:
        models = sorted({m for row in t13.values() for m in row})
        most = {mod: max((row[mod].get("windows") or 0) for row in t13.values() if mod in row) for mod in models}
        rank = {"fp16": 0, "quarot": 1}
        body = [[METHOD_NAMES[m], str(k), str(v)]
                + [_ppl_cell(row.get(mod), {"wikitext2": most[mod]}) for mod in models]
                for (m, k, v), row in sorted(t13.items(), key=lambda kv: (rank.get(kv[0][0], 2), -kv[0][1], -kv[0][2]))]
        recs = [r for row in t13.values() for r in row.values()]
        out += ["### KV-cache-only quantization across models (Table 13 layout)", "",
                _table(["Method", "K bits", "V bits"] + models, body, ["l", "r", "r"] + ["r"] * len(models)), "",
                f"WikiText-2 perplexity; windows: {_distinct(recs, 'windows')}. " + _caption(recs), ""]
    return (["## KV-cache-only quantization (Tables 12 and 13 layout)", ""] + out) if out else []


# --------------------------------------------------------------------------------------------- Table 14
def low_bit_section(records) -> list[str]:
    out = []
    for (model, seqlen), (ppl, zs) in _by_model(records).items():
        def pick(r):
            return _plain_eval(r) and _main_run(r) and (_is_fp16(r) or (r.get("method") in ("quarot", "flatquant")
                                                       and _bits(r) in ("W4A4KV4", "W3A3KV3")))
        recs, zrecs = [r for r in ppl if pick(r)], [r for r in zs if pick(r)]
        if not any(_bits(r) == "W3A3KV3" for r in recs + zrecs):
            continue
        tasks, limits = _present_tasks(zrecs), {r.get("limit") for r in zrecs}
        rows: dict = defaultdict(lambda: ({}, None))
        for r in recs + zrecs:
            label = "FP16" if _is_fp16(r) else f"{METHOD_NAMES[r['method']]}-{_bits(r)}" + \
                ("" if _wq(r) == "rtn" else f" ({_wq(r).upper()})") + _variant_txt(r)
            cells, z = rows[label]
            if r.get("kind") == "zeroshot":
                rows[label] = (cells, r)
            else:
                cells[r.get("dataset")] = r
        order = {"FP16": 0}
        full = _full_windows(recs)
        body = []
        for label, (cells, z) in sorted(rows.items(), key=lambda kv: (order.get(kv[0], 1), "W3" in kv[0],
                                                                      "FlatQuant" in kv[0], kv[0])):
            body.append([label] + [_ppl_cell(cells.get(ds), full) for ds, _ in DATASETS]
                        + (_zs_cells(z, tasks, limits) if zrecs else []))
        header = ["Method"] + [lab for _, lab in DATASETS] + ([lab for _, lab in tasks] + ["Avg"] if zrecs else [])
        out += [_heading("Extreme low-bit quantization (Table 14 layout)", model, seqlen), "",
                _table(header, body, ["l"] + ["r"] * (len(header) - 1)), "",
                "Perplexity (lower is better) and zero-shot accuracy in % (higher is better). "
                + _captions(recs, zrecs), ""]
    return (["## Extreme low-bit quantization (Table 14 layout)", ""] + out) if out else []


# --------------------------------------------------------------------------------------------- Table 15
def _parts(r) -> tuple[bool, bool, bool]:
    k, v = _kv_pair(r)
    return r.get("w_bits", 16) < 16, r.get("a_bits", 16) < 16, min(k, v) < 16


def train_once_section(records) -> list[str]:
    out = []
    for (model, seqlen), (ppl, zs) in _by_model(records).items():
        def pick(r):
            if _is_fp16(r):
                return _plain_eval(r)
            tag = _trained_tag(r)
            return r.get("method") == "flatquant" and not r.get("mixed") and _main_run(r) and (
                tag == TABLE15 or (tag in (None, _bits(r)) and _bits(r) == TABLE15))
        recs, zrecs = [r for r in ppl if pick(r)], [r for r in zs if pick(r)]
        if not any(_trained_tag(r) == TABLE15 and _bits(r) != TABLE15 for r in recs + zrecs):
            continue
        rows: dict = defaultdict(lambda: [{}, None])
        for r in recs + zrecs:
            key = (_parts(r), _bits(r), _wq(r), _variant_txt(r))
            if r.get("kind") == "zeroshot":
                rows[key][1] = r
            else:
                rows[key][0][r.get("dataset")] = r
        full, limits = _full_windows(recs), {r.get("limit") for r in zrecs}
        body = []
        for (parts, bits, wq, var), (cells, z) in sorted(rows.items(), key=lambda kv: (sum(kv[0][0]), kv[0][0][::-1],
                                                                                      kv[0][1:])):
            ticks = ["✓" if p else "" for p in parts]
            avg = _zs_cells(z, [], limits)[-1] if zrecs else None
            body.append(ticks + [f"{bits}" + ("" if wq == "rtn" else f" ({wq.upper()})") + var]
                        + [_ppl_cell(cells.get(ds), full) for ds, _ in DATASETS] + ([avg] if zrecs else []))
        header = ["W4", "A4", "KV4", "Evaluated at"] + [f"{lab} PPL" for _, lab in DATASETS] + \
            (["QA Acc"] if zrecs else [])
        out += [_heading("Train once, evaluate elsewhere (Table 15 layout)", model, seqlen), "",
                _table(header, body, ["c", "c", "c", "l"] + ["r"] * (len(header) - 4)), "",
                ("FlatQuant transforms trained at W4A4KV4, evaluated with only the ticked parts quantized (the row "
                 "without ticks: FP16). QA Acc: the zero-shot average. ") + _captions(recs, zrecs), ""]
    return (["## Train once, evaluate elsewhere (Table 15 layout)", ""] + out) if out else []


def settings_sections(records) -> list[str]:
    return weight_only_section(records) + kv_section(records) + low_bit_section(records) + train_once_section(records)
