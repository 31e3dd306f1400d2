#!/usr/bin/env python
"""Compile the fused transform kernels for sm_90 on this machine (no GPU needed) and print what they use.

For each case: shared memory, registers per thread, stack frame (spills), wgmma in the TTGIR / PTX, HGMMA
and HMMA in the SASS, local loads/stores. It answers "do these tiles fit twice on an SM", "did the dots
become wgmma", "does this variant spill" before any device time is spent. Triton's wheel carries ptxas and
cuobjdump, so this runs wherever Triton is installed.

    python scripts/sm90_resources.py                    # block vs chunked kernel at the prefill sizes
    python scripts/sm90_resources.py --dump /tmp/k      # also write each case's TTGIR and SASS there
    python scripts/sm90_resources.py --gemm             # the TMA GEMM in each config of bench_tma_gemm.py
    python scripts/sm90_resources.py --gemm --out results/kernels/sm90_resources_gemm.json   # also as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU even on a machine without one
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flatquant.kernels._triton_utils import next_pow2
from flatquant.kernels.reference import kron_factors
from flatquant.kernels.transform import block as ftq
from flatquant.kernels.transform import chunked as fc

SIGNATURE = {"x_ptr": "*bf16", "p1_ptr": "*bf16", "p2_ptr": "*bf16", "out_ptr": "*u8", "scale_ptr": "*fp32",
             "M": "i32", "stride_x": "i32", "stride_o": "i32", "alpha": "fp32", "NITER": "i32"}
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# Arguments a launch specializes as multiples of 16 (pointers 16-byte aligned; row strides n and n / 2 of the
# model sizes; M = batch x 2048 at prefill), as Triton's JIT does: without these hints the loads are not
# vectorized, and Triton's pipeliner then leaves them synchronous, so the report would not be that of the
# kernel that runs.
DIVISIBLE_BY_16 = ("x_ptr", "p1_ptr", "p2_ptr", "out_ptr", "scale_ptr", "M", "stride_x", "stride_o")


def compile_sm90(fn, consts: dict, signature: dict = SIGNATURE, divisible=DIVISIBLE_BY_16, **options):
    """triton.compile for compute capability 9.0, with `consts` as constexprs."""
    sig = {**signature, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def resources(kernel) -> dict:
    """What a compiled kernel uses, read off its metadata, TTGIR, PTX and SASS (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {"shared": kernel.metadata.shared, "regs": int(re.findall(r"REG:(\d+)", usage)[0]),
            "stack": int(re.findall(r"STACK:(\d+)", usage)[0]),
            "wgmma_ttgir": kernel.asm["ttgir"].count("warp_group_dot "),
            "async_copy": kernel.asm["ttgir"].count("async_copy_global_to_local"),
            "GMMA": len(re.findall(r"[HIQ]GMMA", sass)), "HMMA": sass.count("HMMA"), "LDL": sass.count("LDL"),
            "STL": sass.count("STL"), "sass": sass}


def cases():
    """(name, kernel, constexprs, options) for the block and chunked kernels at the prefill sizes."""
    for n in (4096, 5120, 8192, 11008, 13824, 14336):
        n1, n2 = kron_factors(n)
        n1p, n2p = next_pow2(n1), next_pow2(n2)
        common = dict(NITER_C=1, N1=n1, N2=n2, N2P=n2p, H=n1 // 2, HP=next_pow2(n1 // 2), HAS_P2=True, PACK=True,
                      IS_F32=False, MAXQ=7, DT=tl.bfloat16, INTERP=False)
        cfg = ftq.block_config(n1p, n2p)
        yield (f"block   n={n}", ftq._fused_block_kernel,
               {**common, "N1P": n1p, "BT": cfg["BT"], "TRIGGER": 1, "PREFETCH": False},
               dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        yield (f"block   n={n} prefetch", ftq._fused_block_kernel,
               {**common, "N1P": n1p, "BT": cfg["BT"], "TRIGGER": 1, "PREFETCH": True},
               dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        if fc.chunked_supported(n1, n2, True):
            c0, c1, c2 = fc.n1_chunks(n1)
            k0, k1 = fc.n2_chunks(n2)
            for pf in (True, False):
                yield (f"chunked n={n} prefetch={pf}", fc._fused_chunked_kernel,
                       {**common, "N2P": fc.rows_padded(n2), "C0": c0, "C1": c1, "C2": c2, "K0": k0, "K1": k1,
                        "PREFETCH": pf},
                       dict(num_warps=fc.CHUNKED_WARPS, num_stages=fc.CHUNKED_STAGES))


def gemm_cases():
    """The TMA GEMM (gemm/tma.py) in each config of benchmarks/kernels/bench_tma_gemm.py, bf16 output."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "kernels"))
    from bench_tma_gemm import SWEEP

    from flatquant.kernels.gemm import tma as tg

    for name, fmt, cfg in SWEEP:
        ty = "i8" if fmt == "int8" else "fp8e4nv"
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        store = bool(cfg.get("tma_store"))
        sig = {"a_desc": f"tensordesc<{ty}[{bm}, {bk}]>", "w_desc": f"tensordesc<{ty}[{bn}, {bk}]>",
               "c_desc": f"tensordesc<bf16[{bm}, {bn}]>" if store else f"tensordesc<{ty}[{bm}, {bk}]>",
               "sa_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16", "M": "i32", "N": "i32",
               "K": "i32", "stride_cm": "i32", "num_tiles": "i32", "num_programs": "i32", "tiles_per_program": "i32"}
        consts = dict(HAS_BIAS=False, FP8=fmt == "fp8", IMPRECISE_K=cfg.get("imprecise_k", 128),
                      FLATTEN=bool(cfg.get("flatten")), TMA_STORE=store, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=cfg["GROUP_M"], INTERP=False, TPP_C=1, KT_C=1)
        yield (f"tma_gemm {name}", tg._tma_gemm_kernel, consts,
               dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], signature=sig,
                    divisible=("sa_ptr", "sw_ptr", "bias_ptr", "c_ptr", "M", "N", "K", "stride_cm")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default=None, help="folder for each case's TTGIR and SASS")
    ap.add_argument("--gemm", action="store_true", help="the TMA GEMM's sweep configs instead of the transforms")
    ap.add_argument("--out", default=None, help="also write the table as a JSON list of records (with provenance)")
    args = ap.parse_args()
    records = []
    print(f"{'case':44} {'smem KB':>8} {'regs':>5} {'stack':>6} {'wgmma':>6} {'cp.async':>8} {'xGMMA':>6} {'HMMA':>5} "
          f"{'LDL/STL':>8}")
    for name, fn, consts, opts in (gemm_cases() if args.gemm else cases()):
        k = compile_sm90(fn, consts, **opts)
        r = resources(k)
        print(f"{name:44} {r['shared'] / 1024:>8.0f} {r['regs']:>5} {r['stack']:>6} {r['wgmma_ttgir']:>6} "
              f"{r['async_copy']:>8} {r['GMMA']:>6} {r['HMMA']:>5} {r['LDL']:>4}/{r['STL']}")
        records.append(_record(name, r))
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, re.sub(r"[^\w=]+", "_", name))
            with open(stem + ".ttgir", "w") as f:
                f.write(k.asm["ttgir"])
            with open(stem + ".sass", "w") as f:
                f.write(r["sass"])
    if args.out:
        from flatquant.results import atomic_write_text

        atomic_write_text(args.out, json.dumps(records, indent=1) + "\n")
        print(f"wrote {len(records)} records to {args.out}")
    return 0


def _record(name: str, r: dict) -> dict:
    """One case as a results record: compile facts, no timing (no baseline: listed, not compared)."""
    from flatquant.results import provenance

    prov = provenance("cpu")
    prov["device"] = f"offline compile for sm_90 (Triton {triton.__version__}'s ptxas; no GPU)"
    return {"kernel": f"sm90_compile: {name}", "shape": None, "median_ms": None, "baseline": None,
            "baseline_median_ms": None, "speedup": None, "achieved_gbps": None, "shared_kb": round(r["shared"] / 1024),
            "registers": r["regs"], "stack_bytes": r["stack"], "wgmma_ops_sass": r["GMMA"], "local_loads": r["LDL"],
            "local_stores": r["STL"], **prov}


if __name__ == "__main__":
    sys.exit(main())
