"""Tolerances and comparison helpers of the kernel tests (importable without triton; tests/kernels/conftest.py
puts this folder on sys.path). Why each bound holds: docs/KERNELS.md, "Test tolerances"."""
from __future__ import annotations

import torch

# Kernel and reference may round a value at a .5 tie differently (float32 summation order, y / s against
# y * (1 / s)): a code may differ by one only where y / scale lies within this distance of a tie.
TIE_TOL = 1e-3


def assert_codes_match(codes: torch.Tensor, ref_codes: torch.Tensor, pre_round: torch.Tensor,
                       tie_tol: float = TIE_TOL) -> int:
    """codes == ref_codes, except |diff| == 1 where |frac(|pre_round|) - 0.5| < tie_tol.

    Returns the number of tie flips (0 in the usual case)."""
    c = codes.to(torch.int32).cpu()
    r = ref_codes.to(torch.int32).cpu()
    v = pre_round.float().cpu()
    assert c.shape == r.shape == v.shape, (c.shape, r.shape, v.shape)
    diff = (c - r).abs()
    bad = diff > 0
    if not bad.any():
        return 0
    assert int(diff.max()) <= 1, f"codes differ by up to {int(diff.max())}"
    off = bad & ~near_tie(v, tie_tol)
    assert not off.any(), (f"{int(off.sum())} codes differ away from a .5 tie; e.g. value "
                           f"{v[off][:4].tolist()} kernel {c[off][:4].tolist()} ref {r[off][:4].tolist()}")
    return int(bad.sum())


def near_tie(pre_round: torch.Tensor, tie_tol: float = TIE_TOL) -> torch.Tensor:
    """Where |frac(|pre_round|) - 0.5| < tie_tol: the values whose code may differ by one (a bool CPU tensor)."""
    v = pre_round.float().cpu().abs()
    return ((v - v.floor()) - 0.5).abs() < tie_tol


def tie_flip_slack(pre_round: torch.Tensor, act_scale: torch.Tensor, w_dequant: torch.Tensor,
                   tie_tol: float = TIE_TOL) -> torch.Tensor:
    """The most a linear's output can move when activation codes flip by one at .5 ties.

    A code at column c that moves by one moves output j by act_scale * w_dequant[j, c], so the bound for
    (token, j) sums |w_dequant[j, c]| over the token's near-tie columns. pre_round (M, K), act_scale (M,),
    w_dequant (N, K) -> (M, N), float32 on the CPU; zero where no value is near a tie."""
    near = near_tie(pre_round, tie_tol).float()
    return act_scale.float().cpu()[:, None] * (near @ w_dequant.float().cpu().abs().t())


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


# Kernels that round T = X P2 once to the half dtype may flip that rounding by one ulp (2^-8 relative covers
# bf16 and fp16) through float32 summation order: scales agree within ROUNDED_T_SCALE_RTOL, and a code may
# differ by one within twice that, in code units, of a tie.
ROUNDED_T_ULP = 2.0 ** -8
ROUNDED_T_SCALE_RTOL = 2.0 ** -9


def rounded_t_tie_tol(dtype: torch.dtype, bits: int, alpha: float) -> float:
    """The tie band for codes computed from a T rounded to `dtype` (TIE_TOL alone for float32)."""
    if dtype == torch.float32:
        return TIE_TOL
    return TIE_TOL + 2 * ROUNDED_T_ULP * (2 ** (bits - 1) - 1) / alpha


def max_rounded_t_flips(numel: int, bits: int) -> float:
    """How many codes may flip at ties when T is rounded to the half dtype: 1e-3 of them at 4 bits, and
    maxq / 7 times that at `bits` (a flipped T element moves y by the same fraction of the token's max)."""
    return max(1.0, 1e-3 * numel * (2 ** (bits - 1) - 1) / 7)
