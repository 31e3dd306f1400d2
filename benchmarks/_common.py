"""Helpers shared by benchmarks/bench_*.py: CUDA guard, timing, copy bandwidth, JSON records."""
from __future__ import annotations

import json
import math
import sys

import torch


def require_cuda(script: str) -> None:
    """Refuse clearly, in one line, without a CUDA device."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (none found); refusing to run.", file=sys.stderr)
        sys.exit(1)


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)


def rotation_count(bytes_per_set: int, cap: int = 64) -> int:
    """How many input sets to rotate among so that they do not all fit in L2 (at least 2x L2)."""
    return max(1, min(cap, math.ceil(2 * l2_bytes() / max(1, bytes_per_set))))


def bench_ms(fn, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median milliseconds of fn() with CUDA events (triton.testing.do_bench, median)."""
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # older Triton without return_mode
        r = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        return float(r[0] if isinstance(r, (list, tuple)) else r)


class Rotator:
    """Calls fn on input sets in turn, so that repeated timings do not re-read one cached buffer."""

    def __init__(self, sets):
        self.sets = sets
        self.i = 0

    def __call__(self, fn):
        def run():
            s = self.sets[self.i]
            self.i = (self.i + 1) % len(self.sets)
            return fn(*s) if isinstance(s, tuple) else fn(s)
        return run


def copy_bandwidth_gbps(nbytes: int = 2 * 2 ** 30) -> tuple[float, float]:
    """Measured device-to-device copy bandwidth: (bytes read + written) / median time, in GB/s."""
    n = nbytes // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup_ms=20, rep_ms=100)
    return 2 * n * 2 / (ms * 1e-3) / 1e9, ms


class RecordWriter:
    """Keeps the records list and rewrites the JSON file (atomically) after every record, so partial
    results survive a timeout."""

    def __init__(self, path, base: dict):
        self.path = path
        self.base = base
        self.records: list[dict] = []

    def add(self, rec: dict) -> dict:
        from flatquant.results import atomic_write_text

        full = {**rec, **self.base}
        self.records.append(full)
        if self.path:
            atomic_write_text(self.path, json.dumps(self.records, indent=1) + "\n")
        return full


def base_fields() -> dict:
    from flatquant.results import provenance

    prov = provenance("cuda")
    try:
        import triton

        prov["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        prov["triton"] = None
    return prov


def graph_ms(fns, warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median ms per call of the callables `fns` replayed from one CUDA graph (no Python/launch cost:
    how decode runs in a serving loop). All of fns are captured in sequence (e.g. rotated input sets
    or layer copies, so that a weight does not stay in L2); the time is divided by len(fns)."""
    for f in fns:  # compile / autotune outside the capture
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # captures on its own side stream
        for f in fns:
            f()
    torch.cuda.synchronize()
    return bench_ms(g.replay, warmup_ms, rep_ms) / len(fns)


def time_pieces(pieces, writer, eager: bool = False, only: str | None = None) -> None:
    """The probes' loop: each (name, shape, fn) replayed 8 times from one CUDA graph, recorded as a
    baseline-free record and printed; `eager` only runs each fn 3 times (for a profiler), `only` (a
    regex) keeps the matching names. A piece that fails (e.g. does not compile) is reported and skipped."""
    import re

    for name, shape, fn in pieces:
        if only and not re.search(only, name):
            continue
        if eager:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            continue
        try:
            ms = graph_ms([fn] * 8)
        except Exception as exc:  # one broken variant must not stop the probe
            print(f"{name} {shape}: failed: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        writer.add({"kernel": name, "shape": shape, "median_ms": ms, "baseline": None, "baseline_median_ms": None,
                    "speedup": None, "timing": "cuda_graph", "achieved_gbps": None})
        print(f"{name} {shape}: {ms * 1e3:.2f} us", flush=True)
