"""The packed W4A4KV4 model: checkpoint export, loading, 4-bit KV cache and generation (docs/CHECKPOINT.md)."""
from __future__ import annotations

from flatquant.runtime.export import save_quantized
from flatquant.runtime.hf import register
from flatquant.runtime.kvcache import PackedKVCache, set_runtime_backend
from flatquant.runtime.load import check_checkpoint, load_quantized

__all__ = ["PackedKVCache", "check_checkpoint", "load_quantized", "register", "save_quantized",
           "set_runtime_backend"]
