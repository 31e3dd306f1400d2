"""Invertible transforms applied to a linear layer's input: x -> (x / c) @ (P1 ⊗ P2).

The weight takes the inverse offline, so the product is unchanged in exact arithmetic:
    y = x Wᵀ = [(x / c) P] [P⁻¹ (diag(c) Wᵀ)]   =>   W' = (W diag(c)) P⁻ᵀ.
P = P1 ⊗ P2 is never materialised: on the last dim reshaped to (n1, n2), x P = vec(P1ᵀ X P2).

Three kinds share that one interface (`forward`, `transform_weight`, `matrices`):
- `KroneckerAffine`: learnable P1, P2 (SVD form with Cayley-orthogonal factors, or direct form with a
  float64 inverse) and an optional learnable channel scale c. This is FlatQuant.
- `FixedKronecker`: frozen orthogonal factors (randomized Hadamard or random orthogonal). QuaRot.
- `ChannelScale`: only c (SmoothQuant).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from flatquant.core.orthogonal import hadamard, orthogonal_init, random_orthogonal  # noqa: F401 (re-exported)


def kron_factors(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = n, n1 <= n2 and n1 + n2 minimal. A prime n gives (1, n)."""
    if n < 1:
        raise ValueError(f"cannot factor size {n}")
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if n1 == 1 and n > 3:
        warnings.warn(f"size {n} is prime: its transform is one full {n}x{n} matrix", stacklevel=2)
    return n1, n // n1


def kron_apply(x: torch.Tensor, p1: torch.Tensor | None, p2: torch.Tensor | None) -> torch.Tensor:
    """x @ (p1 ⊗ p2) on the last dim, computed as p1ᵀ X p2 on the (n1, n2) reshape. None = identity."""
    if p1 is None and p2 is None:
        return x
    n1 = p1.shape[0] if p1 is not None else x.shape[-1] // p2.shape[0]
    n2 = x.shape[-1] // n1
    shape = x.shape
    xr = x.reshape(*shape[:-1], n1, n2)
    if p2 is not None:
        xr = torch.matmul(xr, p2.to(xr.dtype))
    if p1 is not None:
        xr = torch.matmul(p1.t().to(xr.dtype), xr)
    return xr.reshape(shape)


# ------------------------------------------------------------------------------ transforms ---

class Transform(nn.Module):
    """Base: x -> (x / c) @ (P1 ⊗ P2). Subclasses define matrices() and inverse_matrices().

    skip_p2_online: P2 is applied upstream (P_v folded into v_proj rows), so forward() applies only
    P1 while transform_weight() still inverts the full P1 ⊗ P2.
    """

    n: int
    skip_p2_online: bool = False
    _frozen: dict | None = None  # cached matrices for evaluation (see freeze())
    _step: dict | None = None  # matrices shared by one training step's forward and backward (see step_cache())
    _scale_folded: bool = False  # the channel scale now lives in the preceding norm / linear

    # Subclasses implement the _compute_* methods; callers use the public ones (cached when frozen).
    def _compute_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def _compute_inverse(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def _compute_scale(self) -> torch.Tensor | None:
        return None

    def _compute_all(self):
        """(matrices, inverse); subclasses whose two share work (one Cayley map for both) override this."""
        return self._compute_matrices(), self._compute_inverse()

    def _evaluate(self) -> dict:
        """Matrices, inverses and channel scale, each computed once (the dict that freeze and step_cache keep)."""
        m, i = self._compute_all()
        return {"m": m, "i": i, "c": self._compute_scale()}

    def _cached(self) -> dict | None:
        return self._frozen or self._step

    def matrices(self):
        cache = self._cached()
        return cache["m"] if cache else self._compute_matrices()

    def inverse_matrices(self):
        cache = self._cached()
        return cache["i"] if cache else self._compute_inverse()

    def channel_scale(self):
        if self._scale_folded:
            return None
        cache = self._cached()
        return cache["c"] if cache else self._compute_scale()

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype | None = None) -> None:
        """Evaluate the parameterisation once (Cayley maps, inverses) and reuse the result,
        stored in `dtype` (computed at the parameters' own precision first)."""
        self._frozen = None
        self._frozen = {k: _detach(v, dtype) for k, v in self._evaluate().items()}

    def unfreeze(self) -> None:
        self._frozen = None

    def fold_scale(self) -> torch.Tensor | None:
        """Hand the channel scale to the caller (to merge into a norm or linear) and stop applying it."""
        c = self.channel_scale()
        self._scale_folded = True
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channel_scale()
        if c is not None:
            x = x / c.to(x.dtype)
        p1, p2 = self.matrices()
        return kron_apply(x, p1, None if self.skip_p2_online else p2)

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(W diag(c)) P⁻ᵀ for a weight (out, n): the input-side inverse that keeps x Wᵀ unchanged."""
        c = self.channel_scale()
        if c is not None:
            w = w * c.to(w.dtype)
        i1, i2 = self.inverse_matrices()
        return kron_apply(w, _t(i1), _t(i2))

    def dense(self) -> torch.Tensor:
        """The materialised n x n matrix diag(1/c) (P1 ⊗ P2) — for tests and small sizes only."""
        return self.forward(torch.eye(self.n, dtype=torch.float64))


def _t(m: torch.Tensor | None) -> torch.Tensor | None:
    return None if m is None else m.t()


def _detach(x, dtype=None):
    if isinstance(x, tuple):
        return tuple(_detach(v, dtype) for v in x)
    return None if x is None else x.detach().to(dtype or x.dtype, copy=True)


@contextmanager
def step_cache(module: nn.Module):
    """Inside the block, every transform of `module` evaluates its parameterisation once (with autograd):
    one layer forward reads P_a for q, k and v and again for the activations, so without the cache each
    training step would recompute the same Cayley maps and inverses many times over."""
    transforms = [m for m in module.modules() if isinstance(m, Transform) and not m._frozen]
    factors = []
    try:
        factors = _precompute_solves(module)
        for t in transforms:
            t._step = t._evaluate()
        yield
    finally:
        for t in transforms:
            t._step = None
        for f in factors:
            f.precomputed = None


class ChannelScale(Transform):
    """Per-channel scale only (SmoothQuant, or FlatQuant's PS alone): x -> x / c."""

    def __init__(self, scale: torch.Tensor, learnable: bool = False):
        super().__init__()
        self.n = scale.numel()
        self.scale = nn.Parameter(scale.clone().float(), requires_grad=learnable)

    def _compute_scale(self) -> torch.Tensor:
        return self.scale


class FixedKronecker(Transform):
    """Frozen orthogonal Kronecker factors, e.g. a randomized Hadamard (QuaRot). Inverse = transpose.

    Random ±1 signs ride on the channel scale, so x -> (x ⊙ s) (H1 ⊗ H2)."""

    def __init__(self, p1: torch.Tensor | None, p2: torch.Tensor | None, signs: torch.Tensor | None = None,
                 skip_p2_online: bool = False):
        super().__init__()
        self.skip_p2_online = skip_p2_online
        self.n = (p1.shape[0] if p1 is not None else 1) * (p2.shape[0] if p2 is not None else 1)
        self.register_buffer("p1", None if p1 is None else p1.float())
        self.register_buffer("p2", None if p2 is None else p2.float())
        self.register_buffer("signs", None if signs is None else signs.float())

    @classmethod
    def random_hadamard(cls, n: int, generator: torch.Generator | None = None,
                        factors: tuple[int, int] | None = None, signs: bool = True,
                        skip_p2_online: bool = False) -> FixedKronecker:
        """Randomized Hadamard when one of size n can be built, else a random orthogonal matrix;
        either way stored as two Kronecker factors so large sizes stay cheap."""
        n1, n2 = factors if factors is not None else kron_factors(n)
        p1 = orthogonal_init(n1, "hadamard", generator)
        p2 = orthogonal_init(n2, "hadamard", generator)
        s = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1 if signs else None
        return cls(p1 if n1 > 1 else None, p2, s, skip_p2_online)

    def _compute_scale(self) -> torch.Tensor | None:
        return self.signs

    def _compute_matrices(self):
        return self.p1, self.p2

    def _compute_inverse(self):
        return _t(self.p1), _t(self.p2)


def _batched(mats: list[torch.Tensor], fn, pad_identity: bool) -> list[torch.Tensor]:
    """Apply a batched square-matrix function to matrices of different sizes in a few calls.

    Sizes are bucketed by the next power of two and zero-padded to the bucket (identity-padded when
    `pad_identity`), which is exact for block-diagonal-preserving maps such as the inverse and the
    Cayley map. Why: on a GPU one small LU solve costs ~0.3 ms of CPU-side launches whatever its
    size, and a layer has ~20 factors, so solving them one by one made training CPU-bound."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    buckets: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault(1 << (m.shape[0] - 1).bit_length(), []).append(i)
    for size, idx in buckets.items():
        padded = []
        for i in idx:
            m, n = mats[i], mats[i].shape[0]
            if n < size:
                m = torch.nn.functional.pad(m, (0, size - n, 0, size - n))
                if pad_identity:
                    m = m + torch.diag(torch.cat([m.new_zeros(n), m.new_ones(size - n)]))
            padded.append(m)
        res = fn(torch.stack(padded))
        for j, i in enumerate(idx):
            n = mats[i].shape[0]
            out[i] = res[j, :n, :n]
    return out


def _cayley_stacked(a: torch.Tensor) -> torch.Tensor:
    s = a - a.mT
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    # solve_ex, not solve: the error check of solve synchronises the GPU with the CPU at every call.
    return torch.linalg.solve_ex(eye + s, eye - s).result


def cayley(*skews: torch.Tensor) -> list[torch.Tensor]:
    """Orthogonal Q = (I + S)⁻¹ (I - S) for each S = A - Aᵀ (skew-symmetric, so I + S is invertible)."""
    return _batched(list(skews), _cayley_stacked, pad_identity=False)


def inverse(*mats: torch.Tensor) -> list[torch.Tensor]:
    """Matrix inverses (inv_ex: no GPU synchronisation for the error check)."""
    return _batched(list(mats), lambda m: torch.linalg.inv_ex(m).inverse, pad_identity=True)


class _SVDFactor(nn.Module):
    """P = U diag(σ) Vᵀ with U = U₀·cayley(A), V = cayley(B) orthogonal; P⁻¹ = V diag(1/σ) Uᵀ exactly.

    U₀ (a buffer) is the initial orthogonal matrix; A = B = 0 at the start, so P = U₀."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        n = init.shape[0]
        self.register_buffer("u_base", init.float().clone())
        self.u_skew = nn.Parameter(torch.zeros(n, n))
        self.v_skew = nn.Parameter(torch.zeros(n, n))
        self.sigma = nn.Parameter(torch.ones(n))
        self.precomputed: tuple[torch.Tensor, torch.Tensor] | None = None  # (cayley(A), cayley(B)), see step_cache

    def solve_inputs(self) -> list[torch.Tensor]:
        return [self.u_skew, self.v_skew]

    def matrix_and_inverse(self) -> tuple[torch.Tensor, torch.Tensor]:
        qu, qv = self.precomputed or cayley(self.u_skew, self.v_skew)
        u = self.u_base @ qu
        return (u * self.sigma) @ qv.t(), (qv / self.sigma) @ u.t()


class _DirectFactor(nn.Module):
    """A plain learnable matrix; its inverse is computed in float64 (the paper's FP32 recipe)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.float().clone())
        self.precomputed: tuple[torch.Tensor] | None = None  # (float64 inverse,), see step_cache

    def solve_inputs(self) -> list[torch.Tensor]:
        return [self.weight.double()]

    def matrix_and_inverse(self) -> tuple[torch.Tensor, torch.Tensor]:
        (inv,) = self.precomputed or inverse(self.weight.double())
        return self.weight, inv.to(self.weight.dtype)


def _precompute_solves(module: nn.Module) -> list[nn.Module]:
    """Batch the Cayley maps (SVD form) and inverses (direct form) of all factors in `module`."""
    factors = []
    for kind, solve in ((_SVDFactor, cayley), (_DirectFactor, inverse)):
        group = [m for m in module.modules() if isinstance(m, kind)]
        if not group:
            continue
        inputs = [f.solve_inputs() for f in group]
        k = len(inputs[0])
        flat = solve(*[t for ins in inputs for t in ins])
        for j, f in enumerate(group):
            f.precomputed = tuple(flat[j * k:(j + 1) * k])
        factors += group
    return factors


class KroneckerAffine(Transform):
    """FlatQuant's learnable affine transform P1 ⊗ P2 with an optional learnable channel scale.

    factors: (n1, n2); n1 == 1 means a single full matrix (P1 is the identity and not stored).
    parameterization: 'svd' (default, stable under mixed precision) or 'direct' (float64 inverse).
    """

    def __init__(self, n: int, factors: tuple[int, int] | None = None, parameterization: str = "svd",
                 init: str = "orthogonal", learn_scale: bool = False, skip_p2_online: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        n1, n2 = factors if factors is not None else kron_factors(n)
        if n1 * n2 != n:
            raise ValueError(f"factors {n1}x{n2} do not multiply to {n}")
        if parameterization not in ("svd", "direct"):
            raise ValueError(f"parameterization must be 'svd' or 'direct', got {parameterization!r}")
        self.n, self.n1, self.n2 = n, n1, n2
        self.parameterization = parameterization
        self.skip_p2_online = skip_p2_online
        factor = _SVDFactor if parameterization == "svd" else _DirectFactor
        self.f1 = factor(orthogonal_init(n1, init, generator)) if n1 > 1 else None
        self.f2 = factor(orthogonal_init(n2, init, generator))
        self.scale = nn.Parameter(torch.ones(n)) if learn_scale else None

    def _compute_scale(self):
        return self.scale

    def _compute_all(self):
        m1, i1 = self.f1.matrix_and_inverse() if self.f1 is not None else (None, None)
        m2, i2 = self.f2.matrix_and_inverse()
        return (m1, m2), (i1, i2)

    def _compute_matrices(self):
        return self._compute_all()[0]

    def _compute_inverse(self):
        return self._compute_all()[1]


class FactorView(Transform):
    """The P2 factor of another Kronecker transform as a transform of its own: P_v inside P_o ⊗ P_v."""

    def __init__(self, parent: Transform):
        super().__init__()
        self.__dict__["parent"] = parent  # owned elsewhere; registering it twice would duplicate params
        self.n = parent.matrices()[1].shape[0]

    def _compute_matrices(self):
        return None, self.parent.matrices()[1]

    def _compute_inverse(self):
        return None, self.parent.inverse_matrices()[1]
