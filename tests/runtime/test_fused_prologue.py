"""The static decoder with the fused prologues (norm / SiLU·up -> transform -> quantize in one pass) against
the unfused ops, on the tiny packed model's Triton code paths (interpreter, float16: its bf16 casts
truncate). The fused pass has the unfused ops' semantics; its sum of squares / rsqrt differ from torch's in
float32 ulps, which can move a code at a rounding tie, so logits agree to 2% of their largest magnitude
(prefill and decode), and most of them exactly."""
from __future__ import annotations

import pytest
import torch

from flatquant.kernels import fused_norm
from flatquant.runtime import fused_ops, static, synthetic


def _close(a, b, tol):
    return (a - b).abs().max().item() <= tol * a.abs().max().item()


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors: the interpreter only")
@pytest.mark.parametrize("row", ["flatquant", "int4"])
def test_fused_prologue_logits_match_unfused(monkeypatch, row):
    from flatquant.kernels import kv4_attention
    from flatquant.kernels.linear import set_backend

    dec = synthetic.build("tiny", row, "cpu", dtype=torch.float16, seed=4, cap=64)
    set_backend(dec.hf_model, "triton")
    monkeypatch.setattr(fused_ops, "_use_triton", lambda t, fused: fused)
    monkeypatch.setattr(static, "kv4", lambda device: kv4_attention)
    calls = []
    real = fused_norm.prologue_quantize
    monkeypatch.setattr(fused_norm, "prologue_quantize", lambda mode, *a, **k: calls.append(mode) or real(mode, *a, **k))
    g = torch.Generator().manual_seed(5)
    ids, step = torch.randint(0, 256, (2, 12), generator=g), torch.randint(0, 256, (2, 1), generator=g)

    def run(prologue):
        dec.prologue = prologue
        c = dec.new_cache(2, 16)
        return dec.prefill(ids, c).float(), dec.decode_step(step, c).float(), dec.decode_step(step, c).float()

    ref = run(fused_norm.UNFUSED)
    assert not calls
    got = run(fused_norm.FUSED)
    n_layers = len(dec.layers)
    # per pass: 2 norms + 1 SiLU·up per layer (prefill, two decode steps)
    assert calls.count("norm") == 3 * 2 * n_layers and calls.count("silu") == 3 * n_layers
    for a, b in zip(ref, got):
        assert _close(a, b, 2e-2), (a - b).abs().max()
    only_norm = run(fused_norm.PrologueConfig(norm_quant=True))
    assert _close(ref[0], only_norm[0], 2e-2)


def test_prologue_off_on_reference_backend_is_unchanged():
    """Reference linears (CPU, float32): the switch falls back to the unfused ops, so the logits are equal."""
    dec = synthetic.build("tiny", "flatquant", "cpu", dtype=torch.float32, seed=2, cap=32)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    a = dec.prefill(ids, dec.new_cache(2, 8))
    dec.prologue = fused_norm.FUSED
    b = dec.prefill(ids, dec.new_cache(2, 8))
    assert torch.equal(a, b)


def test_fp8_kv_cache_stores_e4m3_codes():
    """The fp8_kv8 row's cache: one e4m3 byte per K / V element, written at the step position in decode."""
    from flatquant.runtime.static import StaticCache

    dec = synthetic.build("tiny", "fp8_kv8", "cpu", dtype=torch.bfloat16, cap=32)
    s = synthetic.SHAPES["tiny"]
    cache = dec.new_cache(2, 8)
    assert cache.fmt == "fp8" and cache.layers[0]["k"].dtype == torch.float8_e4m3fn
    assert cache.bytes_per_token() == s["layers"] * 2 * s["kv_heads"] * (s["hidden"] // s["heads"])
    dec.prefill(torch.randint(0, 256, (2, 3)), cache)
    before = cache.layers[0]["k"][:, :, 3].float().clone()
    dec.decode_step(torch.randint(0, 256, (2, 1)), cache)
    assert not before.any() and cache.layers[0]["k"][:, :, 3].float().abs().sum() > 0
    with pytest.raises(ValueError, match="cache format"):
        StaticCache("int2", 1, 1, 1, 8, 4, "cpu")


def test_prologue_max_tokens_limits_the_fused_calls(monkeypatch):
    """PrologueConfig.max_tokens: prefill (2 x 12 tokens) runs unfused, decode (2 tokens) fused."""
    from flatquant.kernels import kv4_attention
    from flatquant.kernels.linear import set_backend

    dec = synthetic.build("tiny", "int4", "cpu", dtype=torch.float16, seed=4, cap=32)
    set_backend(dec.hf_model, "triton")
    calls = []
    real = fused_norm.prologue_quantize
    monkeypatch.setattr(fused_norm, "prologue_quantize", lambda mode, *a, **k: calls.append(mode) or real(mode, *a, **k))
    monkeypatch.setattr(static, "kv4", lambda device: kv4_attention)
    dec.prologue = fused_norm.PrologueConfig(True, True, max_tokens=4)
    c = dec.new_cache(2, 16)
    dec.prefill(torch.randint(0, 256, (2, 12)), c)
    assert not calls
    dec.decode_step(torch.randint(0, 256, (2, 1)), c)
    assert calls.count("norm") == 2 * len(dec.layers) and calls.count("silu") == len(dec.layers)
