#!/usr/bin/env python
"""Large-M GEMM alone (codes one per byte, row-wise scales): the TMA kernel (flatquant/kernels/gemm/tma.py)
in each config of a sweep, int8 and fp8, against BF16 cuBLAS, cuBLASLt FP8 with row-wise scales (the
scaled_mm route), cuBLASLt FP8 with one scale per tensor (not usable for W4A4: shown as the rate the
hardware reaches) and cuBLASLt INT8 (the int_mm route). Side by side on the same rotated inputs.

Each config is first checked for exactness on the GPU: float32 output with unit scales must equal
torch._int_mm's int32 sums exactly at K = 14336 and 28672 (`exact_cases`: random codes, the largest codes,
and odd products whose sums need every bit). A config that is not exact is recorded and not timed.

    PYTHONPATH=. python benchmarks/kernels/bench_tma_gemm.py --out results/kernels/bench_tma_gemm.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
MS = [4096, 8192, 16384]
_B = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, persistent=True)
# (name, format, config): the default, then one change at a time.
_F = {**_B, "BLOCK_N": 128, "num_stages": 4, "imprecise_k": 128}
SWEEP = [
    ("int8_128x256x128_s3", "int8", _B),
    ("int8_128x256x128_s3_grid", "int8", {**_B, "persistent": False}),
    ("int8_128x256x128_s3_tmastore", "int8", {**_B, "tma_store": True}),
    ("int8_128x256x128_s3_flatten", "int8", {**_B, "flatten": True}),
    ("int8_128x256x128_s4", "int8", {**_B, "num_stages": 4}),
    ("int8_128x256x64_s4", "int8", {**_B, "BLOCK_K": 64, "num_stages": 4}),
    ("int8_256x128x128_s3", "int8", {**_B, "BLOCK_M": 256, "BLOCK_N": 128}),
    ("int8_128x128x128_s4", "int8", {**_B, "BLOCK_N": 128, "num_stages": 4}),
    ("int8_128x128x128_s4_w4", "int8", {**_B, "BLOCK_N": 128, "num_stages": 4, "num_warps": 4}),
    # two programs per SM (<= 113 KB shared memory each): one's epilogue overlaps the other's main loop
    ("int8_128x128x128_s3_w4_grid", "int8", {**_B, "BLOCK_N": 128, "num_warps": 4, "persistent": False}),
    ("int8_128x128x64_s4_w4_grid", "int8", {**_B, "BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 4, "num_warps": 4,
                                            "persistent": False}),
    # the next tile's loads issued while this tile's output leaves through the TMA unit
    ("int8_128x256x64_s4_flatten_tmastore", "int8", {**_B, "BLOCK_K": 64, "num_stages": 4, "flatten": True,
                                                    "tma_store": True}),
    ("fp8_128x128x128_s4", "fp8", _F),
    ("fp8_128x128x128_s4_grid", "fp8", {**_F, "persistent": False}),
    ("fp8_128x128x128_s4_tmastore", "fp8", {**_F, "tma_store": True}),
    ("fp8_128x128x128_s4_w4", "fp8", {**_F, "num_warps": 4}),
    ("fp8_128x128x128_s4_imp64", "fp8", {**_F, "imprecise_k": 64}),
    ("fp8_128x256x128_s3", "fp8", {**_B, "imprecise_k": 128}),  # spills at sm_90 (two 128-register accumulators)
    # Hopper's fast fp8 accumulation (no promotion): what promotion costs. Not exact on the H100 (541ef8d: the
    # odd-product cases), so timed only in the 9e08c89 sweep, whose three cases missed it.
    ("fp8_128x256x128_s3_fastacc", "fp8", {**_B, "imprecise_k": 0}),
    ("fp8_128x128x128_s4_fastacc", "fp8", {**_F, "imprecise_k": 0}),
    # around the fastest fp8 config of the 9e08c89 sweep (H100: 128 x 256 with fast accumulation, which the
    # odd-product cases added after it show inexact)
    ("fp8_128x256x128_s4_fastacc", "fp8", {**_B, "num_stages": 4, "imprecise_k": 0}),
    ("fp8_128x256x128_s3_fastacc_flatten", "fp8", {**_B, "imprecise_k": 0, "flatten": True}),
    ("fp8_128x256x128_s3_fastacc_grid", "fp8", {**_B, "imprecise_k": 0, "persistent": False}),
    ("fp8_128x256x128_s3_fastacc_tmastore", "fp8", {**_B, "imprecise_k": 0, "tma_store": True}),
    ("fp8_256x128x128_s3_fastacc", "fp8", {**_B, "BLOCK_M": 256, "BLOCK_N": 128, "imprecise_k": 0}),
]
QUICK = {"int8_128x256x128_s3", "fp8_128x128x128_s4", "fp8_128x256x128_s3_fastacc"}


def exact_cases(m, n, k, dev):
    """Integer code pairs (a (m, k), w (n, k)) that a correct GEMM must sum exactly. Products of -8s are
    multiples of 64, so their sums need few significant bits however large; odd products (7 x 7 = 49, odd
    codes) make sums past 2**19 that need every bit: an accumulator narrower than its float32 registers
    (Hopper's fp8 fast accumulation) shows there."""
    g = torch.Generator(device=dev).manual_seed(1)
    rnd = lambda r: torch.randint(-8, 8, (r, k), device=dev, dtype=torch.int8, generator=g)
    full = lambda r, v: torch.full((r, k), v, device=dev, dtype=torch.int8)
    odd = lambda r: (2 * torch.randint(0, 4, (r, k), device=dev, generator=g) + 1).to(torch.int8)  # 1, 3, 5, 7
    blocks = torch.where((torch.arange(k, device=dev) // 512) % 2 == 0, -8, 7).to(torch.int8)
    # 64s up to 32 * K, then 49s on top: odd sums near the largest (56.5 * K), 21 bits at K = 28672
    halves = torch.where(torch.arange(k, device=dev) < k // 2, -8, 7).to(torch.int8)
    return [("random", rnd(m), rnd(n)), ("all_-8", full(m, -8), full(n, -8)),
            ("blocks_-8_7", blocks.expand(m, k).contiguous(), full(n, -8)), ("all_7", full(m, 7), full(n, 7)),
            ("odd_positive", odd(m), odd(n)), ("7_x_-8", full(m, 7), full(n, -8)),
            ("halves_-8_then_7", halves.expand(m, k).contiguous(), halves.expand(n, k).contiguous())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records")
    ap.add_argument("--quick", action="store_true", help="three configs, 4096x11008 and 11008x4096 at M = 8192")
    ap.add_argument("--rep-ms", type=float, default=12.0)
    ap.add_argument("--warmup-ms", type=float, default=4.0)
    ap.add_argument("--configs", default=None, help="comma list of sweep names (default: all)")
    ap.add_argument("--shapes", default=None, help="in x out list, e.g. 4096x11008 (default: all)")
    ap.add_argument("--ms", default=None, help="token counts (default: 4096,8192,16384)")
    ap.add_argument("--exact-k", default="14336,28672", help="K values of the exactness check")
    ap.add_argument("--best-out", default=None,
                    help="also write the fastest exact config per format as JSON ({format: config}), for "
                         "bench_w4a4_linear.py --tma-configs")
    args = ap.parse_args()

    from _common import require_cuda

    require_cuda("bench_tma_gemm.py")
    from _common import RecordWriter, Rotator, base_fields, bench_ms, rotation_count

    from flatquant.kernels.gemm import cublas as cb
    from flatquant.kernels.gemm.tma import DEFAULT_CONFIGS, tma_gemm

    dev = torch.device("cuda")
    bf16, f8 = torch.bfloat16, torch.float8_e4m3fn
    sweep = [s for s in SWEEP if (not args.quick or s[0] in QUICK) and (not args.configs or s[0] in args.configs.split(","))]
    shapes = [(4096, 11008), (11008, 4096)] if args.quick else SHAPES
    ms_list = [8192] if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms_list = [int(v) for v in args.ms.split(",")]
    writer = RecordWriter(args.out, {**base_fields(), "default_configs": DEFAULT_CONFIGS})
    bench = lambda fn: bench_ms(fn, args.warmup_ms, args.rep_ms)

    # 1. exactness per config (M = 512, N = 512; K = 14336, the longest K of the shapes, and 28672, the longest
    # of the Llama / Qwen families (Llama-2-70B's intermediate size): sums up to 64 * K = 1835008)
    ok = {}
    m0, n0 = 512, 512
    kset = [int(v) for v in args.exact_k.split(",")]
    # Each case once: its reference sums and its codes in both formats (not again per config).
    cases = [(f"{case}@K={k0}", torch._int_mm(a, w.t()).double(), {"int8": (a, w), "fp8": (a.to(bf16).to(f8),
                                                                                     w.to(bf16).to(f8))})
             for k0 in kset for case, a, w in exact_cases(m0, n0, k0, dev)]
    ones_m, ones_n = torch.ones(m0, device=dev), torch.ones(n0, device=dev)
    for name, fmt, cfg in sweep:
        results = {}
        for label, want, codes in cases:
            try:
                y = tma_gemm(codes[fmt][0], ones_m, codes[fmt][1], ones_n, None, torch.float32, config=cfg)
                results[label] = float((y.double() - want).abs().max())
            except Exception as e:  # a config that does not compile (e.g. shared memory): reported, not fatal
                results[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ok[name] = all(v == 0.0 for v in results.values())
        writer.add(dict(kernel=f"tma_gemm_exactness_{name}", shape=dict(M=m0, N=n0, K=kset), median_ms=None,
                        baseline="torch._int_mm int32", baseline_median_ms=None, speedup=None, achieved_gbps=None,
                        config=cfg, max_abs_error=results, exact=ok[name]))
        print(f"exactness {name}: {results}", flush=True)

    # 2. timings, side by side per shape and M
    print(f"{'shape':>12} {'M':>6} {'bf16 ms':>8}  GEMM ms (x bf16)")
    for k, n in shapes:
        w = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
        ws_bf16 = [torch.randn(n, k, device=dev, dtype=bf16) for _ in range(4)]
        nw = max(4, rotation_count(n * k, cap=8))
        w_i8 = [w.clone() for _ in range(nw)]
        w_f8 = [x.to(bf16).to(f8) for x in w_i8]
        sw = torch.rand(n, device=dev) + 0.5
        for m in ms_list:
            nset = max(2, rotation_count(m * k, cap=6))
            a_i8 = [torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8) for _ in range(nset)]
            a_f8 = [x.to(bf16).to(f8) for x in a_i8]
            a_bf = [x.to(bf16) for x in a_i8]
            sa = torch.rand(m, device=dev) + 0.5
            shape = {"in": k, "out": n, "M": m}
            sets = lambda acts, wts: [(acts[i % len(acts)], wts[i % len(wts)]) for i in range(max(len(acts), len(wts)))]
            t_bf16 = bench(Rotator(sets(a_bf, ws_bf16))(lambda a, wt: torch.matmul(a, wt.t())))
            base = dict(baseline="bf16_cublas", baseline_median_ms=t_bf16)
            gbs = lambda t: (m * k + n * k + m * n * 2) / (t * 1e-3) / 1e9
            line = []
            one = torch.ones((), device=dev)
            vendor = [
                ("cublas_scaled_mm_rowwise", a_f8, w_f8, lambda a, wt: cb.scaled_mm_gemm(a, sa, wt, sw, None, bf16)),
                ("cublas_scaled_mm_tensorwise", a_f8, w_f8,
                 lambda a, wt: torch._scaled_mm(a, wt.t(), scale_a=one, scale_b=one, out_dtype=bf16)),
                ("cublas_int_mm", a_i8, w_i8, lambda a, wt: cb.int_mm_gemm(a, sa, wt, sw, None, bf16)),
            ]
            for name, acts, wts, fn in vendor:
                t = bench(Rotator(sets(acts, wts))(fn))
                writer.add(dict(kernel=name, shape=shape, median_ms=t, **base, speedup=t_bf16 / t,
                                achieved_gbps=gbs(t), tflops=2 * m * n * k / (t * 1e-3) / 1e12))
                line.append(f"{name.replace('cublas_', '')} {t:.3f} ({t_bf16 / t:.2f}x)")
            for name, fmt, cfg in sweep:
                if not ok.get(name):
                    continue
                acts, wts = (a_i8, w_i8) if fmt == "int8" else (a_f8, w_f8)
                try:
                    t = bench(Rotator(sets(acts, wts))(lambda a, wt, cfg=cfg: tma_gemm(a, sa, wt, sw, None, bf16, config=cfg)))
                except Exception as e:
                    print(f"  {name}: failed: {str(e).splitlines()[0][:200]}")
                    continue
                writer.add(dict(kernel=f"tma_gemm_{name}", shape=shape, median_ms=t, **base, speedup=t_bf16 / t,
                                achieved_gbps=gbs(t), tflops=2 * m * n * k / (t * 1e-3) / 1e12, config=cfg))
                line.append(f"{name} {t:.3f} ({t_bf16 / t:.2f}x)")
            print(f"{k:>5}x{n:<6} {m:>6} {t_bf16:>8.4f}  " + " | ".join(line), flush=True)
            del a_i8, a_f8, a_bf
            torch.cuda.empty_cache()
    best = best_configs(writer.records)
    for fmt, (name, geo) in best.items():
        print(f"fastest exact {fmt} config: {name} (geometric mean {geo:.3f}x bf16 over the timed shapes)")
    if args.best_out:
        from flatquant.results import atomic_write_text

        by_name = {name: cfg for name, _, cfg in SWEEP}
        atomic_write_text(args.best_out, json.dumps({fmt: by_name[name] for fmt, (name, _) in best.items()}) + "\n")
    if args.out:
        print(f"wrote {len(writer.records)} records to {args.out}")
    return 0


def best_configs(records) -> dict:
    """{format: (sweep name, geometric-mean speedup over BF16)} of the fastest config per code format, among
    the configs timed at every (shape, M) point that any config of that format was timed at."""
    fmt_of = {name: fmt for name, fmt, _ in SWEEP}
    speed = {}  # name -> {point: speedup}
    for r in records:
        name = r["kernel"].removeprefix("tma_gemm_")
        if name in fmt_of and r.get("speedup"):
            speed.setdefault(name, {})[tuple(sorted(r["shape"].items()))] = r["speedup"]
    best = {}
    for fmt in ("int8", "fp8"):
        names = [n for n in speed if fmt_of[n] == fmt]
        points = set().union(*(speed[n] for n in names)) if names else set()
        full = [n for n in names if set(speed[n]) == points]
        if full:
            geo = {n: math.exp(sum(math.log(v) for v in speed[n].values()) / len(points)) for n in full}
            top = max(geo, key=geo.get)
            best[fmt] = (top, geo[top])
    return best


if __name__ == "__main__":
    sys.exit(main())
