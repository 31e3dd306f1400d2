"""Orthogonal matrices for transforms: Hadamard matrices (Sylvester and Paley constructions), Haar-random
orthogonal matrices, and the initialisations built from them."""
from __future__ import annotations

import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(m: int) -> torch.Tensor | None:
    """Paley construction I (m = q + 1, q ≡ 3 mod 4) or II (m = 2(q + 1), q ≡ 1 mod 4), q prime."""
    def jacobsthal(q: int) -> torch.Tensor:
        squares = {(i * i) % q for i in range(1, q)}
        chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)

    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        qm = jacobsthal(q)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = qm
        return s + torch.eye(m, dtype=torch.float64)
    if m % 2 == 0:
        q = m // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            qm = jacobsthal(q)
            s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            s[0, 1:] = 1
            s[1:, 0] = 1
            s[1:, 1:] = qm
            a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            out = torch.zeros(m, m, dtype=torch.float64)
            for i in range(q + 1):
                for j in range(q + 1):
                    out[2 * i:2 * i + 2, 2 * j:2 * j + 2] = b if s[i, j] == 0 else a * s[i, j]
            return out
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n Hadamard matrix (entries ±1, H Hᵀ = n I) if we can build one: 2^k · m with m = 1 or a
    Paley order (e.g. 12, 20, 36, 44, ...); otherwise None. 576 = 16·36 and 1536 = 128·12 both work."""
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    for extra in range(k + 1):
        m = n >> (k - extra)  # odd part times 2^extra
        if m > 4096:  # Paley matrices are built in Python: keep them small (they are Kronecker factors)
            break
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return torch.kron(_sylvester(k - extra), base)
    return None


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def orthogonal_init(n: int, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """'identity', 'hadamard' (normalised, falls back to random orthogonal) or 'orthogonal' (random)."""
    if kind == "identity" or n == 1:
        return torch.eye(n, dtype=torch.float64)
    if kind == "hadamard":
        h = hadamard(n)
        if h is not None:
            return h / math.sqrt(n)
    return random_orthogonal(n, generator)
