#!/usr/bin/env python
"""Paper Table 6 on this GPU: fused Kronecker transform + int4 quantize vs the unfused PyTorch sequence
(matmul, matmul, quantize + pack), prefill (seq 2048) and decode (1 token), batch 1..64.

Achieved bandwidth counts the bytes the fused kernel must move (activations read once in bf16, packed
int4 + float32 scale written once) over its median time, against the device's measured copy bandwidth
(a large device-to-device copy, bytes read + written).

    PYTHONPATH=. python benchmarks/bench_fused_transform.py --out results/kernels/fused_transform.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

ALPHA = 0.9
HIDDEN = [4096, 5120, 8192, 11008, 13824, 14336]
BATCHES = [1, 2, 4, 8, 16, 32, 64]
SEQ = 2048
QUICK_HIDDEN = [4096, 14336]
QUICK_BATCHES = [1, 16, 64]
DEVICE = "cuda"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON list of records")
    ap.add_argument("--quick", action="store_true", help="hidden 4096/14336, batch 1/16/64")
    ap.add_argument("--rep-ms", type=float, default=30.0)
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--no-variants", action="store_true", help="skip the tiled / round-once variants")
    args = ap.parse_args()

    from flatquant.kernels.bench_utils import require_cuda

    require_cuda("bench_fused_transform.py")
    from flatquant.kernels.bench_utils import (
        RecordWriter,
        Rotator,
        base_fields,
        bench_ms,
        copy_bandwidth_gbps,
        rotation_count,
    )
    from flatquant.kernels.fused_transform_quant import (
        fused_transform_quantize,
        unfused_transform_quantize_torch,
    )
    from flatquant.kernels.reference import kron_factors

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    dtype = torch.bfloat16
    hidden = QUICK_HIDDEN if args.quick else HIDDEN
    batches = QUICK_BATCHES if args.quick else BATCHES
    copy_gbps, copy_ms = copy_bandwidth_gbps()
    writer = RecordWriter(args.out, base_fields())
    writer.add(dict(kernel="device_copy", shape={"bytes": 2 * 2 ** 30}, median_ms=copy_ms, baseline=None,
                    baseline_median_ms=None, speedup=None, achieved_gbps=copy_gbps,
                    note="bytes read + written by a 2 GiB bf16 device-to-device copy"))
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'hidden':>6} {'phase':>7} {'batch':>5} {'unfused ms':>10} {'fused ms':>9} {'speedup':>7} {'GB/s':>7} {'%copy':>6}")
    for n in hidden:
        n1, n2 = kron_factors(n)
        q1 = torch.linalg.qr(torch.randn(n1, n1, device=dev, dtype=torch.float32))[0].to(dtype)
        q2 = torch.linalg.qr(torch.randn(n2, n2, device=dev, dtype=torch.float32))[0].to(dtype)

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
                variants = [("fused", {})]
                if not args.no_variants and phase == "prefill" and b in (1, 16, 64):
                    variants += [("fused_round_once", {"split_intermediate": False}),
                                 ("fused_tiled", {"tiles": (64, 64, 64)})]
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
                del xs, rot
                torch.cuda.empty_cache()
    if args.out:
        print(f"wrote {len(writer.records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
