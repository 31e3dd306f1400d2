"""Result records (flatquant/results.py): stable file names."""
from __future__ import annotations

import json
from pathlib import Path

from flatquant.results import record_name

REPO = Path(__file__).resolve().parents[1]


def test_record_name_separates_gptq_from_rtn():
    rec = dict(kind="ppl", model="SmolLM2-135M-Instruct", method="flatquant", w_bits=4, a_bits=4, kv_bits=4,
               weight_quantizer="rtn", variant="paper-recipe", dataset="wikitext2")
    assert record_name(rec) == "ppl-SmolLM2-135M-Instruct-flatquant-W4A4KV4-paper-recipe-wikitext2.json"
    assert record_name({**rec, "weight_quantizer": "gptq"}) == \
        "ppl-SmolLM2-135M-Instruct-flatquant-W4A4KV4-gptq-paper-recipe-wikitext2.json"
    assert record_name({k: v for k, v in rec.items() if k != "weight_quantizer"}) == record_name(rec)
    zs = dict(kind="zeroshot", model="M", method="fp16", w_bits=16, a_bits=16, kv_bits=16, weight_quantizer="-")
    assert record_name(zs) == "zeroshot-M-fp16-W16A16KV16.json"


def test_committed_records_keep_their_names():
    """Every ppl / zero-shot record in results/ is named as record_name names it today (re-runs replace it)."""
    paths = sorted((REPO / "results").glob("*.json"))
    recs = [(p, json.loads(p.read_text())) for p in paths]
    recs = [(p, r) for p, r in recs if isinstance(r, dict) and r.get("kind") in ("ppl", "zeroshot")]
    assert recs
    for p, r in recs:
        assert record_name(r) == p.name
