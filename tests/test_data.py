"""Text sources and token windows (flatquant.data)."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from flatquant import data
from flatquant.errors import DataError, FlatQuantError


def test_named_sources_resolve(tiny_data_dir):
    wiki = data.load_text("wikitext2", tiny_data_dir)
    assert wiki == (tiny_data_dir / "wikitext2" / "wikitext2_raw_test.txt").read_text()  # used as is
    assert data.load_text("wiki-calib", tiny_data_dir).startswith("The quick brown fox")
    assert data.load_text("WikiText2", tiny_data_dir) == wiki  # case-insensitive / alias
    c4 = data.load_text("c4", tiny_data_dir)
    assert c4.startswith("Document 0. ") and " Document 19. " in c4  # docs joined by a single space


def test_data_dir_from_env(tiny_data_dir, monkeypatch):
    monkeypatch.setenv("FLATQUANT_DATA_DIR", str(tiny_data_dir))
    assert data.resolve_data_dir() == tiny_data_dir.resolve()
    assert data.load_text("wikitext2").startswith("The quick")


def test_missing_data_dir_names_option_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("FLATQUANT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        data.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("FLATQUANT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="FLATQUANT_DATA_DIR"):
        data.resolve_data_dir()


def test_c4_takes_first_1100_docs(tmp_path, tiny_tokenizer):
    root = tmp_path / "d"
    (root / "c4").mkdir(parents=True)
    with gzip.open(root / "c4" / "c4_validation_proxy.jsonl.gz", "wt") as f:
        for i in range(1200):
            f.write(json.dumps({"text": f"d{i}"}) + "\n")
    text = data.load_text("c4", root)
    assert text == " ".join(f"d{i}" for i in range(1100))
    # eval tokens: truncated to 256 windows of seqlen
    ids = data.eval_tokens(tiny_tokenizer, "c4", root, seqlen=4)
    assert ids.shape == (1, 256 * 4)
    full = data.tokenize_text(tiny_tokenizer, text)
    assert torch.equal(ids, full[:, : 256 * 4])


def test_eval_tokens_and_max_tokens(tiny_data_dir, tiny_tokenizer):
    ids = data.eval_tokens(tiny_tokenizer, "wikitext2", tiny_data_dir)
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    text = data.load_text("wikitext2", tiny_data_dir)
    assert torch.equal(ids, tiny_tokenizer(text, return_tensors="pt").input_ids)
    assert data.eval_tokens(tiny_tokenizer, "wikitext2", tiny_data_dir, max_tokens=50).shape == (1, 50)


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert data.load_text(str(txt)) == "hello world"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert data.load_text(str(jl)) == "one\n\ntwo"
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert data.load_text(str(gz)) == "x\n\ny"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match="text"):
        data.load_text(str(bad))


def test_missing_file_is_data_error(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="missing.txt"):
        data.load_text(str(tmp_path / "missing.txt"))
    (tiny_data_dir / "wikitext2" / "wikitext2_raw_test.txt").unlink()
    with pytest.raises(DataError, match="wikitext2_raw_test.txt"):
        data.load_text("wikitext2", tiny_data_dir)
    with pytest.raises(DataError, match="unknown text source"):
        data.load_text("no-such-source", tiny_data_dir)
    assert issubclass(DataError, FlatQuantError)


def test_calibration_windows_reproducible(tiny_data_dir, tiny_tokenizer):
    a = data.calibration_windows(tiny_tokenizer, nsamples=8, seqlen=16, seed=0, data_dir=tiny_data_dir)
    b = data.calibration_windows(tiny_tokenizer, nsamples=8, seqlen=16, seed=0, data_dir=tiny_data_dir)
    c = data.calibration_windows(tiny_tokenizer, nsamples=8, seqlen=16, seed=1, data_dir=tiny_data_dir)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # every window is a contiguous slice of the tokenized calibration text
    ids = data.tokenize_text(tiny_tokenizer, data.load_text("wiki-calib", tiny_data_dir))[0].tolist()
    for w in a.tolist():
        assert any(ids[i: i + 16] == w for i in range(len(ids) - 16 + 1))


def test_seqlen_longer_than_text(tiny_data_dir, tiny_tokenizer):
    n = data.tokenize_text(tiny_tokenizer, data.load_text("wiki-calib", tiny_data_dir)).shape[1]
    with pytest.raises(DataError, match="fewer than"):
        data.calibration_windows(tiny_tokenizer, nsamples=2, seqlen=n, data_dir=tiny_data_dir)
    assert data.calibration_windows(tiny_tokenizer, nsamples=2, seqlen=n - 1, data_dir=tiny_data_dir).shape == (2, n - 1)


def test_no_long_sequence_warning(monkeypatch, make_tokenizer):
    import transformers.tokenization_utils_base as tub

    warned = []
    monkeypatch.setattr(tub.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    text = "The quick brown fox jumps over the lazy dog. " * 20
    tok = make_tokenizer()
    tok.model_max_length = 8
    ids = data.tokenize_text(tok, text)
    assert ids.shape[1] > 8
    assert not any("longer than the specified maximum" in w for w in warned)
    tok(text, return_tensors="pt")  # control: the plain call does warn (once per tokenizer)
    assert any("longer than the specified maximum" in w for w in warned)


def test_real_shared_data(shared_data_dir):
    if shared_data_dir is None:
        pytest.skip("../shared/data not present")
    wiki = data.load_text("wikitext2", shared_data_dir)
    assert len(wiki) > 1_000_000 and "Robert Boulter" in wiki[:200]
    c4 = data.load_text("c4", shared_data_dir)
    assert len(c4) > 1_000_000
    calib = data.load_text("wiki-calib", shared_data_dir)
    assert len(calib) > 1_000_000
    for task_file in ("arc_challenge_test.jsonl.gz", "piqa_validation.jsonl.gz"):
        assert data.zeroshot_file(shared_data_dir, task_file).is_file()
