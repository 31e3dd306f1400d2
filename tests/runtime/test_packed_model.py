"""Packed W4A4KV4 model: parity with the fake-quant model, KV4 cache decode, round trip, HF loading.

Tolerances (CPU, float32): against the fake-quant model after flatquant.core.reparam (same float64 folding,
so the same integer codes), the packed model differs only by float32 summation order (integer GEMM then
scales, vs F.linear on dequantized weights): |Δlogit| <= 1e-4 · max|logit|. Against the unfolded fake-quant
model, folding the channel scales into the norms moves activations by float32 rounding, which can flip a
4-bit code at a rounding tie now and then, so that check is looser (2 % of max|logit|).
"""
from __future__ import annotations

import filecmp

import pytest
import torch

import flatquant
from flatquant.kernels import W4A4Linear
from flatquant.runtime.kvcache import PackedKVCache
from flatquant.runtime.modules import SiteProjection

FAMILIES = ["llama", "qwen2", "qwen3"]
TIGHT, LOOSE = 1e-4, 2e-2


def _ids(tok, n=2, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tok), (n, length), generator=g)


def _close(a, b, tol):
    return (a - b).abs().max().item() <= tol * a.abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_fake_quant(family, fake_models, packed_dirs, tiny_tokenizer):
    from tests.runtime.conftest import reparameterized

    fake = fake_models(family)
    packed = flatquant.load_quantized(packed_dirs(family), device="cpu")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        ref = reparameterized(fake)(ids, use_cache=False).logits
        unfolded = fake(ids, use_cache=False).logits
        got = packed(ids, use_cache=False).logits
        got_cached = packed(ids).logits  # prefill through the KV4 cache
    assert _close(ref, got, TIGHT), (ref - got).abs().max()
    assert _close(ref, got_cached, TIGHT)
    assert _close(unfolded, got, LOOSE), (unfolded - got).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_full_forward(family, fake_models, packed_dirs, tiny_tokenizer, monkeypatch):
    from flatquant.kernels import kv4_reference
    from tests.runtime.conftest import reparameterized

    calls = []
    real = kv4_reference.decode_attention
    monkeypatch.setattr(kv4_reference, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed = flatquant.load_quantized(packed_dirs(family), device="cpu")
    ids = _ids(tiny_tokenizer, length=16, seed=1)
    with torch.no_grad():
        ref = reparameterized(fake_models(family))(ids, use_cache=False).logits
        out = packed(ids[:, :9], past_key_values=PackedKVCache(packed), use_cache=True)
        steps = [out.logits]
        for t in range(9, 16):  # decode: decode_attention on the packed cache
            out = packed(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert isinstance(out.past_key_values, PackedKVCache)
    assert out.past_key_values.get_seq_length() == 16
    assert len(calls) == 7 * packed.config.num_hidden_layers  # every decode step read the packed cache
    assert _close(ref, torch.cat(steps, 1), TIGHT)


def test_generate_matches_fake_quant(fake_models, packed_dirs, tiny_tokenizer):
    fake = fake_models("llama")
    packed = flatquant.load_quantized(packed_dirs("llama"), device="cpu")
    ids = _ids(tiny_tokenizer, n=1, length=6, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(packed.generate(ids, **kw), fake.generate(ids, **kw))


def test_batched_generate_with_padding(fake_models, packed_dirs, tiny_tokenizer):
    """Left padding: decode steps carry a mask, so attention reads the dequantized cache (sdpa + mask)."""
    fake = fake_models("qwen2")
    packed = flatquant.load_quantized(packed_dirs("qwen2"), device="cpu")
    ids = _ids(tiny_tokenizer, n=2, length=7, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = tiny_tokenizer.pad_token_id
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(packed.generate(ids, **kw), fake.generate(ids, **kw))


def test_modules_and_shared_sites(packed_dirs, tiny_tokenizer):
    packed = flatquant.load_quantized(packed_dirs("qwen2"), device="cpu")
    lins = [m for m in packed.modules() if isinstance(m, W4A4Linear)]
    assert len(lins) == 4 * packed.config.num_hidden_layers  # qkv, o, gate_up, down per layer
    assert all(m.backend == "reference" for m in lins)
    attn = packed.model.layers[0].self_attn
    assert isinstance(attn.q_proj, SiteProjection) and attn.q_proj.group.fused is attn.fq_qkv
    calls = []
    attn.fq_qkv.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        packed(_ids(tiny_tokenizer), use_cache=False)
    assert len(calls) == 1  # q, k and v share one transform + quantize + GEMM
    x = torch.randn(1, 3, packed.config.hidden_size)
    with torch.no_grad():  # a sibling called with another tensor computes its own output
        assert torch.equal(attn.k_proj(x), attn.fq_qkv(x)[..., attn.k_proj.start:attn.k_proj.stop])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_load_export_is_byte_identical(family, packed_dirs, tiny_tokenizer, tmp_path):
    first = packed_dirs(family)
    again = tmp_path / "again"
    flatquant.save_quantized(flatquant.load_quantized(first, device="cpu"), again, tokenizer=tiny_tokenizer)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(first, again, files, shallow=False)
    assert not mismatch and not errors


def test_from_pretrained_after_import(packed_dirs, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    path = packed_dirs("llama")
    hf = AutoModelForCausalLM.from_pretrained(path)
    ours = flatquant.load_quantized(path, device="cpu")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)
    assert any(isinstance(m, W4A4Linear) for m in hf.modules())


def test_gptq_weights_export(fake_models, packed_dirs, tiny_tokenizer):
    from tests.runtime.conftest import reparameterized

    fake = fake_models("llama", gptq=True)
    packed = flatquant.load_quantized(packed_dirs("llama", gptq=True), device="cpu")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert _close(reparameterized(fake)(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


def test_quarot_export(fake_models, packed_dirs, tiny_tokenizer):
    fake = fake_models("llama", method="quarot")  # no channel scales: exact against the unfolded model
    packed = flatquant.load_quantized(packed_dirs("llama", method="quarot"), device="cpu")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert _close(fake(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


def test_checkpoint_size_and_config(packed_dirs):
    import json

    path = packed_dirs("llama")
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "flatquant" and q["layout_version"] == 1
    assert (q["w_bits"], q["a_bits"], q["kv_bits"]) == (4, 4, 4)
    assert (path / "tokenizer.json").is_file()
    info = flatquant.runtime.export.fp16_bytes(cfg)
    assert info > 0


def test_half_checkpoint_computed_in_float32_matches(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A float16 export (as on the GPU) holds the same numbers: loaded in float32 it matches the fake-quant
    model of the same float16 weights run in float32 (in float16, rounding alone flips 4-bit codes)."""
    from flatquant import QuantConfig, quantize
    from flatquant.core.modules import freeze
    from flatquant.models.loading import load_model

    model, _ = load_model(str(tiny_model_dir), dtype=torch.float16)
    quantize(model, QuantConfig(4, 4, 4), method="quarot", progress=False)
    flatquant.save_quantized(model, tmp_path / "half", tokenizer=tiny_tokenizer)
    assert (tmp_path / "half" / "config.json").read_text().count('"dtype": "float16"') == 2
    model.float()
    freeze(model, torch.float32)
    packed = flatquant.load_quantized(tmp_path / "half", device="cpu", dtype=torch.float32)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert _close(model(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


def test_pipeline_and_lm_eval(packed_dirs, tiny_tokenizer, shared_data_dir):
    from transformers import pipeline

    packed = flatquant.load_quantized(packed_dirs("llama"), device="cpu")
    out = pipeline("text-generation", model=packed, tokenizer=tiny_tokenizer)("The quick", max_new_tokens=4,
                                                                               do_sample=False)
    assert out[0]["generated_text"].startswith("The quick")
    if shared_data_dir is None:
        pytest.skip("lm-eval part needs the shared zero-shot data")
    from flatquant.eval.zeroshot import evaluate_zeroshot

    res = evaluate_zeroshot(packed, tiny_tokenizer, ["piqa"], data_dir=str(shared_data_dir), limit=2, batch_size=2,
                            device="cpu")
    assert res["piqa"]["n"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors: the interpreter only")
def test_triton_backend_matches_reference(packed_dirs, tiny_tokenizer):
    """The GPU kernels (here in Triton's CPU interpreter, float32): prefill and decode as the reference."""
    from flatquant.runtime import set_runtime_backend

    packed = flatquant.load_quantized(packed_dirs("qwen3"), device="cpu")
    ids = _ids(tiny_tokenizer, length=12, seed=4)
    logits = {}
    for backend in ("reference", "triton"):
        set_runtime_backend(packed, backend)
        assert all(m.backend == backend for m in packed.modules() if isinstance(m, W4A4Linear))
        with torch.no_grad():
            out = packed(ids[:, :8])
            steps = [out.logits]
            for t in range(8, 12):
                out = packed(ids[:, t:t + 1], past_key_values=out.past_key_values)
                steps.append(out.logits)
        logits[backend] = torch.cat(steps, 1)
    assert _close(logits["reference"], logits["triton"], TIGHT)
