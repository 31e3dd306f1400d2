"""Phi-3: fused qkv_proj and gate_up_proj quantized as they are stored (one QuantLinear each)."""
import copy

import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.core.modules import QuantLinear
from flatquant.core.reparam import reparameterize
from flatquant.methods.flatquant import calibrate
from flatquant.models.families import family_for

CFG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def build_phi3(vocab_size=320, seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**CFG, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model.float().eval()


def _ids(n=4, seqlen=24):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_site_map_keeps_projections_fused():
    model = build_phi3()
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    assert fam.sites["attn_in"] == ("qkv_proj",) and fam.sites["mlp_in"] == ("gate_up_proj",)
    lin = fam.linears(layer)
    assert set(lin) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert lin["qkv_proj"] is layer.self_attn.qkv_proj and lin["gate_up_proj"] is layer.mlp.gate_up_proj
    assert fam.v_rows(layer) == ("qkv_proj", (96, 128))  # (4 + 2) heads x 16, then 2 value heads
    assert fam.producer == {"down_in": "gate_up_proj"}
    assert fam.producer_rows("down_in", lin["gate_up_proj"]) == slice(96, None)


@pytest.mark.parametrize("method", ["flatquant", "quarot", "smoothquant"])
def test_all_placements_exact_at_16_bits(method):
    model = build_phi3()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, QuantConfig(16, 16, 16), method=method, calib=ids,
             calib_config=calib_preset("tiny", epochs=1), progress=False)
    layer = family_for(model).decoder_layers(model)[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(layer.mlp.gate_up_proj, QuantLinear)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-4


def test_calibration_lowers_loss_and_reparam_matches():
    model = build_phi3()
    report = calibrate(model, QuantConfig(4, 4, 4), _ids(8, 32), calib_preset("tiny", epochs=6, batch_size=4),
                       progress=False, log=lambda m: None)
    assert all(r["loss_after"] < r["loss_before"] for r in report["calib_layers"])
    ids = _ids(2, 20)
    folded = reparameterize(copy.deepcopy(model))  # P_v on the v rows only, c_d into the up half only
    with torch.no_grad():
        a, b = model(ids).logits, folded(ids).logits
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
