#!/usr/bin/env python
"""W4A4 linear on this GPU vs BF16 cuBLAS (torch.matmul) and torch._scaled_mm FP8 (per-tensor), on
Llama-2-7B / Llama-3-8B layer shapes (in x out) at M = 1 .. 16384 tokens. Side by side, per route
(flatquant/kernels/linear.py): the whole layer (fused transform+quantize + GEMM; "auto" dispatch and
each pinned route) and the GEMM alone (Triton int8/fp8, decode split-K, cuBLASLt int_mm / scaled_mm, the
TMA GEMM on int8 / fp8 codes).
At M <= 16 the auto layer is also timed from a CUDA graph (no Python launch overhead), against bf16
timed the same way.

    PYTHONPATH=. python benchmarks/kernels/bench_w4a4_linear.py --out results/kernels/w4a4_linear.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 12288)]  # (in, out)
MS = [1, 16, 256, 2048, 8192, 16384]
QUICK_SHAPES = [(4096, 11008), (11008, 4096)]
QUICK_MS = [1, 16, 4096]
DEVICE = "cuda"
# tma_gemm's defaults for the config keys a --tma-configs entry may leave out.
TMA_UNSET = dict(persistent=True, imprecise_k=128, flatten=False, tma_store=False)


def scaled_mm_fp8(dev):
    """A callable (x_fp8, w_fp8, sa, sb) -> bf16 through torch._scaled_mm, or (None, reason)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return None, "torch._scaled_mm / float8_e4m3fn not available"

    def run(a8, b8t, sa, sb):
        r = torch._scaled_mm(a8, b8t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        return r[0] if isinstance(r, tuple) else r  # torch < 2.5 returned (out, amax)

    try:
        a = torch.randn(32, 64, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(32, 64, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        run(a, b.t(), one, one)
        return run, None
    except Exception as e:
        return None, f"torch._scaled_mm failed: {type(e).__name__}: {e}"[:300]


def _lin_routes(m):
    """Full-linear routes timed at this M: auto dispatch plus each pinned route that applies."""
    return ["auto", "int8"] + (["decode"] if m <= 16 else ["int_mm", "scaled_mm", "tma_int8", "tma_fp8"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records")
    ap.add_argument("--quick", action="store_true", help="4096x11008 and 11008x4096 at M = 1, 16, 4096")
    ap.add_argument("--rep-ms", type=float, default=20.0)
    ap.add_argument("--warmup-ms", type=float, default=5.0)
    ap.add_argument("--shapes", default=None, help="in x out list, e.g. 4096x11008,11008x4096 (default: all)")
    ap.add_argument("--ms", default=None, help="token counts, e.g. 1,16,4096 (default: all)")
    ap.add_argument("--routes", default=None, help="full-linear routes to time, e.g. auto,scaled_mm (default: all)")
    ap.add_argument("--no-gemm-only", action="store_true", help="skip the GEMM-alone timings")
    ap.add_argument("--tma-m-min", type=int, default=None,
                    help="for this run, auto dispatch takes the TMA GEMM (--tma-route) from this M up (RouteConfig.tma_m_min)")
    ap.add_argument("--tma-route", default=None, choices=("tma_int8", "tma_fp8"), help="RouteConfig.tma_route for this run")
    ap.add_argument("--tma-configs", default=None,
                    help="JSON {format: config} replacing the TMA GEMM's DEFAULT_CONFIGS for this run (as written by "
                         "bench_tma_gemm.py --best-out); recorded in each record's dispatch")
    args = ap.parse_args()

    from _common import require_cuda

    require_cuda("bench_w4a4_linear.py")
    import copy
    from dataclasses import replace

    from _common import (
        RecordWriter,
        Rotator,
        base_fields,
        bench_ms,
        graph_ms,
        rotation_count,
    )

    from flatquant.kernels import linear as lin_mod
    from flatquant.kernels.gemm import tma as tma_gemm
    from flatquant.kernels.gemm.decode import w4a4_gemm_decode
    from flatquant.kernels.gemm.w4a4_gemm import DEFAULT_GEMM_ROUTE, ROUTES, w4a4_gemm
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.kernels.reference import kron_factors
    from flatquant.kernels.routes import DEFAULT_ROUTES
    from flatquant.kernels.transform import fused_transform_quantize

    tma_configs = {}
    if args.tma_configs:  # each replaces its format's default config (unset keys: tma_gemm's own defaults)
        import json

        with open(args.tma_configs) as f:
            tma_configs = {fmt: {**TMA_UNSET, **cfg} for fmt, cfg in json.load(f).items()}
    routes = replace(DEFAULT_ROUTES, tma_configs=tma_configs,
                     **({} if args.tma_m_min is None else {"tma_m_min": args.tma_m_min}),
                     **({"tma_route": args.tma_route} if args.tma_route else {}))
    tma_used = {fmt: {**cfg, **routes.tma_configs.get(fmt, {})} for fmt, cfg in tma_gemm.DEFAULT_CONFIGS.items()}

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    bf16 = torch.bfloat16
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ms_list = QUICK_MS if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms_list = [int(v) for v in args.ms.split(",")]
    only_routes = set(args.routes.split(",")) if args.routes else None
    writer = RecordWriter(args.out, {**base_fields(), "default_gemm_route": DEFAULT_GEMM_ROUTE,
                                     "dispatch": dict(small_m_max=routes.small_m_max, large_m_min=routes.large_m_min,
                                                      large_m_route=routes.large_m_route,
                                                      tma_m_min=routes.tma_m_min, tma_route=routes.tma_route,
                                                      tma_configs=tma_used)})
    smm, smm_reason = scaled_mm_fp8(dev)
    if smm is None:
        print(f"FP8 baseline skipped: {smm_reason}")
    bench = lambda fn: bench_ms(fn, args.warmup_ms, args.rep_ms)
    print(f"{'shape':>12} {'M':>6} {'bf16 ms':>8}  w4a4 linear (route: ms, x bf16) | GEMM only (route: ms)")
    for k, n in shapes:
        n1, n2 = kron_factors(k)
        w = torch.randn(n, k, device=dev) / k ** 0.5
        w_bf16 = w.to(bf16)
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0]
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0]
        lin = W4A4Linear.from_float(w, None, p1, p2, act_clip=0.9, backend="triton", routes=routes)
        # Layer copies (own weight buffers) rotated like the bf16 weights: a 4096 x 11008 int4 weight
        # (22 MB) fits in the 50 MB L2, so timing one layer over and over would flatter the W4A4 side. As
        # many copies as make twice the L2 (12 at 4096 x 4096, whose 4 copies were 34 MB), at least 4.
        lins = [lin] + [copy.deepcopy(lin) for _ in range(max(4, rotation_count(n * k // 2, cap=16)) - 1)]
        ws = [w_bf16] + [w_bf16.clone() for _ in range(3)]
        w8 = w.to(torch.float8_e4m3fn) if smm is not None else None
        wcodes = {f: [l._weight_codes(f) for l in lins] for f in ("int8", "fp8")}  # the layer caches
        qp1, qp2 = lin.p1.to(bf16), lin.p2.to(bf16)
        for m in ms_list:
            shape = {"in": k, "out": n, "M": m, "n1": n1, "n2": n2, "dtype": "bfloat16", "bits": 4}
            nset = max(4, rotation_count(m * k * 2 + n * k // 2, cap=16))
            xs = [torch.randn(m, k, device=dev, dtype=bf16) for _ in range(nset)]
            t_bf16 = bench(Rotator([(xs[i], ws[i % len(ws)]) for i in range(nset)])(lambda x, wt: torch.matmul(x, wt.t())))
            base = dict(baseline="bf16_cublas", baseline_median_ms=t_bf16)
            gb = lambda t, nbytes: nbytes / (t * 1e-3) / 1e9
            lin_bytes = m * k * 2 + n * k // 2 + m * n * 2
            line = []
            # full W4A4 linear (transform + quantize + GEMM), per route
            for route in _lin_routes(m):
                if only_routes is not None and route not in only_routes:
                    continue
                for l in lins:
                    l.gemm_route = None if route == "auto" else route
                taken = lin.gemm_route_for(m, bf16, dev)
                t = bench(Rotator([(xs[i % nset], lins[i % len(lins)]) for i in range(max(nset, len(lins)))])(
                    lambda x, l: l(x)))
                writer.add(dict(kernel=f"w4a4_linear_{route}", route_taken=taken, shape=shape, median_ms=t, **base,
                                speedup=t_bf16 / t, achieved_gbps=gb(t, lin_bytes), rotated_input_sets=nset, rotated_weight_sets=len(lins)))
                line.append(f"{route}->{taken}: {t:.4f} {t_bf16 / t:.2f}x")
            for l in lins:
                l.gemm_route = None
            if m <= 16:  # decode: also without Python / launch overhead (CUDA graph), both sides
                try:
                    tg_b = graph_ms([lambda x=xs[i], wt=ws[i]: torch.matmul(x, wt.t()) for i in range(4)],
                                    args.warmup_ms, args.rep_ms)
                    tg = graph_ms([lambda x=xs[i % nset], l=lins[i]: l(x) for i in range(len(lins))], args.warmup_ms,
                                  args.rep_ms)
                    writer.add(dict(kernel="w4a4_linear_auto_cudagraph", route_taken=lin.gemm_route_for(m, bf16, dev),
                                    shape=shape, median_ms=tg, baseline="bf16_cublas_cudagraph", baseline_median_ms=tg_b,
                                    speedup=tg_b / tg, achieved_gbps=gb(tg, lin_bytes), rotated_weight_sets=len(lins)))
                    line.append(f"graph: {tg:.4f} {tg_b / tg:.2f}x")
                except Exception as e:
                    writer.add(dict(kernel="w4a4_linear_auto_cudagraph", shape=shape, median_ms=None, baseline=None,
                                    baseline_median_ms=None, speedup=None, achieved_gbps=None,
                                    skipped=f"{type(e).__name__}: {e}"[:300]))
            # GEMM alone on pre-quantized activations (each route in its own activation format)
            packed = [fused_transform_quantize(x, qp1, qp2, 0.9, 4) for x in xs]
            if args.no_gemm_only:
                print(f"{k:>5}x{n:<6} {m:>6} {t_bf16:>8.4f}  " + " | ".join(line), flush=True)
                del xs, packed
                torch.cuda.empty_cache()
                continue
            gemms = {r: (packed, lambda a, sa, i, r=r: w4a4_gemm(a, sa, lins[i].qweight, lins[i].weight_scale, None,
                                                                  bf16, 4, route=r)) for r in ROUTES}
            if m <= 16:
                gemms["decode"] = (packed, lambda a, sa, i: w4a4_gemm_decode(a, sa, lins[i].qweight,
                                                                             lins[i].weight_scale, None, bf16, 4))
            codes_by_fmt = {}
            for r, fmt in lin_mod.CODE_FORMAT.items():
                fn = lin_mod.one_byte_gemm(r)
                if lin.route_takes(r, m, bf16, dev):
                    if fmt not in codes_by_fmt:
                        codes_by_fmt[fmt] = [fused_transform_quantize(x, qp1, qp2, 0.9, 4, out_format=fmt) for x in xs]
                    codes = codes_by_fmt[fmt]
                    cfg = {"config": routes.tma_configs.get(fmt)} if r.startswith("tma_") else {}
                    gemms[r] = (codes, lambda a, sa, i, fmt=fmt, fn=fn, cfg=cfg: fn(a, sa, wcodes[fmt][i],
                                                                                   lins[i].weight_scale, None, bf16, **cfg))
            for r, (acts, fn) in gemms.items():
                sets = [(*acts[i % nset], i % len(lins)) for i in range(max(nset, len(lins)))]
                try:
                    t = bench(Rotator(sets)(fn))
                except Exception as e:
                    writer.add(dict(kernel=f"w4a4_gemm_{r}", shape=shape, median_ms=None, **base, speedup=None,
                                    achieved_gbps=None, skipped=f"{type(e).__name__}: {e}"[:300]))
                    continue
                a_bytes = acts[0][0].numel() * acts[0][0].element_size()
                w_bytes = n * k // 2 if r in ROUTES or r == "decode" else n * k
                writer.add(dict(kernel=f"w4a4_gemm_{r}", shape=shape, median_ms=t, **base, speedup=t_bf16 / t,
                                achieved_gbps=gb(t, a_bytes + w_bytes + m * n * 2), rotated_input_sets=nset))
                line.append(f"g_{r}: {t:.4f}")
            # FP8 per-tensor-scaled cuBLASLt GEMM (torch._scaled_mm), GEMM alone
            if smm is not None:
                mp = m if m % 16 == 0 else ((m + 15) // 16) * 16  # _scaled_mm wants multiples of 16
                x8 = [torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn) for _ in range(nset)]
                one = torch.ones((), device=dev)
                try:
                    t8 = bench(Rotator(x8)(lambda a, w8=w8, one=one: smm(a, w8.t(), one, one)))
                    writer.add(dict(kernel="torch_scaled_mm_fp8", shape={**shape, "padded_M": mp}, median_ms=t8,
                                    **base, speedup=t_bf16 / t8, achieved_gbps=None))
                    line.append(f"_scaled_mm: {t8:.4f}")
                except Exception as e:
                    writer.add(dict(kernel="torch_scaled_mm_fp8", shape=shape, median_ms=None, baseline="bf16_cublas",
                                    baseline_median_ms=t_bf16, speedup=None, achieved_gbps=None,
                                    skipped=f"{type(e).__name__}: {e}"[:300]))
                del x8
            print(f"{k:>5}x{n:<6} {m:>6} {t_bf16:>8.4f}  " + " | ".join(line), flush=True)
            del xs, packed, codes_by_fmt
            torch.cuda.empty_cache()
    if smm is None:
        writer.add(dict(kernel="torch_scaled_mm_fp8", shape=None, median_ms=None, baseline=None,
                        baseline_median_ms=None, speedup=None, achieved_gbps=None, skipped=smm_reason))
    _route_choice(writer)
    if args.out:
        print(f"wrote {len(writer.records)} records to {args.out}")
    return 0


def _route_choice(writer) -> None:
    """Fastest full-linear route per M (geometric mean of time over the shapes): sets the dispatch."""
    import math

    by_m: dict = {}
    for r in writer.records:
        if r["kernel"].startswith("w4a4_linear_") and r.get("median_ms") and "auto" not in r["kernel"]:
            by_m.setdefault(r["shape"]["M"], {}).setdefault(r["kernel"][len("w4a4_linear_"):], []).append(
                math.log(r["median_ms"]))
    best = {m: min(rt, key=lambda k: sum(rt[k]) / len(rt[k])) for m, rt in by_m.items()}
    writer.add(dict(kernel="route_choice", shape=None, median_ms=None, baseline=None, baseline_median_ms=None,
                    speedup=None, achieved_gbps=None, fastest_linear_route_by_M=best,
                    note="set small_m_max / large_m_min / large_m_route / tma_m_min / tma_route of RouteConfig (flatquant/kernels/routes.py) from this"))
    print("fastest full-linear route by M:", best)


if __name__ == "__main__":
    sys.exit(main())
