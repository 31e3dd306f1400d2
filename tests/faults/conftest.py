"""Fault-injection tier: a tiny 3-layer model, a data folder, and one reference calibration shared by the tier."""
from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from fault_helpers import H, quantize_args, save_model

from flatquant import cli


@pytest.fixture(scope="session")
def test_rng():
    seed = int(os.environ.get("FLATQUANT_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"fault tier seed: FLATQUANT_TEST_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def fenv(tmp_path_factory):
    """A saved tiny 3-layer Llama, a data folder, and a reference `quantize --preset tiny` run (uninterrupted)."""
    root = tmp_path_factory.mktemp("faults")
    tok = H.build_tokenizer()
    model = save_model(root / "tiny-llama", tok)
    data = root / "data"
    for sub in ("wikitext2", "c4", "calib"):
        (data / sub).mkdir(parents=True)
    (data / "wikitext2" / "wikitext2_raw_test.txt").write_text("\n\n".join([H.SAMPLE_TEXT] * 3))
    (data / "calib" / "wiki_articles.txt").write_text("\n\n".join([H.SAMPLE_TEXT] * 4))
    with gzip.open(data / "c4" / "c4_validation_proxy.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": H.SAMPLE_TEXT}) + "\n")
    env = {"root": root, "model": model, "data": data, "tok": tok, "ref": root / "ref", "ref_results": root / "ref-res"}
    assert cli.main(quantize_args(env, env["ref"], env["ref_results"])) == 0
    return env
