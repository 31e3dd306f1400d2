"""RTN: quantize every projection and the KV cache as they are, with no transform."""
from __future__ import annotations

from flatquant.core.modules import LayerTransforms


def build_transforms(model, family, cfg, calib=None, seed: int = 0) -> list[LayerTransforms]:
    return [LayerTransforms() for _ in family.decoder_layers(model)]
