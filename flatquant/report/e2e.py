"""The end-to-end section of docs/RESULTS.md (records of benchmarks/runtime/bench_e2e.py, kind "e2e"): decode and
prefill time per row and batch, speedups over BF16 and FP8 (the paper's Fig. 4), memory (Tables 20-22), the
computed largest batch, long-context phases, the time per component, and the issue's targets checked against the
records."""
from __future__ import annotations

from pathlib import Path

from flatquant.report.common import _caption, _distinct, _save_fig, _short_commit, _table

KIND = "e2e"
ROW_ORDER = ("bf16", "fp8", "fp8_kv8", "fp8_fused", "fp8_kv8_fused", "int4", "int4_fused", "quarot", "quarot_fused",
             "flatquant", "flatquant_fused", "hf_bf16")
ROW_LABEL = {"bf16": "BF16", "fp8": "FP8 W8A8 (BF16 KV)", "fp8_kv8": "FP8 W8A8 + FP8 KV",
             "fp8_fused": "FP8 W8A8 (BF16 KV), norm/SiLU fused into the quantizer",
             "fp8_kv8_fused": "FP8 W8A8 + FP8 KV, norm/SiLU fused into the quantizer",
             "int4": "INT4 W4A4KV4 (no transforms)", "int4_fused": "INT4 W4A4KV4, fused prologues",
             "quarot": "QuaRot-style W4A4KV4", "quarot_fused": "QuaRot-style W4A4KV4, fused prologues",
             "flatquant": "FlatQuant W4A4KV4", "flatquant_fused": "FlatQuant W4A4KV4, fused prologues",
             "hf_bf16": "HF generate BF16 (reference only)"}
COMPONENTS = ("norm_transform_quant", "gemm", "attention", "other")
GIB = 2 ** 30


def _newest_run(records) -> list[dict]:
    """Per model shape, only the records of its newest run (same commit and command): ratios within one run."""
    newest = {}
    for r in sorted(records, key=lambda r: str(r.get("date", ""))):
        if r.get("model_shape"):
            newest[r["model_shape"]] = (r.get("git_commit"), r.get("command"))
    return [r for r in records if not r.get("model_shape")
            or (r.get("git_commit"), r.get("command")) == newest[r["model_shape"]]]


def _latest(records) -> dict:
    """(shape, row, phase, batch, seqlen, kv_len) -> the newest record of the shape's newest run."""
    out = {}
    for r in sorted(_newest_run(records), key=lambda r: str(r.get("date", ""))):
        out[(r.get("model_shape"), r.get("row"), r.get("phase"), r.get("batch"), r.get("seqlen"), r.get("kv_len"))] = r
    return out


def _rows(recs) -> list[str]:
    present = {r.get("row") for r in recs}
    return [x for x in ROW_ORDER if x in present] + sorted(x for x in present if x not in ROW_ORDER and x)


def _ms(r) -> str:
    if r is None:
        return "-"
    if r.get("oom"):
        return "OOM"
    if r.get("median_ms") is None:
        return "error" if r.get("error") else "-"
    return f"{r['median_ms']:.2f}"


def _speed(num, den) -> float | None:
    if not num or not den or num.get("median_ms") is None or not den.get("median_ms"):
        return None
    return num["median_ms"] / den["median_ms"]


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _phase_tables(shape, recs, latest, phase) -> list[str]:
    sel = [r for r in recs if r.get("phase") == phase]
    if not sel:
        return []
    rows, batches = _rows(sel), sorted({r["batch"] for r in sel})
    seq = sel[0]["seqlen"] if phase == "prefill" else sel[0]["kv_len"]
    key = lambda row, b: (shape, row, phase, b, seq if phase == "prefill" else 1, 0 if phase == "prefill" else seq)
    get = lambda row, b: latest.get(key(row, b))
    what = f"prefill of {seq} tokens" if phase == "prefill" else f"one decode step at KV length {seq}"
    timing = _distinct(sel, "timing").replace("cuda_graph", "CUDA-graph replays")
    floor = ("; × floor = time / (bytes the step reads / measured copy bandwidth)"
             if any(r.get("floor_ratio") for r in sel) else "")
    out = [f"**{shape}: {what}** — median ms ({timing}{floor})", ""]
    head = ["row"] + [f"b={b}" for b in batches]
    body = []
    for row in rows:
        cells = []
        for b in batches:
            r = get(row, b)
            c = _ms(r)
            if r and r.get("floor_ratio"):
                c += f" ({r['floor_ratio']:.2f}× floor)"
            cells.append(c)
        body.append([ROW_LABEL.get(row, row)] + cells)
    out += [_table(head, body), ""]
    for base in ("bf16", "fp8"):
        if base not in rows:
            continue
        body = [[ROW_LABEL.get(row, row)] + [_x(_speed(get(base, b), get(row, b))) for b in batches]
                for row in rows if row != base]
        out += [f"Speedup over {ROW_LABEL[base]} ({phase}, like the paper's Fig. 4):", "", _table(head, body), ""]
    return out


def _memory_tables(shape, recs, latest) -> list[str]:
    out = []
    dec = [r for r in recs if r.get("phase") == "decode" and r.get("median_ms") is not None]
    if dec:
        rows, batches = _rows(dec), sorted({r["batch"] for r in dec})
        body = []
        for row in rows:
            cells = []
            for b in batches:
                r = next((x for x in dec if x["row"] == row and x["batch"] == b), None)
                peak = "-" if r is None or r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f}"
                wk = None if r is None or r.get("kv_cache_bytes") is None else r["weights_bytes"] + r["kv_cache_bytes"]
                cells.append("-" if r is None else f"{peak} / " + ("-" if wk is None else f"{wk / GIB:.1f}"))
            body.append([ROW_LABEL.get(row, row)] + cells)
        out += [f"**{shape}: decode memory (GiB)** — measured peak / weights + KV cache (tensor bytes; the W4 rows' "
                "peak includes the one-byte weight copy the cuBLAS route keeps, `cast_cache_bytes`)", "",
                _table(["row"] + [f"b={b}" for b in batches], body), ""]
    for kv in sorted({r["kv_len"] for r in recs if r.get("phase") == "max_batch"}):
        mb = [r for r in recs if r.get("phase") == "max_batch" and r["kv_len"] == kv]
        body = [[ROW_LABEL.get(r["row"], r["row"]), str(r["batch"]), str(r.get("max_batch_without_cast_cache", "-")),
                 f"{r['per_seq_bytes'] / 2 ** 20:.0f}"] for r in sorted(mb, key=lambda r: _rows(mb).index(r["row"]))]
        out += [f"**{shape}: largest batch at KV length {kv} (computed** from the measured bytes per "
                "sequence and the free GPU memory, not run)", "",
                _table(["row", "max batch", "without the one-byte weight copy", "MiB per sequence"], body), ""]
    lm = [r for r in recs if r.get("phase") == "layer_mem" and r.get("peak_mem_gib") is not None]
    if lm:
        rows, kvs = _rows(lm), sorted({r["kv_len"] for r in lm})
        body = [[ROW_LABEL.get(row, row)] + [
            next((f"{x['peak_mem_gib'] * 1024:.1f}" for x in lm if x["row"] == row and x["kv_len"] == kv), "-")
            for kv in kvs] for row in rows]
        out += [f"**{shape}: one decoder layer's decode memory, batch 1 (MiB; Table 20)** — layer tensor bytes + "
                "measured peak of its KV cache and activations", "", _table(["row"] + [f"KV {k}" for k in kvs], body),
                ""]
    return out


def _long_tables(shape, recs) -> list[str]:
    """prefill_long (columns: prompt length, batch 1) and decode_long (columns: KV length) tables."""
    out = []
    for phase, col, what in (("prefill_long", "seqlen", "long prefill, batch {b}: median ms by prompt length"),
                             ("decode_long", "kv_len", "long-context decode step, batch {b}: median ms by KV length")):
        sel = [r for r in recs if r.get("phase") == phase]
        if not sel:
            continue
        lens, rows = sorted({r[col] for r in sel}), _rows(sel)
        cell = lambda row, n: _ms(next((r for r in sel if r["row"] == row and r[col] == n), None))
        peak = lambda row, n: next((f" ({r['peak_mem_gib']:.1f} GiB)" for r in sel if r["row"] == row
                                    and r[col] == n and r.get("peak_mem_gib") and r.get("median_ms")), "")
        body = [[ROW_LABEL.get(row, row)] + [cell(row, n) + peak(row, n) for n in lens] for row in rows]
        out += [f"**{shape}: {what.format(b=_distinct(sel, 'batch'))}** (peak GPU memory in brackets)", "",
                _table(["row"] + [str(n) for n in lens], body), ""]
    return out


def _component_tables(shape, recs) -> list[str]:
    """Kernel time per step by component (torch.profiler over eager steps) at each profiled point."""
    sel = [r for r in recs if r.get("phase") == "components" and r.get("component_ms")]
    out = []
    for ph, b in sorted({(r.get("of_phase"), r["batch"]) for r in sel}):
        pts = [r for r in sel if r.get("of_phase") == ph and r["batch"] == b]
        body = []
        for row in _rows(pts):
            r = next(x for x in pts if x["row"] == row)
            tot = r.get("kernel_ms_total") or 0.0
            body.append([ROW_LABEL.get(row, row)] + [
                f"{r['component_ms'].get(c, 0.0):.3f} ({100 * r['component_ms'].get(c, 0.0) / tot:.0f}%)" if tot
                else "-" for c in COMPONENTS] + [f"{tot:.3f}", "-" if r.get("host_gap_ms") is None
                                                 else f"{r['host_gap_ms']:.3f}", f"{r['median_ms']:.3f}"])
        where = f"decode b={b}, KV {pts[0]['kv_len']}" if ph == "decode" else f"prefill b={b} × {pts[0]['seqlen']}"
        out += [f"**{shape}: Time per component, {where}** — ms per step ({_distinct(pts, 'time_source')}, eager "
                "steps; top kernels by name in the records' `top_kernels`)", "",
                _table(["row", "norm/SiLU/transform/quantize", "GEMMs", "attention (+KV quantize)", "other kernels",
                        "kernels total", "host gaps", "eager step"], body), ""]
    return out


def targets(records) -> list[dict]:
    """The issue's targets, each {"shape", "target", "value", "goal", "ok", "fields"} (value None: no data)."""
    latest = _latest([r for r in records if r.get("kind") == KIND])
    out = []
    for shape in sorted({k[0] for k in latest if k[0]}):
        g = lambda row, phase, b, s, kv: latest.get((shape, row, phase, b, s, kv))
        dec = lambda row, b=32: next((r for k, r in latest.items() if k[:4] == (shape, row, "decode", b)
                                      and r.get("median_ms") is not None), None)
        pre = {k[3]: r for k, r in latest.items() if k[:3] == (shape, "flatquant", "prefill") and k[3] >= 4}

        def pre_ratio(base, fn=min):
            v = [_speed(latest.get((shape, base, "prefill", b, r["seqlen"], 0)), r) for b, r in pre.items()]
            v = [x for x in v if x is not None]
            return fn(v) if v else None

        def add(target, value, goal, ok, fields):
            out.append({"shape": shape, "target": target, "value": value, "goal": goal,
                        "ok": None if value is None else ok(value), "fields": fields})

        add("decode b=32 KV 2048: FlatQuant vs BF16", _speed(dec("bf16"), dec("flatquant")), ">= 2.5×",
            lambda v: v >= 2.5, "median_ms of phase=decode, batch=32 (bf16 / flatquant)")
        f8 = "fp8_kv8" if dec("fp8_kv8") else "fp8"
        lab = "FP8 W8A8 + FP8 KV" if f8 == "fp8_kv8" else "FP8 W8A8 (BF16 KV here)"
        add(f"decode b=32 KV 2048: FlatQuant vs {lab}", _speed(dec(f8), dec("flatquant")),
            ">= 1.4×", lambda v: v >= 1.4, f"median_ms of phase=decode, batch=32 ({f8} / flatquant)")
        if dec("flatquant_fused"):
            add("decode b=32 KV 2048: FlatQuant with fused prologues vs BF16", _speed(dec("bf16"),
                dec("flatquant_fused")), ">= 2.5×", lambda v: v >= 2.5,
                "median_ms of phase=decode, batch=32 (bf16 / flatquant_fused)")
        add("prefill 2048, batch >= 4: FlatQuant vs BF16 (worst batch)", pre_ratio("bf16"), ">= 1.4×",
            lambda v: v >= 1.4, "median_ms of phase=prefill, batch>=4")
        add("prefill 2048, batch >= 4: FlatQuant vs FP8 (worst batch)", pre_ratio("fp8"), ">= 0.9×",
            lambda v: v >= 0.9, "median_ms of phase=prefill, batch>=4")
        gaps = []
        s_fq, s_i4 = _speed(dec("bf16"), dec("flatquant")), _speed(dec("bf16"), dec("int4"))
        if s_fq is not None and s_i4 is not None:
            gaps.append(s_i4 - s_fq)
        for b, r in pre.items():
            bf, i4 = g("bf16", "prefill", b, r["seqlen"], 0), g("int4", "prefill", b, r["seqlen"], 0)
            s_fq, s_i4 = _speed(bf, r), _speed(bf, i4)
            if s_fq is not None and s_i4 is not None:
                gaps.append(s_i4 - s_fq)
        add("INT4 ceiling minus FlatQuant speedup over BF16 (worst of decode b=32, prefill b>=4)",
            max(gaps) if gaps else None, "<= 0.07×", lambda v: v <= 0.07, "median_ms of rows int4 / flatquant / bf16")
        mem = lambda r: None if r is None else r["weights_bytes"] + r["kv_cache_bytes"]
        m_bf, m_fq = mem(dec("bf16")), mem(dec("flatquant"))
        add("weights + KV memory at decode b=32: BF16 / FlatQuant", m_bf / m_fq if m_bf and m_fq else None,
            ">= 3.3×", lambda v: v >= 3.3, "weights_bytes + kv_cache_bytes of phase=decode, batch=32")
        mb = {r["row"]: r for k, r in latest.items() if k[:3] == (shape, r.get("row"), "max_batch") and k[5] == 2048}
        ratio = (mb["flatquant"]["batch"] / mb["bf16"]["batch"] if "flatquant" in mb and "bf16" in mb
                 and mb["bf16"]["batch"] else None)
        add("largest batch at KV 2048 (computed): FlatQuant / BF16", ratio, ">= 3.5×", lambda v: v >= 3.5,
            "batch of phase=max_batch")
        bf = dec("bf16")
        add("baseline: BF16 decode b=32 time / bytes-read floor", bf.get("floor_ratio") if bf else None, "<= 1.4",
            lambda v: v <= 1.4, "floor_ratio of phase=decode, row=bf16, batch=32")
        f4 = [_speed(latest.get((shape, "bf16", "prefill", 4, s, 0)), latest.get((shape, "fp8", "prefill", 4, s, 0)))
              for s in {k[4] for k in latest if k[:4] == (shape, "fp8", "prefill", 4)}]
        add("baseline: FP8 vs BF16 prefill b=4", f4[0] if f4 and f4[0] is not None else None, ">= 1.3×",
            lambda v: v >= 1.3, "median_ms of phase=prefill, batch=4 (bf16 / fp8)")
    return out


def e2e_section(records: list[dict]) -> list[str]:
    """Markdown lines of the end-to-end section (empty without e2e records)."""
    every = [r for r in records if r.get("kind") == KIND and r.get("phase") != "setup"]
    if not every:
        return []
    recs = _newest_run(every)
    earlier = sorted({(r.get("model_shape"), str(r.get("git_commit"))[:10]) for r in every} -
                     {(r.get("model_shape"), str(r.get("git_commit"))[:10]) for r in recs})
    latest = _latest(recs)
    cur = list(latest.values())
    out = ["## End-to-end speed and memory", "",
           "Random-weight models of real shapes in one runtime (static KV cache, CUDA-graph decode; "
           "`benchmarks/runtime/bench_e2e.py`, method in docs/E2E.md).", ""]
    for shape in sorted({r.get("model_shape") for r in cur if r.get("model_shape")}):
        sr = [r for r in cur if r.get("model_shape") == shape]
        out += [f"### {shape}", ""]
        out += _phase_tables(shape, sr, latest, "decode")
        out += _phase_tables(shape, sr, latest, "prefill")
        out += _memory_tables(shape, sr, latest)
        out += _long_tables(shape, sr)
        out += _component_tables(shape, sr)
    t = targets(records)
    if t:
        body = [[x["shape"], x["target"], "-" if x["value"] is None else f"{x['value']:.2f}", x["goal"],
                 {True: "met", False: "not met", None: "no data"}[x["ok"]], x["fields"]] for x in t]
        out += ["### Targets (issue 24)", "", _table(["shape", "target", "value", "goal", "status", "from"], body), ""]
    setup = [r for r in records if r.get("kind") == KIND and r.get("phase") == "setup"]
    extra = "; ".join(f"copy bandwidth {r['copy_gbps']:.0f} GB/s on {r.get('device', '?')}" for r in setup[-1:]
                      if r.get("copy_gbps"))
    out += [_caption(cur, extra), ""]
    if earlier:
        out += ["Earlier runs, not shown (their records stay in results/): "
                + ", ".join(f"{shape} at {commit}" for shape, commit in earlier) + ".", ""]
    return out


def e2e_plots(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Speedup over BF16 vs batch, decode and prefill panels, one figure per model shape (like Fig. 4)."""
    latest = _latest([r for r in records if r.get("kind") == KIND])
    shapes = sorted({k[0] for k, r in latest.items() if k[0] and r.get("phase") in ("decode", "prefill")})
    if not shapes:
        return []
    import matplotlib.pyplot as plt

    paths = []
    for shape in shapes:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
        for ax, phase in zip(axes[0], ("prefill", "decode")):
            sel = {k: r for k, r in latest.items() if k[0] == shape and k[2] == phase}
            for row in ROW_ORDER[1:-1]:  # not the HF generate reference row
                pts = []
                for k, r in sel.items():
                    if k[1] == row:
                        s = _speed(sel.get((shape, "bf16", phase, k[3], k[4], k[5])), r)
                        if s is not None:
                            pts.append((k[3], s))
                if pts:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=ROW_LABEL[row])
            ax.axhline(1.0, color="black", ls="--", lw=1, label="BF16 (1×)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_title(f"{shape}: {phase}", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("speedup over BF16 (×)")
        axes[0][1].legend(fontsize=8)
        recs = list(latest.values())
        fig.text(0.5, -0.02, f"device: {_distinct(recs, 'device')} | commit(s): "
                 f"{_distinct(recs, 'git_commit', _short_commit)}", ha="center", va="top", fontsize=7)
        paths.append(_save_fig(fig, Path(out_dir) / f"e2e_speedup_{shape}.png"))
        plt.close(fig)
        paths += _memory_plot(shape, latest, out_dir, plt)
    return paths


def _memory_plot(shape, latest, out_dir, plt) -> list[Path]:
    """Memory vs KV length: one decoder layer at batch 1 (layer_mem) and the whole model's measured peak at
    the decode_long batch (OOM cases left out), one line per row."""
    panels = [(p, {k: r for k, r in latest.items() if k[0] == shape and k[2] == p and r.get("peak_mem_gib")
                   and (p == "layer_mem" or r.get("median_ms") is not None)}) for p in ("layer_mem", "decode_long")]
    panels = [(p, sel) for p, sel in panels if sel]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (phase, sel) in zip(axes[0], panels):
        for row in ROW_ORDER:
            pts = sorted((k[5], r["peak_mem_gib"] * (1024 if phase == "layer_mem" else 1))
                         for k, r in sel.items() if k[1] == row)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=ROW_LABEL[row])
        b = _distinct(list(sel.values()), "batch")
        ax.set_title(f"{shape}: " + ("one layer, batch 1 (MiB)" if phase == "layer_mem" else
                                     f"whole model, batch {b} (GiB)"), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV length")
        ax.set_ylabel("peak memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    recs = [r for _, sel in panels for r in sel.values()]
    fig.text(0.5, -0.02, f"device: {_distinct(recs, 'device')} | commit(s): "
             f"{_distinct(recs, 'git_commit', _short_commit)}", ha="center", va="top", fontsize=7)
    path = _save_fig(fig, Path(out_dir) / f"e2e_memory_{shape}.png")
    plt.close(fig)
    return [path]
