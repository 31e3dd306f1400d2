"""The packed runtime and model families: MoE families are refused with one line."""
import pytest
import torch

from flatquant import QuantConfig, quantize
from flatquant.errors import CheckpointError
from flatquant.runtime.export import save_quantized, skeleton
from tests.models.moe_models import build_moe_model


def test_moe_export_is_refused_with_one_line(tmp_path):
    model = build_moe_model("qwen3_moe")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig(4, 4, 4), method="rtn", calib=ids, progress=False)
    with pytest.raises(CheckpointError, match="mixture-of-experts") as e:
        save_quantized(model, tmp_path / "packed")
    assert "\n" not in str(e.value) and not (tmp_path / "packed").exists()


def test_moe_packed_config_is_refused():
    cfg = build_moe_model("mixtral").config.to_dict()
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        skeleton(cfg)


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
