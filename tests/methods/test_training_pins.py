"""What FlatQuant training must do, pinned: clip factors and channel scales get gradients and move; the KV
quantizer is asymmetric; each block trains on full-precision inputs; the learning rate follows a cosine."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.config import RTNConfig
from flatquant.core.quantizer import fake_quantize
from flatquant.methods import flatquant as fq
from flatquant.methods.flatquant import calibrate


def _windows(model, n=4, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _tracked(layer):
    return {n: p.detach().clone() for n, p in layer.named_parameters()
            if "clip_logit" in n or (n.startswith("fq_transforms.") and n.endswith(".scale"))}


def test_clip_factors_and_channel_scales_get_gradients_and_move(tiny_model_factory, monkeypatch):
    model = tiny_model_factory("llama")
    seen = []
    original = fq.train_layer

    def spy(layer, *args, **kwargs):
        before = _tracked(layer)
        out = original(layer, *args, **kwargs)
        params = dict(layer.named_parameters())
        seen.append({n: (params[n].grad, (params[n].detach() - b).abs().max().item()) for n, b in before.items()})
        return out

    monkeypatch.setattr(fq, "train_layer", spy)
    calibrate(model, QuantConfig(4, 4, 4), _windows(model), calib_preset("tiny"), progress=False)
    assert len(seen) == 2
    for layer in seen:
        kinds = {"act/kv clip": [n for n in layer if "clip_logit" in n and "w_quantizer" not in n],
                 "weight clip": [n for n in layer if "w_quantizer.clip_logit" in n],
                 "channel scale": [n for n in layer if n.endswith(".scale")]}
        assert all(kinds.values()), kinds
        assert any("fq_kv" in n for n in kinds["act/kv clip"])
        for kind, names in kinds.items():
            for n in names:
                grad, moved = layer[n]
                assert grad is not None and grad.abs().sum() > 0, (kind, n)
                assert moved > 1e-6, (kind, n, moved)


def test_kv_quantizer_is_asymmetric(tiny_model_factory):
    """Skewed keys/values (range [-1, 3]) are quantized with a zero point, per token and head: exactly the
    asymmetric reference, and clearly more accurate than symmetric quantization would be."""
    model = tiny_model_factory("llama")
    quantize(model, RTNConfig(16, 16, 4))
    kv = model.model.layers[0].self_attn.fq_kv
    x = torch.rand(1, 2, 5, 16, generator=torch.Generator().manual_seed(0)) * 4 - 1
    for quantizer in (kv.k_quantizer, kv.v_quantizer):
        y = quantizer(x)
        assert torch.equal(y, fake_quantize(x, 4, symmetric=False))
        sym_err = (fake_quantize(x, 4, symmetric=True) - x).abs().mean()
        assert (y - x).abs().mean() < 0.8 * sym_err


def test_kv_quantizer_is_asymmetric_after_flatquant(tiny_model_factory):
    model = tiny_model_factory("llama")
    calibrate(model, QuantConfig(4, 4, 4), _windows(model), calib_preset("tiny", epochs=1), progress=False)
    kv = model.model.layers[1].self_attn.fq_kv
    assert not kv.k_quantizer.symmetric and not kv.v_quantizer.symmetric


def test_each_block_trains_on_full_precision_inputs(tiny_model_factory, monkeypatch):
    base = tiny_model_factory("llama")
    ids = _windows(base)
    with torch.no_grad():
        fp_hidden = base(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, ...]
        ref_rtn = copy.deepcopy(base)
        quantize(ref_rtn, RTNConfig(4, 4, 4))
        q_hidden = ref_rtn(ids, output_hidden_states=True).hidden_states
    inputs = {}
    original = fq.calibrate_layer

    def spy(layer, family, model_config, qcfg, cfg, inps, *args, **kwargs):
        inputs[kwargs["index"]] = inps.detach().clone()
        return original(layer, family, model_config, qcfg, cfg, inps, *args, **kwargs)

    monkeypatch.setattr(fq, "calibrate_layer", spy)
    calibrate(copy.deepcopy(base), QuantConfig(4, 4, 4), ids, calib_preset("tiny"), progress=False)
    for i in (0, 1):
        got = inputs[i].float().reshape(fp_hidden[i].shape)
        assert torch.allclose(got, fp_hidden[i], atol=1e-4, rtol=1e-4), i
    # the check can tell: quantized layers' outputs differ clearly from the full-precision ones
    assert (q_hidden[1] - fp_hidden[1]).abs().max() > 100 * 1e-4


def test_learning_rate_follows_a_cosine_schedule(tiny_model_factory, monkeypatch):
    lrs = []

    class Recording(fq.LayerStepper):
        def step(self, x, t, index, total):
            super().step(x, t, index, total)
            lrs.append((index, total, [float(g["lr"]) for g in self.opt.param_groups]))

    monkeypatch.setattr(fq, "LayerStepper", Recording)
    model = tiny_model_factory("llama")
    cfg = calib_preset("tiny", epochs=2, lr=4e-3, clip_lr=2e-2)  # 4 windows, batch 2: 4 steps per layer
    calibrate(model, QuantConfig(4, 4, 4), _windows(model), cfg, progress=False)
    assert len(lrs) == 8
    for index, total, (lr, clip_lr) in lrs:
        assert total == 4
        factor = 0.5 * (1 + math.cos(math.pi * index / total))
        assert lr == pytest.approx(4e-3 * factor, rel=1e-6) and clip_lr == pytest.approx(2e-2 * factor, rel=1e-6)
    assert lrs[2][2][0] == pytest.approx(2e-3)  # half way: half the base rate
