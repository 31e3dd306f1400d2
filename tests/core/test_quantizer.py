import pytest
import torch

from flatquant.core.quantizer import Quantizer, fake_quantize, quantize_asymmetric, quantize_symmetric


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_and_error_bound(bits):
    x = torch.randn(64, 96)
    codes, scale = quantize_symmetric(x, bits)
    maxq = 2 ** (bits - 1) - 1
    assert torch.equal(codes, codes.round())
    assert codes.min() >= -maxq - 1 and codes.max() <= maxq
    q = fake_quantize(x, bits, symmetric=True)
    # every value is within half a step of its code (no clipping at alpha = 1)
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()
    # distinct levels per row never exceed the grid size
    assert max(len(torch.unique(r)) for r in q) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_grid_and_error_bound(bits):
    x = torch.randn(32, 64) + 0.7
    codes, scale, zero = quantize_asymmetric(x, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    q = fake_quantize(x, bits, symmetric=False)
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()


def test_16_bits_is_identity_and_errors_shrink_with_bits():
    x = torch.randn(16, 128)
    assert Quantizer(16)(x) is x
    errs = [(fake_quantize(x, b, True) - x).pow(2).mean().item() for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # 8-bit per-token SQNR on Gaussian data is above 35 dB
    sqnr = 10 * torch.log10(x.pow(2).mean() / (fake_quantize(x, 8, True) - x).pow(2).mean())
    assert sqnr > 35


def test_group_quantization_per_head():
    x = torch.randn(2, 3, 5, 64)  # (batch, heads, seq, head_dim): one group per head and token
    q = fake_quantize(x, 4, symmetric=False)
    grouped = fake_quantize(x.reshape(2, 3, 5, 2, 32), 4, False).reshape(x.shape)
    assert torch.allclose(fake_quantize(x, 4, False, group_size=32), grouped)
    assert not torch.allclose(q, grouped)


def test_zero_rows_and_outliers():
    x = torch.zeros(3, 16)
    x[1, 3] = 1e4
    q = fake_quantize(x, 4, True)
    assert torch.isfinite(q).all() and q[0].abs().sum() == 0 and q[1, 3] == pytest.approx(1e4, rel=1e-6)


def test_ste_gradients_reach_input_and_clip():
    x = torch.randn(8, 32, requires_grad=True)
    qz = Quantizer(4, learnable_clip=True)
    loss = (qz(x) - x.detach() * 0.5).pow(2).sum()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert qz.clip_logit.grad is not None and qz.clip_logit.grad.abs().sum() > 0


def test_clip_search_never_worse_than_no_clipping():
    w = torch.randn(48, 80)
    w[:, 0] *= 20  # an outlier column makes clipping worthwhile
    plain = (fake_quantize(w, 4, True) - w).abs().pow(2.4).sum(-1)
    qz = Quantizer(4, clip_shape=(48, 1))
    qz.search_clip(w)
    searched = (qz(w) - w).abs().pow(2.4).sum(-1)
    assert (searched <= plain + 1e-4).all()
    assert qz.searched_clip.shape == (48, 1) and (qz.searched_clip <= 1).all()
