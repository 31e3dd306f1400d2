"""benchmarks/accuracy/run_settings.py: the plan (rows, order, estimates) and a --smoke CPU run end to end."""
from __future__ import annotations

import json


def test_plan_covers_the_tables_cheapest_first(load_script, capsys):
    mod = load_script("run_settings")
    assert mod.main(["--out-dir", "unused", "--tables", "11,12,13,14,15", "--variants", "base,alpha0.3",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = mod.plan_rows(["11", "12", "13", "14", "15"], ["base", "alpha0.3"], 128, None)
    t11 = [r for r in rows if "11" in r.tables]
    assert len(t11) == 12 and {r.settings.get("w_group_size") for r in t11} == {None, 128}
    kv = [r for r in rows if "12" in r.tables and r.method != "fp16"]
    assert len(kv) == 18 and {r.bits[2:] for r in kv} == {(k, v) for k in (2, 3, 4) for v in (2, 3, 4)}
    assert sum("13" in r.tables for r in rows) == 7  # fp16 + 3 x (quarot, flatquant), shared with 12
    t15 = [r for r in rows if "15" in r.tables]
    assert {r.params for r in t15} == {"w4a4kv4"} and all(r.train_bits == (4, 4, 4, 4) for r in t15)
    assert f"{len(rows)} rows planned" in out
    ordered = mod.order(rows, 2, True)
    costs = [c for _, c in ordered]
    first_fq = next(i for i, (r, _) in enumerate(ordered) if r.method == "flatquant")
    assert all(c <= costs[first_fq] for c in costs[:first_fq])  # the cheap baselines run first
    seen = set()
    for r, _ in ordered:  # a row evaluated from shared parameters comes after the row that trains them
        if r.params and r.train_bits != r.bits:
            assert r.params in seen
        if r.params:
            seen.add(r.params)


def test_smoke_run_writes_records(load_script, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    mod = load_script("run_settings")
    out = tmp_path / "out"
    rc = mod.main(["--smoke", "--model", str(tiny_model_dir), "--model-name", "Tiny", "--data-dir",
                   str(tiny_data_dir), "--out-dir", str(out), "--tables", "13,15", "--no-zeroshot",
                   "--datasets", "wikitext2"])
    assert rc == 0
    recs = {p.name: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert "ppl-Tiny-flatquant-W16A16KV2-paper-recipe-wikitext2-maxwin2.json" in recs
    assert "ppl-Tiny-quarot-W16A16KV3-wikitext2-maxwin2.json" in recs
    t15 = recs["ppl-Tiny-flatquant-W4A16KV16-trained-W4A4KV4-paper-recipe-wikitext2-maxwin2.json"]
    assert t15["trained_bits"] == "W4A4KV4" and (t15["w_bits"], t15["a_bits"]) == (4, 16)
    assert recs["ppl-Tiny-flatquant-W4A4KV4-paper-recipe-wikitext2-maxwin2.json"]["trained_bits"] is None
    assert len(recs) == 1 + 3 * 2 + 4
    for r in recs.values():
        assert {"k_bits", "v_bits", "w_group_size", "w_asym", "kv_group_size", "mixed", "trained_bits"} <= set(r)
    # a second run skips the rows done; --rerun with --max-seconds 0 starts no row
    capsys.readouterr()
    again = ["--smoke", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--out-dir", str(out),
             "--tables", "15", "--no-zeroshot", "--datasets", "wikitext2"]
    assert mod.main(again) == 0
    assert capsys.readouterr().out.count("done before") == 4
    assert mod.main([*again, "--rerun", "--max-seconds", "0"]) == 0
    assert "4 row(s) not started" in capsys.readouterr().out


def test_smoke_zeroshot_rows(load_script, tiny_model_dir, tiny_data_dir, shared_data_dir, tmp_path, monkeypatch):
    """Table 14 rows carry zero-shot records next to their perplexities."""
    import os

    import pytest

    pytest.importorskip("lm_eval")
    if shared_data_dir is None:
        pytest.skip("../shared/data (zero-shot files) not present")
    os.symlink(shared_data_dir / "zeroshot", tiny_data_dir / "zeroshot")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mod = load_script("run_settings")
    out = tmp_path / "out"
    rc = mod.main(["--smoke", "--model", str(tiny_model_dir), "--model-name", "Tiny", "--data-dir", str(tiny_data_dir),
                   "--out-dir", str(out), "--tables", "14", "--datasets", "wikitext2", "--tasks", "piqa",
                   "--zeroshot-batch-size", "4"])
    assert rc == 0
    names = sorted(p.name for p in (out / "results").glob("*.json"))
    assert "zeroshot-Tiny-quarot-W3A3KV3-limit2.json" in names
    assert "zeroshot-Tiny-flatquant-W3A3KV3-paper-recipe-limit2.json" in names
    assert sum(n.startswith("zeroshot-") for n in names) == 4 and sum(n.startswith("ppl-") for n in names) == 4
