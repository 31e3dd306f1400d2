"""flatquant.report.e2e on synthetic e2e records: tables, speedups, targets, plots."""
from __future__ import annotations

import pytest

from flatquant.report import e2e

GIB = 2 ** 30
DEC_MS = {"bf16": 30.0, "fp8": 18.0, "int4": 10.0, "flatquant": 10.5}
PRE_MS = {"bf16": 400.0, "fp8": 250.0, "int4": 240.0, "flatquant": 260.0}
WEIGHTS = {"bf16": 13.0, "fp8": 7.0, "int4": 3.5, "flatquant": 3.6}
KV = {"bf16": 32.0, "fp8": 32.0, "int4": 9.0, "flatquant": 9.0}
MAXB = {"bf16": 60, "fp8": 66, "int4": 240, "flatquant": 238}


def _rec(row, phase, batch, **kw):
    base = {"kind": "e2e", "model_shape": "llama2-7b", "row": row, "phase": phase, "batch": batch,
            "seqlen": 2048 if phase == "prefill" else 1, "kv_len": 0 if phase == "prefill" else 2048,
            "median_ms": None, "peak_mem_gib": None, "oom": False, "device": "NVIDIA H100 80GB HBM3",
            "git_commit": "abc1234def", "command": "python benchmarks/bench_e2e.py --out x.json",
            "date": "2026-12-07T18:00:00+00:00"}
    return {**base, **kw}


def records():
    out = [{"kind": "e2e", "phase": "setup", "copy_gbps": 3000.0, "device": "NVIDIA H100 80GB HBM3",
            "git_commit": "abc1234def", "date": "2026-12-07T18:00:00+00:00"}]
    for row in DEC_MS:  # the four original rows
        for b, f in ((1, 0.1), (32, 1.0)):
            out.append(_rec(row, "decode", b, median_ms=DEC_MS[row] * f, floor_ratio=1.2,
                            weights_bytes=WEIGHTS[row] * GIB, kv_cache_bytes=KV[row] * GIB * b / 32,
                            peak_mem_gib=WEIGHTS[row] + KV[row] * b / 32 + 1, cast_cache_bytes=0))
        for b, f in ((4, 1.0), (16, 4.0)):
            out.append(_rec(row, "prefill", b, median_ms=PRE_MS[row] * f))
        out.append(_rec(row, "max_batch", MAXB[row], computed=True, per_seq_bytes=2 ** 30,
                        max_batch_without_cast_cache=MAXB[row]))
        out.append(_rec(row, "layer_mem", 1, kv_len=256, seqlen=1, peak_mem_gib=0.4))
    out.append(_rec("bf16", "decode", 64, oom=True))
    return out


def test_section_tables_and_speedups():
    md = "\n".join(e2e.e2e_section(records()))
    assert "## End-to-end speed and memory" in md and "### llama2-7b" in md
    assert "| BF16 | 3.00 (1.20× floor) | 30.00 (1.20× floor) | OOM |" in md
    assert "| FlatQuant W4A4KV4 | 2.86× | 2.86× | - |" in md  # 30 / 10.5 over BF16 at b=1 and b=32
    assert "Speedup over FP8 W8A8 (BF16 KV) (prefill" in md
    assert "largest batch at KV length 2048 (computed" in md and "| FlatQuant W4A4KV4 | 238 |" in md
    assert "Table 20" in md and "409.6" in md
    assert "copy bandwidth 3000 GB/s" in md and "abc1234" in md


def test_targets_from_records():
    t = {x["target"]: x for x in e2e.targets(records())}
    dec = t["decode b=32 KV 2048: FlatQuant vs BF16"]
    assert dec["value"] == pytest.approx(30 / 10.5) and dec["ok"] is True
    assert t["decode b=32 KV 2048: FlatQuant vs FP8 W8A8 (BF16 KV here)"]["ok"] is True  # 18 / 10.5 = 1.71
    pre = t["prefill 2048, batch >= 4: FlatQuant vs BF16 (worst batch)"]
    assert pre["value"] == pytest.approx(400 / 260) and pre["ok"] is True
    assert t["prefill 2048, batch >= 4: FlatQuant vs FP8 (worst batch)"]["value"] == pytest.approx(250 / 260)
    gap = t["INT4 ceiling minus FlatQuant speedup over BF16 (worst of decode b=32, prefill b>=4)"]
    assert gap["value"] == pytest.approx(30 / 10 - 30 / 10.5) and gap["ok"] is False  # decode's 0.14 > prefill's
    mem = t["weights + KV memory at decode b=32: BF16 / FlatQuant"]
    assert mem["value"] == pytest.approx(45 / 12.6) and mem["ok"] is True
    assert t["largest batch at KV 2048 (computed): FlatQuant / BF16"]["value"] == pytest.approx(238 / 60)
    assert t["baseline: FP8 vs BF16 prefill b=4"]["value"] == pytest.approx(1.6)


def test_missing_rows_give_no_data_and_empty_section():
    recs = [r for r in records() if r.get("row") != "fp8"]
    t = {x["target"]: x for x in e2e.targets(recs)}
    assert t["decode b=32 KV 2048: FlatQuant vs FP8 W8A8 (BF16 KV here)"]["ok"] is None
    assert e2e.e2e_section([{"kind": "ppl", "ppl": 5.0}]) == []


def test_latest_record_wins():
    recs = records() + [_rec("flatquant", "decode", 32, median_ms=15.0, weights_bytes=1, kv_cache_bytes=1,
                             date="2026-12-08T00:00:00+00:00")]
    t = {x["target"]: x for x in e2e.targets(recs)}
    assert t["decode b=32 KV 2048: FlatQuant vs BF16"]["value"] == pytest.approx(2.0)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = e2e.e2e_plots(records(), tmp_path)
    assert [p.name for p in paths] == ["e2e_speedup_llama2-7b.png", "e2e_memory_llama2-7b.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_ratios_only_within_the_newest_run():
    """A newer run (another commit) replaces the whole older run of its shape: a row only the older run has is
    not shown next to the newer rows, no ratio mixes runs, and the older run is named under the section."""
    old = records() + [_rec("quarot", "decode", 32, median_ms=5.0, floor_ratio=1.0)]
    new = [{**r, "git_commit": "fff9999aaa", "date": "2026-12-08T00:00:00+00:00"} for r in records()
           if r.get("row") != "fp8"]
    new = [{**r, "median_ms": r["median_ms"] * 2} if r.get("row") == "bf16" and r.get("median_ms") else r
           for r in new]
    recs = old + new
    text = "\n".join(e2e.e2e_section(recs))
    assert "QuaRot" not in text.split("Earlier runs")[0] and "FP8 W8A8 (BF16 KV) |" not in text
    assert "Earlier runs, not shown" in text and "abc1234def" in text
    t = {x["target"]: x for x in e2e.targets(recs)}
    dec = t["decode b=32 KV 2048: FlatQuant vs BF16"]["value"]
    assert dec == pytest.approx(2 * DEC_MS["bf16"] / DEC_MS["flatquant"])
