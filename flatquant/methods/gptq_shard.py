"""GPTQ of one decoder layer with its per-group solves split over torch.distributed ranks.

Every rank runs the same layer on the same inputs (GPTQ's inputs are the outputs of the GPTQ layers before
it, so the pass over the layers stays sequential) and so holds the same Hessians; each rank then solves
only its share of the layer's GPTQ groups (the Hessian factorisation and the sweeps, the costly part),
the ranks exchange the codes, and every rank sets all of them. The solves are independent and the errors
are summed in group order, so any number of ranks gives the results of one.
"""
from __future__ import annotations

from torch import nn

from flatquant.config import QuantConfig
from flatquant.methods.gptq import layer_errors, solve_groups


def shard_groups(layer: nn.Module, family, world: int) -> list[set]:
    """The GPTQ groups of each rank: largest first (n³ of the factorisation plus the sweeps' out·n²), each
    to the least loaded rank; depends only on the layer's shapes."""
    lin = family.linears(layer)
    cost = {}
    for key, (_mod, roles) in family.gptq_groups(layer).items():
        mods = [lin[r] for r in roles if lin[r].w_quantizer.enabled]
        if mods:
            n = mods[0].in_features
            cost[key] = n ** 3 + sum(m.out_features for m in mods) * n ** 2
    shares: list[set] = [set() for _ in range(world)]
    load = [0] * world
    for key in sorted(cost, key=lambda k: -cost[k]):  # sorted is stable: ties keep the group order
        r = load.index(min(load))
        shares[r].add(key)
        load[r] += cost[key]
    return shares


def _to_cpu(results: dict) -> dict:
    def cpu(t):
        return None if t is None else t.detach().cpu()
    return {k: {**v, "weights": {r: tuple(cpu(t) for t in w) for r, w in v["weights"].items()}}
            for k, v in results.items()}


def gptq_layer_sharded(layer: nn.Module, family, hessians: dict, qcfg: QuantConfig, dist) -> tuple[dict, str | None]:
    """gptq_layer over the ranks of `dist` (every rank calls it with the same layer and Hessians). Returns
    (the errors row, None), or (None, the first failing rank's message) on every rank when one failed."""
    if dist.world == 1:
        return layer_errors(layer, family, solve_groups(layer, family, hessians, qcfg)), None
    err, mine = None, {}
    try:
        mine = solve_groups(layer, family, hessians, qcfg, shard_groups(layer, family, dist.world)[dist.rank])
    except Exception as e:  # reported to every rank: no rank waits forever in the exchange below
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    gathered = dist.gather((_to_cpu(mine), err))
    failed = [(r, e) for r, (_res, e) in enumerate(gathered) if e]
    if failed:
        return None, f"rank {failed[0][0]}: {failed[0][1]}"
    lin = family.linears(layer)
    results = {}
    for r, (res, _e) in enumerate(gathered):
        results.update(res)
        if r == dist.rank:
            continue
        for group in res.values():  # the other ranks' codes
            for role, (codes, scale, zero) in group["weights"].items():
                m = lin[role]
                dev = m.weight.device
                m.clear_gptq()
                m.set_gptq(codes.to(dev), scale.to(dev), None if zero is None else zero.to(dev))
    return layer_errors(layer, family, results), None
