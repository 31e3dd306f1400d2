import pytest
import torch

from flatquant.core.transforms import (
    ChannelScale,
    FactorView,
    FixedKronecker,
    KroneckerAffine,
    hadamard,
    kron_apply,
    kron_factors,
)


@pytest.mark.parametrize("n,expected", [(4096, (64, 64)), (8192, (64, 128)), (11008, (86, 128)),
                                        (14336, (112, 128)), (576, (24, 24)), (1536, (32, 48))])
def test_kron_factors(n, expected):
    assert kron_factors(n) == expected


def test_prime_size_warns_and_degrades_to_one_matrix():
    with pytest.warns(UserWarning, match="prime"):
        assert kron_factors(13) == (1, 13)


def test_kron_apply_equals_materialised_kron():
    p1, p2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(7, 15, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, p1, p2), x @ torch.kron(p1, p2))


@pytest.mark.parametrize("n", [4, 12, 20, 36, 64, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and torch.equal(h.abs(), torch.ones_like(h))
    assert torch.allclose(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_hadamard_missing_order_returns_none():
    assert hadamard(172) is None  # needs a Williamson construction we do not build


def _check_exact(t, n, tol=1e-4):
    x = torch.randn(6, n)
    w = torch.randn(10, n)
    ref = x @ w.t()
    out = t(x) @ t.transform_weight(w).t()
    assert (out - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("par", ["svd", "direct"])
@pytest.mark.parametrize("init", ["orthogonal", "identity", "hadamard"])
def test_kronecker_affine_is_exact_inverse(par, init):
    t = KroneckerAffine(96, parameterization=par, init=init, learn_scale=True)
    with torch.no_grad():
        t.scale.uniform_(0.5, 2.0)
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move away from the initialisation
    _check_exact(t, 96)
    p1, p2 = t.matrices()
    assert torch.allclose(t.dense().float(), torch.diag(1 / t.scale) @ torch.kron(p1, p2), atol=1e-5)


def test_frozen_transform_matches_live_one():
    t = KroneckerAffine(48, learn_scale=True)
    x = torch.randn(3, 48)
    live = t(x)
    t.freeze()
    assert torch.allclose(t(x), live)
    t.unfreeze()


def test_fixed_and_scale_transforms_are_exact():
    _check_exact(FixedKronecker.random_hadamard(1536, torch.Generator().manual_seed(0)), 1536)
    _check_exact(FixedKronecker.random_hadamard(86 * 4), 86 * 4)  # no Hadamard of 86: random orthogonal
    _check_exact(ChannelScale(torch.rand(32) + 0.5), 32)


def test_factor_view_and_skip_p2_compose_to_full_transform():
    heads, hd = 3, 8
    t = KroneckerAffine(heads * hd, factors=(heads, hd), skip_p2_online=True)
    view = FactorView(t)
    v = torch.randn(5, heads, hd)
    # values rotated by P_v per head, then P_o online == the full P_o ⊗ P_v
    online = t(view(v).reshape(5, -1))
    p1, p2 = t.matrices()
    assert torch.allclose(online, v.reshape(5, -1) @ torch.kron(p1, p2), atol=1e-5)


def test_svd_inverse_is_exact_in_low_precision():
    t = KroneckerAffine(64, parameterization="svd")
    p1, p2 = t.matrices()
    i1, i2 = t.inverse_matrices()
    eye = torch.eye(64)
    assert (torch.kron(p1, p2).half().float() @ torch.kron(i1, i2).half().float() - eye).abs().max() < 1e-2


def test_batched_cayley_and_inverse_match_one_by_one():
    """Matrices of mixed sizes are padded into power-of-two buckets: results equal per-matrix solves."""
    from flatquant.core.transforms import cayley, inverse

    g = torch.Generator().manual_seed(0)
    sizes = [3, 9, 24, 32, 48, 1]
    skews = [torch.randn(n, n, generator=g, dtype=torch.float64) for n in sizes]
    for a, q in zip(skews, cayley(*skews)):
        n = a.shape[0]
        s, eye = a - a.t(), torch.eye(n, dtype=torch.float64)
        assert torch.allclose(q, torch.linalg.solve(eye + s, eye - s), atol=1e-12)
        assert torch.allclose(q @ q.t(), eye, atol=1e-12)  # orthogonal
    mats = [torch.randn(n, n, generator=g, dtype=torch.float64) + n * torch.eye(n, dtype=torch.float64) for n in sizes]
    for m, inv in zip(mats, inverse(*mats)):
        assert torch.allclose(inv, torch.linalg.inv(m), atol=1e-12)


@pytest.mark.parametrize("par", ["svd", "direct"])
def test_step_cache_gives_the_same_values_and_gradients(par):
    """Inside step_cache a transform is evaluated once; outputs and gradients equal the uncached ones."""
    from flatquant.core.transforms import KroneckerAffine, step_cache

    t = KroneckerAffine(24, parameterization=par, learn_scale=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # move away from the initial point so every parameter matters
        for p in t.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    x, w = torch.randn(5, 24), torch.randn(7, 24)

    def loss():
        return (t(x) ** 2).sum() + (t.transform_weight(w) ** 3).sum()

    plain = loss()
    g_plain = torch.autograd.grad(plain, list(t.parameters()))
    with step_cache(t):
        cached = loss()
        assert t._step is not None
    g_cached = torch.autograd.grad(cached, list(t.parameters()))
    assert t._step is None  # cleared on exit
    assert torch.allclose(plain, cached)
    for a, b in zip(g_plain, g_cached):
        assert torch.allclose(a, b, atol=1e-5)
