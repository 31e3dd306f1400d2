"""Packing helpers shared by the dense and the MoE export: checks, int4 weight codes, tensor groups."""
from __future__ import annotations

import torch

from flatquant.core.modules import QuantLinear
from flatquant.core.quantizer import Quantizer, quantize_symmetric
from flatquant.core.transforms import Transform
from flatquant.errors import CheckpointError
from flatquant.kernels.reference import pack_int4


def _refuse(msg: str):
    raise CheckpointError(f"cannot export a packed checkpoint: {msg}")


def _alpha(q: Quantizer) -> torch.Tensor:
    a = q.alpha()
    return torch.as_tensor(a, dtype=torch.float32).detach().float().reshape(-1)[0].reshape(()).clone().cpu()


def _check_quantizer(q: Quantizer, what: str, symmetric: bool) -> None:
    if not q.enabled or q.bits != 4:
        _refuse(f"{what} has {q.bits} bits; the packed format holds W4A4KV4 only")
    if q.symmetric != symmetric or q.group_size is not None:
        _refuse(f"{what} must be {'symmetric' if symmetric else 'asymmetric'} without groups")
    if getattr(q, "clip_logit_low", None) is not None:
        _refuse(f"{what} has separate lower/upper clip factors; the packed format holds one")


def _factors(t: Transform | None, what: str, online: bool = True) -> tuple:
    if t is None:
        return None, None
    if t.channel_scale() is not None and what in ("o_in", "k_head"):
        _refuse(f"the {what} transform has a channel scale, which cannot be folded")
    p1, p2 = t.matrices()
    if online and t.skip_p2_online:
        p2 = None
    return tuple(None if p is None else p.detach().float().cpu().contiguous() for p in (p1, p2))


def _weight(ql: QuantLinear, role: str):
    """int4 codes (out, in) int8 and row scale (out,) float32, bias float64 or None, from a float64 layer."""
    q = ql.w_quantizer
    _check_quantizer(q, f"weight of {role}", symmetric=True)
    w, b = ql.effective_weight_and_bias(torch.float64, quantize=False)
    if ql.has_gptq:
        if ql.gptq_zero is not None:
            _refuse(f"GPTQ weights of {role} are asymmetric")
        codes, scale = ql.gptq_codes, ql.gptq_scale
    else:
        a = q.alpha()
        codes, scale = quantize_symmetric(w, 4, a.float() if isinstance(a, torch.Tensor) else a)
    return codes.detach().to(torch.int8).cpu(), scale.detach().double().reshape(-1).cpu(), b


def _linear_tensors(prefix: str, parts: list, factors: tuple, alpha: torch.Tensor) -> dict:
    out = {f"{prefix}.qweight": pack_int4(torch.cat([p[0] for p in parts])).contiguous(),
           f"{prefix}.weight_scale": torch.cat([p[1] for p in parts]).float().contiguous(),
           f"{prefix}.alpha": alpha}
    if any(p[2] is not None for p in parts):
        out[f"{prefix}.bias"] = torch.cat([p[2] if p[2] is not None else torch.zeros(p[0].shape[0], dtype=torch.float64)
                                           for p in parts]).float().contiguous()
    for name, f in zip(("p1", "p2"), factors):
        if f is not None:
            out[f"{prefix}.{name}"] = f
    return out


def _sizes(factors: tuple) -> dict:
    return {k: (None if f is None else int(f.shape[0])) for k, f in zip(("p1", "p2"), factors)}
