#!/usr/bin/env python
"""Where a one-token fused transform's time goes (decode): the same single-token kernel cut after each
stage, each timed from a CUDA graph, next to the library's block and split kernels and the floor of a
kernel node (an empty kernel). Stages: 0 = load X, P1, P2; 1 = + V = X P2; 2 = + Y = P1ᵀ V (both nibble
halves); 3 = + per-token max and scale; 4 = + quantize, pack and store (the whole transform). A stage
keeps its results alive with stores predicated off by a run-time value (no reduction added). The whole
kernel is also timed with PDL's early trigger (griddepcontrol.launch_dependents at its start), and the
library kernels with that trigger at their start (default), their end, or not at all; and with the
scale and its inverse from float32 '/' (approximate), libdevice's IEEE division (div_rn: a range check
and a slow-path call) or the library's inline IEEE division (`_div_rn`). Diagnostic,
JSON list out; `--eager` runs each piece a few times without timing, for a profiler.

    PYTHONPATH=. python benchmarks/probes/probe_transform_stages.py --out results/kernels/probe_transform_stages.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import _div_rn, gdc_launch_dependents


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _stage_kernel(x_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, sink_ptr, never, alpha, N1: tl.constexpr,
                  N2: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                  STAGE: tl.constexpr, TRIGGER: tl.constexpr, DIV: tl.constexpr):
    if TRIGGER:  # PDL's early trigger, as the library kernels issue it
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    h = tl.arange(0, HP)
    xm = (i[:, None] < N1) & (j[None, :] < N2)
    X = tl.load(x_ptr + t * N1 * N2 + i[:, None] * N2 + j[None, :], mask=xm, other=0.0)
    P2 = tl.load(p2_ptr + j[:, None] * N2 + j[None, :], mask=(j[:, None] < N2) & (j[None, :] < N2), other=0.0)
    qm = (i[:, None] < N1) & (h[None, :] < H)
    P1lo = tl.load(p1_ptr + i[:, None] * N1 + h[None, :], mask=qm, other=0.0)
    P1hi = tl.load(p1_ptr + i[:, None] * N1 + (H + h)[None, :], mask=qm, other=0.0)
    # `never` is 0 at run time: these stores keep a stage's values alive and cost only their predicates.
    if STAGE == 0:
        tl.store(sink_ptr + i[:, None] * N2P + j[None, :], X.to(tl.float32) + P2.to(tl.float32), mask=xm & (never > 0))
        tl.store(sink_ptr + i[:, None] * HP + h[None, :], P1lo.to(tl.float32) + P1hi.to(tl.float32),
                 mask=qm & (never > 0))
        return
    V = tl.dot(X, P2).to(X.dtype)
    if STAGE == 1:
        tl.store(sink_ptr + i[:, None] * N2P + j[None, :], V.to(tl.float32), mask=xm & (never > 0))
        tl.store(sink_ptr + i[:, None] * HP + h[None, :], P1lo.to(tl.float32) + P1hi.to(tl.float32),
                 mask=qm & (never > 0))
        return
    Ylo = tl.dot(tl.trans(P1lo), V)
    Yhi = tl.dot(tl.trans(P1hi), V)
    om = (h[:, None] < H) & (j[None, :] < N2)
    if STAGE == 2:
        tl.store(sink_ptr + h[:, None] * N2P + j[None, :], Ylo + Yhi, mask=om & (never > 0))
        return
    amax = tl.max(tl.max(tl.maximum(tl.abs(Ylo), tl.abs(Yhi)), axis=1), axis=0)
    if DIV == 0:  # float32 '/' (approximate division)
        s = tl.maximum(amax * alpha / 7.0, 1e-8)
    elif DIV == 1:  # libdevice's IEEE division (range check, slow-path call)
        s = tl.maximum(tl.math.div_rn(amax * alpha, 7.0), 1e-8)
    else:  # the library's inline IEEE division
        s = tl.maximum(_div_rn(amax * alpha, 7.0, False), 1e-8)
    if STAGE == 3:
        tl.store(scale_ptr + t, s)
        tl.store(sink_ptr + h[:, None] * N2P + j[None, :], Ylo + Yhi, mask=om & (never > 0))
        return
    tl.store(scale_ptr + t, s)
    if DIV == 0:
        inv = 1.0 / s
    elif DIV == 1:
        inv = tl.math.div_rn(1.0, s)
    else:
        inv = _div_rn(1.0, s, False)
    qlo = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(Ylo * inv), -8.0), 7.0).to(tl.int32)
    qhi = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(Yhi * inv), -8.0), 7.0).to(tl.int32)
    tl.store(out_ptr + t * (N1 * N2 // 2) + h[:, None] * N2 + j[None, :],
             ((qlo & 15) | ((qhi & 15) << 4)).to(tl.uint8), mask=om)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--eager", action="store_true", help="run each piece 3 times, no timing (for ncu)")
    ap.add_argument("--only", default=None, help="a regex: run only the pieces whose name matches")
    args = ap.parse_args()
    from _common import RecordWriter, base_fields, require_cuda, time_pieces

    require_cuda("probe_transform_stages.py")
    from dataclasses import replace

    from flatquant.core.transforms import kron_factors
    from flatquant.kernels.routes import DEFAULT_ROUTES
    from flatquant.kernels.transform import fused_transform_quantize

    dev = torch.device("cuda")
    base = base_fields()
    out = RecordWriter(None if args.eager else args.out, base)
    dummy = torch.zeros(16, device=dev)
    pieces = [("empty_kernel", {}, lambda: _empty_kernel[(1,)](dummy))]
    sink = torch.empty(128 * 128, device=dev)
    for n in (4096, 14336):
        n1, n2 = kron_factors(n)
        n1p, n2p, hp = triton.next_power_of_2(n1), triton.next_power_of_2(n2), triton.next_power_of_2(n1 // 2)
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
        for m in (1, 16):
            x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
            codes = torch.empty(m, n // 2, device=dev, dtype=torch.uint8)
            scale = torch.empty(m, device=dev)
            shape = {"in": n, "M": m, "n1": n1, "n2": n2}
            for stage in range(5):
                for nw in (4, 8):
                    pieces.append((f"stage{stage}_w{nw}", shape, lambda x=x, p1=p1, p2=p2, codes=codes, scale=scale,
                                   stage=stage, nw=nw, n1=n1, n2=n2, n1p=n1p, n2p=n2p, hp=hp, m=m:
                                   _stage_kernel[(m,)](x, p1, p2, codes, scale, sink, 0, 1.0, N1=n1, N2=n2, N1P=n1p,
                                                       N2P=n2p, H=n1 // 2, HP=hp, STAGE=stage, TRIGGER=False,
                                                       DIV=0, num_warps=nw)))
            for div, tag in ((1, "libdevice_div"), (2, "inline_div")):
                pieces.append((f"stage4_w4_{tag}", shape, lambda x=x, p1=p1, p2=p2, codes=codes, scale=scale, n1=n1,
                               n2=n2, n1p=n1p, n2p=n2p, hp=hp, m=m, div=div:
                               _stage_kernel[(m,)](x, p1, p2, codes, scale, sink, 0, 1.0, N1=n1, N2=n2, N1P=n1p,
                                                   N2P=n2p, H=n1 // 2, HP=hp, STAGE=4, TRIGGER=False, DIV=div,
                                                   num_warps=4)))
            pieces.append(("stage4_w4_pdl_trigger", shape, lambda x=x, p1=p1, p2=p2, codes=codes, scale=scale, n1=n1,
                           n2=n2, n1p=n1p, n2p=n2p, hp=hp, m=m:
                           _stage_kernel[(m,)](x, p1, p2, codes, scale, sink, 0, 1.0, N1=n1, N2=n2, N1P=n1p, N2P=n2p,
                                               H=n1 // 2, HP=hp, STAGE=4, TRIGGER=True, DIV=0, num_warps=4)))
            for name, kw in [("block_default", dict(kernel="block")),
                             ("block_w4_s1", dict(kernel="block", config=dict(num_warps=4, num_stages=1))),
                             ("block_w8_s1", dict(kernel="block", config=dict(num_warps=8, num_stages=1))),
                             ("split_default", dict(kernel="split")),
                             ("library_default", {})]:
                for trig in ("start", "end", None):  # the library kernels' PDL trigger (RouteConfig.pdl_trigger)
                    routes = replace(DEFAULT_ROUTES, pdl_trigger=trig)
                    pieces.append((name if trig == "start" else f"{name}_trigger_{trig}", shape,
                                   lambda x=x, p1=p1, p2=p2, kw=kw, routes=routes: fused_transform_quantize(
                                       x, p1, p2, 1.0, 4, routes=routes, **kw)))
    time_pieces(pieces, out, args.eager, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
