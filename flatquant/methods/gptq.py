"""GPTQ weight quantization (Frantar et al., ICLR 2023), per output channel or group, in the transformed domain.

For a linear y = x Wᵀ fed with inputs x, GPTQ picks Ŵ on a fixed grid to minimise E‖x Wᵀ - x Ŵᵀ‖², row by
row. The loss of one row w is ½ (w - ŵ) H (w - ŵ)ᵀ with H = 2/N · Σ x xᵀ. Quantizing column j to q_j and
letting the columns not yet quantized (set F) absorb the error is optimal when

    e = (w_j - q_j) / [H_F⁻¹]_jj,    w_F\\j -= e · [H_F⁻¹]_{j, F\\j}

and H_F⁻¹ shrinks by one Gaussian-elimination step per column. Those steps are exactly the rows of the
upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U): [H_F⁻¹]_{j,k} / [H_F⁻¹]_jj = U_jk / U_jj and
[H_F⁻¹]_jj = U_jj², so one factorisation serves the whole sweep: e = (w_j - q_j) / U_jj,
w_k -= e · U_jk. Updates are applied lazily: inside a block of `block` columns at once, and to the
columns after the block in one matrix product (same result, far fewer passes over W).

Details, each for a reason:
* the grid (scale, and zero when asymmetric) is fixed per row from the full row before the sweep, with the
  layer's own clip factor (FlatQuant's learned sigmoid clip, the baselines' searched clip, else the ratio),
  so GPTQ and RTN weights share one grid and differ only in the rounding; with weight groups the grid is
  per row and group of consecutive input columns, also fixed before the sweep (static groups), so it
  combines with act order;
* dampening λ = damp · mean(diag H) keeps H invertible; if the Cholesky still fails λ grows ×10;
* an input that is always zero (diag H = 0) cannot affect the output: its H row becomes the identity's and
  its weights 0, so they take the grid's zero code;
* act order quantizes columns by decreasing diag H: the columns carrying most input energy go first, while
  many columns remain to absorb their error. The grid is per row, so the order changes nothing else, and
  the codes are permuted back;
* the factorisation runs in float64 (cheap next to the sweep, and it spares the float32 Cholesky failures
  of ill-conditioned Hessians), the sweep in float32.

`apply_gptq` runs GPTQ over a quantized model, decoder layer by decoder layer: each layer's Hessians come
from its actual (transformed) inputs, the outputs of the layers before it with their GPTQ weights.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from flatquant.calib.layerwise import run_layerwise, store_dtype
from flatquant.calib.train_step import run_layer
from flatquant.config import ConfigError, QuantConfig
from flatquant.core.modules import freeze, unfreeze
from flatquant.core.quantizer import Quantizer, dequantize, quantize_asymmetric, quantize_symmetric
from flatquant.errors import FlatQuantError
from flatquant.models.families import family_for

DAMP_RETRIES = 4  # Cholesky attempts; each one multiplies the dampening by 10


class GPTQError(FlatQuantError):
    """GPTQ cannot run (a Hessian that no dampening makes positive definite, an unsupported quantizer)."""


@dataclass
class GPTQWeights:
    """GPTQ result for one weight (out, in): weight = (codes - zero) · scale, one scale (and zero) per row.

    codes are int8 (int16 above 8 bits). Asymmetric codes 0..2^b-1 are stored minus 2^(b-1), and the
    zero with them, so 8-bit codes fit int8; the difference codes - zero is unchanged."""

    codes: torch.Tensor
    scale: torch.Tensor  # (out, 1) float32, or (out, in / group size) with weight groups
    zero: torch.Tensor | None = None  # scale's shape, float32; None = symmetric

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero)


@dataclass
class HessianFactor:
    """What the sweep needs from H, shared by every linear that reads the same input."""

    u: torch.Tensor  # upper Cholesky factor of the damped H⁻¹, rows/cols in sweep order, float32
    perm: torch.Tensor | None  # sweep order of the input columns (act order); None = natural order
    dead: torch.Tensor  # (in,) bool: inputs that were always zero


class Hessian:
    """Running H = 2/N · Σ x xᵀ over every row x (last dim) of the inputs seen."""

    def __init__(self, n: int, device):
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))

    def take(self) -> torch.Tensor:
        """value(), computed in place: the running sum is handed over (no second n x n copy)."""
        h, self.sum = self.sum, None
        return h.mul_(2.0 / max(self.count, 1))


def row_grid(w: torch.Tensor, bits: int, symmetric: bool, alpha: torch.Tensor | float = 1.0,
             group_size: int | None = None):
    """Per-row (scale, zero or None) from the full rows, computed exactly as the RTN quantizer does; with a
    group size, per row and group of input columns: shapes (out, in / group_size)."""
    if group_size is not None and group_size != w.shape[-1]:
        if w.shape[-1] % group_size:
            raise GPTQError(f"GPTQ: group size {group_size} does not divide {w.shape[-1]} inputs")
        a = alpha.unsqueeze(-1) if isinstance(alpha, torch.Tensor) and alpha.dim() > 0 else alpha
        scale, zero = row_grid(w.reshape(w.shape[0], -1, group_size), bits, symmetric, a)
        return scale[..., 0], None if zero is None else zero[..., 0]
    if symmetric:
        _, scale = quantize_symmetric(w, bits, alpha)
        return scale, None
    _, scale, zero = quantize_asymmetric(w, bits, alpha)
    return scale, zero


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int):
    """(codes, dequantized) of one column w (out,) on the per-row grid; same arithmetic as fake_quantize."""
    if zero is None:
        maxq = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(w / scale), -maxq - 1, maxq)
        return q, q * scale
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, (q - zero) * scale


def damped_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), in float64. λ grows ×10 per retry
    while H + λI is not numerically positive definite."""
    return _damped_factor(h, None, damp)


def _damped_factor(h: torch.Tensor, dead: torch.Tensor | None, damp: float) -> torch.Tensor:
    """damped_inverse_factor of h with diag entries `dead` set to 1, holding at most two n x n float64
    matrices at a time besides h (each attempt rebuilds H + λI from h, which is never modified)."""
    mean_diag = None
    for attempt in range(DAMP_RETRIES):
        hd = h.detach().to(torch.float64, copy=True)
        if dead is not None:
            torch.diagonal(hd)[dead] = 1.0
        if mean_diag is None:
            mean_diag = torch.diagonal(hd).mean()
        hd.add_(0.0)  # H + λI adds +0 off the diagonal: the same -0.0 -> +0.0 as the sum with the identity
        torch.diagonal(hd).add_((damp * 10**attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if info.item() == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if info.item() == 0 and torch.isfinite(u).all():
                return u
    raise GPTQError(f"GPTQ: the Hessian ({h.shape[0]} inputs) is not positive definite even with dampening "
                    f"{damp * 10 ** (DAMP_RETRIES - 1):g} x mean(diag H) (non-finite calibration activations?)")


@torch.no_grad()
def factor_hessian(h: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
    h = h.detach()
    diag = torch.diagonal(h)
    if not torch.isfinite(diag).all():
        raise GPTQError("GPTQ: the Hessian has non-finite entries (non-finite calibration activations?)")
    dead = diag == 0
    # dead inputs sort last (diag 0); stable, so ties keep their natural order (float64: as exact as h)
    perm = torch.argsort(diag.double(), descending=True, stable=True) if act_order else None
    if perm is not None:  # permuted in h's own dtype: the float64 conversion after it is exact
        h = h.index_select(0, perm).index_select(1, perm)
    u = _damped_factor(h, dead if perm is None else dead[perm], damp)
    del h
    return HessianFactor(u.float(), perm, dead)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, factor: HessianFactor, bits: int, symmetric: bool = True,
                  alpha: torch.Tensor | float = 1.0, block: int = 128, group_size: int | None = None) -> GPTQWeights:
    """GPTQ codes of a weight (out, in) given its input Hessian's factor (see the module docstring). With a
    group size, each row's grid is per group of consecutive input columns, fixed from the original weights
    before the sweep (so act order and groups combine: a column keeps its group's grid whatever its turn)."""
    w = w.detach().float().clone()
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().float().to(w.device)
    scale, zero = row_grid(w, bits, symmetric, alpha, group_size)  # from the full rows, dead columns included
    w[:, factor.dead.to(w.device)] = 0.0
    n = w.shape[1]
    s = scale.repeat_interleave(n // scale.shape[1], dim=1)  # each column's scale (and zero)
    z = None if zero is None else zero.repeat_interleave(n // zero.shape[1], dim=1)
    if factor.perm is not None:
        perm = factor.perm.to(w.device)
        w, s, z = w[:, perm], s[:, perm], None if z is None else z[:, perm]
    u = factor.u.to(w.device)
    codes = torch.empty_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2]  # a view: the in-block updates land in w
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            q, deq = _round_column(w1[:, j], s[:, c], None if z is None else z[:, c], bits)
            codes[:, i1 + j] = q
            e = (w1[:, j] - deq) / u1[j, j]
            err[:, j] = e
            if j + 1 < i2 - i1:
                w1[:, j + 1:].addr_(e, u1[j, j + 1:], alpha=-1.0)
        if i2 < n:
            w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1.0)
    if factor.perm is not None:
        codes = codes[:, torch.argsort(factor.perm.to(w.device))]
    if zero is not None:  # store asymmetric codes centred (see GPTQWeights)
        codes, zero = codes - 2 ** (bits - 1), zero - 2 ** (bits - 1)
    dtype = torch.int8 if bits <= 8 else torch.int16
    return GPTQWeights(codes.to(dtype), scale.float(), None if zero is None else zero.float())


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool = True, alpha: torch.Tensor | float = 1.0,
         damp: float = 0.01, block: int = 128, act_order: bool = True, group_size: int | None = None) -> GPTQWeights:
    """GPTQ of one weight (out, in) for the input Hessian h (in, in)."""
    return gptq_quantize(w, factor_hessian(h, damp, act_order), bits, symmetric, alpha, block, group_size)


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """½ tr(ΔW H ΔWᵀ) = mean over the calibration inputs x of ‖ΔW x‖² (H = 2/N Σ x xᵀ)."""
    dw = dw.float()
    return 0.5 * float(((dw @ h.float()) * dw).sum())


def quantizer_alpha(q: Quantizer) -> torch.Tensor | float:
    a = q.alpha()
    return a.detach().float() if isinstance(a, torch.Tensor) else float(a)


# ------------------------------------------------------------------------------------------ model level ---

def _site_quantizers(layer: nn.Module, family) -> dict[str, nn.Module]:
    """Per GPTQ group, the module whose input is the linears' actual (transformed) input: a site's activation
    quantizer (an MoE expert's gate/up: its tap, which sees only its routed tokens)."""
    return {key: mod for key, (mod, _roles) in family.gptq_groups(layer).items()}


def _tensors(module: nn.Module):
    return itertools.chain(module.named_parameters(), module.named_buffers())


def _restore_dtypes(module: nn.Module, dtypes: dict) -> None:
    """Give every tensor that existed before its dtype back (the GPTQ buffers, new, stay float32/int8)."""
    for name, t in _tensors(module):
        if name in dtypes and t.dtype != dtypes[name]:
            t.data = t.data.to(dtypes[name])


@torch.no_grad()
def solve_groups(layer: nn.Module, family, hessians: dict, qcfg: QuantConfig, keys=None) -> dict:
    """GPTQ weights of the enabled QuantLinears of the GPTQ groups `keys` (default all), set on the layer
    one group at a time. hessians: key -> H, or a `Hessian` (then consumed: its memory is freed as soon as
    its group is done, so one Hessian and one weight's work are resident at a time). Returns key ->
    {"weights": {role: (codes, scale, zero)}, "errors": [(ref, rtn, gptq) per linear], "seen": bool}."""
    lin = family.linears(layer)
    out = {}
    for key, (_mod, roles) in family.gptq_groups(layer).items():
        mods = [(r, lin[r]) for r in roles if lin[r].w_quantizer.enabled]
        if not mods or (keys is not None and key not in keys):
            if isinstance(hessians.get(key), Hessian):
                del hessians[key]
            continue
        seen = key in hessians  # not seen: an MoE expert no calibration token was routed to: H = I (RTN)
        h = hessians.pop(key) if seen and isinstance(hessians[key], Hessian) else hessians.get(key)
        h = h.take() if isinstance(h, Hessian) else h
        if h is None:
            h = torch.eye(mods[0][1].in_features, device=mods[0][1].weight.device)
        factor = factor_hessian(h, qcfg.gptq_damp, qcfg.gptq_act_order and seen)
        res_g = out[key] = {"weights": {}, "errors": [], "seen": seen}
        for role, m in mods:
            wq = m.w_quantizer
            m.clear_gptq()
            w, _ = m.effective_weight_and_bias(quantize=False)
            res = gptq_quantize(w, factor, wq.bits, wq.symmetric, quantizer_alpha(wq), qcfg.gptq_block,
                                wq.group_size)
            m.set_gptq(res.codes, res.scale, res.zero)
            res_g["weights"][role] = (res.codes, res.scale, res.zero)
            if seen:  # no inputs to measure an unseen group's output error on
                res_g["errors"].append((output_error(w, h), output_error(wq(w) - w, h),
                                        output_error(res.dequantize().to(w.device) - w, h)))
            del w, res
        del h, factor
    return out


def layer_errors(layer: nn.Module, family, results: dict) -> dict:
    """{"rtn_err", "gptq_err"} of solve_groups' results (summed linear by linear in group order, relative to
    the output energy), and "rtn_kept": the groups that saw no input."""
    ref = rtn = new = 0.0
    skipped = []
    for key in family.gptq_groups(layer):
        if key not in results:
            continue
        if not results[key]["seen"]:
            skipped.append(key)
        for e_ref, e_rtn, e_new in results[key]["errors"]:
            ref += e_ref
            rtn += e_rtn
            new += e_new
    ref = max(ref, 1e-30)
    return {"rtn_err": rtn / ref, "gptq_err": new / ref, **({"rtn_kept": skipped} if skipped else {})}


@torch.no_grad()
def gptq_layer(layer: nn.Module, family, hessians: dict, qcfg: QuantConfig) -> dict:
    """Replace the weight quantization of every enabled QuantLinear of `layer` by GPTQ weights.

    The layer must be unfrozen, with its parameters at the precision its target weights should be read at.
    Returns {"rtn_err", "gptq_err"}: Σ ½tr(ΔW H ΔWᵀ) of the RTN and GPTQ weights over the layer's
    linears, relative to Σ ½tr(W H Wᵀ) (the energy of the outputs); "rtn_kept": the groups that saw no input
    (unrouted MoE experts: their codes are the RTN codes, left out of the errors)."""
    return layer_errors(layer, family, solve_groups(layer, family, hessians, qcfg))


@torch.no_grad()
def apply_gptq(model: nn.Module, calib_windows: torch.Tensor | None, qcfg: QuantConfig, batch_size: int = 4,
               progress: bool = True, log=None, restore: Callable[[int, nn.Module], None] | None = None,
               on_layer_done: Callable[[int, nn.Module], None] | None = None) -> dict:
    """GPTQ weights for every quantized linear of `model` (quantized with its transforms and frozen), layer by
    layer as GPTQ does: the Hessians of a layer's four input sites come from one forward pass of the layer as
    it evaluates (transforms, activation and KV quantization, its current weights) on the outputs of the
    layers before it, which already carry their GPTQ weights; the layer's output with its new weights is
    the next layer's input. Hessians are taken at the input of each site's activation quantizer (before
    activation quantization), where the linear's transformed input is.

    restore(i, layer): called on the unfrozen float32 layer before its target weights are read (FlatQuant
    puts back its learned float32 parameters). on_layer_done(i, layer): after the codes are set, still in
    float32 (to save it). Returns the report: the windows, settings and seconds, and "layers" (one row per
    layer: {"layer", "rtn_err", "gptq_err", "seconds"})."""
    if calib_windows is None:
        raise ConfigError("GPTQ needs calibration windows")
    family = family_for(model)
    if not all(hasattr(layer, "fq_transforms") for layer in family.decoder_layers(model)):
        raise ValueError("apply_gptq needs a quantized model (quantize its layers first)")
    log = log or (lambda msg: tqdm.write(msg))
    model_dtype = next(model.parameters()).dtype
    t0 = time.time()

    def step(i, layer, inps, kwargs):
        t = time.time()
        dtypes = {name: x.dtype for name, x in _tensors(layer)}
        hessians: dict[str, Hessian] = {}

        def hook(key):
            def pre(_mod, args):
                x = args[0]
                hessians.setdefault(key, Hessian(x.shape[-1], x.device)).add(x)
            return pre

        handles = [q.register_forward_pre_hook(hook(key)) for key, q in _site_quantizers(layer, family).items()]
        try:
            run_layer(layer, inps, kwargs, batch_size, model_dtype)
        finally:
            for hd in handles:
                hd.remove()
        unfreeze(layer)
        layer.float()
        if restore is not None:
            restore(i, layer)
        row = {"layer": i, **gptq_layer(layer, family, {k: v.value() for k, v in hessians.items()}, qcfg)}
        if on_layer_done is not None:
            on_layer_done(i, layer)
        freeze(layer, dtype=model_dtype)
        _restore_dtypes(layer, dtypes)
        run_layer(layer, inps, kwargs, batch_size, model_dtype, out=inps)  # in place: batch by batch
        row["seconds"] = round(time.time() - t, 2)
        log(f"gptq layer {i:3d}: linear output error (relative) rtn {row['rtn_err']:.4g} -> gptq "
            f"{row['gptq_err']:.4g} ({row['seconds']:.1f} s)")
        return inps, row

    rows = run_layerwise(model, family, calib_windows, step, dtype=store_dtype(model), desc="gptq layers",
                         progress=progress)
    return {"nsamples": int(calib_windows.shape[0]), "seqlen": int(calib_windows.shape[1]),
            "damp": qcfg.gptq_damp, "block": qcfg.gptq_block, "act_order": qcfg.gptq_act_order,
            "seconds": round(time.time() - t0, 2), "layers": rows}
