"""Rope variants (Llama-3.1 `llama3` scaling, Qwen YaRN long context) load and evaluate unchanged."""
import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.models.loading import load_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1000000.0}
CASES = [("llama", {"rope_parameters": LLAMA3}), ("llama", {"rope_scaling": dict(LLAMA3)}),
         ("qwen2", {"rope_scaling": dict(YARN)}), ("qwen3", {"rope_parameters": YARN})]


def _ids(vocab, n=2, seqlen=96):  # longer than the original context: the scaled frequencies matter
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,rope", CASES)
@pytest.mark.parametrize("method", ["rtn", "flatquant"])
def test_rope_variant_wrapped_at_16_bits_equals_hf(tiny_model_factory, family, rope, method):
    model = tiny_model_factory(family, **rope)
    assert model.config.rope_parameters["rope_type"] in ("llama3", "yarn")
    plain = tiny_model_factory(family)  # same weights, default rope: the variant must change the logits
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
        assert _rel(plain(ids).logits, ref) > 1e-3
    quantize(model, QuantConfig(16, 16, 16), method=method, calib=ids[:, :32],
             calib_config=calib_preset("tiny", epochs=1), progress=False)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-4


@pytest.mark.parametrize("family,rope", CASES[1:3])
def test_rope_variant_survives_a_saved_folder(tiny_model_factory, tiny_tokenizer, tmp_path, family, rope):
    model = tiny_model_factory(family, **rope)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded, _tok = load_model(str(tmp_path / "m"), dtype=torch.float32)
    ids = _ids(model.config.vocab_size)
    assert loaded.config.rope_parameters["rope_type"] == model.config.rope_parameters["rope_type"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
