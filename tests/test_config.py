"""Method configs as types: each carries its own defaults, and `quantize` dispatches on the type."""
import copy

import pytest
import torch

from flatquant import (
    CalibConfig,
    FlatQuantConfig,
    FP16Config,
    QuantConfig,
    QuaRotConfig,
    RTNConfig,
    SmoothQuantConfig,
    calib_preset,
    method_config,
    quantize,
)
from flatquant.config import METHODS, PRESETS, ConfigError, as_method_config


def test_each_method_carries_its_defaults():
    assert QuaRotConfig().w_clip_search and SmoothQuantConfig().w_clip_search
    assert not RTNConfig().w_clip_search and not FlatQuantConfig().w_clip_search
    assert FlatQuantConfig().calib == CalibConfig()
    assert (FP16Config().w_bits, FP16Config().a_bits, FP16Config().kv_bits) == (16, 16, 16)
    assert [method_config(m).method for m in METHODS] == list(METHODS)
    for cfg in (QuaRotConfig(weight_quantizer="gptq"), FlatQuantConfig(4, 4, 4, weight_quantizer="gptq")):
        assert cfg.weight_quantizer == "gptq"


def test_method_config_none_means_default():
    assert method_config("quarot", w_clip_search=None) == QuaRotConfig()
    assert method_config("quarot", w_clip_search=False).w_clip_search is False
    assert method_config("smoothquant", w_bits=8, weight_quantizer=None) == SmoothQuantConfig(w_bits=8)
    assert method_config("fp16", w_bits=4, w_clip_search=True) == FP16Config()  # fp16 changes nothing
    with pytest.raises(ConfigError, match="unknown method"):
        method_config("gptq")


def test_saved_settings_are_the_quantizer_fields_only():
    cfg = FlatQuantConfig(4, 4, 4, calib=calib_preset("tiny"))
    assert cfg.to_dict() == QuantConfig(4, 4, 4).to_dict()  # what parameter folders store and compare
    assert QuantConfig.from_dict(cfg.to_dict()) == QuantConfig(4, 4, 4)


def test_plain_quantconfig_keeps_its_settings_and_takes_the_method():
    plain = QuantConfig(4, 4, 4)  # w_clip_search False, explicitly
    cfg = as_method_config(plain, "quarot")
    assert isinstance(cfg, QuaRotConfig) and cfg.w_clip_search is False
    assert isinstance(as_method_config(plain), RTNConfig)
    assert as_method_config(QuaRotConfig(), "quarot") == QuaRotConfig()
    with pytest.raises(ConfigError, match="method 'rtn' given with a QuaRotConfig"):
        as_method_config(QuaRotConfig(), "rtn")
    with pytest.raises(ConfigError, match="unknown method"):
        quantize(torch.nn.Linear(2, 2), plain, method="awq")


def test_tiny_preset_is_for_tests_only():
    from flatquant import cli

    assert PRESETS["tiny"]  # registered by tests/conftest.py
    src = open(cli.__file__).read() + open(__import__("flatquant.config").config.__file__).read()
    assert '"tiny"' not in src


@pytest.mark.parametrize("cls, method", [(RTNConfig, "rtn"), (QuaRotConfig, "quarot"),
                                         (SmoothQuantConfig, "smoothquant")])
def test_type_dispatch_equals_named_method(tiny_model_factory, cls, method):
    base = tiny_model_factory("llama")
    ids = torch.randint(0, base.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    quantize(a, cls(4, 4, 4), calib=ids)
    settings = {f: getattr(cls(), f) for f in ("w_clip_search",)}
    quantize(b, QuantConfig(4, 4, 4, **settings), method=method, calib=ids)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.equal(a(ids).logits, base(ids).logits)


def test_flatquant_config_carries_its_recipe(tiny_model_factory):
    base = tiny_model_factory("llama")
    ids = torch.randint(0, base.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    quantize(a, FlatQuantConfig(4, 4, 4, calib=calib_preset("tiny", epochs=1)), calib=ids, progress=False)
    quantize(b, QuantConfig(4, 4, 4), method="flatquant", calib=ids, calib_config=calib_preset("tiny", epochs=1),
             progress=False)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_fp16_is_no_change(tiny_model_factory):
    model = tiny_model_factory("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize(model, FP16Config()) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
