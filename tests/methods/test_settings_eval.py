"""Other settings end to end: parameters trained at W4A16 evaluated at A4/KV4 (trained_bits recorded),
separate K/V bits, KV groups, split KV clip factors, the calibration loss and scale-alpha knobs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.calib.train_step import calib_loss
from flatquant.config import ConfigError, FlatQuantConfig, RTNConfig
from flatquant.core.quantizer import Quantizer, fake_quantize
from flatquant.methods.flatquant import calibrate, load_calibrated
from flatquant.runner import EvalSpec, run_config


def _windows(model, n=4, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_w4a16_parameters_evaluate_at_a4_kv4(tiny_model_factory, tiny_tokenizer, tmp_path):
    base = tiny_model_factory("llama")
    ids = _windows(base)
    calibrate(copy.deepcopy(base), QuantConfig(4, 16, 16), ids, calib_preset("tiny"), progress=False,
              out_dir=tmp_path / "p")
    model = load_calibrated(copy.deepcopy(base), tmp_path / "p", QuantConfig(4, 4, 4))
    layer = model.model.layers[0]
    site = layer.input_layernorm.site.quantizer
    assert site.bits == 4 and site.clip_logit is None and site.alpha() == 1.0  # not trained: fixed ratio
    assert layer.self_attn.fq_kv.k_quantizer.bits == 4
    assert layer.self_attn.q_proj.w_quantizer.clip_logit is not None  # trained weight clipping kept
    spec = EvalSpec(datasets=["wikitext2"], seqlen=32, batch_size=2, tokens={"wikitext2": ids.reshape(1, -1)})
    recs = run_config(base, tiny_tokenizer, "Tiny", "flatquant", FlatQuantConfig(4, 4, 4), spec,
                      params_dir=str(tmp_path / "p"), results_dir=tmp_path / "r", progress=False)
    assert recs[0]["trained_bits"] == "W4A16KV16" and recs[0]["a_bits"] == 4
    assert recs[0]["ppl"] == recs[0]["ppl"]
    names = [p.name for p in (tmp_path / "r").glob("*.json")]
    assert names == ["ppl-Tiny-flatquant-W4A4KV4-trained-W4A16KV16-wikitext2.json"]
    fresh = run_config(base, tiny_tokenizer, "Tiny", "rtn", RTNConfig(4, 4, 4), spec, results_dir=None,
                       progress=False)
    r = fresh[0]
    assert r["trained_bits"] is None and (r["k_bits"], r["v_bits"]) == (4, 4)
    assert (r["w_group_size"], r["w_asym"], r["kv_group_size"], r["mixed"]) == (None, False, None, None)


def test_separate_k_and_v_bits(tiny_model_factory):
    model = tiny_model_factory("llama")
    cfg = RTNConfig(16, 16, 4, k_bits=2, v_bits=3)
    quantize(model, cfg)
    kv = model.model.layers[1].self_attn.fq_kv
    assert (kv.k_quantizer.bits, kv.v_quantizer.bits) == (2, 3)
    assert cfg.tag == "W16A16K2V3" and RTNConfig(4, 4, 4, k_bits=4).tag == "W4A4KV4"
    x = torch.randn(1, 2, 3, 16)
    assert torch.equal(kv.k_quantizer(x), fake_quantize(x, 2, symmetric=False))


def test_kv_group_size_within_a_head(tiny_model_factory):
    model = tiny_model_factory("llama")  # head_dim 16
    quantize(model, RTNConfig(16, 16, 4, kv_group_size=8))
    q = model.model.layers[0].self_attn.fq_kv.k_quantizer
    x = torch.randn(1, 2, 3, 16)
    x[..., :8] *= 20  # one half of each head much larger: its own scale
    assert torch.equal(q(x), fake_quantize(x, 4, symmetric=False, group_size=8))
    assert (q(x) - x)[..., 8:].abs().max() < (fake_quantize(x, 4, False) - x)[..., 8:].abs().max()
    model = tiny_model_factory("llama")
    quantize(model, RTNConfig(16, 16, 4, kv_group_size=16))  # the head: the default grouping
    assert model.model.layers[0].self_attn.fq_kv.k_quantizer.group_size is None
    for bad in (5, 32):
        with pytest.raises(ConfigError, match="head dimension"):
            quantize(tiny_model_factory("llama"), RTNConfig(16, 16, 4, kv_group_size=bad))


def test_split_kv_clip_learns_two_factors(tiny_model_factory, tmp_path):
    q = Quantizer(4, symmetric=False, learnable_clip=True, split_clip=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        q.clip_logit_low.fill_(0.0)  # minimum clipped to half; maximum nearly unclipped
    lo, hi = torch.sigmoid(torch.tensor(0.0)), torch.sigmoid(q.clip_logit.detach())
    from flatquant.core.quantizer import dequantize, quantize_asymmetric

    ref = dequantize(*quantize_asymmetric(x, 4, hi, lo))
    assert torch.allclose(q(x), ref)
    q(x).pow(2).sum().backward()
    assert q.clip_logit.grad is not None and q.clip_logit_low.grad is not None
    assert Quantizer(4, symmetric=True, learnable_clip=True, split_clip=True).clip_logit_low is None

    base = tiny_model_factory("llama")
    ids = _windows(base)
    cfg = calib_preset("tiny", kv_clip_split=True)
    model = copy.deepcopy(base)
    calibrate(model, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "p")
    kv = model.model.layers[0].self_attn.fq_kv.k_quantizer
    assert kv.clip_logit_low is not None
    assert not torch.equal(kv.clip_logit_low, kv.clip_logit)  # learned separately
    again = load_calibrated(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    meta = json.loads((tmp_path / "p" / "flatquant.json").read_text())
    assert meta["calib"]["kv_clip_split"] is True


def test_calibration_loss_choices():
    t = torch.tensor([[[10.0, 10.0], [0.1, 0.1]]])
    out = t + torch.tensor([[[1.0, 1.0], [0.1, 0.1]]])
    assert calib_loss(out, t, "mse") == pytest.approx((1 + 1 + 0.01 + 0.01) / 4)
    assert calib_loss(out, t, "nmse-token") == pytest.approx((1 / 100 + 0.01 / 0.01) / 2)
    with pytest.raises(ConfigError):
        calib_preset("tiny", loss="l1")


def test_knobs_change_training(tiny_model_factory):
    base = tiny_model_factory("llama")
    ids = _windows(base)
    outs = {}
    for name, over in {"default": {}, "alpha": {"scale_alpha": 0.3}, "loss": {"loss": "nmse-token"},
                       "wd": {"weight_decay": 0.5}}.items():
        model = copy.deepcopy(base)
        calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny", **over), progress=False)
        with torch.no_grad():
            outs[name] = model(ids).logits
    for name in ("alpha", "loss", "wd"):
        assert not torch.allclose(outs[name], outs["default"]), name


def test_old_calib_settings_still_compare_equal():
    from flatquant.config import CalibConfig

    old = {k: v for k, v in CalibConfig().to_dict().items() if k not in ("scale_alpha", "kv_clip_split", "loss")}
    assert CalibConfig.recipe_settings(old) == CalibConfig.recipe_settings(CalibConfig().to_dict())
    old_q = {k: v for k, v in QuantConfig().to_dict().items() if k not in ("k_bits", "v_bits", "mixed")}
    assert QuantConfig.normalized(old_q) == QuantConfig().to_dict()
