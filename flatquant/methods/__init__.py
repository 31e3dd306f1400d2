"""Quantization methods. Each baseline turns a model into per-layer `LayerTransforms`; FlatQuant learns them."""
from flatquant.methods import quarot, rtn, smoothquant

BASELINES = {
    "rtn": rtn.build_transforms,
    "smoothquant": smoothquant.build_transforms,
    "quarot": quarot.build_transforms,
}
