import pytest
from transformers import GPT2Config

from flatquant.errors import ModelError
from flatquant.models.families import family_for


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_registry_finds_all_projections(tiny_model_factory, family):
    model = tiny_model_factory(family)
    fam = family_for(model)
    layers = fam.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    lin = fam.linears(layers[0])
    assert set(lin) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (lin["q_proj"].bias is not None) == fam.qkv_bias


def test_unknown_architecture_lists_supported():
    with pytest.raises(ModelError, match="supported model types: .*llama.*qwen2"):
        family_for(GPT2Config())
