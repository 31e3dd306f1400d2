"""Tiny FlatQuant-calibrated models (Llama, Qwen2, Qwen3) and their packed checkpoints, built once per session."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("_fq_tests_root", Path(__file__).parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
SAMPLE_TEXT, TINY_CONFIG, build_model = _root.SAMPLE_TEXT, _root.TINY_CONFIG, _root.build_model


def build_qwen3(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY_CONFIG, "vocab_size": vocab_size, "head_dim": 16}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model.float().eval()


def base_model(family: str, vocab_size: int):
    return build_qwen3(vocab_size) if family == "qwen3" else build_model(family, vocab_size=vocab_size)


def calibrated(family: str, tokenizer, method: str = "flatquant", gptq: bool = False):
    """A fake-quant W4A4KV4 model: FlatQuant with the tiny preset (learned transforms, scales, clips)."""
    from flatquant import QuantConfig, calib_preset, quantize

    model = base_model(family, len(tokenizer))
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt")["input_ids"][0]
    calib = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(4)])
    qcfg = QuantConfig(4, 4, 4, weight_quantizer="gptq" if gptq else "rtn")
    quantize(model, qcfg, method=method, calib=calib if method == "flatquant" or gptq else None,
             calib_config=calib_preset("tiny"), progress=False)
    model.config.use_cache = True
    return model


@pytest.fixture(scope="session")
def fake_models(tiny_tokenizer):
    cache = {}

    def get(family: str, method: str = "flatquant", gptq: bool = False):
        key = (family, method, gptq)
        if key not in cache:
            cache[key] = calibrated(family, tiny_tokenizer, method, gptq)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def packed_dirs(fake_models, tiny_tokenizer, tmp_path_factory):
    from flatquant import save_quantized

    cache = {}

    def get(family: str, method: str = "flatquant", gptq: bool = False):
        key = (family, method, gptq)
        if key not in cache:
            out = tmp_path_factory.mktemp("packed") / f"{family}-{method}{'-gptq' if gptq else ''}"
            save_quantized(fake_models(*key), out, tokenizer=tiny_tokenizer)
            cache[key] = out
        return cache[key]

    return get


def reparameterized(model):
    from flatquant.core.reparam import reparameterize

    return reparameterize(copy.deepcopy(model))


def calibrated_moe(family: str, method: str = "flatquant", gptq: bool = False):
    """A tiny random MoE model (tests/models/moe_models.py) quantized to W4A4KV4 (FlatQuant: tiny preset)."""
    from flatquant import QuantConfig, calib_preset, quantize
    from tests.models.moe_models import build_moe_model

    model = build_moe_model(family)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    qcfg = QuantConfig(4, 4, 4, weight_quantizer="gptq" if gptq else "rtn")
    quantize(model, qcfg, method=method, calib=calib if method == "flatquant" or gptq else None,
             calib_config=calib_preset("tiny"), progress=False)
    model.config.use_cache = True
    return model


@pytest.fixture(scope="session")
def moe_models():
    cache = {}

    def get(family: str, method: str = "flatquant", gptq: bool = False):
        if (family, method, gptq) not in cache:
            cache[family, method, gptq] = calibrated_moe(family, method, gptq)
        return cache[family, method, gptq]

    return get


@pytest.fixture(scope="session")
def moe_packed_dirs(moe_models, tmp_path_factory):
    from flatquant import save_quantized

    cache = {}

    def get(family: str, method: str = "flatquant", gptq: bool = False):
        if (family, method, gptq) not in cache:
            out = tmp_path_factory.mktemp("packed-moe") / f"{family}-{method}{'-gptq' if gptq else ''}"
            save_quantized(moe_models(family, method, gptq), out)
            cache[family, method, gptq] = out
        return cache[family, method, gptq]

    return get
