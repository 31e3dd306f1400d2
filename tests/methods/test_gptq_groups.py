"""GPTQ and RTN with weight groups (the GPTQ-g128 baseline of Table 11), with and without act order."""
from __future__ import annotations

import copy

import pytest
import torch

from flatquant import quantize_with_report
from flatquant.config import RTNConfig
from flatquant.core.modules import quant_linears
from flatquant.core.quantizer import fake_quantize
from flatquant.methods.gptq import GPTQError, Hessian, gptq, row_grid


def _inputs(n=64, tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 1.5 * torch.randn(n, n, generator=g) / n**0.5)
    x[:, :3] *= 8
    return x


def _h(x):
    h = Hessian(x.shape[1], "cpu")
    h.add(x)
    return h.value()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_group_codes_lie_on_each_groups_grid_and_beat_rtn(act_order, symmetric):
    x = _inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    w[:, 40:48] *= 6  # one group with larger weights: its own scale
    res = gptq(w, _h(x), bits=3, symmetric=symmetric, act_order=act_order, group_size=16)
    assert res.scale.shape == (32, 4) and (res.zero is None) == symmetric
    scale, zero = row_grid(w, 3, symmetric, group_size=16)
    assert torch.equal(res.scale, scale)  # per-group grid, from the original weights
    deq = res.dequantize()
    for gi in range(4):
        cols = slice(16 * gi, 16 * gi + 16)
        s = scale[:, gi:gi + 1]
        steps = deq[:, cols] / s + (0 if zero is None else zero[:, gi:gi + 1])
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # on this group's grid
    rtn = fake_quantize(w, 3, symmetric, group_size=16)
    err = lambda wq: (x @ (w - wq).t()).norm().item()
    assert err(deq) < 0.9 * err(rtn)
    per_channel = gptq(w, _h(x), bits=3, symmetric=symmetric, act_order=act_order)
    assert err(deq) < err(per_channel.dequantize())  # groups: a finer grid


def test_group_size_must_divide():
    with pytest.raises(GPTQError, match="does not divide"):
        row_grid(torch.randn(4, 10), 4, True, group_size=4)


@pytest.mark.parametrize("weight_quantizer", ["rtn", "gptq"])
def test_model_level_groups(tiny_model_factory, weight_quantizer):
    base = tiny_model_factory("llama")
    ids = torch.randint(0, base.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    errs = {}
    for g in (None, 16):
        model = copy.deepcopy(base)
        quantize_with_report(model, RTNConfig(w_bits=3, a_bits=16, kv_bits=16, w_group_size=g,
                                              weight_quantizer=weight_quantizer), calib=ids, progress=False)
        for m in quant_linears(model):
            assert m.w_quantizer.group_size == g
            if weight_quantizer == "gptq":
                assert m.gptq_scale.shape == (m.out_features, 1 if g is None else m.in_features // g)
        with torch.no_grad():
            errs[g] = ((model(ids).logits - ref).norm() / ref.norm()).item()
    assert errs[16] < errs[None], errs


def test_group_size_that_does_not_divide_is_a_config_error(tiny_model_factory):
    from flatquant.config import ConfigError

    model = tiny_model_factory("llama")
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_with_report(model, RTNConfig(w_group_size=40), progress=False)
