"""Shared fixtures: tiny randomly initialised Llama / Qwen2 / Qwen3 models and a tokenizer built offline.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a few sentences at test time.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported, and any test may import one first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests-only calibration preset (the CLI offers it only while the tests run): tiny windows, 2 epochs.
TINY_PRESET = dict(nsamples=4, seqlen=32, epochs=2, batch_size=2)


def register_tiny_preset() -> None:
    from flatquant import config

    config.PRESETS.setdefault("tiny", TINY_PRESET)
    config.PRESET_EVAL_WINDOWS.setdefault("tiny", 2)


register_tiny_preset()

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps floating point numbers to a small "
    "set of integers. Large language models have outliers in their activations, and flat distributions "
    "are easier to quantize. A Kronecker product of two small matrices is cheap to apply. "
) * 4

TINY_CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_tokenizer():
    """Builds a fresh tokenizer (for tests that need one no other test has used)."""
    return build_tokenizer


def build_model(family: str = "llama", vocab_size: int = 320, seed: int = 0, **overrides):
    """A tiny random causal LM of the given family, in float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = {**TINY_CONFIG, "vocab_size": vocab_size, **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))  # q/k/v carry a bias
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**{"head_dim": 16, **cfg}))  # per-head RMSNorm on q and k
    else:
        raise ValueError(family)
    # Random init gives near-zero logits; larger weights make quantization error visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model.float().eval()


@pytest.fixture
def tiny_model_factory(tiny_tokenizer):
    def make(family: str = "llama", **overrides):
        return build_model(family, vocab_size=len(tiny_tokenizer), **overrides)

    return make


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama model directory (config, safetensors weights, tokenizer)."""
    path = tmp_path / "tiny-llama"
    model = build_model("llama", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A data folder with the layout of ../shared/data, filled with small synthetic text."""
    import gzip
    import json

    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    (root / "c4").mkdir()
    (root / "calib").mkdir()
    (root / "wikitext2" / "wikitext2_raw_test.txt").write_text("\n\n".join([SAMPLE_TEXT] * 3))
    (root / "calib" / "wiki_articles.txt").write_text("\n\n".join([SAMPLE_TEXT] * 4))
    with gzip.open(root / "c4" / "c4_validation_proxy.jsonl.gz", "wt") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Document {i}. " + SAMPLE_TEXT[: 200 + 10 * i]}) + "\n")
    return root


@pytest.fixture(scope="session")
def shared_data_dir():
    """The real ../shared/data when present (CI has it), else None."""
    env = os.environ.get("FLATQUANT_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for c in candidates:
        if (c / "wikitext2").is_dir():
            return c
    return None
