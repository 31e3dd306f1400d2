"""benchmarks/accuracy/run_accuracy.py --quick on a tiny saved model: the gptq part end to end (CPU smoke run)."""
from __future__ import annotations

import json
import os

import pytest


def _offline_zeroshot(tiny_data_dir, shared_data_dir, monkeypatch):
    """lm-eval importable, the zero-shot files linked into the tiny data folder, the hub switched off."""
    pytest.importorskip("lm_eval")
    if shared_data_dir is None:
        pytest.skip("../shared/data (zero-shot files) not present")
    os.symlink(shared_data_dir / "zeroshot", tiny_data_dir / "zeroshot")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_quick_gptq_part(load_script, tiny_model_dir, tiny_data_dir, shared_data_dir, tmp_path, monkeypatch, capsys):
    _offline_zeroshot(tiny_data_dir, shared_data_dir, monkeypatch)
    results, work = tmp_path / "results", tmp_path / "work"
    main = load_script("run_accuracy").main
    rc = main(["--quick", "--parts", "gptq", "--model", str(tiny_model_dir), "--model-name", "Tiny",
               "--data-dir", str(tiny_data_dir), "--results-dir", str(results), "--work-dir", str(work),
               "--zeroshot-batch-size", "4"])
    assert rc == 0
    names = sorted(p.name for p in results.glob("*.json"))
    assert names == ["ppl-Tiny-flatquant-W4A4KV4-gptq-paper-recipe-c4-maxwin2.json",  # --quick caps windows
                     "ppl-Tiny-flatquant-W4A4KV4-gptq-paper-recipe-wikitext2-maxwin2.json",
                     "ppl-Tiny-quarot-W4A4KV4-gptq-c4-maxwin2.json", "ppl-Tiny-quarot-W4A4KV4-gptq-wikitext2-maxwin2.json",
                     "zeroshot-Tiny-flatquant-W4A4KV4-gptq-paper-recipe-limit2.json",
                     "zeroshot-Tiny-quarot-W4A4KV4-gptq-limit2.json"]
    recs = {p.name: json.loads(p.read_text()) for p in results.glob("*.json")}
    for r in recs.values():
        assert r["weight_quantizer"] == "gptq" and r["w_bits"] == 4
        assert r["w_clip_search"] is (r["method"] == "quarot")
    assert json.loads((work / "flatquant_w4a4kv4_gptq" / "flatquant.json").read_text())["complete"]
    assert len(recs["zeroshot-Tiny-quarot-W4A4KV4-gptq-limit2.json"]["tasks"]) == 6
    log = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert len(log) == 3 and all("gptq:" in l and "wall" in l for l in log)


def test_quick_longcalib_part(load_script, tiny_model_dir, tiny_data_dir, shared_data_dir, tmp_path, monkeypatch, capsys):
    """The larger-calibration part: its own variant name, its recipe in the records, its own parameters."""
    _offline_zeroshot(tiny_data_dir, shared_data_dir, monkeypatch)
    results, work = tmp_path / "results", tmp_path / "work"
    main = load_script("run_accuracy").main
    rc = main(["--quick", "--parts", "longcalib", "--long-nsamples", "6", "--long-epochs", "3",
               "--model", str(tiny_model_dir), "--model-name", "Tiny", "--data-dir", str(tiny_data_dir),
               "--results-dir", str(results), "--work-dir", str(work), "--zeroshot-batch-size", "4"])
    assert rc == 0
    names = sorted(p.name for p in results.glob("*.json"))
    assert names == ["ppl-Tiny-flatquant-W4A4KV4-gptq-calib-6x64-e3-c4-maxwin2.json",
                     "ppl-Tiny-flatquant-W4A4KV4-gptq-calib-6x64-e3-wikitext2-maxwin2.json",
                     "zeroshot-Tiny-flatquant-W4A4KV4-gptq-calib-6x64-e3-limit2.json"]
    for p in results.glob("*.json"):
        r = json.loads(p.read_text())
        assert r["variant"] == "calib-6x64-e3" and r["weight_quantizer"] == "gptq"
        assert (r["calib"]["nsamples"], r["calib"]["seqlen"], r["calib"]["epochs"]) == (6, 64, 3)
    meta = json.loads((work / "flatquant_w4a4kv4_gptq_calib-6x64-e3" / "flatquant.json").read_text())
    assert meta["complete"] and meta["calib"]["nsamples"] == 6
    log = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert len(log) == 2 and all("longcalib:" in l for l in log)
