"""Quantization methods. Each baseline turns a model into per-layer `LayerTransforms`; FlatQuant learns them.
flatquant.api maps each method's config type to the function that applies it."""
