"""Kernel-benchmark tables and plot for docs/RESULTS.md (part of flatquant.report.document).

Input: the entries of results/kernels/*.json (JSON lists written by benchmarks/kernels/bench_fused_transform.py
and benchmarks/kernels/bench_w4a4_linear.py), loaded by flatquant.report.document.load_all with kind
"kernel_bench". Each entry has kernel, shape, median_ms, baseline, baseline_median_ms, speedup, achieved_gbps,
device, git_commit, command; entries are recognised by their shape, not by file name:

* fused transform + quantize: shape with "hidden" and "phase" (plus one "device_copy" entry: the
  copy-bandwidth measurement) -> paper Table 6 layout: speedup over unfused PyTorch per hidden size,
  phase and batch, and the best prefill bandwidth as a fraction of the measured copy bandwidth;
* W4A4 linear: shape with "M", "in", "out" (plus one "route_choice" entry) -> speedup over BF16 cuBLAS of
  the default full linear, of the GEMM alone (best route), and under CUDA graphs.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from flatquant.report.common import _bar_colors, _commands, _distinct, _num, _save_fig, _short_commit, _table

DEFAULT_FUSED = "fused"  # the fused kernel the layer uses by default; other "fused_*" kernels are variants
LINEAR_AUTO = "w4a4_linear_auto"  # the full linear (quantize + GEMM) with the default route dispatch
LINEAR_GRAPH = "w4a4_linear_auto_cudagraph"
DECODE_PARTS_BASELINE = "bf16_gemv_cudagraph"
# bench_decode_parts.py's pieces, in the order of the decode breakdown table.
DECODE_PARTS = [("bf16_gemv", "BF16"), ("fused_transform_quant", "transform"), ("decode_gemm_default", "GEMM"),
                ("w4a4_linear_auto", "layer"),
                ("w4a4_linear_auto_fused_decode_on", "layer, one launch (fused_decode.py)"),
                ("w4a4_linear_auto_pdl_on", "layer, PDL on"),
                ("w4a4_linear_auto_pdl_off", "layer, PDL off"),
                ("w4a4_linear_auto_gemv_prefetch2", "layer, gemv 2 tiles ahead"),
                ("w4a4_linear_auto_gemv_pipelined", "layer, gemv pipelined via shared memory"),
                ("w4a4_linear_auto_mma_stages1", "layer, tensor-core K loop unpipelined"),
                ("w4a4_linear_auto_mma_packed_activations", "layer, tensor-core on packed activations"),
                ("w4a4_linear_auto_mma_signed_weight", "layer, tensor-core on sign-extended weight codes"),
                ("w4a4_linear_auto_mma_offset_weight", "layer, tensor-core on offset weight codes"),
                ("w4a4_linear_auto_mma_not_gemv", "layer, tensor-core instead of the dp4a gemv"),
                ("w4a4_linear_auto_transform_block", "layer, transform on the block kernel"),
                ("w4a4_linear_auto_trigger_end", "layer, PDL trigger after the transform's stores"),
                ("w4a4_linear_auto_trigger_none", "layer, no PDL trigger")]
GEMM_PREFIX = "w4a4_gemm_"
TMA_SWEEP_PREFIXES = ("tma_gemm_", "cublas_")  # bench_tma_gemm.py: the TMA GEMM's configs and the vendor GEMMs
TMA_VENDOR = [("cublas_scaled_mm_rowwise", "cuBLASLt FP8 row-wise"), ("cublas_scaled_mm_tensorwise",
              "cuBLASLt FP8 per-tensor (not W4A4)"), ("cublas_int_mm", "cuBLASLt INT8 + epilogue")]
REFERENCE_FP8 = "torch_scaled_mm_fp8"


def classify(e: dict) -> str | None:
    """'fused', 'linear', 'decode_parts', 'tma_sweep' or None (not a kernel entry this module knows: listed
    generically)."""
    shape = e.get("shape")
    if str(e.get("kernel", "")).startswith(TMA_SWEEP_PREFIXES):  # bench_tma_gemm.py
        return "tma_sweep"
    if e.get("baseline") == DECODE_PARTS_BASELINE:  # bench_decode_parts.py: its own table, timed differently
        return "decode_parts"
    if e.get("baseline") is None and e.get("kernel") not in ("device_copy", "route_choice"):
        return None  # e.g. probe_decode_latency.py: absolute kernel-node times, no baseline to compare with
    if e.get("kernel") == "device_copy" or (isinstance(shape, dict) and {"hidden", "phase"} <= set(shape)):
        return "fused"
    if e.get("kernel") == "route_choice" or (isinstance(shape, dict) and {"M", "in", "out"} <= set(shape)):
        return "linear"
    return None


def _x(v) -> str:
    return f"{v:.2f}×" if _num(v) else "-"


def _provenance(entries) -> str:
    cmd = _commands(entries)
    return (f"Device: {_distinct(entries, 'device')}; commit(s): {_distinct(entries, 'git_commit', _short_commit)}; "
            f"command: `{cmd}`.")


def _variant_name(kernel: str) -> str:
    return "default" if kernel == DEFAULT_FUSED else kernel.removeprefix("fused_").replace("_", "-")


# --------------------------------------------------------------------------------------------- fused
def _fused_data(entries):
    fused = [e for e in entries if classify(e) == "fused"]
    copy = next((e for e in fused if e.get("kernel") == "device_copy"), None)
    runs = [e for e in fused if e.get("kernel") != "device_copy" and _num(e.get("speedup"))
            and e.get("timing") != "cuda_graph"]
    kernels = Counter(e["kernel"] for e in runs)
    default = DEFAULT_FUSED if DEFAULT_FUSED in kernels else (kernels.most_common(1)[0][0] if kernels else None)
    return fused, copy, runs, default


def _pct_copy(e, copy_gbps) -> float | None:
    if _num(e.get("fraction_of_copy_bw")):
        return 100 * e["fraction_of_copy_bw"]
    if _num(e.get("achieved_gbps")) and _num(copy_gbps) and copy_gbps:
        return 100 * e["achieved_gbps"] / copy_gbps
    return None


def _fused_section(entries) -> list[str]:
    fused, copy, runs, default = _fused_data(entries)
    if not runs:
        return []
    copy_gbps = copy.get("achieved_gbps") if copy else None
    main = {(e["shape"]["hidden"], e["shape"]["phase"], e["shape"].get("batch")): e
            for e in runs if e["kernel"] == default}
    batches = sorted({b for _, _, b in main if b is not None})
    hiddens = sorted({h for h, _, _ in main})
    phases = sorted({p for _, p, _ in main}, key=lambda p: (p != "prefill", p))
    factors = {e["shape"]["hidden"]: f"{e['shape'].get('n1', '?')}×{e['shape'].get('n2', '?')}" for e in runs}
    rows = []
    for h in hiddens:
        for i, phase in enumerate(phases):
            cells = [f"{h} ({factors[h]})" if i == 0 else "", phase]
            cells += [_x(main[(h, phase, b)]["speedup"]) if (h, phase, b) in main else "-" for b in batches]
            cand = [e for e in runs if e["shape"]["hidden"] == h and e["shape"]["phase"] == phase
                    and _num(e.get("achieved_gbps"))]
            best = max(cand, key=lambda e: e["achieved_gbps"], default=None) if phase == "prefill" else None
            if best is None:
                cells.append("-")
            else:
                pct = _pct_copy(best, copy_gbps)
                cells.append(f"{best['achieved_gbps']:,.0f} GB/s" + (f" ({pct:.0f}%)" if pct is not None else "")
                             + f", {_variant_name(best['kernel'])}, b={best['shape'].get('batch')}")
            rows.append(cells)
    header = ["Hidden (n1×n2)", "Phase"] + [f"b={b}" for b in batches] + ["Best prefill GB/s (% of copy)"]
    seqs = _distinct([e["shape"] for e in runs if e["shape"].get("phase") == "prefill"], "seq")
    dtype = _distinct([e["shape"] for e in runs], "dtype")
    bits = _distinct([e["shape"] for e in runs], "bits")
    copy_txt = (f"Copy bandwidth: {copy_gbps:,.0f} GB/s ({copy.get('note') or 'device-to-device copy'})."
                if _num(copy_gbps) else "Copy bandwidth: not measured.")
    out = ["### Fused transform + quantize vs unfused PyTorch (Table 6 layout)", "",
           _table(header, rows, ["l", "l"] + ["r"] * (len(batches) + 1)), "",
           (f"Speedup = median time of the unfused PyTorch reference ({_distinct(runs, 'baseline')}) / median time "
            f"of the fused kernel `{default}` (the default), per batch b; prefill: b × {seqs} tokens, decode: b × 1 "
            f"token; {dtype} activations, {bits}-bit codes. GB/s = bytes read + written / median time. {copy_txt} "
            "The last column is the best of all fused kernels measured (default and variants). " + _provenance(fused)),
           ""]
    # the kernel variants, where more than one was measured at the same size
    variants = sorted({e["kernel"] for e in runs} - {default})
    by_key = {(e["kernel"], e["shape"]["hidden"], e["shape"].get("batch")): e
              for e in runs if e["shape"]["phase"] == "prefill"}
    vbatches = sorted({b for k, h, b in by_key if k in variants})
    if variants and vbatches:
        kernels = [default] + variants
        vrows = []
        for h in hiddens:
            cells = [f"{h} ({factors[h]})"]
            for b in vbatches:
                vals = [by_key.get((k, h, b), {}).get("speedup") for k in kernels]
                top = max((v for v in vals if _num(v)), default=None)
                cells.append(" / ".join((f"**{v:.2f}**" if v == top and len(vals) > 1 else f"{v:.2f}")
                                        if _num(v) else "-" for v in vals))
            vrows.append(cells)
        names = " / ".join(f"`{k}`" for k in kernels)
        out += ["Kernel variants at prefill: speedup over unfused PyTorch of " + names + " (**bold**: fastest).", "",
                _table(["Hidden (n1×n2)"] + [f"b={b}" for b in vbatches], vrows, ["l"] + ["r"] * len(vbatches)), ""]
    return out + _fused_graph_table(fused, hiddens, factors)


def _fused_graph_table(fused, hiddens, factors) -> list[str]:
    """The small calls timed from CUDA graphs on both sides (bench_fused_transform.py: eager calls that small
    are host bound): speedup and fused-kernel µs per (phase, batch)."""
    graph = {(e["shape"]["hidden"], e["shape"]["phase"], e["shape"].get("batch")): e for e in fused
             if e.get("timing") == "cuda_graph" and _num(e.get("speedup"))}
    if not graph:
        return []
    cols = sorted({(p, b) for _, p, b in graph}, key=lambda pb: (pb[0] != "prefill", pb[0], pb[1]))
    rows = [[f"{h} ({factors.get(h, '?')})"]
            + [(f"{graph[(h, p, b)]['speedup']:.2f}× ({graph[(h, p, b)]['median_ms'] * 1e3:.1f} µs)"
                if (h, p, b) in graph else "-") for p, b in cols]
            for h in sorted({h for h, _, _ in graph} | set(hiddens)) if any((h, p, b) in graph for p, b in cols)]
    return ["Small calls, both sides replayed from one CUDA graph (eager calls this small are host bound): speedup "
            "of the fused kernel over the unfused PyTorch sequence (fused µs per call). " + _provenance(graph.values()),
            "", _table(["Hidden (n1×n2)"] + [f"{p} b={b}" for p, b in cols], rows, ["l"] + ["r"] * len(cols)), ""]


# --------------------------------------------------------------------------------------------- linear
def _shape_label(s) -> str:
    return f"{s['in']} → {s['out']}"


def _linear_data(entries):
    lin = [e for e in entries if classify(e) == "linear"]
    runs = [e for e in lin if isinstance(e.get("shape"), dict) and _num(e.get("speedup"))]
    shapes = []
    for e in runs:
        if (e["shape"]["in"], e["shape"]["out"]) not in shapes:
            shapes.append((e["shape"]["in"], e["shape"]["out"]))
    return lin, runs, shapes


def _by_shape_m(runs, pick):
    return {(e["shape"]["in"], e["shape"]["out"], e["shape"]["M"]): e for e in runs if pick(e)}


def _best_gemm(runs):
    best: dict = {}
    for e in runs:
        if e["kernel"].startswith(GEMM_PREFIX):
            k = (e["shape"]["in"], e["shape"]["out"], e["shape"]["M"])
            if k not in best or e["speedup"] > best[k]["speedup"]:
                best[k] = e
    return best


def _linear_section(entries) -> list[str]:
    lin, runs, shapes = _linear_data(entries)
    if not runs:
        return []
    out = ["### W4A4 linear vs BF16 cuBLAS", ""]
    auto = _by_shape_m(runs, lambda e: e["kernel"] == LINEAR_AUTO)
    ms = sorted({m for _, _, m in auto})
    if auto:
        routes = {m: sorted({e.get("route_taken") or "?" for (_, _, mm), e in auto.items() if mm == m}) for m in ms}
        header = ["Layer (in → out)"] + [f"M={m}" + (f" ({routes[m][0]})" if len(routes[m]) == 1 else "") for m in ms]
        rows = [[_shape_label({"in": i, "out": o})]
                + [(f"**{_x(auto[(i, o, m)]['speedup'])}**" if auto[(i, o, m)]["speedup"] >= 1
                    else _x(auto[(i, o, m)]["speedup"])) if (i, o, m) in auto else "-" for m in ms]
                for i, o in shapes]
        out += [("Full linear (fused transform + quantize + W4A4 GEMM, default route dispatch "
                 f"`{LINEAR_AUTO}`): speedup over BF16 cuBLAS; M = tokens; route taken in the header; "
                 "**bold**: faster than BF16."), "",
                _table(header, rows, ["l"] + ["r"] * len(ms)), ""]
    best = _best_gemm(runs)
    if best:
        gms = sorted({m for _, _, m in best})
        common = Counter(e["kernel"] for e in best.values()).most_common(1)[0][0]
        rows = []
        for i, o in shapes:
            cells = [_shape_label({"in": i, "out": o})]
            for m in gms:
                e = best.get((i, o, m))
                cells.append("-" if e is None else _x(e["speedup"]) + (
                    "" if e["kernel"] == common else f" ({e['kernel'].removeprefix(GEMM_PREFIX)})"))
            rows.append(cells)
        ref = [e["speedup"] for e in runs if e["kernel"] == REFERENCE_FP8]
        ref_txt = (f" For reference, a plain FP8 `torch._scaled_mm` (`{REFERENCE_FP8}`, not W4A4) on the same sizes "
                   f"runs at {min(ref):.2f}–{max(ref):.2f}× BF16." if ref else "")
        out += [(f"GEMM only (activation codes already quantized): speedup over BF16 cuBLAS of the fastest "
                 f"`{GEMM_PREFIX}*` route, `{common.removeprefix(GEMM_PREFIX)}` unless named.{ref_txt}"), "",
                _table(["Layer (in → out)"] + [f"M={m}" for m in gms], rows, ["l"] + ["r"] * len(gms)), ""]
    graph = _by_shape_m(runs, lambda e: e["kernel"] == LINEAR_GRAPH)
    if graph:
        gms = sorted({m for _, _, m in graph})
        rows = [[_shape_label({"in": i, "out": o})]
                + [(f"{_x(e['speedup'])} ({1e3 * e['median_ms']:.1f} vs {1e3 * e['baseline_median_ms']:.1f} µs)"
                    if (e := graph.get((i, o, m))) else "-") for m in gms]
                for i, o in shapes if any((i, o, m) in graph for m in gms)]
        out += [(f"Decode under CUDA graphs (`{LINEAR_GRAPH}` vs {_distinct(graph.values(), 'baseline')}, both "
                 "captured in a graph, so launch overhead is excluded): speedup (W4A4 vs BF16 median)."), "",
                _table(["Layer (in → out)"] + [f"M={m}" for m in gms], rows, ["l"] + ["r"] * len(gms)), ""]
    notes = []
    choice = next((e for e in lin if e.get("kernel") == "route_choice"), None)
    if choice and isinstance(choice.get("fastest_linear_route_by_M"), dict):
        fastest = choice["fastest_linear_route_by_M"]
        notes.append("Fastest full-linear route by M (`route_choice` entry): "
                     + ", ".join(f"M={m} {r}" for m, r in sorted(fastest.items(), key=lambda kv: int(kv[0]))) + ".")
    dispatch = next((e.get("dispatch") for e in runs if isinstance(e.get("dispatch"), dict)), None)
    if dispatch:
        notes.append("Dispatch settings of the benchmarked build: "
                     + ", ".join(f"{k}={v}" for k, v in dispatch.items())
                     + f"; default GEMM route {_distinct(runs, 'default_gemm_route')}.")
    shapes_ = [e["shape"] for e in runs]
    notes += [f"Speedup = BF16 median / W4A4 median; dtype {_distinct(shapes_, 'dtype')}, "
              f"{_distinct(shapes_, 'bits')}-bit weights and activations.", _provenance(lin)]
    out += [" ".join(notes), ""]
    return out


def _decode_parts_section(entries) -> list[str]:
    parts = [e for e in entries if classify(e) == "decode_parts" and isinstance(e.get("shape"), dict)]
    cells = {(e["shape"]["in"], e["shape"]["out"], e["shape"]["M"], e["kernel"]): e for e in parts}
    keys = sorted({(i, o, m) for i, o, m, _ in cells}, key=lambda t: (t[0], t[1], t[2]))
    if not keys:
        return []
    rows = []
    for i, o, m in keys:
        row = [_shape_label({"in": i, "out": o}), str(m)]
        for name, _ in DECODE_PARTS:
            e = cells.get((i, o, m, name))
            row.append("-" if e is None else f"{1e3 * e['median_ms']:.1f}")
        whole = cells.get((i, o, m, "w4a4_linear_auto"))
        row.append(_x(whole["speedup"]) if whole else "-")
        rows.append(row)
    head = ["Layer (in → out)", "M"] + [f"{label} µs" for _, label in DECODE_PARTS] + ["layer vs BF16"]
    return ["### Decode, piece by piece", "",
            ("`benchmarks/kernels/bench_decode_parts.py`: each piece replayed from its own CUDA graph over at least 8 "
             "rotated "
             "weight sets (and at least twice the L2 in packed int4; no launch overhead): the BF16 GEMV, the fused "
             "transform + quantize alone, the decode GEMM alone (default config), and the whole W4A4 layer (the "
             "median of three runs of the default; at M = 1 also as one launch: transform, quantize and GEMV in "
             "`fused_decode.py`, off by default) with the default PDL setting and with the GEMM launched as "
             "a programmatic dependent everywhere / nowhere, then with one decode option changed at a time (the "
             "gemv's weight two tiles ahead or pipelined through shared memory; where the tensor-core kernel runs, "
             "its K loop unpipelined, fed packed activation codes, or on sign-extended or offset weight codes "
             "instead of 16 x code; the tensor-core kernel where the dp4a gemv is the default; the "
             "transform on the block kernel at every size (by default 14336-type sizes take the split kernel), its "
             "PDL trigger after its stores or never); '-' where a variant does not apply. Median µs."), "",
            _table(head, rows, ["l", "r"] + ["r"] * (len(head) - 2)), "", _provenance(parts), ""]


def _tma_sweep_section(entries) -> list[str]:
    """The GEMM alone at large M: the fastest exact TMA GEMM config per format against the vendor GEMMs."""
    sweep = [e for e in entries if classify(e) == "tma_sweep"]
    timed = [e for e in sweep if _num(e.get("speedup")) and isinstance(e.get("shape"), dict) and "in" in e["shape"]]
    if not timed:
        return []
    keys = []
    for e in timed:
        k = (e["shape"]["in"], e["shape"]["out"], e["shape"]["M"])
        if k not in keys:
            keys.append(k)
    cell = {(e["shape"]["in"], e["shape"]["out"], e["shape"]["M"], e["kernel"]): e for e in timed}
    exact = {e["kernel"].removeprefix("tma_gemm_exactness_"): e.get("exact") for e in sweep
             if e["kernel"].startswith("tma_gemm_exactness_")}

    def best(i, o, m, fmt):
        cands = [e for (ii, oo, mm, k), e in cell.items() if (ii, oo, mm) == (i, o, m)
                 and k.startswith(f"tma_gemm_{fmt}_") and exact.get(k.removeprefix("tma_gemm_")) is True]
        return max(cands, key=lambda e: e["speedup"], default=None)

    rows = []
    for i, o, m in keys:
        bf16_ms = next(e["baseline_median_ms"] for (ii, oo, mm, _), e in cell.items() if (ii, oo, mm) == (i, o, m))
        row = [_shape_label({"in": i, "out": o}), str(m), f"{bf16_ms:.3f}"]
        for name, _ in TMA_VENDOR:
            e = cell.get((i, o, m, name))
            row.append(_x(e["speedup"]) if e else "-")
        for fmt in ("int8", "fp8"):
            e = best(i, o, m, fmt)
            row.append("-" if e is None else f"{_x(e['speedup'])} ({e['kernel'].removeprefix(f'tma_gemm_{fmt}_')})")
        rows.append(row)
    head = ["Layer (in → out)", "M", "BF16 ms"] + [label for _, label in TMA_VENDOR] + ["TMA GEMM int8", "TMA GEMM fp8"]
    checks = next((e for e in sweep if e["kernel"].startswith("tma_gemm_exactness_")), {})
    ks = checks.get("shape", {}).get("K", [])
    ks = ks if isinstance(ks, list) else [ks]
    cases = sorted({c.split("@")[0] for c in checks.get("max_abs_error", {})})
    n_exact = sum(1 for v in exact.values() if v)
    inexact = sorted(k for k, v in exact.items() if v is False)
    return ["### Large-M GEMM alone: the TMA kernel against cuBLASLt", "",
            ("`benchmarks/kernels/bench_tma_gemm.py`: the GEMM on codes one per byte with per-token and per-channel "
             "scales "
             "(bf16 out), speedup over BF16 cuBLAS on the same rotated inputs; for the TMA kernel (`tma_gemm.py`) "
             "the fastest config of the sweep (named: tile M×N×K, pipeline stages, and the one change from the "
             "default) among those that passed the GPU exactness check (float32 output equal to `torch._int_mm` "
             f"on the integer cases {', '.join(cases)} at K = {' and '.join(map(str, ks))}): "
             f"{n_exact} of {len(exact)} configs exact"
             + (f"; not exact: {', '.join(f'`{k}`' for k in inexact)}" if inexact else "") + "."), "",
            _table(head, rows, ["l", "r", "r"] + ["r"] * (len(head) - 3)), "", _provenance(sweep), ""]


def kernels_section(entries: list[dict]) -> list[str]:
    body = (_fused_section(entries) + _linear_section(entries) + _tma_sweep_section(entries)
            + _decode_parts_section(entries))
    if not body:
        return []
    return ["## Kernels", "",
            ("Median GPU times of the Triton / cuBLASLt kernels against their PyTorch baselines "
             "(`benchmarks/kernels/bench_fused_transform.py`, `benchmarks/kernels/bench_w4a4_linear.py`); "
             "> 1× is faster."), ""] + body


# --------------------------------------------------------------------------------------------- plot
def kernel_plots(entries: list[dict], out_dir: str | Path) -> list[Path]:
    """W4A4 linear speedup over BF16 vs M, one line per layer shape: full linear (default route) and GEMM only."""
    lin, runs, shapes = _linear_data(entries)
    panels = [("full linear (quantize + GEMM, default route)", _by_shape_m(runs, lambda e: e["kernel"] == LINEAR_AUTO)),
              ("GEMM only (fastest route)", _best_gemm(runs))]
    panels = [(t, d) for t, d in panels if d]
    if not panels:
        return []
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(6.2 * len(panels), 4.6), sharey=True)
    colors = dict(zip(shapes, _bar_colors(len(shapes))))
    for ax, (title, data) in zip(axes[0], panels):
        for i, o in shapes:
            pts = sorted((m, e["speedup"]) for (ii, oo, m), e in data.items() if (ii, oo) == (i, o))
            if pts:
                ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o", color=colors[(i, o)],
                        label=_shape_label({"in": i, "out": o}))
        ax.axhline(1.0, color="black", ls="--", lw=1, label="BF16 cuBLAS (1×)")
        ax.set_xscale("log", base=2)
        ms = sorted({m for _, _, m in data})
        ax.set_xticks(ms)
        ax.set_xticklabels([f"{m // 1024}K" if m >= 1024 and m % 1024 == 0 else str(m) for m in ms], fontsize=8)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over BF16 cuBLAS (×)")
    axes[0][0].set_ylim(bottom=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(7, len(labels)),
               fontsize=8, frameon=False, title="layer (in → out)", title_fontsize=8)
    fig.suptitle(f"W4A4 linear vs BF16 cuBLAS - {_distinct(lin, 'device')}", fontsize=12)
    footer = (f"device: {_distinct(lin, 'device')} | commit(s): {_distinct(lin, 'git_commit', _short_commit)} | "
              f"command: {_distinct([e for e in lin if e.get('command')], 'command')}")
    fig.text(0.5, -0.12, footer, ha="center", va="top", fontsize=7, wrap=True)
    path = _save_fig(fig, Path(out_dir) / "kernels_w4a4_linear_speedup.png")
    plt.close(fig)
    return [path]
