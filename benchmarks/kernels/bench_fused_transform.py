#!/usr/bin/env python
"""Paper Table 6 on this GPU: fused Kronecker transform + int4 quantize vs the unfused PyTorch sequence
(matmul, matmul, quantize + pack), prefill (seq 2048) and decode (1 token), batch 1..64.

Calls of at most GRAPH_MAX_TOKENS tokens (decode, and prefill at b <= 4) are also timed with both sides
replayed from one CUDA graph ("fused_graph" records): eager calls that small are host bound.

Achieved bandwidth counts the bytes the fused kernel must move (activations read once in bf16, packed
int4 + float32 scale written once) over its median time, against the device's measured copy bandwidth
(a large device-to-device copy, bytes read + written).

    PYTHONPATH=. python benchmarks/kernels/bench_fused_transform.py --out results/kernels/fused_transform.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

ALPHA = 0.9
HIDDEN = [4096, 5120, 8192, 11008, 13824, 14336]
BATCHES = [1, 2, 4, 8, 16, 32, 64]
SEQ = 2048
QUICK_HIDDEN = [4096, 14336]
SWEEP_HIDDEN = [4096, 8192, 11008, 14336]
QUICK_BATCHES = [1, 16, 64]
# Sizes (tokens per call) also timed from CUDA graphs, both sides: where eager calls are host bound.
GRAPH_MAX_TOKENS = 8192
DEVICE = "cuda"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records")
    ap.add_argument("--quick", action="store_true", help="hidden 4096/14336, batch 1/16/64")
    ap.add_argument("--rep-ms", type=float, default=30.0)
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--no-variants", action="store_true", help="skip the per-token / tiled kernel variants")
    ap.add_argument("--sweep", action="store_true",
                    help="only sweep the block kernel's config (tokens per step, warps, stages) at prefill, batch 16")
    ap.add_argument("--sweep-occupancy", action="store_true",
                    help="only sweep pipeline stages x register caps x programs per SM around the default, batch 16")
    ap.add_argument("--sweep-chunked", action="store_true",
                    help="only time the chunked kernel (pipeline stages, programs per SM, register cap, register "
                         "prefetch) against the block kernel at prefill, batch 16, every hidden size")
    ap.add_argument("--hidden", default=None, help="comma list of hidden sizes (default: all six, or the quick two)")
    args = ap.parse_args()

    from _common import require_cuda

    require_cuda("bench_fused_transform.py")
    from _common import (
        RecordWriter,
        Rotator,
        base_fields,
        bench_ms,
        copy_bandwidth_gbps,
        graph_ms,
        rotation_count,
    )

    from flatquant.kernels.reference import kron_factors
    from flatquant.kernels.transform import default_kernel, fused_transform_quantize, unfused_transform_quantize_torch
    from flatquant.kernels.transform.chunked import chunked_supported

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    dtype = torch.bfloat16
    hidden = [int(v) for v in args.hidden.split(",")] if args.hidden else QUICK_HIDDEN if args.quick else HIDDEN
    batches = QUICK_BATCHES if args.quick else BATCHES
    copy_gbps, copy_ms = copy_bandwidth_gbps()
    writer = RecordWriter(args.out, base_fields())
    writer.add(dict(kernel="device_copy", shape={"bytes": 2 * 2 ** 30}, median_ms=copy_ms, baseline=None,
                    baseline_median_ms=None, speedup=None, achieved_gbps=copy_gbps,
                    note="bytes read + written by a 2 GiB bf16 device-to-device copy"))
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    if args.sweep or args.sweep_occupancy:
        _sweep(writer, SWEEP_HIDDEN, copy_gbps, args, occupancy=args.sweep_occupancy)
        return 0
    if args.sweep_chunked:
        _sweep_chunked(writer, hidden, copy_gbps, args)
        return 0
    print(f"{'hidden':>6} {'phase':>7} {'batch':>5} {'unfused ms':>10} {'fused ms':>9} {'speedup':>7} {'GB/s':>7} {'%copy':>6}")
    for n in hidden:
        n1, n2 = kron_factors(n)
        # Row-major factors, as the layer caches them: QR returns a column-major Q, and a strided factor would
        # cost the fused kernel a copy per call (two extra kernels at decode).
        q1 = torch.linalg.qr(torch.randn(n1, n1, device=dev, dtype=torch.float32))[0].to(dtype).contiguous()
        q2 = torch.linalg.qr(torch.randn(n2, n2, device=dev, dtype=torch.float32))[0].to(dtype).contiguous()

        for phase in ("prefill", "decode"):
            for b in batches:
                tokens = b * (SEQ if phase == "prefill" else 1)
                in_bytes = tokens * n * 2
                nset = rotation_count(in_bytes)
                xs = [torch.randn(tokens, n, device=dev, dtype=dtype) for _ in range(nset)]
                rot = Rotator(xs)
                moved = in_bytes + tokens * n // 2 + tokens * 4 + (n1 * n1 + n2 * n2) * 2
                shape = {"hidden": n, "n1": n1, "n2": n2, "batch": b, "seq": SEQ if phase == "prefill" else 1,
                         "tokens": tokens, "phase": phase, "dtype": "bfloat16", "bits": 4}
                try:
                    t_unf = bench_ms(rot(lambda x, q1=q1, q2=q2: unfused_transform_quantize_torch(x, q1, q2, ALPHA, 4)),
                                     args.warmup_ms, args.rep_ms)
                except torch.cuda.OutOfMemoryError:
                    t_unf = None
                    torch.cuda.empty_cache()
                # "fused" is the default dispatch (the block kernel for even n1); the per-token kernel with the
                # float32 intermediate (the earlier default), per-token rounding T once, and the tiled path.
                variants = [("fused", {})]
                if not args.no_variants and phase == "prefill" and b in (1, 16, 64):
                    variants += [("fused_token_split", {"kernel": "token", "split_intermediate": True}),
                                 ("fused_token_round_once", {"kernel": "token"}),
                                 ("fused_tiled", {"tiles": (64, 64, 64)})]
                    # the other one of the block and chunked kernels, where both take the size
                    other = "block" if default_kernel(tokens, n1, n2, True, dev) == "chunked" else "chunked"
                    if other == "block" or chunked_supported(n1, n2, True):
                        variants.append((f"fused_{other}", {"kernel": other}))
                for name, kw in variants:
                    t = bench_ms(rot(lambda x, q1=q1, q2=q2, kw=kw: fused_transform_quantize(x, q1, q2, ALPHA, 4, **kw)),
                                 args.warmup_ms, args.rep_ms)
                    gbps = moved / (t * 1e-3) / 1e9
                    writer.add(dict(kernel=name, shape=shape, median_ms=t, baseline="unfused_pytorch",
                                    baseline_median_ms=t_unf, speedup=(t_unf / t) if t_unf else None,
                                    achieved_gbps=gbps, copy_gbps=copy_gbps, fraction_of_copy_bw=gbps / copy_gbps,
                                    bytes_moved=moved, rotated_input_sets=nset))
                    if name == "fused":
                        print(f"{n:>6} {phase:>7} {b:>5} {t_unf or float('nan'):>10.4f} {t:>9.4f} "
                              f"{(t_unf or float('nan')) / t:>6.2f}x {gbps:>7.0f} {100 * gbps / copy_gbps:>5.0f}%",
                              flush=True)
                if tokens <= GRAPH_MAX_TOKENS:
                    # Eager calls this small are host bound (Python + launches, 0.05-0.2 ms, varying from run to
                    # run); both sides replayed from one CUDA graph give the kernels' own times.
                    t_unf_g = graph_ms([lambda x=x: unfused_transform_quantize_torch(x, q1, q2, ALPHA, 4) for x in xs])
                    t_g = graph_ms([lambda x=x: fused_transform_quantize(x, q1, q2, ALPHA, 4) for x in xs])
                    gbps = moved / (t_g * 1e-3) / 1e9
                    writer.add(dict(kernel="fused_graph", shape=shape, median_ms=t_g, baseline="unfused_pytorch_graph",
                                    baseline_median_ms=t_unf_g, speedup=t_unf_g / t_g, timing="cuda_graph",
                                    achieved_gbps=gbps, copy_gbps=copy_gbps, fraction_of_copy_bw=gbps / copy_gbps,
                                    bytes_moved=moved, rotated_input_sets=nset))
                    print(f"{n:>6} {phase:>7} {b:>5} {t_unf_g:>10.4f} {t_g:>9.4f} {t_unf_g / t_g:>6.2f}x "
                          f"{gbps:>7.0f} {100 * gbps / copy_gbps:>5.0f}%  (CUDA graph)", flush=True)
                del xs, rot
                torch.cuda.empty_cache()
    if args.out:
        print(f"wrote {len(writer.records)} records to {args.out}")
    return 0


def _prefill_inputs(n: int, n1: int, n2: int, batch: int):
    """Row-major bf16 orthogonal factors, `batch` prefill sequences of random activations in enough copies to
    rotate past the L2, and the bytes the fused kernel must move: (q1, q2, tokens, xs, rotator, bytes)."""
    from _common import Rotator, rotation_count

    dev = torch.device(DEVICE)
    q1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
    q2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
    tokens = batch * SEQ
    xs = [torch.randn(tokens, n, device=dev, dtype=torch.bfloat16) for _ in range(rotation_count(tokens * n * 2))]
    return q1, q2, tokens, xs, Rotator(xs), tokens * n * 2 + tokens * n // 2 + tokens * 4


def _sweep(writer, hidden, copy_gbps, args, batch: int = 16, occupancy: bool = False) -> None:
    """Block-kernel configs around the default (block_config) at prefill: tokens per step x warps x stages,
    or (occupancy) pipeline stages x a register cap (maxnreg) x programs per SM, e.g. two programs of
    128 x 128 tiles per SM with one stage and at most 128 registers per thread."""
    from _common import bench_ms

    from flatquant.kernels.reference import kron_factors
    from flatquant.kernels.transform import block as ftq
    from flatquant.kernels.transform import fused_transform_quantize

    for n in hidden:
        n1, n2 = kron_factors(n)
        if n1 % 2:
            continue
        n1p, n2p = ftq.next_pow2(n1), ftq.next_pow2(n2)
        q1, q2, tokens, xs, rot, moved = _prefill_inputs(n, n1, n2, batch)
        default = ftq.block_config(n1p, n2p)
        bts = sorted({max(1, default["BT"] // 2), default["BT"], default["BT"] * 2})
        results = []
        if occupancy:
            cfgs = [{**default, "num_stages": st, "maxnreg": reg, "programs_per_sm": 3 if reg and reg < 128 else 2}
                    for st in (1, 2, 3) for reg in (None, 128, 96)]
        else:
            cfgs = [dict(BT=bt, num_warps=w, num_stages=st, programs_per_sm=default["programs_per_sm"])
                    for bt in bts if bt * n1p * n2p <= 2 * ftq.BLOCK_MAX_ELEMENTS for w in (4, 8) for st in (2, 3)]
            cfgs += [{**default, "programs_per_sm": p} for p in (1, 4) if p != default["programs_per_sm"]]
        if default not in cfgs:
            cfgs.append(default)
        for cfg in cfgs:
            try:
                t = bench_ms(rot(lambda x, cfg=cfg: fused_transform_quantize(x, q1, q2, ALPHA, 4, config=cfg)),
                             args.warmup_ms, args.rep_ms)
            except Exception as e:  # e.g. out of shared memory / registers for this config
                writer.add(dict(kernel="fused_block_sweep", shape={"hidden": n, "tokens": tokens}, config=cfg,
                                median_ms=None, baseline=None, baseline_median_ms=None, speedup=None,
                                achieved_gbps=None, skipped=f"{type(e).__name__}: {e}"[:200]))
                print(f"{n:>6} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            gbps = moved / (t * 1e-3) / 1e9
            results.append((t, cfg))
            writer.add(dict(kernel="fused_block_sweep", shape={"hidden": n, "n1": n1, "n2": n2, "tokens": tokens,
                                                               "bits": 4},
                            config=cfg, is_default=cfg == default, median_ms=t, baseline=None, baseline_median_ms=None,
                            speedup=None, achieved_gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps))
            print(f"{n:>6} {cfg}: {t:.4f} ms {gbps:.0f} GB/s ({gbps / copy_gbps:.0%})", flush=True)
        wgmma = _uses_wgmma(ftq._fused_block_kernel)
        if results:
            t, cfg = min(results, key=lambda r: r[0])
            td = next((r[0] for r in results if r[1] == default), float("nan"))
            print(f"{n:>6}: best {t:.4f} ms {cfg} ({moved / t / 1e6 / copy_gbps:.0%} of copy); default {td:.4f} ms "
                  f"{default}; wgmma in PTX: {wgmma}", flush=True)
        del xs, rot
        torch.cuda.empty_cache()


def _sweep_chunked(writer, hidden, copy_gbps, args, batch: int = 16) -> None:
    """The chunked kernel (Triton's pipelining 1-4 stages deep or the register prefetch; 1 or 2 programs per SM;
    at most 128 registers per thread, so that two programs fit on an SM where shared memory allows) against the
    block kernel (its default, and with the prefetch switched) at prefill, side by side on the same inputs. Sizes
    the chunked kernel does not take (5120 = 64 x 80) time the block kernel only."""
    from _common import bench_ms

    from flatquant.kernels.reference import kron_factors
    from flatquant.kernels.transform import block as ftq
    from flatquant.kernels.transform import chunked as fc
    from flatquant.kernels.transform import fused_transform_quantize

    for n in hidden:
        n1, n2 = kron_factors(n)
        q1, q2, tokens, xs, rot, moved = _prefill_inputs(n, n1, n2, batch)
        block = ftq.block_config(ftq.next_pow2(n1), ftq.next_pow2(n2))
        cases = [("block", block), ("block", {**block, "prefetch": not block["prefetch"]})]
        cases += [("chunked", {**fc.chunked_config(), "prefetch": pf, "num_stages": st, "programs_per_sm": pps,
                               "maxnreg": reg})
                  for pf, st, pps, reg in ((False, 3, 2, None), (False, 3, 1, None), (False, 4, 1, None),
                                           (False, 2, 2, 128), (False, 1, 2, 128), (True, 1, 1, None))]
        for kernel, cfg in cases:
            if kernel == "chunked" and not fc.chunked_supported(n1, n2, True):
                continue
            try:
                t = bench_ms(rot(lambda x, k=kernel, c=cfg: fused_transform_quantize(x, q1, q2, ALPHA, 4, kernel=k,
                                                                                        config=c)),
                             args.warmup_ms, args.rep_ms)
            except Exception as e:  # e.g. out of shared memory / registers for this config
                print(f"{n:>6} {kernel} {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            gbps = moved / (t * 1e-3) / 1e9
            writer.add(dict(kernel=f"fused_{kernel}_sweep", shape={"hidden": n, "n1": n1, "n2": n2, "tokens": tokens,
                                                                   "bits": 4},
                            config=cfg, median_ms=t, baseline=None, baseline_median_ms=None, speedup=None,
                            achieved_gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps))
            print(f"{n:>6} {kernel:>7} {cfg}: {t:.4f} ms {gbps:.0f} GB/s ({gbps / copy_gbps:.0%})", flush=True)
        del xs, rot
        torch.cuda.empty_cache()


def _uses_wgmma(jit_fn):
    """Whether any compiled variant of a Triton kernel uses Hopper's wgmma (PTX), or None if unknown."""
    try:
        found = False
        for cache in getattr(jit_fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for k in kernels.values():
                found = found or "wgmma" in k.asm.get("ptx", "")
        return found
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
