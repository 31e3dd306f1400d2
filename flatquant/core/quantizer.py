"""One fake quantizer for weights, activations and the KV cache.

A tensor is quantized along its last dimension, optionally in groups of `group_size`:
- weights (out, in): one scale per output channel  -> reduce over `in`
- activations (..., n): one scale per token         -> reduce over `n`
- keys/values (b, heads, seq, head_dim): per token and head (group = head_dim)

Symmetric: q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1), s = alpha * max|x| / (2^(b-1) - 1).
Asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1), s = alpha * (max - min) / (2^b - 1), z = round(-alpha*min / s).
The clip factor alpha is fixed (1.0 or a searched per-channel ratio) or learnable as sigmoid(logit); an
asymmetric quantizer may learn a separate factor for its minimum (split_clip).
Rounding uses a straight-through estimator, so gradients reach the scale (hence alpha) and the input.
16 bits or more means "not quantized": the quantizer is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

# sigmoid(4) ~= 0.982: learnable clipping starts just below "no clipping".
CLIP_LOGIT_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even), with an identity gradient."""
    if not x.requires_grad:  # nothing to pass a gradient to: x + (round(x) - x) equals round(x) up to a zero's sign
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def quantize_symmetric(x: torch.Tensor, bits: int, alpha: torch.Tensor | float = 1.0):
    """Integer codes and scale for symmetric quantization over the last dim (float32 math).

    Returns (codes as float tensor holding integers, scale with a trailing dim of 1).
    """
    maxq = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) * alpha
    scale = (amax / maxq).clamp(min=1e-8)
    codes = torch.clamp(round_ste(xf / scale), -maxq - 1, maxq)
    return codes, scale


def quantize_asymmetric(x: torch.Tensor, bits: int, alpha: torch.Tensor | float = 1.0,
                        alpha_low: torch.Tensor | float | None = None):
    """Integer codes, scale and zero point for asymmetric quantization over the last dim. alpha clips the
    maximum, alpha_low (default: alpha) the minimum."""
    maxq = 2**bits - 1
    xf = x.float()
    xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * alpha
    xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * (alpha if alpha_low is None else alpha_low)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-8)
    zero = round_ste(-xmin / scale)
    codes = torch.clamp(round_ste(xf / scale) + zero, 0, maxq)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zero) * scale in float32 (zero None = symmetric); the inverse of the code functions above."""
    w = codes.float()
    if scale.shape[-1] not in (1, w.shape[-1]):  # one scale (and zero) per group of columns
        g = w.shape[-1] // scale.shape[-1]
        scale = scale.repeat_interleave(g, dim=-1)
        zero = None if zero is None else zero.repeat_interleave(g, dim=-1)
    if zero is not None:
        w = w - zero.float()
    return w * scale.float()


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool, alpha: torch.Tensor | float = 1.0,
                  group_size: int | None = None, alpha_low: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` over its last dim (in groups); result has x's dtype. alpha_low: the
    asymmetric minimum's own clip factor (default: alpha)."""
    if bits >= 16:
        return x
    shape = x.shape
    if group_size is not None and group_size != shape[-1]:
        if shape[-1] % group_size:
            raise ValueError(f"last dim {shape[-1]} is not a multiple of group size {group_size}")
        x = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
        if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
            alpha = alpha.unsqueeze(-1)
        if isinstance(alpha_low, torch.Tensor) and alpha_low.dim() > 0:
            alpha_low = alpha_low.unsqueeze(-1)
    if symmetric:
        codes, scale = quantize_symmetric(x, bits, alpha)
        out = codes * scale
    else:
        codes, scale, zero = quantize_asymmetric(x, bits, alpha, alpha_low)
        out = (codes - zero) * scale
    return out.reshape(shape).to(x.dtype)


class Quantizer(nn.Module):
    """Fake quantizer with optional learnable (sigmoid) or searched (per-channel) clipping.

    clip_shape: shape of the learnable clip logits, e.g. (out_features, 1) for per-channel weight
    clipping or (1,) for a single activation threshold.
    """

    def __init__(self, bits: int = 16, symmetric: bool = True, group_size: int | None = None,
                 clip_ratio: float = 1.0, learnable_clip: bool = False, clip_shape: tuple[int, ...] = (1,),
                 split_clip: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.symmetric = symmetric
        self.group_size = group_size
        self.clip_ratio = float(clip_ratio)
        # A searched per-channel ratio (weights) replaces the scalar clip_ratio once set.
        self.register_buffer("searched_clip", None)
        if learnable_clip and self.enabled:
            self.clip_logit = nn.Parameter(torch.full(clip_shape, CLIP_LOGIT_INIT))
        else:
            self.clip_logit = None
        # split_clip (asymmetric, learnable): the minimum gets its own clip factor, sigmoid(clip_logit_low)
        if split_clip and learnable_clip and self.enabled and not symmetric:
            self.clip_logit_low = nn.Parameter(torch.full(clip_shape, CLIP_LOGIT_INIT))
        else:
            self.clip_logit_low = None

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def alpha(self) -> torch.Tensor | float:
        if self.clip_logit is not None:
            return torch.sigmoid(self.clip_logit.float())
        if self.searched_clip is not None:
            return self.searched_clip
        return self.clip_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        low = None if self.clip_logit_low is None else torch.sigmoid(self.clip_logit_low.float())
        return fake_quantize(x, self.bits, self.symmetric, self.alpha(), self.group_size, low)

    @torch.no_grad()
    def search_clip(self, w: torch.Tensor, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> None:
        """Per-row clip-ratio grid search minimising sum |Q(w) - w|^norm (the GPTQ/QuaRot recipe): ratios
        1, 1 - 1/grid, ..., the first (largest) of equal minima wins."""
        if not self.enabled:
            return
        ratios = torch.tensor([1.0 - i / grid for i in range(int(max_shrink * grid))], device=w.device)
        self.searched_clip = ratios[clip_search_best(w, ratios, self.bits, self.symmetric, self.group_size,
                                                     norm)].unsqueeze(-1)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        clip = "learnable" if self.clip_logit is not None else ("searched" if self.searched_clip is not None
                                                                else self.clip_ratio)
        return f"bits={self.bits}, {kind}, group={self.group_size}, clip={clip}"


# Elements of one search step's temporary: small enough to stay in cache, large enough to amortise dispatch.
SEARCH_BLOCK = 1 << 18
# Symmetric search without groups: each row's PRUNE_TOP largest |w| bound a candidate's error from below; a
# candidate whose bound exceeds the row's best error so far by more than float rounding can't win: skipped.
PRUNE_TOP = 32
PRUNE_MARGIN = 1e-3


def _sym_errors(x: torch.Tensor, scale: torch.Tensor, maxq: int, norm: float) -> torch.Tensor:
    """sum |fake_quantize(x) - x|^norm over the last two dims of x (rows, groups, g) for each scale
    (candidates, rows, groups, 1): (candidates, rows), with fake_quantize's float32 operations."""
    q = torch.div(x, scale).round_().clamp_(-maxq - 1, maxq).mul_(scale)
    return q.sub_(x).abs_().pow_(norm).reshape(q.shape[0], q.shape[1], -1).sum(-1)


@torch.no_grad()
def clip_search_best(w: torch.Tensor, ratios: torch.Tensor, bits: int, symmetric: bool,
                     group_size: int | None = None, norm: float = 2.4, block: int | None = None) -> torch.Tensor:
    """Index into `ratios` (float32, 1-D) of each row's smallest sum |fake_quantize(w, ratio) - w|^norm, the
    first on ties; w's shape less its last dim. Blocks of rows x candidates in one broadcast op each, with
    the same float32 operations as fake_quantize (round_ste is exactly round without gradients), so every
    error computed is the loop's; candidates proven worse (PRUNE_TOP) are skipped."""
    block = block or SEARCH_BLOCK
    shape = w.shape
    x = w.float().reshape(-1, shape[-1])
    g = group_size if group_size is not None and group_size != shape[-1] else shape[-1]
    if shape[-1] % g:
        raise ValueError(f"last dim {shape[-1]} is not a multiple of group size {g}")
    x = x.reshape(x.shape[0], -1, g)  # (rows, groups, g)
    alphas = ratios.float().view(-1, 1, 1, 1)
    if symmetric:  # every candidate's scale (and zero point): (candidates, rows, groups, 1)
        maxq = 2 ** (bits - 1) - 1
        scales = (x.abs().amax(-1, keepdim=True) * alphas / maxq).clamp(min=1e-8)
    else:
        maxq = 2**bits - 1
        hi = x.amax(-1, keepdim=True).clamp(min=0) * alphas
        lo = x.amin(-1, keepdim=True).clamp(max=0) * alphas
        scales = ((hi - lo) / maxq).clamp(min=1e-8)
        zeros = (-lo / scales).round_()
    rows, n = x.shape[0], alphas.shape[0]
    prune = symmetric and g == shape[-1] and PRUNE_TOP < g
    errs = torch.full((n, rows), float("inf"), device=w.device)
    rb = max(1, min(rows, block // shape[-1]))
    for r0 in range(0, rows, rb):
        xs, r1 = x[r0:r0 + rb], min(rows, r0 + rb)
        if prune:
            top = xs.gather(-1, xs.abs().topk(PRUNE_TOP, dim=-1).indices)  # their errors: part of each sum
            bound = _sym_errors(top, scales[:, r0:r1], maxq, norm) * (1 - PRUNE_MARGIN)
            best = torch.full((r1 - r0,), float("inf"), device=w.device)
        cb = 1 if prune else max(1, block // xs.numel())
        for c0 in range(0, n, cb):
            c1 = min(n, c0 + cb)
            scale = scales[c0:c1, r0:r1]
            if prune:
                alive = ~(bound[c0] > best)  # a NaN bound or best keeps the row
                live = int(alive.sum())
                if live == 0:
                    continue
                if live < r1 - r0:
                    idx = alive.nonzero().squeeze(1)
                    errs[c0, r0 + idx] = _sym_errors(xs[idx], scale[:, idx], maxq, norm)[0]
                else:
                    errs[c0:c1, r0:r1] = _sym_errors(xs, scale, maxq, norm)
                best = torch.minimum(best, errs[c0, r0:r1])
            elif symmetric:
                errs[c0:c1, r0:r1] = _sym_errors(xs, scale, maxq, norm)
            else:
                zero = zeros[c0:c1, r0:r1]
                q = torch.div(xs, scale).round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)
                errs[c0:c1, r0:r1] = q.sub_(xs).abs_().pow_(norm).reshape(c1 - c0, r1 - r0, -1).sum(-1)
    errs = torch.where(errs.isnan(), float("inf"), errs)  # NaN never wins, as in a `<` comparison
    return errs.argmin(0).reshape(shape[:-1])  # argmin: the first of equal minima


@torch.no_grad()
def clip_search_loop(w: torch.Tensor, ratios: torch.Tensor, bits: int, symmetric: bool,
                     group_size: int | None = None, norm: float = 2.4) -> torch.Tensor:
    """The plain reference of clip_search_best: one full fake_quantize per candidate, strict `<` keeps the
    first minimum. Returns the same indices."""
    w = w.float()
    best_err = torch.full(w.shape[:-1], float("inf"), device=w.device)
    best = torch.zeros(w.shape[:-1], dtype=torch.long, device=w.device)
    for i, ratio in enumerate(ratios.tolist()):
        err = (fake_quantize(w, bits, symmetric, ratio, group_size) - w).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, i), best)
    return best
