"""FP8 (e4m3) K/V decode attention (flatquant.kernels.fp8_attention): the Triton kernel against its reference
and the reference against SDPA on the cast cache (the eager path the static decoder used before)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatquant.kernels import fp8_attention as fa

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(b, hkv, s_max, d):
    k = (torch.randn(b, hkv, s_max, d, device=DEV) * 2).to(torch.float8_e4m3fn)
    v = torch.randn(b, hkv, s_max, d, device=DEV).to(torch.float8_e4m3fn)
    k[0, 0, 0, :4] = torch.tensor([0.004, -0.01, 448.0, 0.0]).to(torch.float8_e4m3fn)  # subnormals, max, zero
    return k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,hq,hkv,d", [(2, 4, 4, 64), (1, 8, 2, 128), (3, 6, 2, 32)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_kernel_matches_reference(dtype, b, hq, hkv, d, splits):
    s_max = 150
    k, v = _cache(b, hkv, s_max, d)
    q = torch.randn(b, hq, d, device=DEV).to(dtype)
    lengths = torch.tensor([150, 1, 77][:b], dtype=torch.int32, device=DEV)
    got = fa.decode_attention(q, k, v, lengths, 0.1, num_splits=splits, block_n=32 if splits else None)
    want = fa.decode_attention_reference(q, k, v, lengths, 0.1)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), err


def test_reference_equals_sdpa_on_the_cast_cache():
    b, hq, hkv, d, n = 2, 8, 2, 64, 40
    k, v = _cache(b, hkv, n, d)
    q = torch.randn(b, hq, d, device=DEV)
    want = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k.float(), v.float(), scale=0.2)
    got = fa.decode_attention_reference(q, k, v, torch.full((b,), n, device=DEV), 0.2)
    assert torch.allclose(got, want.reshape(b, hq, d), atol=1e-5, rtol=1e-5)


def test_empty_sequence_gives_zeros_and_bad_input_raises():
    k, v = _cache(2, 2, 16, 32)
    q = torch.randn(2, 2, 32, device=DEV)
    out = fa.decode_attention(q, k, v, torch.tensor([0, 5], dtype=torch.int32, device=DEV))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    with pytest.raises(ValueError):
        fa.decode_attention(q, k.float(), v, torch.tensor([1, 1], device=DEV))
    with pytest.raises(ValueError):
        fa.decode_attention(torch.randn(2, 3, 32, device=DEV), k, v, torch.tensor([1, 1], device=DEV))
