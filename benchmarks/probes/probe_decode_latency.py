#!/usr/bin/env python
"""Where a decode-sized kernel's time goes: the floor of a kernel node in a CUDA graph (an empty Triton
kernel, a one-program 8 KB load + store) next to the fused transform kernels (block, split) and the decode
GEMM, all replayed from CUDA graphs. With --eager it only runs each piece a few times, for a profiler
(`ncu --metrics gpu__time_duration.sum`): the kernels' own durations, without the graph's launch cost.

    PYTHONPATH=. python benchmarks/probes/probe_decode_latency.py --out results/kernels/probe_decode_latency.json
    ncu --metrics gpu__time_duration.sum --csv python benchmarks/probes/probe_decode_latency.py --eager
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


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _copy_kernel(x_ptr, y_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(y_ptr + r, tl.load(x_ptr + r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--eager", action="store_true", help="run each piece 3 times, no timing (for ncu)")
    args = ap.parse_args()
    from _common import RecordWriter, base_fields, require_cuda, time_pieces

    require_cuda("probe_decode_latency.py")
    from flatquant.core.transforms import kron_factors
    from flatquant.kernels.gemm.decode import activation_format, w4a4_gemm_decode
    from flatquant.kernels.reference import quantize_weight_reference
    from flatquant.kernels.transform import fused_transform_quantize

    dev = torch.device("cuda")
    base = base_fields()
    out = RecordWriter(None if args.eager else args.out, base)
    x8k = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    y8k = torch.empty_like(x8k)
    pieces = [("empty_kernel", {}, lambda: _empty_kernel[(1,)](x8k)),
              ("copy_8kb_one_program", {}, lambda: _copy_kernel[(1,)](x8k, y8k, N=4096))]
    for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        n1, n2 = kron_factors(k)
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
        w = quantize_weight_reference(torch.randn(n, k, device=dev) / k ** 0.5, 4)
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            shape = {"in": k, "out": n, "M": m, "n1": n1, "n2": n2}
            if n == 4096:  # one transform record per input size (4096, 14336)
                for kern in ("block", "split"):
                    pieces.append((f"transform_{kern}", shape,
                                   lambda x=x, p1=p1, p2=p2, kern=kern: fused_transform_quantize(x, p1, p2, 1.0, 4,
                                                                                                 kernel=kern)))
            # the codes in the layout the layer hands the decode GEMM (packed, or one per byte for the tensor cores)
            fmt = activation_format(m, n, k // 2, dev)
            a, sa = fused_transform_quantize(x, p1, p2, 1.0, 4, out_format=fmt)
            pieces.append(("decode_gemm", shape, lambda a=a, sa=sa, w=w: w4a4_gemm_decode(a, sa, w[0], w[1])))
    time_pieces(pieces, out, args.eager, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
