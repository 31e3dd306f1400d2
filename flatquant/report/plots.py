"""The matplotlib figures of docs/RESULTS.md (part of flatquant.report.document): perplexity per method and bit
setting, zero-shot accuracy per task and the ablation, each captioned with model, data, device and commit(s);
the kernel figure comes from flatquant.report.kernels."""
from __future__ import annotations

from pathlib import Path

import flatquant.report.common as rc
from flatquant.report.e2e import e2e_plots
from flatquant.report.kernels import kernel_plots


def _plot_caption(recs, data: str) -> str:
    return (f"model {rc._distinct(recs, 'model', rc._model_name)} | data: {data} | "
            f"device: {rc._distinct(recs, 'device')} | commit(s): {rc._distinct(recs, 'git_commit', rc._short_commit)}")


def _plot_ppl(plt, model, seqlen, rows, out_dir) -> Path:
    recs = rc._row_records(rows)
    datasets = rc._present_datasets(recs)
    tags = sorted({rc._bits(r) for r in recs if not rc._is_fp16(r)}, key=rc._bits_key)

    def plot_label(r):
        return rc._method_label(r) + rc._wq_suffix(r)

    methods = []
    for _, row in sorted(rows.items(), key=lambda kv: rc._row_sort(*kv)):
        r0 = next(iter(row.values()))
        if not rc._is_fp16(r0) and plot_label(r0) not in methods:
            methods.append(plot_label(r0))
    fig, axes = plt.subplots(1, len(datasets), squeeze=False,
                             figsize=(max(5.0, 0.3 * len(rows) + 0.8 * len(tags)) * len(datasets), 4.8))
    colors = dict(zip(methods, rc._bar_colors(max(1, len(methods)))))
    for ax, (ds, ds_label) in zip(axes[0], datasets):
        fp16 = [r for r in recs if rc._is_fp16(r) and r.get("dataset") == ds]
        ymax, ymin = 0.0, float("inf")
        for ti, tag in enumerate(tags):
            # the bars present in this bit setting, centred on its tick, one colour per method
            here = sorted((row[ds] for row in rows.values() if ds in row and not rc._is_fp16(row[ds])
                           and rc._bits(row[ds]) == tag and rc._num(row[ds].get("ppl"))),
                          key=lambda r: methods.index(plot_label(r)))
            width = 0.8 / max(1, len(here)) if len(here) > 1 else 0.4
            for k, r in enumerate(here):
                x = ti - width * (len(here) - 1) / 2 + width * k
                y = float(r["ppl"])
                ymax, ymin = max(ymax, y), min(ymin, y)
                ax.bar([x], [y], width=width, color=colors[plot_label(r)], label=plot_label(r))
                ax.annotate(rc._fmt_ppl(y), (x, y), ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(here) > 2 else 0, xytext=(0, 2), textcoords="offset points")
        if fp16 and rc._num(fp16[0].get("ppl")):
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
        win = rc._full_windows(recs)[ds]
        base = f"; FP16 = {rc._fmt_ppl(fp16[0]['ppl'])}" if fp16 else ""
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
    fig.suptitle(f"Perplexity - {rc._model_name(model)}, seqlen {seqlen}", fontsize=12)
    fig.text(0.5, -0.09, _plot_caption(recs, "; ".join(rc.DATASET_NOTES.get(d, d) for d, _ in datasets)),
             ha="center", va="top", fontsize=7, wrap=True)
    return rc._save_fig(fig, out_dir / f"ppl_{rc._slug(rc._model_name(model))}_seqlen{seqlen}.png")


def _plot_zeroshot(plt, model, limit, recs, out_dir) -> Path:
    present = rc._zs_tasks(recs)
    labels_x = [l for _, l in present] + ["Avg"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(labels_x) * max(1, len(recs)) / 3), 4.6))
    width = 0.8 / max(1, len(recs))
    colors = rc._bar_colors(max(1, len(recs)))
    for i, r in enumerate(recs):
        ys = [float((r.get("tasks") or {}).get(t, {}).get("value", float("nan"))) for t, _ in present]
        ys.append(float(r["average"]) if isinstance(r.get("average"), (int, float)) else float("nan"))
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(labels_x))]
        lab = ("FP16" if rc._is_fp16(r) else f"{rc._method_label(r)} {rc._bits(r)}") + rc._wq_suffix(r)
        ax.bar(xs, ys, width=width, color=colors[i], label=lab)
    ax.set_xticks(range(len(labels_x)))
    ax.set_xticklabels(labels_x)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(recs) > 4 else 1, loc="upper right")
    lim = "full task sets" if limit is None else f"limit {limit} rows/task"
    fig.suptitle(f"Zero-shot accuracy - {rc._model_name(model)} ({lim})", fontsize=12)
    fig.text(0.5, -0.02, _plot_caption(recs, "lm-eval 0-shot; acc_norm: ARC-C/ARC-E/HellaSwag/PIQA, "
                                             "acc: LAMBADA/WinoGrande"), ha="center", va="top", fontsize=7, wrap=True)
    lim_slug = "full" if limit is None else rc._slug(limit)
    return rc._save_fig(fig, out_dir / f"zeroshot_{rc._slug(rc._model_name(model))}_limit-{lim_slug}.png")


def _plot_ablation(plt, records, model, seqlen, rows, out_dir) -> Path | None:
    """WikiText-2 perplexity per ablation row (log scale), with the FP16 and full-recipe levels as lines."""
    ds, ds_label = rc.DATASETS[0]
    rows = [(label, row[ds]) for label, row in sorted(rows.items(), key=lambda kv: rc._ablation_key(kv[0]))
            if ds in row and rc._num(row[ds].get("ppl"))]
    if not rows:
        return None
    recs = [r for _, r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2.5), 4.4))
    ys = [float(r["ppl"]) for r in recs]
    ax.bar(range(len(rows)), ys, width=0.6, color=rc._bar_colors(len(rows)))
    for x, y in enumerate(ys):
        ax.annotate(rc._fmt_ppl(y), (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    refs = [r for r in rc._ppl_records(records) if str(r.get("model")) == model and r.get("seqlen") == seqlen
            and r.get("dataset") == ds
            and (rc._is_fp16(r) or (r.get("variant") in rc.MAIN_VARIANTS and not rc._is_gptq(r)))]
    for r, style in zip(sorted(refs, key=rc._method_key), ("--", ":", "-.")):
        lab = "FP16" if rc._is_fp16(r) else f"{rc._method_label(r)}, {rc.MAIN_VARIANTS[r['variant']]}"
        ax.axhline(float(r["ppl"]), color="black", ls=style, lw=1, label=f"{lab} = {rc._fmt_ppl(r['ppl'])}")
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
    calib = rc._distinct_calib([r for r in recs if r.get("calib")], False)
    fig.suptitle(f"Ablation - {rc._model_name(model)} {rc._bits(recs[0])}, {ds_label}, seqlen {seqlen}", fontsize=11)
    ax.set_title(f"reduced recipe: {calib.replace('`', '')}", fontsize=8)
    fig.text(0.5, -0.02, _plot_caption(recs + refs, rc.DATASET_NOTES.get(ds, ds)), ha="center", va="top", fontsize=7,
             wrap=True)
    return rc._save_fig(fig, out_dir / f"ablation_{rc._slug(rc._model_name(model))}_seqlen{seqlen}.png")


def make_plots(records: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG figures: perplexity per method and bit setting (log scale), zero-shot accuracy per task, the
    ablation, and the W4A4 linear speedup (flatquant.report.kernels)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths: list[Path] = []
    figures = [lambda k=k, rows=rows: _plot_ppl(plt, *k, rows, out_dir)
               for k, rows in sorted(rc._ppl_groups(records).items(), key=rc._group_sort)]
    figures += [lambda k=k, recs=recs: _plot_zeroshot(plt, *k, recs, out_dir)
                for k, recs in rc._zs_groups(records)]
    figures += [lambda k=k, rows=rows: _plot_ablation(plt, records, *k, rows, out_dir)
                for k, rows in sorted(rc._ablation_groups(records).items(), key=rc._group_sort)]
    for make in figures:
        path = make()
        plt.close("all")
        if path is not None:
            paths.append(path)
    paths += kernel_plots([r for r in records if r.get("kind") == rc.KERNEL_KIND], out_dir)
    paths += e2e_plots(records, out_dir)
    return paths

