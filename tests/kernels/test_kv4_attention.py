"""KV4 cache: reference vs the fake quantizer and SDPA, Triton vs reference (interpreter on CPU, GPU too)."""
from __future__ import annotations

import math

import pytest
import torch

from flatquant.core.quantizer import Quantizer, quantize_asymmetric
from flatquant.kernels import kv4_attention as tri
from flatquant.kernels import kv4_reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HALF_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
LENGTHS = [0, 1, 17, 63, 130]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_cache(b, hkv, s_max, d, device=DEV, clip=1.0):
    """Random K/V quantized into a (B, Hkv, S_max, ...) cache; returns the seven cache tensors."""
    k = torch.randn(b, hkv, s_max, d, device=device) * (1 + torch.rand(b, hkv, s_max, 1, device=device))
    v = torch.randn(b, hkv, s_max, d, device=device)
    return (*ref.quantize_kv(k, clip), *ref.quantize_kv(v, clip))


def assert_close_to_f32(out, exact, dtype, atol=1e-5, rtol=1e-5):
    """out (dtype) against a float32 result: float32 summation-order error plus one dtype ulp."""
    assert out.dtype == dtype and out.shape == exact.shape
    err = (out.float() - exact).abs()
    bound = atol + (rtol + HALF_EPS[dtype]) * exact.abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


# ------------------------------------------------------------------------------- quantization ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [1.0, 0.9, "tensor"])
def test_reference_quantize_equals_fake_quantizer(dtype, clip):
    x = (torch.randn(3, 5, 7, 64) * 3).to(dtype)
    x[0, 0, 0] = 0  # an all-zero row: the scale clamp
    x[0, 0, 1] = 2.5  # a constant positive row
    if clip == "tensor":
        fq = Quantizer(4, symmetric=False, learnable_clip=True)
        with torch.no_grad():
            fq.clip_logit.fill_(1.3)
        alpha = torch.sigmoid(fq.clip_logit.float()).reshape(())
    else:
        fq, alpha = Quantizer(4, symmetric=False, clip_ratio=clip), clip
    codes, scale, zero = ref.quantize_kv(x, alpha)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 5, 7, 32)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == zero.shape == (3, 5, 7)
    assert torch.equal(ref.dequantize_kv(codes, scale, zero, dtype), fq(x).detach())
    # layout: element 2j in the low nibble, 2j + 1 in the high nibble, codes in [0, 15]
    want, s, z = quantize_asymmetric(x, 4, alpha)
    assert torch.equal(codes & 0xF, want[..., 0::2].to(torch.uint8))
    assert torch.equal(codes >> 4, want[..., 1::2].to(torch.uint8))
    assert torch.equal(scale, s.squeeze(-1)) and torch.equal(zero, z.squeeze(-1))


@pytest.mark.xfail(torch.cuda.is_available(), reason="the Triton write path differs from the reference on the H100 "
                   "(aca9be5); the cache uses the reference", strict=False)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_triton_quantize_equals_reference(dtype, d):
    x = (torch.randn(2, 3, 11, d, device=DEV) * 2).to(dtype)
    x[0, 0, 0] = 0
    # exact ties: max - min = 15 gives scale 1, so x + 0.5 steps sit on .5 (round half to even)
    x[0, 1, :] = (torch.arange(d, device=DEV) % 16 - 7.5).to(dtype)
    x[0, 2, :] = (torch.arange(d, device=DEV) % 16 - 7.0).to(dtype)
    for clip in (1.0, 0.8, torch.tensor(0.95, device=DEV)):
        got = tri.quantize_kv_triton(x, clip)
        want = ref.quantize_kv(x, clip)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_quantize_edge_cases():
    assert all(t.numel() == 0 for t in tri.quantize_kv_triton(torch.randn(0, 4, 64, device=DEV)))
    with pytest.raises(ValueError):
        tri.quantize_kv_triton(torch.randn(2, 63, device=DEV))
    with pytest.raises(ValueError):
        ref.quantize_kv(torch.randn(2, 63))
    # pack/unpack round trip on every code pair
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(ref.pack_pairs(ref.unpack_pairs(codes)), codes)


# ----------------------------------------------------------------------- reference attention ---

@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 32), (9, 3, 128)])
def test_reference_matches_sdpa(hq, hkv, d):
    b, s_max = len(LENGTHS), 136
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, s_max, d, device="cpu")
    q = torch.randn(b, hq, d)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    sm = 0.7 / math.sqrt(d)
    out = ref.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, sm)
    k = ref.dequantize_kv(kc, ks, kz).repeat_interleave(hq // hkv, dim=1)
    v = ref.dequantize_kv(vc, vs, vz).repeat_interleave(hq // hkv, dim=1)
    for i, n in enumerate(LENGTHS):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        want = torch.nn.functional.scaled_dot_product_attention(q[i, :, None], k[i, :, :n], v[i, :, :n], scale=sm)
        torch.testing.assert_close(out[i], want[:, 0], atol=2e-6, rtol=2e-5)


def test_reference_rejects_bad_shapes():
    kc, ks, kz, vc, vs, vz = make_cache(2, 2, 8, 32, device="cpu")
    lengths = torch.tensor([3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        ref.decode_attention(torch.randn(2, 3, 32), kc, ks, kz, vc, vs, vz, lengths, 1.0)
    with pytest.raises(ValueError):
        ref.decode_attention(torch.randn(2, 4, 32), kc, ks, kz, vc, vs, vz, torch.tensor([3, 9]), 1.0)
    with pytest.raises(ValueError):
        tri.decode_attention(torch.randn(2, 4, 32, device=DEV), kc.to(DEV), ks.to(DEV), kz.to(DEV), vc.to(DEV),
                             vs[:, :, :4].to(DEV), vz.to(DEV), lengths.to(DEV), 1.0)
    with pytest.raises(ValueError, match="integers"):
        ref.decode_attention(torch.randn(2, 4, 32), kc, ks, kz, vc, vs, vz, lengths.float(), 1.0)
    with pytest.raises(ValueError, match="block_n"):
        cache = [t.to(DEV) for t in (kc, ks, kz, vc, vs, vz, lengths)]
        tri.decode_attention(torch.randn(2, 4, 32, device=DEV), *cache, 1.0, block_n=24)


# -------------------------------------------------------------------------- Triton attention ---

# (Hq, Hkv, D, dtype, splits, block): odd head counts, GQA ratios 1/3/8, one split (direct store) and several
CASES = [(4, 4, 64, torch.bfloat16, 3, 16), (6, 2, 128, torch.float16, None, 16), (9, 3, 32, torch.float32, 1, 32),
         (8, 1, 64, torch.bfloat16, 5, 16), (9, 3, 128, torch.bfloat16, 2, 64), (6, 2, 32, torch.float32, 4, 16)]


@pytest.mark.parametrize("hq,hkv,d,dtype,splits,block", CASES)
def test_triton_decode_matches_reference(hq, hkv, d, dtype, splits, block):
    b, s_max = len(LENGTHS), 136
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, s_max, d, clip=0.9)
    q = (torch.randn(b, hq, d, device=DEV) * 2).to(dtype)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32, device=DEV)
    sm = 1.0 / math.sqrt(d)
    out = tri.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, sm, num_splits=splits, block_n=block)
    exact = ref.decode_attention_f32(q, kc, ks, kz, vc, vs, vz, lengths, sm)
    assert_close_to_f32(out, exact, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # length 0


def test_triton_decode_one_token_and_empty_cache():
    b, hq, hkv, d = 3, 6, 2, 64
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, 1, d)
    q = torch.randn(b, hq, d, device=DEV)
    lengths = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEV)
    out = tri.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, 0.125)
    # one token: softmax weight 1, so query head h returns kv head h // 3's dequantized value
    v = ref.dequantize_kv(vc, vs, vz)[:, :, 0].repeat_interleave(hq // hkv, dim=1)
    torch.testing.assert_close(out[[0, 2]], v[[0, 2]], atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    empty = make_cache(b, hkv, 0, d)
    out0 = tri.decode_attention(q.bfloat16(), *empty, torch.zeros(b, dtype=torch.int32, device=DEV), 0.125)
    assert out0.dtype == torch.bfloat16 and torch.equal(out0, torch.zeros_like(out0))


def test_triton_decode_on_cache_views():
    """A view into a larger preallocated cache (batch and capacity sliced): strides differ from the shape."""
    full = make_cache(4, 2, 80, 64)
    view = [t[1:3, :, :50] for t in full]
    q = torch.randn(2, 4, 64, device=DEV, dtype=torch.bfloat16)
    lengths = torch.tensor([50, 33], dtype=torch.int32, device=DEV)
    out = tri.decode_attention(q, *view, lengths, 0.125, num_splits=2, block_n=16)
    exact = ref.decode_attention_f32(q, *[t.contiguous() for t in view], lengths, 0.125)
    assert_close_to_f32(out, exact, torch.bfloat16)


def test_write_path_then_decode():
    """quantize_kv (Triton) stored into a preallocated cache, token by token, then decode."""
    b, hq, hkv, d, s_max = 2, 4, 2, 32, 24
    cache = [torch.zeros(b, hkv, s_max, d // 2, dtype=torch.uint8, device=DEV)] + \
        [torch.zeros(b, hkv, s_max, device=DEV) for _ in range(2)]
    cache = cache + [c.clone() for c in cache]
    ks_all = torch.randn(b, hkv, 9, d, device=DEV, dtype=torch.float16)
    vs_all = torch.randn(b, hkv, 9, d, device=DEV, dtype=torch.float16)
    for t in range(9):
        for dst, src in zip(cache[:3], tri.quantize_kv(ks_all[:, :, t], 0.95)):
            dst[:, :, t] = src
        for dst, src in zip(cache[3:], tri.quantize_kv(vs_all[:, :, t], 0.95)):
            dst[:, :, t] = src
    lengths = torch.tensor([9, 5], dtype=torch.int32, device=DEV)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.float16)
    out = tri.decode_attention(q, *cache, lengths, 0.2, num_splits=2, block_n=16)
    fq = Quantizer(4, symmetric=False, clip_ratio=0.95)
    # the fake quantizer on x.float(): the same codes, dequantized in float32 like the kernel
    k = fq(ks_all.float()).repeat_interleave(2, dim=1)
    v = fq(vs_all.float()).repeat_interleave(2, dim=1)
    for i, n in enumerate([9, 5]):
        want = torch.nn.functional.scaled_dot_product_attention(q[i, :, None].float(), k[i, :, :n], v[i, :, :n],
                                                                scale=0.2)[:, 0]
        assert_close_to_f32(out[i], want, torch.float16, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ GPU, model sizes ---

@needs_cuda
@pytest.mark.parametrize("b,hq,hkv,s_max", [(32, 32, 8, 2048), (4, 32, 32, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sizes(b, hq, hkv, s_max, dtype):
    """Llama-3-8B (32/8) and Llama-2-7B (32/32) heads, D = 128: one dtype ulp plus 1e-4 relative."""
    d = 128
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, s_max, d)
    q = torch.randn(b, hq, d, device="cuda").to(dtype)
    lengths = torch.randint(0, s_max + 1, (b,), device="cuda", dtype=torch.int32)
    lengths[0], lengths[1] = s_max, 0
    for splits in (None, 1):
        out = tri.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, 1 / math.sqrt(d), num_splits=splits)
        exact = ref.decode_attention_f32(q, kc, ks, kz, vc, vs, vz, lengths, 1 / math.sqrt(d))
        assert_close_to_f32(out, exact, dtype, atol=1e-4, rtol=1e-4)


@pytest.mark.xfail(torch.cuda.is_available(), reason="the Triton write path differs from the reference on the H100 "
                   "(aca9be5); the cache uses the reference", strict=False)
@needs_cuda
def test_gpu_quantize_many_rows():
    x = (torch.randn(64, 8, 512, 128, device="cuda") * 4).to(torch.bfloat16)
    for clip in (1.0, 0.85):
        for g, w in zip(tri.quantize_kv_triton(x, clip), ref.quantize_kv(x, clip)):
            assert torch.equal(g, w)


# ------------------------------------------------------------- code operands, GQA, pipelining knobs ---

@pytest.mark.parametrize("codes", ["biased", "exact", "prmt"])
@pytest.mark.parametrize("hq,hkv,dtype,block", [(3, 3, torch.bfloat16, 32), (8, 2, torch.float16, 16),
                                                (8, 1, torch.bfloat16, 16), (5, 5, torch.float32, 16),
                                                (16, 1, torch.bfloat16, 16)])
def test_triton_decode_code_modes(codes, hq, hkv, dtype, block):
    """GQA ratios 1 / 4 / 8 / 16, odd head counts, lengths not a multiple of the block, every code operand
    form, w's two parts stacked in one value dot (G <= 8) or in two."""
    b, d, s_max = 4, 32, 45
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, s_max, d)
    q = (torch.randn(b, hq, d, device=DEV) * 2 + 1).to(dtype)  # a mean: sum(q) large, the zero term matters
    lengths = torch.tensor([45, 1, 0, 33], dtype=torch.int32, device=DEV)
    for splits, stack in ((1, True), (3, True), (2, False)):
        out = tri.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, 0.2, num_splits=splits, block_n=block,
                                   codes=codes, num_stages=1, stack=stack)
        exact = ref.decode_attention_f32(q, kc, ks, kz, vc, vs, vz, lengths, 0.2)
        assert_close_to_f32(out, exact, dtype)
        assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_triton_decode_rejects_bad_codes():
    kc, ks, kz, vc, vs, vz = make_cache(1, 1, 4, 16)
    with pytest.raises(ValueError, match="codes"):
        tri.decode_attention(torch.randn(1, 1, 16, device=DEV), kc, ks, kz, vc, vs, vz,
                             torch.ones(1, dtype=torch.int32, device=DEV), codes="packed")


def test_choose_splits_fills_the_gpu(monkeypatch):
    """About WAVES programs per SM, never below MIN_SPLIT_TOKENS per split, one split when the grid is full."""
    monkeypatch.setattr(tri, "_sm_count", lambda dev: 132)
    dev = torch.device("cpu")
    assert tri.choose_splits(32, 32, 2048, 128, dev) == 1
    assert tri.choose_splits(1, 8, 32768, 128, dev) == min(tri.MAX_SPLITS, math.ceil(tri.WAVES * 132 / 8))
    assert tri.choose_splits(1, 8, 2048, 128, dev) == 2048 // tri.MIN_SPLIT_TOKENS
    assert tri.choose_splits(32, 8, 2048, 128, dev) == math.ceil(tri.WAVES * 132 / 256)


@needs_cuda
@pytest.mark.parametrize("codes", ["biased", "exact", "prmt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n,num_warps,num_stages", [(64, 4, 2), (128, 8, 3), (32, 4, 1)])
def test_gpu_code_modes_and_tiles(codes, dtype, block_n, num_warps, num_stages):
    """Every code operand form (the inline-PTX one runs only here) and tile knob the sweep tries, GQA 4."""
    b, hq, hkv, s_max, d = 6, 32, 8, 700, 128
    kc, ks, kz, vc, vs, vz = make_cache(b, hkv, s_max, d)
    q = torch.randn(b, hq, d, device="cuda").to(dtype)
    lengths = torch.tensor([700, 0, 1, 129, 513, 64], dtype=torch.int32, device="cuda")
    exact = ref.decode_attention_f32(q, kc, ks, kz, vc, vs, vz, lengths, 1 / math.sqrt(d))
    for splits in (None, 1, 3):
        out = tri.decode_attention(q, kc, ks, kz, vc, vs, vz, lengths, 1 / math.sqrt(d), num_splits=splits,
                                   block_n=block_n, num_warps=num_warps, num_stages=num_stages, codes=codes,
                                   stack=splits != 3)
        assert_close_to_f32(out, exact, dtype, atol=1e-4, rtol=1e-4)
