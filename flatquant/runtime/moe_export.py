"""Export of one fake-quant MoE block (flatquant/models/moe.py) into the packed tensors of runtime/moe.py.

Folded as flatquant.core.reparam folds it: P_ug's channel scale c goes into post_attention_layernorm and back
into the 16-bit router's (and shared-expert gate's) input columns; expert e's c_d goes into the row scales of
its gate_up's up half (row scales are equivariant); the shared expert's into its up rows. An expert that got
no calibration tokens (identity P_d) is written with identity factors of its siblings' sizes, so every
expert of every layer has the same tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.core.modules import ActSite, module_key
from flatquant.models import moe
from flatquant.runtime.moe import SHARED_IN
from flatquant.runtime.packing import _alpha, _check_quantizer, _factors, _linear_tensors, _refuse, _sizes


def _site_quantizer(act, what: str):
    if not isinstance(act, ActSite):
        _refuse(f"{what} has no activation quantizer")
    _check_quantizer(act.quantizer, f"activations of {what}", symmetric=True)
    return _alpha(act.quantizer)


def _scale_rows(w: tuple, rows: slice, c: torch.Tensor | None) -> tuple:
    """(codes, scale, bias) with the rows `rows` divided by a folded channel scale c."""
    if c is None:
        return w
    codes, s, b = w
    s, b = s.clone(), None if b is None else b.clone()
    s[rows] /= c.double().cpu()
    if b is not None:
        b[rows] /= c.double().cpu()
    return codes, s, b


def _identity_like(sizes: dict) -> tuple:
    return tuple(None if n is None else torch.eye(n, dtype=torch.float32) for n in (sizes["p1"], sizes["p2"]))


@torch.no_grad()
def block_tensors(lay: nn.Module, family, lp: str, rel: dict, w: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(tensors, {"mlp_in": sizes, "down_in": sizes[, "down_in.shared": sizes]}) of a float64 MoE layer copy
    `lay`; w: role -> (int4 codes, row scale, bias) of every projection (export._weight)."""
    block = family.mlp_module(lay)
    t = lay.fq_transforms
    mlp_p = f"{lp}.{rel[id(block)]}"

    def get(site: str):
        return t[module_key(site)] if module_key(site) in t else None

    out = {}
    t_in = get("mlp_in")
    c_in = None if t_in is None else t_in.channel_scale()
    norm = family.norm(lay, "post")
    nw = norm.weight.double()
    readers = {id(m): m.weight.double() for m in moe.raw_readers(block)}
    if c_in is not None:
        nw = nw / c_in.double()
        readers = {k: v * c_in.double() for k, v in readers.items()}
    out[f"{lp}.{rel[id(norm)]}.weight"] = nw.to(dtype).cpu().contiguous()
    for m in moe.raw_readers(block):
        out[f"{lp}.{rel[id(m)]}.weight"] = readers[id(m)].to(dtype).cpu().contiguous()
    f_in = _factors(t_in, "mlp_in")
    for name, f in zip(("p1", "p2"), f_in):
        if f is not None:
            out[f"{mlp_p}.{SHARED_IN}.{name}"] = f
    out[f"{mlp_p}.{SHARED_IN}.alpha"] = _site_quantizer(block.input_site, "the experts' gate/up input")
    downs = [f"down_in.{e}" for e in range(block.num_experts)]
    factors = {s: _factors(get(s), s) for s in downs}
    sizes = next((_sizes(f) for f in factors.values() if f != (None, None)), _sizes((None, None)))
    groups = []  # (prefix, [weights], factors, alpha or None for a gate/up on the shared codes)
    for e, site in enumerate(downs):
        gu, dn = f"experts.{e}.gate_up", f"experts.{e}.down"
        _, rows = moe.down_producer(block, site)  # the up half of the expert's gate_up
        scale = None if get(site) is None else get(site).channel_scale()
        groups.append((f"{mlp_p}.experts.{e}.gate_up", [_scale_rows(w[gu], rows, scale)], (None, None), None))
        f = factors[site] if factors[site] != (None, None) else _identity_like(sizes)
        groups.append((f"{mlp_p}.experts.{e}.down", [w[dn]], f,
                       _site_quantizer(block.experts[e].down.input_site, f"expert {e}'s down input")))
    out_sites = {"mlp_in": _sizes(f_in), "down_in": sizes}
    if block.shared_expert is not None:
        g, u, d = (f"shared_expert.{r}" for r in moe.SHARED_ROLES)
        t_d = get("down_in.shared")
        f_d = _factors(t_d, "down_in.shared")
        scale = None if t_d is None else t_d.channel_scale()
        groups.append((f"{mlp_p}.shared_expert.fq_gate_up", [w[g], _scale_rows(w[u], slice(None), scale)],
                       (None, None), None))
        groups.append((f"{mlp_p}.shared_expert.down_proj", [w[d]], f_d,
                       _site_quantizer(block.shared_expert.down_proj.input_site, "the shared expert's down input")))
        out_sites["down_in.shared"] = _sizes(f_d)
    for prefix, parts, f, alpha in groups:
        tensors = _linear_tensors(prefix, parts, f, torch.ones(()) if alpha is None else alpha)
        if alpha is None:
            tensors.pop(f"{prefix}.alpha")  # gate/up read the codes of the shared site (its clip)
        out.update(tensors)
    return out, out_sites


__all__ = ["block_tensors"]
