#!/usr/bin/env python
"""Decode GEMM (packed int4 weight, tensor cores; flatquant/kernels/gemm/decode.py) vs the one-byte-code
`scaled_mm` route (cuBLASLt FP8, weight codes one per byte) at M = 8-128 tokens, GEMM alone, for Llama-2-7B
and Llama-3-8B linear shapes; BF16 `x @ w.t()` for reference. Sets RouteConfig.small_m_max and the decode
GEMM's tiles per M bucket (decode.MMA_M_CONFIG). Each GEMM is replayed from one CUDA graph over weight copies
that exceed twice the L2. Both routes get the activation codes their layer hands them (int8 one per byte
for the decode kernel, float8 for scaled_mm; the transform that writes them costs the same for both).

    PYTHONPATH=. python benchmarks/kernels/bench_decode_gemm_m.py --sweep --out $OUT/decode_gemm_m.json

Records: kind "decode_gemm_m", route "decode" (config: the resolved kernel config; default true where it is
the one a default call runs), "scaled_mm" or "bf16"; then one record kind "decode_gemm_m_pick": per bucket
the decode config with the best geometric mean over shapes and Ms, and the largest M up to which that
config beats scaled_mm on every shape (the small_m_max to set).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/ (_common)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root

import torch

MODELS = {  # (in, out) of the linear layers of one decoder block (q/k/v and gate/up merged)
    "llama-2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama-3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
MS = [8, 16, 32, 64, 128]
DEVICE = "cuda"
# Tensor-core tiles tried per M bucket besides the default: (BLOCK_M, BLOCK_N, BLOCK_K, SUB, warps); a
# BLOCK_M below the bucket walks several M tiles (the weight read more than once, more programs).
SWEEP = {
    16: [(16, 64, 128, 2, 2), (16, 32, 128, 4, 4)],
    32: [(32, 32, 128, 2, 2), (32, 32, 64, 1, 2), (32, 64, 128, 1, 4)],
    64: [(64, 64, 128, 1, 4), (64, 32, 128, 2, 4), (64, 64, 64, 1, 4)],
    128: [(128, 64, 128, 1, 4), (128, 32, 64, 1, 4), (128, 32, 32, 1, 4), (64, 32, 64, 1, 4)],
}


def _cfg(t):
    bm, bn, bk, sub, nw = t
    return dict(KERNEL="mma", SWAP_AB=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SUB=sub, SPLIT_K=1, MMA_WARPS=nw)


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SUB", "MMA_WARPS", "SPLIT_K")


def _key(cfg: dict) -> tuple:
    return tuple(cfg.get(k) for k in TILE_KEYS)


def pick(records: list[dict]) -> dict:
    """Per bucket: the decode config with the best geometric mean time over its (shape, M) points, and the
    largest M (of those measured) up to which decode beats scaled_mm on every shape with its pick."""
    from flatquant.kernels.gemm.decode import m_bucket

    dec = [r for r in records if r["kind"] == "decode_gemm_m" and r["route"] == "decode" and r["median_ms"]]
    smm = {(r["model"], r["shape"]["in"], r["shape"]["out"], r["shape"]["M"]): r["median_ms"]
           for r in records if r["kind"] == "decode_gemm_m" and r["route"] == "scaled_mm"}
    best: dict[int, tuple] = {}
    for bucket in sorted({m_bucket(r["shape"]["M"]) for r in dec}):
        rows = [r for r in dec if m_bucket(r["shape"]["M"]) == bucket]
        points = {(r["model"], r["shape"]["in"], r["shape"]["out"], r["shape"]["M"]) for r in rows}
        by_cfg: dict[tuple, dict] = {}
        for r in rows:
            by_cfg.setdefault(_key(r["config"]), {})[(r["model"], r["shape"]["in"], r["shape"]["out"],
                                                      r["shape"]["M"])] = r
        full = {c: v for c, v in by_cfg.items() if set(v) == points}  # measured at every point
        if full:
            c, v = min(full.items(), key=lambda kv: sum(math.log(r["median_ms"]) for r in kv[1].values()))
            best[bucket] = (c, v)
    wins_up_to = 0
    for m in sorted({r["shape"]["M"] for r in dec}):
        b = m_bucket(m)
        if b not in best:
            break
        pts = [(p, r) for p, r in best[b][1].items() if p[3] == m]
        if not pts or any(p not in smm or r["median_ms"] >= smm[p] for p, r in pts):
            break
        wins_up_to = m
    return {"small_m_max": max(16, wins_up_to) if wins_up_to else 16, "decode_wins_up_to_m": wins_up_to,
            "mma_m_config": {str(b): {k: c for k, c in next(iter(v[1].values()))["config"].items() if k in TILE_KEYS}
                             for b, v in best.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP tiles of each M bucket")
    ap.add_argument("--rep-ms", type=float, default=30.0)
    args = ap.parse_args()
    from _common import RecordWriter, base_fields, graph_ms, require_cuda, rotation_count

    require_cuda("bench_decode_gemm_m.py")
    from flatquant.kernels.gemm.cublas import scaled_mm_gemm, unpack_int4_codes
    from flatquant.kernels.gemm.decode import m_bucket, resolved_config, w4a4_gemm_decode
    from flatquant.kernels.reference import quantize_weight_reference
    from flatquant.kernels.routes import DEFAULT_ROUTES

    dev = torch.device(DEVICE)
    out = RecordWriter(args.out, {**base_fields(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                                  "timing": "cuda_graph", "rep_ms": args.rep_ms})
    ms = [int(v) for v in args.ms.split(",")]
    time = lambda fns: graph_ms(fns, 10, args.rep_ms)
    print(f"{'model':>11} {'in':>6} {'out':>6} {'M':>4} {'bf16':>8} {'scaled_mm':>9} {'decode':>8} best-decode config")
    for model in args.models.split(","):
        for k, n in MODELS[model]:
            torch.manual_seed(0)
            sets = rotation_count(n * k, cap=8)  # the fp8 weight (one byte per code) over 2x L2
            ws = [torch.randn(n, k, device=dev) / k ** 0.5 for _ in range(sets)]
            qw = [quantize_weight_reference(w, 4) for w in ws]
            w8 = [unpack_int4_codes(q, torch.float8_e4m3fn) for q, _ in qw]
            wb = [w.to(torch.bfloat16) for w in ws]
            del ws
            for m in ms:
                shape = {"in": k, "out": n, "M": m, "bits": 4}
                codes = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
                sa = torch.rand(m, device=dev) + 0.5
                c8 = codes.to(torch.float8_e4m3fn)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                rec = lambda route, t, **kw: out.add(dict(kind="decode_gemm_m", model=model, shape=shape, route=route,
                                                         median_ms=t, **kw))
                t_bf16 = time([lambda w=w: x @ w.t() for w in wb])
                rec("bf16", t_bf16)
                t_smm = time([lambda w=w, q=q: scaled_mm_gemm(c8, sa, w, q[1]) for w, q in zip(w8, qw)])
                rec("scaled_mm", t_smm)
                default = resolved_config(m, n, k // 2, dev)
                cfgs = [default] + ([_cfg(t) for t in SWEEP[m_bucket(m)]] if args.sweep else [])
                res = []
                for cfg in cfgs:
                    try:
                        t = time([lambda q=q: w4a4_gemm_decode(codes, sa, q[0], q[1], None, torch.bfloat16, 4,
                                                               config=cfg) for q in qw])
                    except Exception as e:  # a tile that does not compile (shared memory): recorded, skipped
                        rec("decode", None, config=cfg, default=cfg is default, error=repr(e)[:200])
                        continue
                    full = resolved_config(m, n, k // 2, dev, cfg)
                    full.setdefault("BLOCK_M", m_bucket(m))
                    rec("decode", t, config=full, default=cfg is default, speedup_vs_scaled_mm=t_smm / t,
                        weight_gbps=n * k / 2 / (t * 1e-3) / 1e9)
                    res.append((t, full, cfg is default))
                t_def = next((t for t, _, d in res if d), float("nan"))
                tb, cb, _ = min(res, key=lambda r: r[0]) if res else (float("nan"), {}, False)
                print(f"{model:>11} {k:>6} {n:>6} {m:>4} {t_bf16:8.4f} {t_smm:9.4f} {t_def:8.4f} {tb:8.4f} "
                      f"{_key(cb)}", flush=True)
            del qw, w8, wb
            torch.cuda.empty_cache()
    chosen = pick(out.records)
    out.add(dict(kind="decode_gemm_m_pick", current_small_m_max=DEFAULT_ROUTES.small_m_max, **chosen))
    print("pick:", chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
