"""Perplexity protocol (flatquant.eval.perplexity)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from flatquant.errors import DataError
from flatquant.eval import perplexity


def _ids(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def _reference_ppl(model, ids, seqlen):
    """Hand-computed: one window at a time, mean NLL over positions 1..seqlen-1, exp of the mean."""
    nwin = ids.shape[1] // seqlen
    nlls = []
    with torch.no_grad():
        for w in range(nwin):
            x = ids[:, w * seqlen: (w + 1) * seqlen]
            logits = model(x).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -logp.gather(1, x[0, 1:, None]).mean()
            nlls.append(float(nll))
    return math.exp(sum(n * seqlen for n in nlls) / (nwin * seqlen)), nwin


def test_matches_hand_computed(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    ids = _ids(5 * 32 + 7, len(tiny_tokenizer))  # a tail shorter than one window is dropped
    ref, nwin = _reference_ppl(model, ids, 32)
    out = perplexity(model, ids, seqlen=32, batch_size=2, progress=False)
    assert out["windows"] == nwin == 5 and out["tokens"] == 5 * 32 and out["seqlen"] == 32
    assert out["ppl"] == pytest.approx(ref, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["nll"]), rel=1e-9)


def test_hf_loss_agrees(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("qwen2")
    ids = _ids(3 * 16, len(tiny_tokenizer), seed=3)
    with torch.no_grad():
        losses = [float(model(ids[:, i * 16:(i + 1) * 16], labels=ids[:, i * 16:(i + 1) * 16]).loss)
                  for i in range(3)]
    out = perplexity(model, ids, seqlen=16, progress=False)
    assert out["ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_batch_size_does_not_change_result(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    ids = _ids(7 * 24, len(tiny_tokenizer), seed=1)
    vals = [perplexity(model, ids, seqlen=24, batch_size=b, progress=False)["ppl"] for b in (1, 3, 8)]
    assert vals[0] == pytest.approx(vals[1], rel=1e-5) and vals[0] == pytest.approx(vals[2], rel=1e-5)


def test_max_windows(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    ids = _ids(6 * 16, len(tiny_tokenizer), seed=2)
    out = perplexity(model, ids, seqlen=16, max_windows=2, progress=False)
    ref, _ = _reference_ppl(model, ids[:, : 2 * 16], 16)
    assert out["windows"] == 2 and out["tokens"] == 32 and out["max_windows"] == 2
    assert out["ppl"] == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, ids, seqlen=16, max_windows=100, progress=False)["windows"] == 6


def test_text_shorter_than_one_window(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("llama")
    with pytest.raises(DataError, match="text has 10 tokens, fewer than one window of 16"):
        perplexity(model, _ids(10, len(tiny_tokenizer)), seqlen=16, progress=False)


def test_chunked_cross_entropy_matches_full():
    from flatquant.eval.perplexity import _window_nll

    logits = torch.randn(5, 9, 11)
    targets = torch.randint(0, 11, (5, 9))
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 11), targets[:, 1:].reshape(-1), reduction="none")
    expect = full.view(5, 8).mean(1)
    for chunk in (1, 2, 5):
        assert torch.allclose(_window_nll(logits, targets, chunk), expect, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_chunks_match_full_logits(tiny_model_factory, tiny_tokenizer, monkeypatch, family):
    """The output head applied a few positions at a time gives the full-logits perplexity (to 1e-6)."""
    ppl_mod = importlib.import_module("flatquant.eval.perplexity")
    from flatquant.eval.perplexity import _head_nll, _window_nll

    model = tiny_model_factory(family)
    ids = _ids(3 * 20, len(tiny_tokenizer), seed=4)
    batch = ids.view(3, 20)
    with torch.no_grad():
        full = _window_nll(model(input_ids=batch).logits, batch, chunk=3)
        for positions in (1, 3, 7, 19, 64):
            assert torch.allclose(_head_nll(model, batch, positions), full, rtol=1e-6, atol=1e-6), positions
    ref, _ = _reference_ppl(model, ids, 20)
    for budget in (1, 4 * len(tiny_tokenizer) * 5, 1 << 30):  # one position, five, the whole window per chunk
        monkeypatch.setattr(ppl_mod, "HEAD_CHUNK_BYTES", budget)
        assert perplexity(model, ids, seqlen=20, batch_size=1, progress=False)["ppl"] == pytest.approx(ref, rel=1e-6)
