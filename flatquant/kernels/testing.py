"""Comparison helpers for kernel tests (importable without triton)."""
from __future__ import annotations

import torch

# Triton and torch may round values at a .5 tie differently only through float32 summation order or the
# last bit of y / scale (a division in one, a multiply by the reciprocal in another): a code may then differ
# by one, and only where the reference's pre-rounding value y / scale lies within this distance of a .5 tie
# (seed 1983796734 gave an exact 2.5 with no transform at all). Everywhere else codes must be equal bit for bit.
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


# The block, chunked and decode kernels round T = X P2 once to the half dtype. Float32 summation order (numpy's in
# the interpreter, the tensor cores' on the GPU) can flip that rounding of a T element by one ulp (2^-8 relative
# for bf16, 2^-10 for fp16; 2^-8 covers both), which moves y by about that much of the token's max |y|: scales
# then agree within ROUNDED_T_SCALE_RTOL, and a code may differ by one within twice that, in code units, of a tie.
ROUNDED_T_ULP = 2.0 ** -8
ROUNDED_T_SCALE_RTOL = 2.0 ** -9


def rounded_t_tie_tol(dtype: torch.dtype, bits: int, alpha: float) -> float:
    """The tie band for codes computed from a T rounded to `dtype` (TIE_TOL alone for float32)."""
    if dtype == torch.float32:
        return TIE_TOL
    return TIE_TOL + 2 * ROUNDED_T_ULP * (2 ** (bits - 1) - 1) / alpha


def max_rounded_t_flips(numel: int, bits: int) -> float:
    """How many codes may flip at ties when T is rounded to the half dtype: 1e-3 of them at 4 bits, and
    proportionally more for finer codes (a flipped T element moves y by the same fraction of the token's
    max, i.e. maxq / 7 times as many code units at `bits` as at 4; at 8 bits, fp16, n2 = 112 seed 1176978504
    gave 20 flips in 15,680 codes, 0.13 %)."""
    return max(1.0, 1e-3 * numel * (2 ** (bits - 1) - 1) / 7)
