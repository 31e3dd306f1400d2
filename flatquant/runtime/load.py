"""Load a packed checkpoint: check the folder, then build it through transformers' quantizer hook."""
from __future__ import annotations

from pathlib import Path

import torch

from flatquant.errors import CheckpointError, ModelError
from flatquant.runtime import layout


def check_checkpoint(path: str | Path) -> dict:
    """config.json of a complete, consistent packed checkpoint, or one CheckpointError line."""
    from flatquant.runtime.export import expected_tensors

    cfg = layout.read_config(path)
    try:
        expected = expected_tensors(cfg)
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: config.json does not describe a packed model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
    layout.check_tensors(path, expected)
    return cfg


def load_quantized(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The packed model as a Hugging Face PreTrainedModel on `device` (default: CUDA if available): W4A4
    linears (Triton backend on CUDA, reference on CPU) and a 4-bit KV cache."""
    from transformers import AutoModelForCausalLM

    from flatquant.runtime.hf import register

    cfg = check_checkpoint(path)
    register()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or getattr(torch, cfg["quantization_config"]["dtype"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load the packed model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return model.to(device).eval()
