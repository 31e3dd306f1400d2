"""Tiny random MoE models (Mixtral, Qwen2-MoE with a shared expert and a dense layer, Qwen3-MoE) for tests."""
from __future__ import annotations

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def build_moe_model(family: str, vocab_size: int = 320, seed: int = 0, **overrides):
    """A tiny random MoE causal LM in float32, eval mode; weights scaled up so quantization error shows."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    cfg = {**BASE, "vocab_size": vocab_size}
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**{**cfg, "intermediate_size": 48, "num_local_experts": 4,
                                                    "num_experts_per_tok": 2, **overrides}))
    elif family == "qwen2_moe":  # layer 1 is dense (mlp_only_layers); layer 0 has a shared expert
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**cfg, "intermediate_size": 80, "moe_intermediate_size": 32,
                                                      "shared_expert_intermediate_size": 48, "num_experts": 4,
                                                      "num_experts_per_tok": 2, "mlp_only_layers": [1],
                                                      **overrides}))
    elif family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**cfg, "head_dim": 16, "intermediate_size": 80,
                                                      "moe_intermediate_size": 32, "num_experts": 4,
                                                      "num_experts_per_tok": 2, "norm_topk_prob": True,
                                                      **overrides}))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model.float().eval()
