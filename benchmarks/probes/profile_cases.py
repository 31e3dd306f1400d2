#!/usr/bin/env python
"""Runs a few kernel cases once each, inside a profiler range, for Nsight Compute: the decode layer
(fused transform + decode GEMM) at M = 1 and 16 and the fused transform at prefill, on the shapes where
the issue's targets are missed. A diagnostic (which unit limits each kernel), not a benchmark: ncu
serialises the kernels and flushes the caches between them, so its durations are not layer times.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python benchmarks/probes/profile_cases.py --cases decode,prefill
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

DECODE = [(4096, 4096, 1), (4096, 4096, 16), (14336, 4096, 1), (14336, 4096, 16)]  # (in, out, M)
PREFILL = [(4096, "packed"), (14336, "packed"), (14336, "fp8")]  # (hidden, out_format) at 8 x 2048 tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="decode,prefill")
    args = ap.parse_args()
    from _common import require_cuda

    require_cuda("profile_cases.py")
    from flatquant.core.transforms import kron_factors
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.kernels.transform import fused_transform_quantize

    dev = torch.device("cuda")
    runs = []  # (label, fn)
    wanted = set(args.cases.split(","))

    def factors(k):
        n1, n2 = kron_factors(k)
        return [torch.linalg.qr(torch.randn(s, s, device=dev))[0].contiguous() for s in (n1, n2)]

    if "decode" in wanted:
        for k, n, m in DECODE:
            p1, p2 = factors(k)
            layer = W4A4Linear.from_float(torch.randn(n, k, device=dev) / k ** 0.5, None, p1, p2, backend="triton")
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            runs.append((f"decode layer {k}->{n} M={m}", lambda layer=layer, x=x: layer(x)))
    if "prefill" in wanted:
        for k, fmt in PREFILL:
            p1, p2 = (p.to(torch.bfloat16) for p in factors(k))
            x = torch.randn(8 * 2048, k, device=dev, dtype=torch.bfloat16)
            runs.append((f"fused prefill {k} tokens=16384 out={fmt}",
                         lambda x=x, p1=p1, p2=p2, fmt=fmt: fused_transform_quantize(x, p1, p2, 1.0, 4, out_format=fmt)))
    for _, fn in runs:  # compile outside the profiled range
        fn()
    torch.cuda.synchronize()
    for label, fn in runs:
        print(label, flush=True)
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
