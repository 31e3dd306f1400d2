"""runner.run_config's memory handling: the evaluated copy shares the base model's float weights, and
quantizing it never writes into them (the base stays bit-identical, results equal a full deep copy)."""
from __future__ import annotations

import copy

import pytest
import torch

from flatquant import runner
from flatquant.config import calib_preset, method_config


def _ids(n, vocab, seed):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_weight_sharing_copy(tiny_model_factory):
    model = tiny_model_factory("qwen2")
    dup = runner._weight_sharing_copy(model)
    pairs = list(zip(model.parameters(), dup.parameters()))
    assert len(pairs) == len(list(model.parameters()))
    for p, q in pairs:
        assert p is not q and p.data_ptr() == q.data_ptr() and q.requires_grad == p.requires_grad
    assert dup.lm_head.weight is dup.model.embed_tokens.weight  # ties survive the copy
    dup.model.layers[0].mlp.up_proj.weight.data = torch.zeros(1)  # replacing a copy's tensor...
    assert model.model.layers[0].mlp.up_proj.weight.shape[0] > 1  # ...leaves the base alone


@pytest.mark.parametrize("method,extra", [("fp16", {}), ("rtn", {}), ("quarot", {}), ("smoothquant", {}),
                                          ("rtn", {"weight_quantizer": "gptq"}), ("flatquant", {})])
def test_run_config_base_untouched_and_same_as_deepcopy(tiny_model_factory, tiny_tokenizer, monkeypatch, method,
                                                         extra):
    vocab = len(tiny_tokenizer)
    base = tiny_model_factory("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ccfg = calib_preset("tiny")  # registered by tests/conftest.py
    qcfg = method_config(method, **extra, **({"calib": ccfg} if method == "flatquant" else {}))
    calib = _ids(ccfg.nsamples * ccfg.seqlen, vocab, 1).view(ccfg.nsamples, ccfg.seqlen)
    spec = runner.EvalSpec(seqlen=32, max_windows=3, batch_size=2, tokens={"wikitext2": _ids(4 * 32, vocab, 2)})

    def run():
        return runner.run_config(base, tiny_tokenizer, "tiny", method, qcfg, spec, ccfg=ccfg, calib=calib,
                                 results_dir=None, progress=False)[0]["ppl"]

    shared = run()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    monkeypatch.setattr(runner, "_weight_sharing_copy", copy.deepcopy)
    assert shared == run()  # bit-identical to quantizing a full deep copy
