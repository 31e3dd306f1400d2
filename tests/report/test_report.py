"""docs/RESULTS.md and plots from results records (flatquant.report.document, flatquant.report.kernels)."""
from __future__ import annotations

import json

from flatquant.report import document as report
from flatquant.report import kernels as report_kernels
from flatquant.results import load_records, write_record

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROV = {"device": "NVIDIA H100 80GB HBM3", "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "command": "flatquant eval --method quarot", "date": "2025-01-01T00:00:00+00:00"}
FULL = {"nsamples": 128, "seqlen": 2048, "epochs": 15, "dataset": "wiki-calib", "recipe": "svd-amp",
        "lt": True, "ps": True, "lct": True}
REDUCED = {**FULL, "nsamples": 32, "epochs": 5}

PPL = {  # (method, w, a, kv, wq) -> (wikitext2, c4)
    ("fp16", 16, 16, 16, "rtn"): (17.31, 22.05),
    ("rtn", 4, 16, 16, "rtn"): (19.2, 25.1),
    ("quarot", 4, 16, 16, "rtn"): (18.4, 24.0),
    ("rtn", 16, 4, 16, "rtn"): (2.1e4, 3.3e4),
    ("rtn", 16, 16, 4, "rtn"): (25.0, 30.2),
    ("rtn", 4, 4, 4, "rtn"): (5.6e3, 7.1e3),
    ("smoothquant", 4, 4, 4, "rtn"): (950.0, 1200.0),
    ("quarot", 4, 4, 4, "rtn"): (41.2, 55.3),
    ("quarot", 8, 8, 8, "rtn"): (17.4, 22.1),
}
ABLATION = {  # variant -> (method, calib flags, (wikitext2, c4))
    "ablation:RTN": ("rtn", None, (5.6e3, 7.1e3)),
    "ablation:+LT+PS+LCT": ("flatquant", {}, (26.5, 33.4)),  # listed before +LT: the table orders the rows
    "ablation:+LT": ("flatquant", {"ps": False, "lct": False}, (61.25, 70.5)),
}
RECIPES = {"recipe:svd-amp": ((27.1, 34.2), 23.49, 5107.9), "recipe:direct-fp32": ((26.9, 33.9), 34.41, 5600.0)}
ZS = {("fp16", 16, 16, 16): [30.1, 55.2, 40.3, 41.0, 66.7, 52.1], ("quarot", 4, 4, 4): [25.2, 40.1, 30.2, 20.5, 60.0, 50.4],
      ("flatquant", 4, 4, 4): [28.0, 50.3, 37.9, 33.3, 64.8, 51.2]}
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande"]
KPROV = {"device": "NVIDIA H100 80GB HBM3", "git_commit": "fedcba9876543210fedcba9876543210fedcba98",
         "date": "2025-01-02T00:00:00+00:00"}


def _ppl(method, w, a, kv, ds, v, windows=None, **extra):
    return dict(kind="ppl", model=MODEL, method=method, w_bits=w, a_bits=a, kv_bits=kv, weight_quantizer="rtn",
                dataset=ds, seqlen=2048, windows=windows or (166 if ds == "wikitext2" else 256), ppl=v, **PROV, **extra)


def sample_records() -> list[dict]:
    recs = []
    for (method, w, a, kv, _wq), vals in PPL.items():
        for ds, v in zip(("wikitext2", "c4"), vals):
            recs.append(_ppl(method, w, a, kv, ds, v))
    for ds, v in zip(("wikitext2", "c4"), (23.9, 30.8)):
        recs.append(_ppl("flatquant", 4, 4, 4, ds, v, variant="paper-recipe", calib=FULL, quantize_seconds=812.5,
                         peak_gpu_mib=5045.2))
    for variant, (method, flags, vals) in ABLATION.items():
        for ds, v in zip(("wikitext2", "c4"), vals):
            calib = None if flags is None else {**REDUCED, **flags}
            windows = 40 if (variant == "ablation:+LT" and ds == "wikitext2") else None
            recs.append(_ppl(method, 4, 4, 4, ds, v, windows, variant=variant, **({"calib": calib} if calib else {})))
    for variant, (vals, secs, mib) in RECIPES.items():
        for ds, v in zip(("wikitext2", "c4"), vals):
            recs.append(_ppl("flatquant", 4, 4, 4, ds, v, variant=variant, quantize_seconds=secs, calib_seconds=secs,
                             peak_gpu_mib=mib, calib={**REDUCED, "recipe": variant.split(":")[1]}))
    for (method, w, a, kv), vals in ZS.items():
        tasks = {t: {"metric": "acc" if t in ("lambada_openai", "winogrande") else "acc_norm", "value": v, "n": 500}
                 for t, v in zip(TASKS, vals)}
        extra = {"variant": "paper-recipe", "calib": FULL, "quantize_seconds": 1.0} if method == "flatquant" else {}
        recs.append(dict(kind="zeroshot", model=MODEL, method=method, w_bits=w, a_bits=a, kv_bits=kv, tasks=tasks,
                         average=sum(vals) / 6, limit=500, **PROV, **extra))
    recs.append(dict(kind="calib_cost", shape="llama3-8b decoder layer (random weights)", recipe="svd-amp",
                     cuda_graph=True, nsamples=128, seqlen=2048, epochs_run=2, ms_per_step=85.55, seconds_per_epoch=2.738,
                     fixed_seconds_per_layer=7.1, layer_seconds_15_epochs=48.2, layers=32, model_minutes_extrapolated=25.7,
                     peak_gpu_gib=16.58, loss_before=1.25, phase_seconds={"setup": 1.7},
                     paper_reference="LLaMA-3-8B: 0.9 h", **PROV))
    recs.append(dict(kind="kernel", shape=[2048, 576], op="kron_quant", speedup=2.31, latency_ms=0.0123, **PROV))
    return recs


def _fused(kernel, hidden, phase, batch, ms, base_ms, gbps):
    shape = {"hidden": hidden, "n1": 64, "n2": hidden // 64, "batch": batch, "seq": 2048 if phase == "prefill" else 1,
             "phase": phase, "dtype": "bfloat16", "bits": 4}
    return dict(kernel=kernel, shape=shape, median_ms=ms, baseline="unfused_pytorch", baseline_median_ms=base_ms,
                speedup=base_ms / ms, achieved_gbps=gbps, copy_gbps=3000.0, fraction_of_copy_bw=gbps / 3000.0,
                command="python benchmarks/bench_fused_transform.py", **KPROV)


def _linear(kernel, m, ms, base_ms, route=None, baseline="bf16_cublas", n_out=4096):
    return dict(kernel=kernel, shape={"in": 4096, "out": n_out, "M": m, "dtype": "bfloat16", "bits": 4},
                median_ms=ms, baseline=baseline, baseline_median_ms=base_ms, speedup=base_ms / ms, achieved_gbps=1.0,
                route_taken=route, default_gemm_route="int8", command="python benchmarks/bench_w4a4_linear.py",
                dispatch={"small_m_max": 16, "large_m_min": 17, "large_m_route": "scaled_mm"}, **KPROV)


def sample_kernel_files() -> dict[str, list[dict]]:
    fused = [dict(kernel="device_copy", shape={"bytes": 2**31}, median_ms=1.4, baseline=None, baseline_median_ms=None,
                  speedup=None, achieved_gbps=3000.0, note="2 GiB bf16 copy", command="python benchmarks/bench_fused_transform.py",
                  **KPROV),
             _fused("fused", 4096, "prefill", 1, 0.2, 0.25, 100.0), _fused("fused", 4096, "prefill", 2, 0.2, 0.5, 600.0),
             _fused("fused", 4096, "decode", 1, 0.1, 0.3, 0.5), _fused("fused", 4096, "decode", 2, 0.1, 0.2, 1.0),
             _fused("fused_round_once", 4096, "prefill", 1, 0.1, 0.25, 900.0)]
    linear = [_linear("w4a4_linear_auto", 1, 0.4, 0.028, "decode"), _linear("w4a4_linear_auto", 2048, 0.25, 0.5, "scaled_mm"),
              _linear("w4a4_linear_auto", 1, 0.2, 0.05, "decode", n_out=11008),
              _linear("w4a4_gemm_int8", 1, 0.04, 0.028), _linear("w4a4_gemm_scaled_mm", 1, 0.02, 0.028),
              _linear("w4a4_gemm_int8", 2048, 0.2, 0.5), _linear("w4a4_gemm_scaled_mm", 2048, 0.25, 0.5),
              _linear("w4a4_linear_auto_cudagraph", 1, 0.0276, 0.0188, "decode", "bf16_cublas_cudagraph"),
              dict(kernel="route_choice", shape=None, median_ms=None, speedup=None,
                   fastest_linear_route_by_M={"1": "int8", "2048": "scaled_mm"}, **KPROV),
              dict(kernel="mystery", shape={"x": 1}, median_ms=0.5, speedup=1.5, **KPROV)]
    return {"bench_fused_transform.json": fused, "bench_w4a4_linear.json": linear}


def _section(md: str, title: str) -> str:
    start = md.index(title)
    nxt = md.find("\n## ", start + len(title))
    return md[start:nxt if nxt >= 0 else len(md)]


def _kernel_entries():
    return [{"kind": report.KERNEL_KIND, **e, "_path": f"results/kernels/{name}"}
            for name, es in sample_kernel_files().items() for e in es]


def test_render_tables():
    md = report.render_markdown(sample_records())
    assert "## Perplexity (Table 1 layout)" in md and "## Zero-shot accuracy (Table 2 layout)" in md
    table1 = _section(md, "## Perplexity (Table 1 layout)")
    assert "| Bits | Method | W quantizer | WikiText-2 | C4 (proxy) |" in table1
    assert "| Bits | Method | W quantizer | ARC-C | ARC-E | HellaSwag | LAMBADA | PIQA | WinoGrande | Avg |" in md
    # rows grouped by bit setting, FP16 first, W4A4KV4 rows together, best of the group in bold
    lines = table1.splitlines()
    i_fp16 = next(i for i, l in enumerate(lines) if l.startswith("| **FP16** | FP16"))
    i_w4a4 = next(i for i, l in enumerate(lines) if l.startswith("| **W4A4KV4** |"))
    assert i_fp16 < i_w4a4
    # the main FlatQuant run is plain "FlatQuant"; no other variant reaches Table 1
    assert "|  | FlatQuant | RTN | **23.90** | **30.80** |" in table1
    assert "ablation" not in table1 and "svd-amp]" not in table1 and "direct-fp32" not in table1 and "[" not in table1
    assert "61.25" not in table1 and "27.10" not in table1 and "26.50" not in table1
    assert lines[i_w4a4:i_w4a4 + 5] == ["| **W4A4KV4** | RTN | RTN | 5600.0 | 7100.0 |",  # once: ablation:RTN is not here
                                        "|  | SmoothQuant | RTN | 950.0 | 1200.0 |",
                                        "|  | QuaRot | RTN | 41.20 | 55.30 |",
                                        "|  | FlatQuant | RTN | **23.90** | **30.80** |",
                                        "| **W8A8KV8** | QuaRot | RTN | 17.40 | 22.10 |"]
    assert "2.10e+04" in table1  # large perplexities stay readable
    # caption: the full recipe, its calibration time and memory; seqlen, windows, device, commit
    assert ("FlatQuant uses the full paper recipe: 128 × 2048-token calibration windows (`wiki-calib`), 15 epochs, "
            "recipe `svd-amp`, calibration time 812 s, peak GPU memory 5,045 MiB (4.93 GiB).") in table1
    assert "seqlen 2048" in table1 and "WikiText-2 166" in table1 and "C4 (proxy) 256" in table1
    assert "NVIDIA H100 80GB HBM3" in table1 and "0123456789" in table1
    # zero-shot: FlatQuant's main run, no calibration time (those runs load saved parameters)
    zs = _section(md, "## Zero-shot accuracy")
    assert "|  | FlatQuant | RTN | 28.00 | 50.30 | 37.90 | 33.30 | 64.80 | 51.20 | 44.25 |" in zs
    assert "lm-eval limit: 500" in zs and "calibration time" not in zs
    # other kinds are listed generically, nothing dropped
    other = _section(md, "## Other results")
    assert "### kernel" in other and "2.31" in other and "[2048, 576]" in other
    assert "calib_cost" not in other  # it has its own section
    # the SmolLM2 note
    assert "dequantized Q4_1 GGUF" in md and "groups of 32" in md


def test_ablation_table():
    md = report.render_markdown(sample_records())
    abl = _section(md, "## Ablation (Table 3 layout)")
    assert "| Method | LT | PS | LCT | WikiText-2 | C4 (proxy) |" in abl
    rows = [l for l in abl.splitlines() if l.startswith(("| RTN", "| +LT"))]
    assert rows == ["| RTN |  |  |  | 5600.0 | 7100.0 |",
                    "| +LT | ✓ |  |  | 61.25 (n=40) | 70.50 |",  # fewer windows than its column: marked
                    "| +LT+PS+LCT | ✓ | ✓ | ✓ | **26.50** | **33.40** |"]
    assert "Reduced recipe: 32 × 2048-token calibration windows (`wiki-calib`), 5 epochs, recipe `svd-amp`" in abl
    assert "The full-recipe row (FlatQuant, 128 × 2048, 15 epochs) is in Table 1: WikiText-2 23.90, C4 (proxy) 30.80." in abl
    assert "23.90 |" not in abl  # the full recipe is not a row here


def test_recipe_table_shows_time_and_memory():
    md = report.render_markdown(sample_records())
    rec = _section(md, "## Training recipes (Table 4 layout)")
    assert "| Recipe | Parameterisation | WikiText-2 | C4 (proxy) | Calibration time | Peak GPU memory |" in rec
    assert "| `direct-fp32` | full matrices with an explicit inverse, float32 | 26.90 | 33.90 | 34.4 s | 5,600 MiB (5.47 GiB) |" in rec
    assert "| `svd-amp` | " in rec and "| 27.10 | 34.20 | 23.5 s | 5,108 MiB (4.99 GiB) |" in rec
    assert "Reduced recipe: 32 × 2048-token calibration windows (`wiki-calib`), 5 epochs." in rec
    assert "ablation" not in rec


def test_other_variants_are_not_dropped():
    recs = sample_records() + [_ppl("flatquant", 4, 4, 4, "wikitext2", 31.5, variant="seed-1", calib=FULL)]
    md = report.render_markdown(recs)
    assert "31.50" not in _section(md, "## Perplexity (Table 1 layout)")
    other = _section(md, "## Other variants")
    assert "| FlatQuant [seed-1] | 31.50 | - |" in other


def test_calib_cost_table():
    md = report.render_markdown(sample_records())
    cost = _section(md, "## Calibration cost")
    assert ("| Shape | Recipe | CUDA graph | Samples | ms / step | s / epoch | Fixed s / layer | s / layer (15 epochs) | "
            "Layers | Model min (extrapolated) | Peak GPU GiB | Paper reference |") in cost
    assert ("| llama3-8b decoder layer (random weights) | svd-amp | yes | 128 × 2048 | 85.55 | 2.738 | 7.1 | 48.2 | 32 | "
            "25.7 | 16.58 | LLaMA-3-8B: 0.9 h |") in cost
    assert "loss_before" not in cost and "phase_seconds" not in cost  # compact: not every field


def test_kernel_sections():
    md = report.render_markdown(sample_records() + _kernel_entries())
    k = _section(md, "## Kernels")
    # fused transform: rows = hidden x phase, columns = batch, best prefill bandwidth vs the copy measurement
    assert "| Hidden (n1×n2) | Phase | b=1 | b=2 | Best prefill GB/s (% of copy) |" in k
    assert "| 4096 (64×64) | prefill | 1.25× | 2.50× | 900 GB/s (30%), round-once, b=1 |" in k
    assert "|  | decode | 3.00× | 2.00× | - |" in k
    assert "Copy bandwidth: 3,000 GB/s (2 GiB bf16 copy)" in k and "b × 2048 tokens" in k
    assert "| 4096 (64×64) | 1.25 / **2.50** |" in k  # variants table: fused / fused_round_once at b=1
    # W4A4 linear: full linear (auto) per shape and M, route in the header, bold where faster than BF16
    assert "| Layer (in → out) | M=1 (decode) | M=2048 (scaled_mm) |" in k
    assert "| 4096 → 4096 | 0.07× | **2.00×** |" in k and "| 4096 → 11008 | 0.25× | - |" in k
    # GEMM only: best route per cell, named where it is not the usual one
    assert "`scaled_mm` unless named" in k and "| 4096 → 4096 | 1.40× | 2.50× (int8) |" in k
    assert "0.68× (27.6 vs 18.8 µs)" in k  # CUDA-graph decode
    assert "M=1 int8, M=2048 scaled_mm" in k and "small_m_max=16" in k
    assert "fedcba9876" in k and "python benchmarks/bench_w4a4_linear.py" in k and "NVIDIA H100" in k
    # an entry of unknown shape is listed generically, one provenance row per kernel file
    assert "mystery" in _section(md, "## Other results")
    recs = _section(md, "## Records")
    assert "| `bench_w4a4_linear.json` | kernel_bench (10 entries) | `python benchmarks/bench_w4a4_linear.py` | fedcba9876 |" in recs


def _tma(kernel, ms, base_ms=2.0, m=8192, **extra):
    return {"kind": report.KERNEL_KIND, "kernel": kernel, "shape": {"in": 4096, "out": 11008, "M": m},
            "median_ms": ms, "baseline": "bf16_cublas", "baseline_median_ms": base_ms, "speedup": base_ms / ms,
            "achieved_gbps": 1.0, "command": "python benchmarks/bench_tma_gemm.py", **KPROV, **extra,
            "_path": "results/kernels/bench_tma_gemm.json"}


def test_tma_sweep_section():
    exact = lambda name, ok: {"kind": report.KERNEL_KIND, "kernel": f"tma_gemm_exactness_{name}",
                              "shape": {"M": 512, "N": 512, "K": 14336}, "median_ms": None, "baseline": "torch._int_mm",
                              "baseline_median_ms": None, "speedup": None, "exact": ok, **KPROV,
                              "command": "python benchmarks/bench_tma_gemm.py", "_path": "results/kernels/bench_tma_gemm.json"}
    entries = [exact("int8_a", True), exact("int8_b", True), exact("fp8_a", True), exact("fp8_fastacc", False),
               _tma("cublas_scaled_mm_rowwise", 1.25), _tma("cublas_scaled_mm_tensorwise", 1.0),
               _tma("cublas_int_mm", 2.0), _tma("tma_gemm_int8_a", 1.0), _tma("tma_gemm_int8_b", 0.8),
               _tma("tma_gemm_fp8_a", 1.6), _tma("tma_gemm_fp8_fastacc", 0.5)]
    k = _section(report.render_markdown(entries), "## Kernels")
    assert "### Large-M GEMM alone" in k
    # fastest exact config per format (the inexact fast-accumulation config is not a candidate)
    assert "| 4096 → 11008 | 8192 | 2.000 | 1.60× | 2.00× | 1.00× | 2.50× (b) | 1.25× (a) |" in k
    assert "3 of 4 configs exact; not exact: `fp8_fastacc`" in k
    assert "python benchmarks/bench_tma_gemm.py" in k


def test_empty_records():
    md = report.render_markdown([])
    assert "No results recorded yet" in md and "## Kernels" not in md and "## Ablation" not in md


def _write_results(tmp_path):
    results = tmp_path / "results"
    for r in sample_records():
        write_record(r, results)
    (results / "kernels").mkdir()
    for name, entries in sample_kernel_files().items():
        (results / "kernels" / name).write_text(json.dumps(entries))
    return results


def test_write_report_with_plots(tmp_path):
    results = _write_results(tmp_path)
    assert len(load_records(results)) == len(sample_records())  # the kernel lists are not records ...
    n_kernel = sum(len(v) for v in sample_kernel_files().values())
    assert len(report.load_all(results)) == len(sample_records()) + n_kernel  # ... but the report reads them
    out_md = tmp_path / "docs" / "RESULTS.md"
    plots = report.write_report(results, out_md, tmp_path / "docs" / "plots")
    md = out_md.read_text()
    pngs = sorted((tmp_path / "docs" / "plots").glob("*.png"))
    assert sorted(plots) == pngs
    assert [p.name.split("_")[0] for p in pngs] == ["ablation", "kernels", "ppl", "zeroshot"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        assert f"(plots/{p.name})" in md  # embedded with a path relative to the markdown
    assert "flatquant eval --method quarot" in md  # provenance section lists the commands
    assert "| `bench_fused_transform.json` | kernel_bench (6 entries) |" in md
    assert "| 4096 (64×64) | prefill | 1.25× | 2.50× |" in md
    assert not list((tmp_path / "docs").glob(".*.tmp"))


def test_make_plots_names_provenance(tmp_path, monkeypatch):
    import matplotlib.figure

    texts = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        legends = [t.get_text() for leg in self.legends + [ax.get_legend() for ax in self.axes if ax.get_legend()]
                   for t in leg.get_texts()]
        titles = [ax.get_title() for ax in self.axes]
        texts.append(" ".join([self._suptitle.get_text() if self._suptitle else ""]
                              + [t.get_text() for t in self.texts] + titles + legends))
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    paths = report.make_plots(sample_records() + _kernel_entries(), tmp_path)
    assert len(paths) == 4 and len(texts) == 4
    for t in texts:
        assert "NVIDIA H100" in t
    ppl, zs, abl, kern = texts
    for t in (ppl, zs, abl):
        assert MODEL in t and "0123456789" in t
    assert "seqlen 2048" in ppl and "limit 500" in zs
    assert "Ablation" in abl and "32 × 2048" in abl and "5 epochs" in abl and "full paper recipe = 23.90" in abl
    assert "W4A4 linear vs BF16 cuBLAS" in kern and "fedcba9876" in kern and "4096 → 11008" in kern


def _gptq_records() -> list[dict]:
    """QuaRot and FlatQuant (main run) with GPTQ weights, next to their RTN rows of sample_records()."""
    recs = []
    for ds, v in zip(("wikitext2", "c4"), (35.5, 47.0)):
        recs.append({**_ppl("quarot", 4, 4, 4, ds, v), "weight_quantizer": "gptq"})
    for ds, v in zip(("wikitext2", "c4"), (23.1, 30.2)):
        recs.append({**_ppl("flatquant", 4, 4, 4, ds, v, variant="paper-recipe", calib=FULL, quantize_seconds=900.0,
                            peak_gpu_mib=5100.0), "weight_quantizer": "gptq"})
    tasks = {t: {"metric": "acc", "value": v, "n": 500} for t, v in zip(TASKS, [29.0, 51.0, 38.5, 35.0, 65.0, 52.0])}
    for method in ("flatquant", "rtn"):
        recs.append(dict(kind="zeroshot", model=MODEL, method=method, w_bits=4, a_bits=4, kv_bits=4, tasks=tasks,
                         average=45.08, limit=500, weight_quantizer="gptq", **PROV,
                         **({"variant": "paper-recipe", "calib": FULL} if method == "flatquant" else {})))
    return recs


def test_gptq_rows_are_separate_rows():
    md = report.render_markdown(sample_records() + _gptq_records())
    table1 = _section(md, "## Perplexity (Table 1 layout)")
    lines = table1.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("| **W4A4KV4** |"))
    # as in the paper: the RTN rows of a bit setting, then its GPTQ rows; bold = best of the bit setting
    assert lines[i:i + 7] == ["| **W4A4KV4** | RTN | RTN | 5600.0 | 7100.0 |",
                              "|  | SmoothQuant | RTN | 950.0 | 1200.0 |",
                              "|  | QuaRot | RTN | 41.20 | 55.30 |",
                              "|  | FlatQuant | RTN | 23.90 | 30.80 |",
                              "|  | QuaRot | GPTQ | 35.50 | 47.00 |",
                              "|  | FlatQuant | GPTQ | **23.10** | **30.20** |",
                              "| **W8A8KV8** | QuaRot | RTN | 17.40 | 22.10 |"]
    assert "FlatQuant uses the full paper recipe: 128 × 2048-token calibration windows" in table1
    assert "calibration time 812 s" in table1
    assert "FlatQuant (GPTQ) uses the full paper recipe: 128 × 2048-token calibration windows" in table1
    assert "calibration time 900 s" in table1
    zs = [l for l in _section(md, "## Zero-shot accuracy").splitlines() if l.startswith(("|  |", "| **"))]
    assert [l.split(" | ")[1:3] for l in zs] == [["FP16", "-"], ["QuaRot", "RTN"], ["FlatQuant", "RTN"],
                                                 ["RTN", "GPTQ"], ["FlatQuant", "GPTQ"]]
    # the ablation and recipe tables compare with the RTN main run, whose weights they share
    assert "is in Table 1: WikiText-2 23.90, C4 (proxy) 30.80." in _section(md, "## Ablation (Table 3 layout)")
    assert "23.10" not in _section(md, "## Ablation (Table 3 layout)")


def test_gptq_records_files_and_plots(tmp_path, monkeypatch):
    import matplotlib.figure

    recs = sample_records() + _gptq_records()
    results = tmp_path / "results"
    for r in recs:
        write_record(r, results)
    assert len(load_records(results)) == len(recs)  # no GPTQ record overwrote an RTN one
    texts = {}
    orig = matplotlib.figure.Figure.savefig

    def spy(self, path, *a, **k):
        legends = [t.get_text() for leg in self.legends + [ax.get_legend() for ax in self.axes if ax.get_legend()]
                   for t in leg.get_texts()]
        texts[str(path)] = legends
        return orig(self, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    paths = report.make_plots(recs, tmp_path / "plots")
    assert len(paths) == 3
    ppl, zs, abl = (next(v for k, v in texts.items() if f"/.{kind}_" in k) for kind in ("ppl", "zeroshot", "ablation"))
    assert {"QuaRot", "QuaRot (GPTQ)", "FlatQuant", "FlatQuant (GPTQ)"} <= set(ppl)
    assert "FlatQuant W4A4KV4 (GPTQ)" in zs and "FlatQuant W4A4KV4" in zs and "RTN W4A4KV4 (GPTQ)" in zs
    assert any("full paper recipe = 23.90" in t for t in abl) and not any("23.10" in t for t in abl)


def test_archived_runs_are_not_rendered(tmp_path):
    """results/archive/ keeps superseded runs (another device's kernel timings) out of the tables."""
    entry = {"kernel": "fused", "shape": {"hidden": 4096, "phase": "prefill", "batch": 1}, "median_ms": 1.0,
             "baseline": "unfused_pytorch", "baseline_median_ms": 2.0, "speedup": 2.0, "device": "GPU-A"}
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bench.json").write_text(json.dumps([entry]))
    (tmp_path / "archive" / "old").mkdir(parents=True)
    (tmp_path / "archive" / "old" / "bench.json").write_text(json.dumps([{**entry, "device": "GPU-OLD"}]))
    write_record({"kind": "ppl", "model": "m", "method": "fp16", "dataset": "wikitext2", "ppl": 9.0},
                 tmp_path / "archive" / "old")
    recs = report.load_all(tmp_path)
    assert [r["device"] for r in recs] == ["GPU-A"]
    md = report.render_markdown(recs, [])
    assert "GPU-A" in md and "GPU-OLD" not in md


def test_decode_parts_table_is_separate_from_the_linear_tables():
    """bench_decode_parts.py records (graph-timed pieces, baseline bf16_gemv_cudagraph) get their own table;
    its whole-layer record shares the kernel name of the eager linear but must not land in that table."""
    base = dict(kind="kernel_bench", baseline="bf16_gemv_cudagraph", baseline_median_ms=0.014, device="NVIDIA H200",
                git_commit="abc1234", command="python benchmarks/bench_decode_parts.py", timing="cuda_graph")
    shape = {"in": 4096, "out": 4096, "M": 4, "dtype": "bfloat16", "bits": 4}
    parts = [dict(base, kernel=k, shape=shape, median_ms=ms, speedup=0.014 / ms)
             for k, ms in [("bf16_gemv", 0.014), ("fused_transform_quant", 0.007), ("decode_gemm_default", 0.0061),
                           ("w4a4_linear_auto", 0.008)]]
    md = report.render_markdown(sample_records() + _kernel_entries() + parts)
    k = _section(md, "## Kernels")
    assert "### Decode, piece by piece" in k
    dashes = " | ".join(["-"] * (len(report_kernels.DECODE_PARTS) - 4))  # the variants not recorded here
    assert f"| 4096 → 4096 | 4 | 14.0 | 7.0 | 6.1 | 8.0 | {dashes} | 1.75× |" in k
    assert "M=4" not in k  # no M = 4 column in the eager linear table


def test_baseline_free_probe_records_stay_out_of_the_kernel_tables():
    """probe_decode_latency.py records (absolute times, no baseline) must not become linear-table columns."""
    probe = dict(kind="kernel_bench", kernel="transform_split", baseline=None, baseline_median_ms=None, speedup=None,
                 shape={"in": 4096, "out": 4096, "M": 7, "n1": 64, "n2": 64}, median_ms=0.0079,
                 device="NVIDIA H200", git_commit="abc1234", command="python benchmarks/probe_decode_latency.py")
    assert report_kernels.classify(probe) is None
    md = report.render_markdown(sample_records() + _kernel_entries() + [probe])
    assert "M=7" not in _section(md, "## Kernels")


def test_fused_graph_timings_get_their_own_table():
    """bench_fused_transform.py's CUDA-graph records (small calls, both sides from graphs) stay out of the main
    table, the variants and the best-bandwidth column, and get a table of their own."""
    files = sample_kernel_files()
    graph = [{**_fused("fused_graph", 4096, phase, 1, ms, base, 9999.0), "timing": "cuda_graph",
              "baseline": "unfused_pytorch_graph"} for phase, ms, base in [("prefill", 0.01, 0.05), ("decode", 0.004, 0.02)]]
    entries = [{"kind": report.KERNEL_KIND, **e, "_path": f"results/kernels/{f}"}
               for f, es in files.items() for e in es + (graph if "fused" in f else [])]
    k = _section(report.render_markdown(sample_records() + entries), "## Kernels")
    assert "| 4096 (64×64) | prefill | 1.25× | 2.50× | 900 GB/s (30%), round-once, b=1 |" in k  # unchanged
    assert "graph" not in k.split("Small calls")[0].split("Kernel variants")[1]
    assert "| Hidden (n1×n2) | prefill b=1 | decode b=1 |" in k
    assert "| 4096 (64×64) | 5.00× (10.0 µs) | 5.00× (4.0 µs) |" in k
