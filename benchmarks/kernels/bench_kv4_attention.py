#!/usr/bin/env python
"""KV4 decode attention (flatquant/kernels/kv4_attention.py: packed int4 K/V with per-(token, head)
scale and zero, flash-decoding) vs BF16 decode attention over a bf16 cache of the same shape (torch
SDPA, flash backend where available: the G = Hq / Hkv query heads of a kv head as G query rows).

Shapes: Llama-2-7B (Hq = Hkv = 32, D = 128) and Llama-3-8B (Hq = 32, Hkv = 8, D = 128); batch 1/8/32/64;
KV length 2048 and 8192, every sequence full. Both sides are replayed from one CUDA graph (how decode
runs in a serving loop), over as many cache copies as make at least twice the L2, so that a small
cache is not read from L2; median of triton.testing.do_bench. achieved_gbps = bytes the kernel must
read (codes, scales and zeros for KV4; bf16 K and V for the baseline; plus q and the output) / time.

    PYTHONPATH=. python benchmarks/kernels/bench_kv4_attention.py --out results/kernels/kv4_attention.json [--quick]

--sweep also times the kernel at other sequence-split counts, block sizes, warp counts, pipeline depths,
code operand forms and with w's two parts in one value dot or two (stack); records
kv4_decode_attention_sweep, with config and a check of its output against the reference. It prints, per
shape and over all shapes (geometric mean of time / default time), the fastest config. One GPU call picks
the defaults:

    PYTHONPATH=. python benchmarks/kernels/bench_kv4_attention.py --quick --sweep --rep-ms 30 --out $OUT/kv4_sweep.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch

MODELS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # (Hq, Hkv, D)
BATCHES = [1, 8, 32, 64]
KV_LENS = [2048, 8192]
QUICK_BATCHES = [1, 32]
QUICK_KV_LENS = [2048]
SWEEP_SPLITS = [1, 2, 4, 8, 16]  # at the default block, warps, stages and codes
# (block_n, num_warps, num_stages, codes, stack) at the default splits
SWEEP_OTHER = [(32, 4, 2, "biased", True), (64, 4, 2, "biased", True), (64, 4, 3, "biased", True),
               (128, 4, 2, "biased", True), (128, 8, 3, "biased", True), (256, 8, 2, "biased", True),
               (128, 8, 2, "exact", True), (64, 4, 2, "prmt", True), (128, 8, 2, "prmt", True),
               (128, 8, 2, "biased", False), (128, 4, 3, "biased", True), (256, 4, 2, "biased", True),
               (128, 4, 2, "prmt", True), (128, 2, 2, "biased", True), (64, 2, 2, "biased", True),
               (128, 4, 2, "biased", False)]  # the second line: around the 4-warp default
MAX_COPIES = 64
DEVICE = "cuda"


def median_ms(fn, warmup_ms, rep_ms) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms(calls, warmup_ms, rep_ms) -> float:
    """Median ms per call of `calls` captured in sequence into one CUDA graph."""
    for c in calls:  # compile outside the capture
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return median_ms(g.replay, warmup_ms, rep_ms) / len(calls)


def copies_for(nbytes: int) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / max(1, nbytes))))


def kv4_cache(b, hkv, s, d, dev):
    codes = lambda: torch.randint(0, 256, (b, hkv, s, d // 2), dtype=torch.uint8, device=dev)
    scale = lambda: torch.rand(b, hkv, s, device=dev) * 0.1 + 0.01
    zero = lambda: torch.randint(0, 16, (b, hkv, s), device=dev).float()
    return codes(), scale(), zero(), codes(), scale(), zero()


def sdpa_backend_ctx():
    """(context manager factory, name): the flash backend if torch has the selector, else the default."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "flash"
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext, "default"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records (rewritten after every record)")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32, KV 2048")
    ap.add_argument("--sweep", action="store_true", help="also time every (splits, block_n) at each shape")
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--warmup-ms", type=float, default=15.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kv4_attention.py: needs a CUDA GPU (none found); refusing to run.", file=sys.stderr)
        return 1

    import triton

    from flatquant.kernels import kv4_attention as kv4
    from flatquant.results import atomic_write_text, provenance

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    bf16 = torch.bfloat16
    base = {**provenance("cuda"), "triton": triton.__version__}
    records: list[dict] = []

    def add(rec):
        rec = {**rec, **base, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        records.append(rec)
        if args.out:
            atomic_write_text(args.out, json.dumps(records, indent=1) + "\n")
        return rec

    sdpa_ctx, sdpa_name = sdpa_backend_ctx()
    batches = QUICK_BATCHES if args.quick else BATCHES
    kv_lens = QUICK_KV_LENS if args.quick else KV_LENS
    timing = dict(timing="cuda_graph", warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    print(f"{'model':>11} {'B':>3} {'KV':>5} {'bf16 ms':>9} {'kv4 ms':>9} {'x':>6} {'kv4 GB/s':>9} splits")
    for model, (hq, hkv, d) in MODELS.items():
        g = hq // hkv
        for s in kv_lens:
            for b in batches:
                shape = dict(model=model, batch=b, kv_len=s, hq=hq, hkv=hkv, head_dim=d, q_dtype="bfloat16")
                io_bytes = 2 * b * hq * d * 2  # q read + output written, bf16
                kv4_bytes = b * hkv * s * (d + 16) + io_bytes  # K, V codes (d/2 bytes each) + 4 float32
                bf16_bytes = b * hkv * s * d * 2 * 2 + io_bytes
                lengths = torch.full((b,), s, dtype=torch.int32, device=dev)
                sm = 1.0 / math.sqrt(d)
                # baseline: bf16 cache, SDPA with the G query heads of a kv head as G query rows
                nb = copies_for(bf16_bytes)
                bsets = [(torch.randn(b, hkv, g, d, device=dev, dtype=bf16),
                          torch.randn(b, hkv, s, d, device=dev, dtype=bf16),
                          torch.randn(b, hkv, s, d, device=dev, dtype=bf16)) for _ in range(nb)]
                sdpa = torch.nn.functional.scaled_dot_product_attention
                try:
                    with sdpa_ctx():
                        t_bf16 = graph_ms([lambda q=q, k=k, v=v: sdpa(q, k, v, scale=sm) for q, k, v in bsets],
                                          args.warmup_ms, args.rep_ms)
                    backend = sdpa_name
                except RuntimeError:
                    t_bf16 = graph_ms([lambda q=q, k=k, v=v: sdpa(q, k, v, scale=sm) for q, k, v in bsets],
                                      args.warmup_ms, args.rep_ms)
                    backend = "default"
                del bsets
                # KV4 cache
                nk = copies_for(kv4_bytes)
                ksets = [(torch.randn(b, hq, d, device=dev, dtype=bf16), *kv4_cache(b, hkv, s, d, dev))
                         for _ in range(nk)]
                run = lambda q, *c, **kw: kv4.decode_attention(q, *c, lengths, sm, **kw)
                t_kv4 = graph_ms([lambda st=st: run(*st) for st in ksets], args.warmup_ms, args.rep_ms)
                splits = kv4.choose_splits(b, hkv, s, kv4.BLOCK_N, dev)
                baseline = f"bf16_sdpa_{backend}"
                add(dict(kernel="kv4_decode_attention", shape=shape, median_ms=t_kv4, baseline=baseline,
                         baseline_median_ms=t_bf16, speedup=t_bf16 / t_kv4,
                         achieved_gbps=kv4_bytes / (t_kv4 * 1e-3) / 1e9,
                         baseline_achieved_gbps=bf16_bytes / (t_bf16 * 1e-3) / 1e9,
                         config=dict(num_splits=splits, block_n=kv4.BLOCK_N, num_warps=kv4.NUM_WARPS,
                                     num_stages=kv4.NUM_STAGES, codes=kv4.CODES, stack=kv4.STACK_V),
                         cache_copies=nk,
                         baseline_cache_copies=nb, **timing))
                print(f"{model:>11} {b:>3} {s:>5} {t_bf16:9.4f} {t_kv4:9.4f} {t_bf16 / t_kv4:6.2f} "
                      f"{kv4_bytes / (t_kv4 * 1e-3) / 1e9:9.0f} {splits}", flush=True)
                if args.sweep:
                    dflt = (kv4.BLOCK_N, kv4.NUM_WARPS, kv4.NUM_STAGES, kv4.CODES, kv4.STACK_V)
                    cfgs = [(ns, *dflt) for ns in SWEEP_SPLITS if ns * kv4.BLOCK_N <= s]
                    cfgs += [(None, *o) for o in SWEEP_OTHER]
                    # every config's output on two sequences against the reference (a wrong one is not picked)
                    st0 = [t[:2] for t in ksets[0]]
                    anchor = kv4.ref.decode_attention_f32(*st0, lengths[:2], sm)
                    for ns, blk, nw, st, cd, sv in cfgs:
                        kw = dict(num_splits=ns, block_n=blk, num_warps=nw, num_stages=st, codes=cd, stack=sv)
                        try:
                            o = kv4.decode_attention(*st0, lengths[:2], sm, **kw).float()
                        except Exception as e:  # a config that does not compile: recorded, skipped
                            add(dict(kernel="kv4_decode_attention_sweep_error", shape=shape, config=kw,
                                     error=repr(e)[:300]))
                            print(f"{'':>11} sweep {kw} failed: {repr(e)[:120]}", flush=True)
                            continue
                        diff = float((o - anchor).abs().max())
                        ok = diff <= 0.02 * float(anchor.abs().max()) + 1e-3  # a few bf16 ulps
                        t = graph_ms([lambda st_=st_: run(*st_, **kw) for st_ in ksets], args.warmup_ms, args.rep_ms)
                        cfg = {**kw, "num_splits": ns or kv4.choose_splits(b, hkv, s, blk, dev)}
                        add(dict(kernel="kv4_decode_attention_sweep", shape=shape, median_ms=t, baseline=baseline,
                                 baseline_median_ms=t_bf16, speedup=t_bf16 / t, default_median_ms=t_kv4,
                                 achieved_gbps=kv4_bytes / (t * 1e-3) / 1e9, config=cfg,
                                 config_splits="fixed" if ns else "heuristic", max_abs_diff_vs_reference=diff,
                                 matches_reference=ok, cache_copies=nk, **timing))
                        print(f"{'':>11} sweep {cfg} {t:9.4f} ms {t_bf16 / t:6.2f}x{'' if ok else ' WRONG OUTPUT'}",
                              flush=True)
                del ksets
                torch.cuda.empty_cache()
    if args.sweep:
        summarize_sweep(records)
    return 0


def summarize_sweep(records: list[dict]) -> None:
    """Print the fastest config per shape and the heuristic-split config with the best geometric mean of
    time / default time over all shapes (the candidate for the module defaults); configs whose output
    differs from the reference's are left out."""
    sweep = [r for r in records if r["kernel"] == "kv4_decode_attention_sweep" and r["matches_reference"]]
    key = lambda r: (r["shape"]["model"], r["shape"]["batch"], r["shape"]["kv_len"])
    for k in sorted({key(r) for r in sweep}):
        best = min((r for r in sweep if key(r) == k), key=lambda r: r["median_ms"])
        print(f"best {k}: {best['config']} {best['median_ms']:.4f} ms (default {best['default_median_ms']:.4f})")
    geo: dict[tuple, list[float]] = {}
    for r in sweep:
        if r["config_splits"] == "heuristic":
            c = r["config"]
            geo.setdefault((c["block_n"], c["num_warps"], c["num_stages"], c["codes"], c["stack"]), []).append(
                math.log(r["median_ms"] / r["default_median_ms"]))
    for c, v in sorted(geo.items(), key=lambda kv: sum(kv[1]) / len(kv[1])):
        print(f"(block_n, num_warps, num_stages, codes, stack) {c}: geomean time / default "
              f"{math.exp(sum(v) / len(v)):.3f}")


if __name__ == "__main__":
    sys.exit(main())
