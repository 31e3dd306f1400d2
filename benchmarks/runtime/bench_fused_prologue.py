"""The fused decoder prologues against the unfused ops they replace, one activation pass at a time (issue 24).

For Llama-2-7B / Llama-3-8B sizes and token counts M (default 1, 32: decode; 8192: prefill 4 x 2048), times, each in a CUDA graph
(median of replays, inputs rotated past L2):
  norm  W4: add_rmsnorm + fused_transform_quantize (the runtime's default kernel choice, packed / the GEMM
            route's format)      vs  fused_norm.prologue_quantize("norm")   (hidden size, P_a factors)
  silu  W4: silu_mul + fused_transform_quantize  vs  prologue_quantize("silu")  (intermediate size, P_d factors)
  norm / silu FP8: add_rmsnorm or silu_mul + fp8.quantize_fp8  vs  fp8.prologue_fp8
Each fused case is first checked against its reference (codes within one step on <= 1% of the elements,
scales within 1e-2). Records ("kind": "fused_prologue") go to --out.

GPU (one H100, about 1 minute):
  PYTHONPATH=$PWD python benchmarks/runtime/bench_fused_prologue.py --out $OUT/fused_prologue.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (_common)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from _common import RecordWriter, base_fields, graph_ms, require_cuda, rotation_count

from flatquant.core.transforms import kron_factors
from flatquant.kernels import fused_norm
from flatquant.kernels.transform import fused_transform_quantize
from flatquant.runtime import fp8, fused_ops

SIZES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}


def _factors(n, device):
    n1, n2 = kron_factors(n)
    mk = lambda k: (torch.eye(k, device=device) + torch.randn(k, k, device=device) * 0.1 / k ** 0.5).bfloat16()
    return mk(n1).contiguous(), mk(n2).contiguous()


def case(w, shape, kind, n, m, fmt, device="cuda"):
    dev = torch.device(device)
    p1, p2 = _factors(n, dev)
    xin = 2 * n if kind == "silu" else n
    per_set = m * xin * 2 * (2 if kind == "norm" else 1)
    sets = []
    for _ in range(rotation_count(per_set, cap=16)):
        sets.append((torch.randn(m, xin, device=dev).bfloat16(), torch.randn(m, n, device=dev).bfloat16()))
    wn = (torch.rand(n, device=dev) + 0.5).bfloat16()
    x, r = sets[0]
    if fmt == "fp8_w8a8":
        got = fp8.prologue_fp8(kind, x, r if kind == "norm" else None, wn, 1e-5)
        want = fp8.prologue_fp8_reference(kind, x, r if kind == "norm" else None, wn, 1e-5)
        ok = torch.allclose(got[1], want[1], rtol=1e-2, atol=0) and \
            (got[0].view(torch.uint8) != want[0].view(torch.uint8)).float().mean().item() <= 0.01
        unf = (lambda x, r: fp8.quantize_fp8(fused_ops.add_rmsnorm(x, r, wn, 1e-5)[0])) if kind == "norm" else \
            (lambda x, r: fp8.quantize_fp8(fused_ops.silu_mul(x)))
        fus = (lambda x, r: fp8.prologue_fp8("norm", x, r, wn, 1e-5)) if kind == "norm" else \
            (lambda x, r: fp8.prologue_fp8("silu", x))
    else:
        kw = dict(res=r, w=wn, eps=1e-5) if kind == "norm" else {}
        got = fused_norm.prologue_quantize(kind, x, p1, p2, 0.9, 4, fmt, **kw)
        want = (fused_norm.norm_quant_reference(x, r, wn, 1e-5, p1, p2, 0.9, 4, fmt) if kind == "norm"
                else fused_norm.silu_quant_reference(x, p1, p2, 0.9, 4, fmt))
        from flatquant.kernels import reference as ref
        ca = ref.unpack_codes(got[0], 4).float() if fmt == "packed" else got[0].float()
        cb = ref.unpack_codes(want[0], 4).float() if fmt == "packed" else want[0].float()
        d = (ca - cb).abs()
        ok = bool(torch.allclose(got[1], want[1], rtol=1e-2, atol=0) and d.max() <= 1
                  and (d > 0).float().mean() <= 0.01)
        pre = (lambda x, r: fused_ops.add_rmsnorm(x, r, wn, 1e-5)[0]) if kind == "norm" else \
            (lambda x, r: fused_ops.silu_mul(x))
        unf = lambda x, r: fused_transform_quantize(pre(x, r), p1, p2, 0.9, 4, out_format=fmt)
        fus = (lambda x, r: fused_norm.prologue_quantize("norm", x, p1, p2, 0.9, 4, fmt, res=r, w=wn, eps=1e-5)) \
            if kind == "norm" else (lambda x, r: fused_norm.prologue_quantize("silu", x, p1, p2, 0.9, 4, fmt))
    t_unf = graph_ms([lambda s=s: unf(*s) for s in sets])
    t_fus = graph_ms([lambda s=s: fus(*s) for s in sets])
    rec = {"kind": "fused_prologue", "model_shape": shape, "op": kind, "format": fmt, "n": n, "m": m,
           "unfused_ms": t_unf, "fused_ms": t_fus, "speedup": t_unf / t_fus, "matches_reference": ok,
           "timing": "cuda_graph"}
    w.add(rec)
    print(f"{shape} {kind:4s} {fmt:8s} n={n} m={m}: unfused {t_unf * 1e3:.1f} us, fused {t_fus * 1e3:.1f} us "
          f"(x{t_unf / t_fus:.2f}) ok={ok}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="llama2-7b")
    p.add_argument("--m", default="1,32,8192", help="token counts")
    p.add_argument("--formats", default="packed,int8,fp8,fp8_w8a8",
                   help="W4 code formats (packed: decode/Triton GEMM, int8: decode MMA, fp8: scaled_mm) and fp8_w8a8")
    a = p.parse_args(argv)
    require_cuda("bench_fused_prologue")
    w = RecordWriter(a.out, base_fields())
    for shape in a.shapes.split(","):
        hidden, inter = SIZES[shape]
        for fmt in a.formats.split(","):
            for m in (int(x) for x in a.m.split(",")):
                for kind, n in (("norm", hidden), ("silu", inter)):
                    try:
                        case(w, shape, kind, n, m, fmt)
                    except Exception as exc:  # one failing case must not stop the run
                        w.add({"kind": "fused_prologue", "model_shape": shape, "op": kind, "format": fmt, "n": n,
                               "m": m, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
                        print(f"{shape} {kind} {fmt} m={m}: {type(exc).__name__}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
