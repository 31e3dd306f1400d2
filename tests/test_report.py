"""docs/RESULTS.md and plots from results records (flatquant.report)."""
from __future__ import annotations

from flatquant import report
from flatquant.results import load_records, write_record

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROV = {"device": "NVIDIA H100 80GB HBM3", "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "command": "flatquant eval --method quarot", "date": "2025-01-01T00:00:00+00:00"}

PPL = {  # (method, w, a, kv, wq) -> (wikitext2, c4)
    ("fp16", 16, 16, 16, "rtn"): (17.31, 22.05),
    ("rtn", 4, 16, 16, "rtn"): (19.2, 25.1),
    ("quarot", 4, 16, 16, "rtn"): (18.4, 24.0),
    ("rtn", 16, 4, 16, "rtn"): (2.1e4, 3.3e4),
    ("rtn", 16, 16, 4, "rtn"): (25.0, 30.2),
    ("rtn", 4, 4, 4, "rtn"): (5.6e3, 7.1e3),
    ("smoothquant", 4, 4, 4, "rtn"): (950.0, 1200.0),
    ("quarot", 4, 4, 4, "rtn"): (41.2, 55.3),
    ("flatquant", 4, 4, 4, "rtn"): (23.9, 30.8),
    ("quarot", 8, 8, 8, "rtn"): (17.4, 22.1),
}
ZS = {("fp16", 16, 16, 16): [30.1, 55.2, 40.3, 41.0, 66.7, 52.1], ("quarot", 4, 4, 4): [25.2, 40.1, 30.2, 20.5, 60.0, 50.4],
      ("flatquant", 4, 4, 4): [28.0, 50.3, 37.9, 33.3, 64.8, 51.2]}
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande"]


def sample_records() -> list[dict]:
    recs = []
    for (method, w, a, kv, wq), vals in PPL.items():
        for ds, v in zip(("wikitext2", "c4"), vals):
            recs.append(dict(kind="ppl", model=MODEL, method=method, w_bits=w, a_bits=a, kv_bits=kv,
                             weight_quantizer=wq, dataset=ds, seqlen=2048, windows=166 if ds == "wikitext2" else 256,
                             ppl=v, **PROV))
    recs.append(dict(kind="ppl", model=MODEL, method="flatquant", w_bits=4, a_bits=4, kv_bits=4, weight_quantizer="rtn",
                     dataset="wikitext2", seqlen=2048, windows=40, ppl=24.5, variant="ablation:+LT", **PROV))
    for (method, w, a, kv), vals in ZS.items():
        tasks = {t: {"metric": "acc" if t in ("lambada_openai", "winogrande") else "acc_norm", "value": v, "n": 500}
                 for t, v in zip(TASKS, vals)}
        recs.append(dict(kind="zeroshot", model=MODEL, method=method, w_bits=w, a_bits=a, kv_bits=kv, tasks=tasks,
                         average=sum(vals) / 6, limit=500, **PROV))
    recs.append(dict(kind="calib_time", model=MODEL, method="flatquant", w_bits=4, a_bits=4, kv_bits=4,
                     seconds=812.5, nsamples=128, epochs=15, peak_mem_gb=3.2, extra={"lr": 5e-3}, **PROV))
    recs.append(dict(kind="kernel", shape=[2048, 576], op="kron_quant", speedup=2.31, latency_ms=0.0123, **PROV))
    return recs


def test_render_tables():
    md = report.render_markdown(sample_records())
    assert "## Perplexity (Table 1 layout)" in md and "## Zero-shot accuracy (Table 2 layout)" in md
    assert "| Bits | Method | W quantizer | WikiText-2 | C4 (proxy) |" in md
    assert "| Bits | Method | W quantizer | ARC-C | ARC-E | HellaSwag | LAMBADA | PIQA | WinoGrande | Avg |" in md
    # rows grouped by bit setting, FP16 first, W4A4KV4 rows together, best of the group in bold
    lines = md.splitlines()
    i_fp16 = next(i for i, l in enumerate(lines) if l.startswith("| **FP16** | FP16"))
    i_w4a4 = next(i for i, l in enumerate(lines) if l.startswith("| **W4A4KV4** |"))
    assert i_fp16 < i_w4a4
    assert "| FlatQuant | RTN | **23.90** | **30.80** |" in md
    assert "2.10e+04" in md  # large perplexities stay readable
    assert "24.50 (n=40)" in md  # a row with fewer windows is marked
    assert "FlatQuant [ablation:+LT]" in md
    # captions: model, seqlen, windows, device, commit, limit
    assert "seqlen 2048" in md and "WikiText-2 166" in md and "C4 (proxy) 256" in md
    assert "NVIDIA H100 80GB HBM3" in md and "0123456789" in md
    assert "lm-eval limit: 500" in md
    assert "| 28.00 | 50.30 | 37.90 | 33.30 | 64.80 | 51.20 | 44.25 |" in md
    # other kinds are listed generically, nothing dropped
    assert "### calib_time" in md and "812.5" in md and "extra.lr" in md
    assert "### kernel" in md and "2.31" in md and "[2048, 576]" in md
    # the SmolLM2 note
    assert "dequantized Q4_1 GGUF" in md and "groups of 32" in md


def test_empty_records():
    md = report.render_markdown([])
    assert "No results recorded yet" in md


def test_write_report_with_plots(tmp_path):
    results = tmp_path / "results"
    for r in sample_records():
        write_record(r, results)
    assert len(load_records(results)) == len(sample_records())
    out_md = tmp_path / "docs" / "RESULTS.md"
    plots = report.write_report(results, out_md, tmp_path / "docs" / "plots")
    md = out_md.read_text()
    pngs = sorted((tmp_path / "docs" / "plots").glob("*.png"))
    assert len(pngs) == 2 and sorted(plots) == pngs
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        assert f"(plots/{p.name})" in md  # embedded with a path relative to the markdown
    assert "flatquant eval --method quarot" in md  # provenance section lists the commands
    assert not list((tmp_path / "docs").glob(".*.tmp"))


def test_make_plots_names_provenance(tmp_path, monkeypatch):
    import matplotlib.figure

    texts = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        texts.append(" ".join([self._suptitle.get_text() if self._suptitle else ""] + [t.get_text() for t in self.texts]))
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    paths = report.make_plots(sample_records(), tmp_path)
    assert len(paths) == 2 and len(texts) == 2
    for t in texts:
        assert MODEL in t and "NVIDIA H100" in t and "0123456789" in t
    assert "seqlen 2048" in texts[0] and "limit 500" in texts[1]
