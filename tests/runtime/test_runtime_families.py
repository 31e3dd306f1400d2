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
