#!/usr/bin/env python
"""Decode (M <= 16) W4A4 linear, piece by piece, each timed from a CUDA graph (no launch overhead): the
BF16 GEMV baseline, the fused transform + quantize alone, the decode GEMM alone (default config and a
small config sweep), and the whole layer. Says where the decode time goes. JSON list out.

    PYTHONPATH=. python benchmarks/kernels/bench_decode_parts.py --out results/kernels/bench_decode_parts.json
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
# Configs swept per M: the CUDA-core dp4a kernel ("gemv": rows, K bytes per step, warps) where it is the
# default (M <= RouteConfig.gemv_max_m), the tensor-core kernel ("mma": BLOCK_N, BLOCK_K, SPLIT_K) with the weight as
# the MMA's A operand (SWAP_AB) at M = 16, the other operand order's default and the dp4a kernel pinned,
# for comparison.
GEMV_SWEEP = [dict(KERNEL="gemv", GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, num_warps=nw) for bn, bk, nw in
              [(8, 512, 4), (8, 1024, 4), (8, 1024, 8), (16, 512, 4), (16, 1024, 8), (8, 2048, 4), (4, 1024, 2)]]
GEMV_SWEEP += [dict(KERNEL="gemv", GEMV_BLOCK_N=8, GEMV_BLOCK_K=bk, GEMV_PREFETCH=2) for bk in (512, 1024)]
# The dp4a kernel's loop pipelined through shared memory (GEMV_PREFETCH 0, GEMV_STAGES deep) instead.
GEMV_SWEEP += [dict(KERNEL="gemv", GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, num_warps=nw, GEMV_PREFETCH=0, GEMV_STAGES=st)
               for bn, bk, nw in [(4, 1024, 2), (8, 1024, 4), (8, 512, 4), (4, 512, 2), (16, 1024, 8)] for st in (2, 3, 4)]
# The tensor-core kernel, weight as the MMA's A operand: rows per program (BLOCK_N) x K sub-ranges per program
# (SUB, one warp each) x bytes per sub-range and step (BLOCK_K), 256-1024 bytes per step; then splits over
# programs (SPLIT_K) and the two other weight-nibble forms on one tile.
MMA_SWAP_SWEEP = [dict(KERNEL="mma", SWAP_AB=True, BLOCK_N=bn, SUB=sub, BLOCK_K=bk, SPLIT_K=1, num_warps=sub)
                  for bn in (16, 32, 64) for sub in (2, 4, 8) for bk in (64, 128, 256) if 256 <= sub * bk <= 1024]
MMA_SWAP_SWEEP += [dict(KERNEL="mma", SWAP_AB=True, BLOCK_N=bn, SUB=4, BLOCK_K=128, SPLIT_K=sk, num_warps=4)
                   for bn in (32, 64) for sk in (2, 4)]
MMA_SWAP_SWEEP += [dict(KERNEL="mma", SWAP_AB=True, BLOCK_N=32, SUB=sub, BLOCK_K=bk, SPLIT_K=1, num_warps=sub,
                        W_NIBBLES=nib) for sub, bk in ((2, 256), (4, 128)) for nib in ("signed", "offset")]
MMA_SWAP_SWEEP += [dict(KERNEL="mma", SWAP_AB=True, BLOCK_N=32, SUB=sub, BLOCK_K=bk, SPLIT_K=1, num_warps=sub,
                        num_stages=st) for sub, bk in ((2, 128), (4, 256)) for st in (2, 4)]
# The dp4a kernel pinned at M = 16, with tiles small enough for its (16, rows, words) accumulator.
GEMV_M16_SWEEP = [dict(KERNEL="gemv", GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, num_warps=nw) for bn, bk, nw in
                  [(4, 256, 4), (8, 256, 4), (4, 512, 4), (8, 128, 4), (16, 128, 8), (2, 512, 4)]]
# --sweep-set sub: only the tensor-core tiles above, at M = 1 as well (where the dp4a kernel is the default), and
# no transform sweep.
SWEEP_SETS = {"all": None, "sub": {1: MMA_SWAP_SWEEP, 16: MMA_SWAP_SWEEP}}
SWEEP = {1: GEMV_SWEEP, 4: GEMV_SWEEP + [dict(KERNEL="mma", SWAP_AB=True)],
         16: MMA_SWAP_SWEEP + [dict(KERNEL="mma", SWAP_AB=False)] + GEMV_M16_SWEEP}
# Fused transform + quantize launch variants (at decode its latency is the cost): the split kernel (the
# default at M <= 16 for 128 x 128 factor tiles; first with CB >= n2, one program per token, then Y
# columns per program; warps), the block kernel (one token per program at these M) and the per-token
# kernel.
TRANSFORM_SWEEP = [dict(kernel="split", config=dict(CB=256, num_warps=nw)) for nw in (4, 8)]
TRANSFORM_SWEEP += [dict(kernel="split", config=dict(CB=cb, num_warps=nw)) for cb in (16, 32, 64) for nw in (4, 8)]
TRANSFORM_SWEEP += [dict(kernel="block", config=dict(num_warps=nw, num_stages=1)) for nw in (4, 8)]
TRANSFORM_SWEEP += [dict(kernel="token")]

# --layer-sweep: the whole layer (not the GEMM alone: at decode the two kernels overlap, and a GEMM that is
# faster alone can be slower behind the transform) with one decode setting changed at a time, as RouteConfig
# fields: gemv rows x K bytes per step x warps at M = 1 where the dp4a kernel is the default (other M keep
# the default), else tensor-core tiles (BLOCK_N x SUB x BLOCK_K), and the transform's split kernel
# (columns per program, warps).
def _layer_sweep(gemv_default: bool, m: int) -> dict[str, dict]:
    gemv = {f"gemv_{bn}x{bk}_w{nw}": dict(decode_overrides=dict(GEMV_BLOCK_N=bn, GEMV_BLOCK_K=bk, GEMV_WARPS=nw,
                                                                SWAP_AB=True) if m <= 1 else {})
            for bn, bk, nw in [(4, 2048, 2), (8, 2048, 4), (2, 1024, 1), (2, 2048, 1), (8, 1024, 4), (4, 512, 2)]}
    mma = {f"mma_{bn}x{sub}x{bk}": dict(decode_overrides=dict(BLOCK_N=bn, SUB=sub, BLOCK_K=bk, SPLIT_K=1, MMA_WARPS=sub))
           for bn, sub, bk in [(32, 4, 256), (16, 4, 256), (32, 2, 128), (16, 2, 256), (32, 4, 128), (32, 2, 256)]}
    split = {f"split_cb{cb}_w{nw}": dict(split_columns=cb, split_warps=nw)
             for cb, nw in [(16, 8), (64, 8), (32, 4), (128, 8)]}
    return {**(gemv if gemv_default else mma), **split}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--layer-sweep", action="store_true", help="also time the layer under the _layer_sweep settings")
    ap.add_argument("--sweep-set", default="all", choices=sorted(SWEEP_SETS),
                    help="which config sweep: all, or sub (tensor-core tiles x K sub-ranges at M = 1 and 16, no transform sweep)")
    args = ap.parse_args()
    from _common import RecordWriter, base_fields, graph_ms, require_cuda, rotation_count

    require_cuda("bench_decode_parts.py")
    from dataclasses import replace

    from flatquant.core.transforms import kron_factors
    from flatquant.kernels.gemm import decode as decode_gemm
    from flatquant.kernels.gemm.decode import resolved_config, w4a4_gemm_decode
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.kernels.reference import quantize_weight_reference
    from flatquant.kernels.routes import DEFAULT_ROUTES
    from flatquant.kernels.transform import fused_transform_quantize

    dev = torch.device("cuda")
    base = base_fields()
    out = RecordWriter(args.out, base)
    for (k, n), m in itertools.product(SHAPES, [int(v) for v in args.ms.split(",")]):
        # Weights rotated over at least twice the L2 (50 MB) in packed int4 (12 sets at 4096 x 4096; 8 sets, 67
        # MB, until 0539003), so that the W4A4 side does not read them from L2.
        sets = max(8, rotation_count(n * k // 2, cap=16))
        n1, n2 = kron_factors(k)
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(sets)]
        xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
        # Row-major factors, as the layer caches them: QR returns a column-major Q, and a strided factor would
        # cost the fused kernel a copy per call (two extra kernels at decode).
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
        shape = {"in": k, "out": n, "M": m, "n1": n1, "n2": n2, "dtype": "bfloat16", "bits": 4}
        bf16 = graph_ms([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, ws)])
        # The activation codes as the layer hands them to the decode GEMM (packed, or one per byte for the
        # tensor-core kernel); the GEMM is also timed on packed codes for the comparison.
        fmt = decode_gemm.activation_format(m, n, k // 2, dev)  # an out_format value
        fused = graph_ms([lambda x=x: fused_transform_quantize(x, p1, p2, 1.0, 4, out_format=fmt) for x in xs])
        q = [quantize_weight_reference(w.float(), 4) for w in ws]
        a = [fused_transform_quantize(x, p1, p2, 1.0, 4, out_format=fmt) for x in xs]
        a_packed = [fused_transform_quantize(x, p1, p2, 1.0, 4) for x in xs]
        a_bytes = a if fmt == "int8" else [fused_transform_quantize(x, p1, p2, 1.0, 4, out_format="int8")
                                           for x in xs]  # one code per byte, for the tensor-core sweep

        def gemm(cfg, acts=a):
            return graph_ms([lambda ai=ai, qi=qi: w4a4_gemm_decode(ai[0], ai[1], qi[0], qi[1], None, torch.bfloat16,
                                                                  4, config=cfg) for ai, qi in zip(acts, q)])
        default = resolved_config(m, n, k // 2, dev)
        layers = [W4A4Linear.from_float(w.float(), None, p1.float(), p2.float(), backend="triton") for w in ws]

        def layer_ms(**routes):  # the layers under DEFAULT_ROUTES with `routes` changed
            for lay in layers:
                lay.routes = replace(DEFAULT_ROUTES, **routes)
            return graph_ms([lambda x=x, lay=lay: lay(x) for x, lay in zip(xs, layers)])

        # The default layer is timed three times (first, after the PDL pair, last) and reported as the median:
        # the first of a shape's layer graphs measured up to 0.5 us faster than identical later ones
        # (4096 x 4096, M = 1, 0539003).
        wholes_default = [layer_ms()]
        # The same layer with the GEMM launched as a programmatic dependent (PDL) everywhere / nowhere, then
        # with one decode option changed at a time: the gemv kernel requesting two weight tiles ahead, or its
        # loop pipelined through shared memory; the tensor-core kernel (where it runs) with its K loop not
        # pipelined (synchronous loads), or fed packed activation codes (unpacked in its registers).
        wholes = {}
        for tag, on in (("pdl_on", True), ("pdl_off", False)):
            wholes[tag] = layer_ms(pdl_gemv=on, pdl_mma=on)
        wholes_default.append(layer_ms())
        # tag -> RouteConfig fields; then the transform on the block kernel at every size (by default
        # 128 x 128 factor tiles take the split kernel at these M).
        variants = {"gemv_prefetch2": dict(decode_overrides={"GEMV_PREFETCH": 2}),
                    "gemv_pipelined": dict(decode_overrides={"GEMV_PREFETCH": 0, "GEMV_STAGES": 3})}
        if resolved_config(m, n, k // 2, dev)["KERNEL"] == "mma":
            variants.update(mma_stages1=dict(decode_overrides={"num_stages": 1}),
                            mma_packed_activations=dict(mma_unpacked_activations=False),
                            mma_signed_weight=dict(decode_overrides={"W_NIBBLES": "signed"}),
                            mma_offset_weight=dict(decode_overrides={"W_NIBBLES": "offset"}))
        if 1 < m <= decode_gemm.gemv_max_m(n, k // 2):  # the tensor-core kernel where the dp4a kernel is the default
            variants["mma_not_gemv"] = dict(gemv_max_m=1)
        # M = 1: the one-launch kernel (fused_decode.py; off by default), with and without its L2 prefetch
        if m == 1:
            variants["fused_decode_on"] = dict(fused_decode_max_m=1)
            variants["fused_decode_on_l2"] = dict(fused_decode_max_m=1, fused_decode_l2_prefetch=True)
        # both decode kernels asking L2 for their weight slice before the PDL wait, on and off
        variants["l2_prefetch_on"] = dict(l2_prefetch_gemv=True, l2_prefetch_mma=True)
        variants["l2_prefetch_off"] = dict(l2_prefetch_gemv=False, l2_prefetch_mma=False)
        variants["transform_block"] = dict(split_max_m=0)
        # the transform's PDL trigger (letting the GEMM start) after its stores, or never
        variants["trigger_end"] = dict(pdl_trigger="end")
        variants["trigger_none"] = dict(pdl_trigger=None)
        if args.layer_sweep:
            variants.update(_layer_sweep(resolved_config(m, n, k // 2, dev)["KERNEL"] == "gemv", m))
        for tag, routes in variants.items():
            wholes[tag] = layer_ms(**routes)
        wholes_default.append(layer_ms())
        whole = statistics.median(wholes_default)
        for name, ms, extra in ([("bf16_gemv", bf16, {}), ("fused_transform_quant", fused, {"out_format": fmt}),
                                ("decode_gemm_default", gemm(default), {"config": default, "activations": fmt}),
                                ("decode_gemm_default_packed_activations", gemm(default, a_packed), {"config": default}),
                                ("w4a4_linear_auto", whole, {"runs_ms": wholes_default})]
                                + [(f"w4a4_linear_auto_{tag}", ms, {}) for tag, ms in wholes.items()]):
            out.add({"kernel": name, "shape": shape, "median_ms": ms, "baseline": "bf16_gemv_cudagraph",
                     "baseline_median_ms": bf16, "speedup": bf16 / ms, "timing": "cuda_graph",
                     "achieved_gbps": (n * k / 2 if name.startswith("decode") else n * k * 2) / (ms * 1e-3) / 1e9
                     if name != "fused_transform_quant" else None, **extra})
            print(f"{k}x{n} M={m} {name}: {ms * 1e3:.1f} us (bf16 {bf16 * 1e3:.1f} us)", flush=True)
        if args.no_sweep:
            continue
        sweep = SWEEP_SETS[args.sweep_set] or SWEEP
        for cfg in sweep.get(m, []):
            full = resolved_config(m, n, k // 2, dev, {**resolved_config(m, n, k // 2, dev), **cfg})
            try:  # the dp4a kernel reads packed codes, the tensor-core kernel codes one per byte
                ms = gemm(full, a_packed if full["KERNEL"] == "gemv" else a_bytes)
            except Exception as e:  # a config the compiler refuses (shared memory): recorded as such
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            out.add({"kernel": "decode_gemm_sweep", "shape": shape, "median_ms": ms, "baseline": "bf16_gemv_cudagraph",
                     "baseline_median_ms": bf16, "speedup": bf16 / ms, "timing": "cuda_graph", "config": full,
                     "activations": "packed" if full["KERNEL"] == "gemv" else "int8",
                     "achieved_gbps": n * k / 2 / (ms * 1e-3) / 1e9})
        for tcfg in TRANSFORM_SWEEP if args.sweep_set == "all" else []:
            try:
                ms = graph_ms([lambda x=x: fused_transform_quantize(x, p1, p2, 1.0, 4, **tcfg) for x in xs])
            except Exception as e:
                print(f"  transform {tcfg}: {type(e).__name__}", flush=True)
                continue
            out.add({"kernel": "fused_transform_quant_sweep", "shape": shape, "median_ms": ms, "config": tcfg,
                     "baseline": "bf16_gemv_cudagraph", "baseline_median_ms": bf16, "speedup": bf16 / ms,
                     "timing": "cuda_graph", "achieved_gbps": None})
            print(f"  transform {tcfg}: {ms * 1e3:.1f} us", flush=True)
        swept = [r for r in out.records if r["kernel"] == "decode_gemm_sweep" and r["shape"] == shape]
        mma = [r for r in swept if r["config"]["KERNEL"] == "mma" and r["config"].get("SWAP_AB")]
        if mma:  # the whole layer with the fastest swept tensor-core config as the decode default (any M)
            best = min(mma, key=lambda r: r["median_ms"])["config"]
            ms = layer_ms(decode_overrides=best)
            out.add({"kernel": "w4a4_linear_auto_best_mma", "shape": shape, "median_ms": ms,
                     "baseline": "bf16_gemv_cudagraph", "baseline_median_ms": bf16, "speedup": bf16 / ms,
                     "timing": "cuda_graph", "config": best, "achieved_gbps": n * k * 2 / (ms * 1e-3) / 1e9})
            print(f"  layer with best mma config {best}: {ms * 1e3:.1f} us (bf16 {bf16 * 1e3:.1f} us)", flush=True)
        for kern in sorted({(r["config"]["KERNEL"], bool(r["config"].get("SWAP_AB"))) for r in swept}):
            ms, cfg = min(((r["median_ms"], r["config"]) for r in swept
                           if (r["config"]["KERNEL"], bool(r["config"].get("SWAP_AB"))) == kern), key=lambda t: t[0])
            print(f"  best {kern} config {cfg}: {ms * 1e3:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
