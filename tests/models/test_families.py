import pytest
from transformers import GPT2Config

from flatquant.errors import ModelError
from flatquant.models.families import family_for


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_registry_finds_all_projections(tiny_model_factory, family):
    model = tiny_model_factory(family)
    fam = family_for(model)
    assert fam.name == family
    layers = fam.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    lin = fam.linears(layers[0])
    assert set(lin) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(lin) == set(fam.roles) == {r for roles in fam.sites.values() for r in roles}
    attn, mlp = fam.attention(layers[0]), fam.mlp_module(layers[0])
    for role, module in lin.items():  # each role is the module of that name, in attention or the MLP
        assert module is getattr(attn, role, None) or module is getattr(mlp, role)
    assert (lin["q_proj"].bias is not None) == (family == "qwen2")
    assert hasattr(attn, "q_norm") == (family == "qwen3")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_site_map(tiny_model_factory, family):
    model = tiny_model_factory(family)
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    assert list(fam.sites) == ["attn_in", "o_in", "mlp_in", "down_in"]
    for site, roles in fam.sites.items():  # every projection of a site reads inputs of the same width
        assert {m.in_features for m in fam.site_linears(layer, site)} == \
            {fam.linears(layer)[roles[0]].in_features}
    assert fam.site_norm("attn_in") == "input" and fam.site_norm("mlp_in") == "post"
    assert fam.site_norm("o_in") is None and fam.producer == {"down_in": "up_proj"}
    k, v = (fam.linears(layer)[r] for r in fam.kv)
    assert k.out_features == v.out_features == model.config.num_key_value_heads * fam.head_dim(model.config)


def test_head_dim_explicit_or_derived(tiny_model_factory):
    qwen3 = tiny_model_factory("qwen3", head_dim=32)  # an explicit head_dim that differs from hidden / heads
    assert family_for(qwen3).head_dim(qwen3.config) == 32
    llama = tiny_model_factory("llama")
    assert family_for(llama).head_dim(llama.config) == 64 // 4


def test_unknown_architecture_lists_supported():
    with pytest.raises(ModelError, match="supported model types: .*llama.*qwen2"):
        family_for(GPT2Config())


def test_readme_family_table_is_the_registry():
    from pathlib import Path

    from flatquant.models.families import family_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert family_table() in readme, "README's family table differs from families.family_table(); paste it in"


def test_unknown_architecture_error_lists_every_supported_type():
    from flatquant.models.families import supported_model_types

    with pytest.raises(ModelError) as e:
        family_for(GPT2Config())
    msg = str(e.value)
    assert "\n" not in msg and "'gpt2'" in msg
    assert all(t in msg for t in supported_model_types()) and "mixtral" in msg and "qwen3_moe" in msg
