#!/usr/bin/env python
"""W4A4 linear on this GPU: fused transform+quantize + int4 GEMM (and the GEMM alone, INT8 and FP8
tensor-core routes) vs BF16 cuBLAS (torch.matmul) and vs torch._scaled_mm FP8, on Llama-2-7B /
Llama-3-8B layer shapes (in x out) at M = 1 .. 16384 tokens.

    PYTHONPATH=. python benchmarks/bench_w4a4_linear.py --out results/kernels/w4a4_linear.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 12288)]  # (in, out)
MS = [1, 16, 256, 2048, 8192, 16384]
QUICK_SHAPES = [(4096, 11008), (11008, 4096)]
QUICK_MS = [1, 16, 4096]
DEVICE = "cuda"


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
    except Exception as e:  # noqa: BLE001 - record why the baseline is skipped
        return None, f"torch._scaled_mm failed: {type(e).__name__}: {e}"[:300]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records")
    ap.add_argument("--quick", action="store_true", help="4096x11008 and 11008x4096 at M = 1, 16, 4096")
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    args = ap.parse_args()

    from flatquant.kernels.bench_utils import require_cuda

    require_cuda("bench_w4a4_linear.py")
    from flatquant.kernels.bench_utils import RecordWriter, Rotator, base_fields, bench_ms, rotation_count
    from flatquant.kernels.fused_transform_quant import fused_transform_quantize
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.kernels.reference import kron_factors
    from flatquant.kernels.w4a4_gemm import DEFAULT_GEMM_ROUTE, ROUTES, w4a4_gemm

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ms_list = QUICK_MS if args.quick else MS
    writer = RecordWriter(args.out, {**base_fields(), "default_gemm_route": DEFAULT_GEMM_ROUTE})
    smm, smm_reason = scaled_mm_fp8(dev)
    if smm is None:
        print(f"FP8 baseline skipped: {smm_reason}")
    print(f"{'shape':>12} {'M':>6} {'bf16 ms':>8} {'w4a4 lin':>9} {'int8 gemm':>9} {'fp8 gemm':>9} {'_scaled_mm':>10} {'lin x':>6}")
    for k, n in shapes:
        n1, n2 = kron_factors(k)
        w = torch.randn(n, k, device=dev) / k ** 0.5
        w_bf16 = w.to(torch.bfloat16)
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0]
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0]
        lin = W4A4Linear.from_float(w, None, p1, p2, act_clip=0.9, backend="triton")
        w8 = w.to(torch.float8_e4m3fn) if smm is not None else None
        for m in ms_list:
            shape = {"in": k, "out": n, "M": m, "n1": n1, "n2": n2, "dtype": "bfloat16", "bits": 4}
            in_bytes = m * k * 2
            nset = rotation_count(in_bytes + n * k // 2, cap=16)
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(nset)]
            ws = [w_bf16] + [w_bf16.clone() for _ in range(min(nset, 4) - 1)]  # rotate bf16 weights too
            bf16_sets = [(xs[i], ws[i % len(ws)]) for i in range(nset)]
            t_bf16 = bench_ms(Rotator(bf16_sets)(lambda x, wt: torch.matmul(x, wt.t())), args.warmup_ms, args.rep_ms)
            base = dict(baseline="bf16_cublas", baseline_median_ms=t_bf16)
            row = {}
            # full W4A4 linear (transform + quantize + GEMM)
            t = bench_ms(Rotator(xs)(lin), args.warmup_ms, args.rep_ms)
            row["lin"] = t
            writer.add(dict(kernel=f"w4a4_linear_{DEFAULT_GEMM_ROUTE}", shape=shape, median_ms=t, **base,
                            speedup=t_bf16 / t, achieved_gbps=(in_bytes + n * k // 2 + m * n * 2) / (t * 1e-3) / 1e9,
                            rotated_input_sets=nset))
            # GEMM alone on pre-quantized activations
            qa = [fused_transform_quantize(x, lin.p1.to(torch.bfloat16), lin.p2.to(torch.bfloat16), 0.9, 4) for x in xs]
            for route in ROUTES:
                t = bench_ms(Rotator(qa)(lambda a, sa, lin=lin, route=route: w4a4_gemm(
                    a, sa, lin.qweight, lin.weight_scale, None, torch.bfloat16, 4, route=route)),
                             args.warmup_ms, args.rep_ms)
                row[route] = t
                writer.add(dict(kernel=f"w4a4_gemm_{route}", shape=shape, median_ms=t, **base, speedup=t_bf16 / t,
                                achieved_gbps=(m * k // 2 + n * k // 2 + m * n * 2) / (t * 1e-3) / 1e9,
                                rotated_input_sets=nset))
            # FP8 per-tensor-scaled cuBLASLt GEMM (torch._scaled_mm), GEMM alone
            if smm is not None:
                mp = m if m % 16 == 0 else ((m + 15) // 16) * 16  # _scaled_mm wants multiples of 16
                x8 = [torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn) for _ in range(nset)]
                one = torch.ones((), device=dev)
                try:
                    t8 = bench_ms(Rotator(x8)(lambda a, w8=w8, one=one: smm(a, w8.t(), one, one)), args.warmup_ms, args.rep_ms)
                    row["smm"] = t8
                    writer.add(dict(kernel="torch_scaled_mm_fp8", shape={**shape, "padded_M": mp}, median_ms=t8,
                                    **base, speedup=t_bf16 / t8, achieved_gbps=None))
                    td = row[DEFAULT_GEMM_ROUTE]
                    writer.add(dict(kernel=f"w4a4_gemm_{DEFAULT_GEMM_ROUTE}", shape=shape, median_ms=td,
                                    baseline="torch_scaled_mm_fp8", baseline_median_ms=t8, speedup=t8 / td,
                                    achieved_gbps=None))
                except Exception as e:  # noqa: BLE001
                    writer.add(dict(kernel="torch_scaled_mm_fp8", shape=shape, median_ms=None, baseline="bf16_cublas",
                                    baseline_median_ms=t_bf16, speedup=None, achieved_gbps=None,
                                    skipped=f"{type(e).__name__}: {e}"[:300]))
                del x8
            print(f"{k:>5}x{n:<6} {m:>6} {t_bf16:>8.4f} {row['lin']:>9.4f} {row['int8']:>9.4f} {row['fp8']:>9.4f} "
                  f"{row.get('smm', float('nan')):>10.4f} {t_bf16 / row['lin']:>5.2f}x", flush=True)
            del xs, ws, bf16_sets, qa
            torch.cuda.empty_cache()
    if smm is None:
        writer.add(dict(kernel="torch_scaled_mm_fp8", shape=None, median_ms=None, baseline=None,
                        baseline_median_ms=None, speedup=None, achieved_gbps=None, skipped=smm_reason))
    # which route is faster at the GEMM alone (geometric mean over everything measured)
    import math

    ratios = [r["median_ms"] for r in writer.records if r["kernel"] == "w4a4_gemm_int8" and r["baseline"] == "bf16_cublas"]
    ratios_f = [r["median_ms"] for r in writer.records if r["kernel"] == "w4a4_gemm_fp8" and r["baseline"] == "bf16_cublas"]
    if ratios and len(ratios) == len(ratios_f):
        g = math.exp(sum(math.log(a / b) for a, b in zip(ratios, ratios_f)) / len(ratios))
        faster = "int8" if g <= 1 else "fp8"
        writer.add(dict(kernel="route_choice", shape=None, median_ms=None, baseline=None, baseline_median_ms=None,
                        speedup=None, achieved_gbps=None, geomean_int8_over_fp8_time=g, faster_route=faster,
                        note="set flatquant.kernels.w4a4_gemm.DEFAULT_GEMM_ROUTE to faster_route"))
        print(f"GEMM route: int8/fp8 time geomean {g:.3f} -> faster: {faster} (default {DEFAULT_GEMM_ROUTE})")
    if args.out:
        print(f"wrote {len(writer.records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
