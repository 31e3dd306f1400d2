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


def _search_clip_loop(w, bits, symmetric, group_size, grid=100, max_shrink=0.8, norm=2.4):
    """The plain reference: one full fake-quantize per candidate ratio, strict `<` keeps the first minimum."""
    w = w.float()
    best_err = torch.full(w.shape[:-1], float("inf"))
    best = torch.ones(w.shape[:-1])
    for i in range(int(max_shrink * grid)):
        ratio = 1.0 - i / grid
        err = (fake_quantize(w, bits, symmetric, ratio, group_size) - w).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best.unsqueeze(-1)


@pytest.mark.parametrize("bits,symmetric,group_size,shape", [
    (4, True, None, (96, 80)), (4, False, None, (40, 64)), (3, True, 16, (24, 64)), (2, False, 32, (3, 5, 64)),
    (8, True, None, (16, 48))])
@pytest.mark.parametrize("block", [64, 1 << 18])
def test_vectorised_clip_search_picks_the_loops_ratios(bits, symmetric, group_size, shape, block):
    from flatquant.core import quantizer

    g = torch.Generator().manual_seed(bits * 7 + len(shape))
    w = torch.randn(*shape, generator=g)
    w[..., 0] *= 15  # outliers: clipping wins on many rows
    flat = w.view(-1, shape[-1])
    flat[1] = 0  # every ratio ties at zero error: the first (1.0) must win
    flat[2] = 1e-10 * torch.randn(shape[-1], generator=g)  # scale floors at 1e-8 for every ratio: all tie
    flat[3] = flat[4]  # identical rows pick identical ratios
    flat[5, 3] = float("nan")  # NaN errors never win: ratio 1.0
    ref = _search_clip_loop(w, bits, symmetric, group_size)
    qz = Quantizer(bits, symmetric, group_size)
    old = quantizer.SEARCH_BLOCK
    try:
        quantizer.SEARCH_BLOCK = block
        qz.search_clip(w)
    finally:
        quantizer.SEARCH_BLOCK = old
    assert qz.searched_clip.shape == ref.shape
    assert torch.equal(qz.searched_clip, ref)  # bit-identical choices, ties included
    assert qz.searched_clip.view(-1)[1] == 1 and qz.searched_clip.view(-1)[2] == 1 and qz.searched_clip.view(-1)[5] == 1
    assert (ref < 1).sum() > 0  # the case exercises clipping


def test_clip_search_ties_go_to_the_first_candidate():
    from flatquant.core.quantizer import clip_search_best

    w = torch.full((4, 32), 1e-10)  # the scale floors at 1e-8 for every ratio: all candidates tie
    ratios = torch.tensor([1.0, 0.9, 0.8])
    assert clip_search_best(w, ratios, 4, True, block=8).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("bits", [3, 4])
def test_pruned_clip_search_equals_the_loop_on_heavy_tails(bits, monkeypatch):
    from flatquant.core import quantizer

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g)
    w = w / torch.rand(64, 256, generator=g).clamp(min=0.05) ** 0.5  # heavy tails: low best ratios on some rows
    maxq = 2 ** (bits - 1) - 1
    w[0] = torch.arange(256).remainder(2 * maxq + 1).sub(maxq) * 0.125  # on the 1.0 grid: zero error, then pruned
    w[1, :8] = 40.0  # a block of outliers: a bound from the top elements alone is tight
    computed = []
    real = quantizer._sym_errors
    monkeypatch.setattr(quantizer, "_sym_errors", lambda x, *a: computed.append(x.shape[0]) or real(x, *a))
    qz = Quantizer(bits, True)
    qz.search_clip(w)
    assert torch.equal(qz.searched_clip, _search_clip_loop(w, bits, True, None))
    assert qz.searched_clip[0] == 1
    bound_rows = 80 * 64  # the top-element bounds: one pass over every candidate and row
    assert sum(computed) - bound_rows < 0.9 * 80 * 64  # candidates were skipped
    monkeypatch.setattr(quantizer, "PRUNE_TOP", 10**6)  # no pruning: the same choices
    plain = Quantizer(bits, True)
    plain.search_clip(w)
    assert torch.equal(plain.searched_clip, qz.searched_clip)


def test_clip_search_loop_is_the_old_search():
    from flatquant.core.quantizer import clip_search_loop

    w = torch.randn(40, 96) * torch.rand(40, 96).clamp(min=0.1) ** -0.5
    ratios = torch.tensor([1.0 - i / 100 for i in range(80)])
    assert torch.equal(ratios[clip_search_loop(w, ratios, 4, True)].unsqueeze(-1), _search_clip_loop(w, 4, True, None))
    assert torch.equal(ratios[clip_search_loop(w, ratios, 4, False, 32)].unsqueeze(-1),
                       _search_clip_loop(w, 4, False, 32))


def test_round_ste_value_and_gradient():
    """Without a gradient round_ste is plain rounding, and it equals the straight-through form's value (Sterbenz:
    round(x) - x is exact in float32); with one the gradient is the identity."""
    from flatquant.core.quantizer import round_ste

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * s for s in (0.3, 3.0, 300.0, 3e6)])
    x = torch.cat([x, torch.arange(-8, 9) + 0.5, torch.tensor([0.0, -0.0, 2.0**23 + 1, -(2.0**22) - 0.5])])
    ste_form = x + (torch.round(x) - x)
    got = round_ste(x)
    assert torch.equal(got, torch.round(x)) and torch.equal(got, ste_form)
    xg = x.clone().requires_grad_(True)
    out = round_ste(xg)
    assert out.requires_grad and torch.equal(out.detach(), ste_form)
    (out * torch.arange(x.numel(), dtype=x.dtype)).sum().backward()
    assert torch.equal(xg.grad, torch.arange(x.numel(), dtype=x.dtype))
