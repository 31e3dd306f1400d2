"""The packed runtime loads every registered model family (dense, fused projections, MoE)."""
import pytest
import torch

from flatquant import QuantConfig, quantize
from flatquant.models.families import supported_model_types
from flatquant.runtime.export import save_quantized


def _build(model_type: str):
    """A tiny random model of a registered model type (float32, eval mode)."""
    from tests.conftest import TINY_CONFIG, build_model
    from tests.models.moe_models import MOE_FAMILIES, build_moe_model
    from tests.models.test_fused_projections import build_phi3

    if model_type in ("llama", "qwen2", "qwen3"):
        return build_model(model_type)
    if model_type == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, "vocab_size": 320}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.normal_(0, 0.08)
        return model.float().eval()
    if model_type == "phi3":
        return build_phi3()
    if model_type in MOE_FAMILIES:
        return build_moe_model(model_type)
    raise AssertionError(f"no tiny model for {model_type!r}: add one here and to tests/conftest.py")


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_family_loads_in_the_packed_runtime(model_type, tmp_path):
    """Each registered model type: FlatQuant (tiny) -> packed checkpoint -> load -> the same logits, prefill
    and one decode step through the KV4 cache (tolerance as tests/runtime/test_packed_model.py)."""
    import copy

    import flatquant
    from flatquant import calib_preset
    from flatquant.core.reparam import reparameterize
    from flatquant.kernels import W4A4Linear

    model = _build(model_type)
    assert model.config.model_type == model_type
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig(4, 4, 4), method="flatquant", calib=ids, calib_config=calib_preset("tiny", epochs=1),
             progress=False)
    model.config.use_cache = True
    save_quantized(model, tmp_path / model_type)
    packed = flatquant.load_quantized(tmp_path / model_type, device="cpu")
    assert any(isinstance(m, W4A4Linear) for m in packed.modules())
    x = ids[:2, :12]
    with torch.no_grad():
        ref = reparameterize(copy.deepcopy(model))(x, use_cache=False).logits
        out = packed(x[:, :11])
        got = torch.cat([out.logits, packed(x[:, 11:], past_key_values=out.past_key_values).logits], 1)
    assert (ref - got).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_phi3_fused_projections_export_load_match(tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj export as the packed fused sites and load back to the same logits."""
    import copy

    import flatquant
    from flatquant import calib_preset
    from flatquant.core.reparam import reparameterize
    from flatquant.runtime.modules import SiteProjection
    from tests.models.test_fused_projections import build_phi3

    model = build_phi3()
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig(4, 4, 4), method="flatquant", calib=ids, calib_config=calib_preset("tiny"),
             progress=False)
    save_quantized(model, tmp_path / "phi3")
    packed = flatquant.load_quantized(tmp_path / "phi3", device="cpu")
    attn = packed.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, SiteProjection) and attn.qkv_proj.out_features == 128
    x = ids[:2, :20]
    with torch.no_grad():
        ref = reparameterize(copy.deepcopy(model))(x, use_cache=False).logits
        got = packed(x, use_cache=False).logits
        cached = packed(x).logits  # prefill through the KV4 cache
    tol = 1e-4 * ref.abs().max().item()
    assert (ref - got).abs().max().item() <= tol and (ref - cached).abs().max().item() <= tol
