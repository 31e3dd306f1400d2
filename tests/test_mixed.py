"""--mixed: the grammar, JSON files, and every rule it cannot honour is an error (never ignored)."""
from __future__ import annotations

import json

import pytest
import torch

from flatquant import QuantConfig, quantize
from flatquant.config import RTNConfig
from flatquant.errors import FlatQuantError
from flatquant.mixed import MixedSpecError, load_spec, parse, resolve


def test_grammar_resolves_layers_projections_and_order():
    spec = "down_proj=w8a8;layers=0,1,5-6:w6;layers=1:kv8;layers=6:o_proj=3"
    parse(spec)
    assert resolve(spec, "w", "down_proj", 3, 4) == 8
    assert resolve(spec, "w", "down_proj", 1, 4) == 6  # the later clause wins
    assert resolve(spec, "a", "down_proj", 1, 4) == 8
    assert resolve(spec, "w", "q_proj", 5, 4) == 6 and resolve(spec, "w", "q_proj", 4, 4) == 4
    assert resolve(spec, "k", None, 1, 4) == 8 and resolve(spec, "v", None, 1, 4) == 8
    assert resolve(spec, "k", None, 0, 4) == 4
    assert resolve(spec, "w", "o_proj", 6, 4) == 3 and resolve(spec, "a", "o_proj", 6, 4) == 3


@pytest.mark.parametrize("bad", ["", "down_proj=", "layers=0-:w8", "layers=3-1:w8", "layers=0w8", "x8",
                                 "down_proj=kv8", "w1", "w17", "w8w4", "a b=w8", "w8;;a8"])
def test_unreadable_specs_fail(bad):
    with pytest.raises(MixedSpecError):
        parse(bad)
    with pytest.raises(FlatQuantError):
        QuantConfig(mixed=bad)


def test_json_file_becomes_the_same_spec(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"proj": ["down_proj"], "w": 8, "a": 8}, {"layers": [0, 1], "w": 8, "a": 8},
                                {"layers": [1], "k": 3, "v": 2}]))
    assert load_spec(str(path)) == "down_proj=w8a8;layers=0,1:w8a8;layers=1:k3v2"
    path.write_text(json.dumps([{"layers": [0], "bits": 8}]))
    with pytest.raises(MixedSpecError, match="bad rule"):
        load_spec(str(path))
    with pytest.raises(MixedSpecError, match="no such file"):
        load_spec(str(tmp_path / "missing.json"))


def _bits(model):
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append({"q_w": attn.q_proj.w_quantizer.bits, "down_w": mlp.down_proj.w_quantizer.bits,
                    "down_a": mlp.down_proj.input_site.quantizer.bits,
                    "qkv_a": layer.input_layernorm.site.quantizer.bits,
                    "k": attn.fq_kv.k_quantizer.bits, "v": attn.fq_kv.v_quantizer.bits})
    return out


def test_per_layer_bits_reach_the_quantizers(tiny_model_factory):
    model = tiny_model_factory("llama")
    quantize(model, RTNConfig(mixed="down_proj=w8a8;layers=1:w6a6;layers=1:k3v2;q_proj,k_proj,v_proj=a5"))
    l0, l1 = _bits(model)
    assert l0 == {"q_w": 4, "down_w": 8, "down_a": 8, "qkv_a": 5, "k": 4, "v": 4}
    assert l1 == {"q_w": 6, "down_w": 6, "down_a": 6, "qkv_a": 5, "k": 3, "v": 2}


@pytest.mark.parametrize("spec,words", [
    ("k_proj=a8", "share one input quantizer"),  # k_proj's input is q_proj's quantizer
    ("up_proj=8", "share one input quantizer"),
    ("layers=0:v_proj=a8", "in layer 0"),
    ("foo_proj=w8", "names projection 'foo_proj'"),
    ("layers=2:w8", "layer 2 does not exist"),
])
def test_what_cannot_be_honoured_is_an_error(tiny_model_factory, spec, words):
    model = tiny_model_factory("llama")
    with pytest.raises(MixedSpecError, match=words):
        quantize(model, RTNConfig(mixed=spec))


def test_shared_site_override_in_the_old_dict_is_an_error(tiny_model_factory):
    model = tiny_model_factory("llama")
    with pytest.raises(MixedSpecError, match="share one input quantizer"):
        quantize(model, RTNConfig(a_bits_override={"up_proj": 8}))
    model = tiny_model_factory("llama")
    quantize(model, RTNConfig(a_bits_override={"gate_proj": 8, "up_proj": 8}))  # the shared site, explicitly
    assert model.model.layers[0].post_attention_layernorm.site.quantizer.bits == 8


def test_mixed_changes_outputs(tiny_model_factory):
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for spec in (None, "layers=0:w8a8kv8"):
        model = tiny_model_factory("llama")
        quantize(model, RTNConfig(mixed=spec))
        with torch.no_grad():
            outs.append(model(ids).logits)
    assert not torch.allclose(outs[0], outs[1])
