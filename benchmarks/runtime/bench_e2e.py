"""End-to-end speed and memory of whole models on one GPU (issue 24; the paper's Fig. 4, 9, 10, Tables 20-22).

Random-weight models of real shapes (flatquant.runtime.synthetic: Llama-2-7B, Llama-3-8B), one row at a time,
all run by the same static decoder (flatquant.runtime.static: static KV cache, CUDA-graph decode step, the
same attention code where the format allows):
  bf16 | fp8 (W8A8, per-token / per-channel, BF16 KV) | fp8_kv8 (the same with an FP8 KV cache) |
  int4 (W4A4KV4, no transforms) | quarot (W4A4KV4, QuaRot's online rotations only) | flatquant (W4A4KV4) |
  <row>_fused (every fused norm / SiLU -> transform -> quantize prologue on; the plain rows run the
  runtime's default, flatquant.kernels.fused_norm.DEFAULT: no W4 SiLU prologue) |
  hf_bf16 (Hugging Face `generate` in BF16, dynamic cache: a reference row only, its own decode loop).
Phases:
  decode    one decode step (all layers + lm_head) at KV length --kv-len, captured in a CUDA graph, median of
            replays; the cache holds random contents of that length (values do not change speed); floor =
            bytes the step must read (weights as its GEMM route reads them + KV) / measured copy bandwidth;
  prefill   --seqlen tokens per sequence into an empty cache (eager), last-token logits, median of runs;
  layer_mem one decoder layer's decode memory at batch 1 (Table 20): its tensor bytes + the measured peak of
            its KV cache and activations, KV lengths --layer-kv;
  max_batch (computed, after decode) the largest batch at each --max-batch-kv length that fits the free GPU
            memory, from the measured bytes per sequence (KV + the largest decode case's activations) and the
            weights;
  prefill_long  prefill of each --long-prefill length at batch 1;
  decode_long   one decode step at each --long-kv length at batch --long-batch (CUDA graph);
  components    at each --components point (decode:B at --kv-len, prefill:B at --seqlen), eager steps under
            torch.profiler: GPU kernel time per step in norm/SiLU/transform/quantize, GEMMs, attention (incl.
            KV quantization) and other kernels, plus host gaps (eager wall time - kernel time) and the top
            kernels by name, so a missed target can be traced to a component.
Records ("kind": "e2e") go to --out, a JSON list rewritten after every record (a cut-short run keeps its
rows). A case that does not fit is recorded with "oom": true. --max-seconds: no new case after that.

GPU (one H100; the default run is cut by --max-seconds, --quick about 2 minutes):
  PYTHONPATH=$PWD timeout 420 python benchmarks/runtime/bench_e2e.py --out $OUT/e2e.json
CPU pipeline check on a tiny shape with the reference kernels (a test runs it):
  python benchmarks/runtime/bench_e2e.py --smoke --out /tmp/e2e.json
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (_common)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from _common import RecordWriter, base_fields, copy_bandwidth_gbps

from flatquant.kernels.linear import CODE_FORMAT, W4A4Linear
from flatquant.kernels.routes import DEFAULT_ROUTES
from flatquant.runtime import fp8, fused_ops, synthetic

GIB = 2 ** 30
DEFAULT = dict(shapes="llama2-7b,llama3-8b", rows="bf16,flatquant,flatquant_fused,fp8,fp8_kv8,int4,quarot,hf_bf16",
               phases="decode,prefill,layer_mem,prefill_long,decode_long,components",
               decode_batches="1,8,32,64,128", prefill_batches="1,4,16,64", layer_kv="256,512,1024,2048",
               long_prefill="4096,8192,16384", long_kv="8192,16384,32768", long_batch=16, max_batch_kv="2048,8192",
               components="decode:32,prefill:4", hf_batches="1", hf_new_tokens=32)
QUICK = dict(shapes="llama2-7b", decode_batches="1,32", prefill_batches="4", layer_kv="2048",
             phases="decode,prefill,layer_mem")
SMOKE = dict(shapes="tiny", decode_batches="1,2", prefill_batches="2",
             layer_kv="16", long_prefill="24", long_kv="24", long_batch=2, max_batch_kv="16,32",
             components="decode:2,prefill:2", hf_new_tokens=8)
HF_ROW = "hf_bf16"
PHASES = ("decode", "prefill", "layer_mem", "max_batch", "prefill_long", "decode_long", "components")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file (a list of records, rewritten after each one)")
    p.add_argument("--shapes")
    p.add_argument("--rows")
    p.add_argument("--phases")
    p.add_argument("--batches", help="decode and prefill batches (overrides both lists)")
    p.add_argument("--decode-batches")
    p.add_argument("--prefill-batches")
    p.add_argument("--layer-kv", help="KV lengths of the one-layer memory phase")
    p.add_argument("--long-prefill", help="prefill lengths of the prefill_long phase (batch 1)")
    p.add_argument("--long-kv", help="KV lengths of the decode_long phase")
    p.add_argument("--long-batch", type=int, help="batch of the decode_long phase (default 16)")
    p.add_argument("--max-batch-kv", help="KV lengths the max_batch computation reports")
    p.add_argument("--components", help="points of the components phase, e.g. decode:32,prefill:4")
    p.add_argument("--hf-batches", help="batches of the hf_bf16 row (prefill --seqlen, then decode)")
    p.add_argument("--hf-new-tokens", type=int, help="tokens the hf_bf16 row generates per timed run (default 32)")
    p.add_argument("--seqlen", type=int, help="prefill tokens per sequence (default 2048)")
    p.add_argument("--kv-len", type=int, help="KV length of the decode step (default 2048)")
    p.add_argument("--quick", action="store_true", help="a ~2 minute subset (Llama-2-7B shape, fewer batches)")
    p.add_argument("--smoke", action="store_true", help="the whole pipeline on the CPU, tiny shape, reference kernels")
    p.add_argument("--max-seconds", type=float, default=300.0, help="start no new case after this many seconds")
    p.add_argument("--w4-large-route", default="scaled_mm", choices=("scaled_mm", "int8", "fp8", "auto"),
                   help="W4A4 GEMM route at decode batches above the decode GEMM's small_m_max (scaled_mm: auto's choice)")
    p.add_argument("--no-graph", action="store_true", help="time decode eagerly (no CUDA graph)")
    p.add_argument("--prologue-max-tokens", type=int, default=None,
                   help="*_fused rows: fuse the prologues only for calls of at most this many tokens")
    a = p.parse_args(argv)
    preset = {**DEFAULT, **(SMOKE if a.smoke else QUICK if a.quick else {})}
    if a.smoke:
        preset["rows"] = ",".join(synthetic.ROWS + (HF_ROW,))
    for key, val in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    if a.batches:
        a.decode_batches = a.prefill_batches = a.batches
    a.seqlen = a.seqlen or (16 if a.smoke else 2048)
    a.kv_len = a.kv_len or (16 if a.smoke else 2048)
    split = lambda s, f=str: [f(x) for x in s.split(",") if x]
    a.shapes, a.rows, a.phases = split(a.shapes), split(a.rows), split(a.phases)
    a.decode_batches, a.prefill_batches, a.layer_kv = (split(a.decode_batches, int), split(a.prefill_batches, int),
                                                       split(a.layer_kv, int))
    a.long_prefill, a.long_kv, a.max_batch_kv = split(a.long_prefill, int), split(a.long_kv, int), split(a.max_batch_kv, int)
    a.hf_batches = split(a.hf_batches, int)
    for s in a.shapes:
        synthetic.shape_of(s)
    bad = [r for r in a.rows if r not in synthetic.ROWS + (HF_ROW,)] + [x for x in a.phases if x not in PHASES]
    try:
        a.components = [(p, int(b)) for p, b in (c.split(":") for c in split(a.components))]
    except ValueError:
        bad.append(a.components)
    bad += [f"{p}:{b}" for p, b in (a.components if isinstance(a.components, list) else [])
            if p not in ("decode", "prefill")]
    if bad:
        raise SystemExit(f"bench_e2e: unknown row or phase {bad[0]!r}")
    return a


COMPONENTS = ("norm_transform_quant", "gemm", "attention", "other")
_NTQ = ("_prologue_quant", "_fused_split", "_fused_block", "_fused_chunked", "_fused_onchip", "_fused_tiled",
        "rmsnorm", "silu", "_quant_kernel")
_ATT = ("_split_kernel", "_combine_kernel", "_quantize_kv", "_write_kernel", "flash", "fmha", "attention", "sdpa",
        "softmax", "efficient")
_GEMM = ("gemm", "gemv", "_decode_kernel", "_fused_decode", "_unpack_kernel", "_scale_epilogue", "xmma", "cutlass",
         "cublas", "sm90", "sm80", "matmul", "splitk", "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")


def classify_kernel(name: str, cuda: bool = True) -> str:
    """The component a kernel (or, on the CPU, an op) belongs to, by its name (first match: norm/SiLU/
    transform/quantize, attention (with KV quantization), GEMM (the one-launch decode kernel included),
    else other)."""
    low = name.lower()
    for comp, keys in (("norm_transform_quant", _NTQ), ("attention", _ATT), ("gemm", _GEMM)):
        if any(k in low for k in keys):
            return comp
    return "other"


class Bench:
    def __init__(self, args):
        self.a = args
        self.cuda = not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.t0 = time.time()
        if self.cuda:
            base = base_fields()
        else:
            from flatquant.results import provenance

            base = provenance("cpu")
        self.w = RecordWriter(args.out, base)
        self.copy_gbps = None
        self.usable = None
        self.fused = True

    def out_of_time(self) -> bool:
        return time.time() - self.t0 > self.a.max_seconds

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- checks -----------------------------------------------------------------------------------
    def setup(self):
        if not self.cuda:
            return
        self.free()
        self.usable = torch.cuda.mem_get_info()[0]
        self.copy_gbps, ms = copy_bandwidth_gbps()
        err = lambda exc: f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        try:
            bad = fused_ops.self_check(self.device)
        except Exception as exc:  # a kernel that does not build: the decoder uses the PyTorch ops
            bad = err(exc)
        self.fused = bad is None
        from flatquant.kernels import fused_norm

        try:
            pbad = fused_norm.self_check(self.device)
        except Exception as exc:  # the *_fused rows' cases will record their own errors
            pbad = err(exc)
        rec = {"kind": "e2e", "phase": "setup", "copy_gbps": self.copy_gbps, "copy_ms": ms,
               "usable_bytes": self.usable, "fused_ops": self.fused, "fused_ops_error": bad,
               "fused_prologue_ok": pbad is None, "fused_prologue_error": pbad}
        try:
            x = torch.randn(64, 4096, device="cuda").bfloat16() * 3
            q, s = fp8.quantize_fp8(x)
            qr, sr = fp8.quantize_fp8_reference(x, 16)
            lin = fp8.Fp8Linear.from_float(torch.randn(256, 4096, device="cuda") * 0.02)
            y = lin(x[:8])
            ref = x[:8].float() @ (lin.weight.float() * lin.weight_scale.t()).t()
            rec.update({"fp8_quant_mismatch": float((q.view(torch.uint8) != qr.view(torch.uint8)).float().mean()),
                        "fp8_scale_equal": bool(torch.equal(s, sr)),
                        "fp8_linear_rel_err": float((y.float() - ref).abs().max() / ref.abs().max()),
                        "fp8_fast_accum": fp8.Fp8Linear.fast_accum_ok})
        except Exception as exc:  # the fp8 row's cases will record their own errors
            rec["fp8_error"] = err(exc)
        try:  # the KV4 write kernel (used only where bit-equal) and the FP8-KV decode attention
            from flatquant.kernels import fp8_attention, kv4_write

            rec["kv4_write_exact"] = kv4_write.gpu_ok(self.device)
            k, v = (torch.randn(4, 8, 2048, 128, device="cuda").to(torch.float8_e4m3fn) for _ in range(2))
            q, n = torch.randn(4, 32, 128, device="cuda").bfloat16(), torch.tensor([2048, 1, 700, 1500], device="cuda")
            a = fp8_attention.decode_attention(q, k, v, n).float()
            r = fp8_attention.decode_attention_reference(q, k, v, n).float()
            rec["fp8_attention_rel_err"] = float((a - r).abs().max() / r.abs().max())
        except Exception as exc:
            rec["kv_kernels_error"] = err(exc)
        self.w.add(rec)
        print(f"copy {self.copy_gbps:.0f} GB/s, usable {self.usable / GIB:.1f} GiB, fused ops {self.fused}, "
              f"fused prologues {pbad or 'ok'}, "
              f"fp8 check {({k: v for k, v in rec.items() if k.startswith('fp8')})}", flush=True)

    # ---- accounting -------------------------------------------------------------------------------
    @staticmethod
    def w4_linears(dec):
        return [m for lay in dec.layers for m in (lay.qkv, lay.o, lay.gate_up, lay.down) if isinstance(m, W4A4Linear)]

    def cast_bytes(self, dec) -> int:
        return sum(t.numel() * t.element_size() for m in self.w4_linears(dec) for t in m._cast_cache.values()
                   if isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype in (torch.int8, torch.float8_e4m3fn))

    def step_read_bytes(self, dec, batch: int) -> int:
        """Bytes one decode step must read besides the KV cache: every linear's weight as its route reads it."""
        n = dec.lm_head.numel() * dec.lm_head.element_size()
        for lay in dec.layers:
            for m in (lay.qkv, lay.o, lay.gate_up, lay.down):
                if isinstance(m, W4A4Linear):
                    route = m.gemm_route_for(batch, torch.bfloat16, self.device)
                    codes = m.out_features * m.in_features  # one byte per code on the cuBLAS routes, else packed
                    n += codes if route in CODE_FORMAT else codes // 2
                    n += m.weight_scale.numel() * 4 + sum(p.numel() * 4 for p in (m.p1, m.p2) if p is not None)
                else:
                    n += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        return n

    def set_routes(self, dec, batch: int, decode: bool = True):
        small = batch <= DEFAULT_ROUTES.small_m_max  # the decode GEMM's range: the default route picks it
        route = None if small or not decode or self.a.w4_large_route == "auto" else self.a.w4_large_route
        for m in self.w4_linears(dec):
            m.gemm_route = route

    # ---- timing -----------------------------------------------------------------------------------
    def _events(self, fn, n: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
            return out
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for e0, e1 in ev:
            e0.record()
            fn()
            e1.record()
        torch.cuda.synchronize()
        return [e0.elapsed_time(e1) for e0, e1 in ev]

    def time_decode(self, dec, cache, ids) -> dict:
        step = lambda: dec.decode_step(ids, cache, advance=False)
        if not self.cuda or self.a.no_graph:
            step()
            self.sync()
            est = statistics.median(self._events(step, 2))
            n = 2 if self.a.smoke else max(3, min(30, int(300 / max(est, 1e-3))))
            return {"times": self._events(step, n), "timing": "eager"}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        eager = eager.clone()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = step()
        except RuntimeError as exc:  # not capturable: time the eager step instead, and say so
            torch.cuda.synchronize()
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"graph capture failed ({msg}); timing eagerly", flush=True)
            return {"times": self._events(step, 10), "timing": "eager", "graph_error": msg}
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        match = bool(torch.equal(out, eager))
        close = float((out.float() - eager.float()).abs().max() / eager.float().abs().max().clamp_min(1e-6))
        est = statistics.median(self._events(g.replay, 3))
        n = max(10, min(200, int(600 / max(est, 1e-3))))
        times = self._events(g.replay, n)
        del g
        return {"times": times, "timing": "cuda_graph", "graph_matches_eager": match, "graph_vs_eager_rel": close}

    # ---- cases ------------------------------------------------------------------------------------
    def record(self, shape, row, phase, batch, seqlen, kv_len, **kw):
        rec = {"kind": "e2e", "model_shape": shape, "row": row, "phase": phase, "batch": batch, "seqlen": seqlen,
               "kv_len": kv_len, "median_ms": None, "tokens_per_s": None, "peak_mem_gib": None, "oom": False,
               "copy_gbps": self.copy_gbps, "fused_ops": self.fused and self.cuda,
               "prologue_max_tokens": self.a.prologue_max_tokens if row.endswith("_fused") else None, **kw}
        full = self.w.add(rec)
        ms = full.get("median_ms")
        print(f"{shape} {row:9s} {phase:8s} b={batch} s={seqlen} kv={kv_len}: "
              + ("OOM" if full["oom"] else f"{ms:.3f} ms" if ms is not None else
                 f"{full.get('error') or ''}{full.get('peak_mem_gib') or ''}")
              + (f" floor x{full['floor_ratio']:.2f}" if full.get("floor_ratio") else ""), flush=True)
        return full

    def guarded(self, fn, shape, row, phase, batch, seqlen, kv_len):
        try:
            return fn()
        except torch.OutOfMemoryError:
            self.free()
            return self.record(shape, row, phase, batch, seqlen, kv_len, oom=True)
        except Exception as exc:  # one failing case must not stop the run
            self.free()
            return self.record(shape, row, phase, batch, seqlen, kv_len,
                               error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")

    def peak_reset(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def decode_case(self, dec, shape, row, batch, kv=None, phase="decode"):
        kv = kv or self.a.kv_len
        self.set_routes(dec, batch)
        self.peak_reset()
        cache = dec.new_cache(batch, kv + 1)
        cache.fill_random(kv)
        ids = torch.randint(0, dec.embed.shape[0], (batch, 1), device=self.device)
        t = self.time_decode(dec, cache, ids)
        ms = statistics.median(t.pop("times"))
        kv_read = cache.bytes_per_token() * batch * (kv + 1)
        floor_bytes = self.step_read_bytes(dec, batch) + kv_read
        floor_ms = floor_bytes / (self.copy_gbps * 1e9) * 1e3 if self.copy_gbps else None
        rec = self.record(shape, row, phase, batch, 1, kv, median_ms=ms, tokens_per_s=batch / ms * 1e3,
                          peak_mem_gib=self.peak_gib(), weights_bytes=dec.weight_bytes(),
                          cast_cache_bytes=self.cast_bytes(dec), kv_cache_bytes=cache.nbytes(),
                          kv_bytes_per_token=cache.bytes_per_token(), floor_bytes=floor_bytes, floor_ms=floor_ms,
                          floor_ratio=ms / floor_ms if floor_ms else None, w4_route=self.route_name(dec, batch), **t)
        del cache
        self.free()
        return rec

    def route_name(self, dec, batch):
        lins = self.w4_linears(dec)
        return lins[0].gemm_route_for(batch, torch.bfloat16, self.device) if lins else None

    def prefill_case(self, dec, shape, row, batch, seqlen=None, phase="prefill"):
        s = seqlen or self.a.seqlen
        self.set_routes(dec, batch * s, decode=False)
        self.peak_reset()
        cache = dec.new_cache(batch, s)
        ids = torch.randint(0, dec.embed.shape[0], (batch, s), device=self.device)

        def run():
            cache.set_length(0)
            dec.prefill(ids, cache)
        run()
        self.sync()
        est = statistics.median(self._events(run, 1))
        n = 1 if self.a.smoke else max(2, min(10, int(1500 / max(est, 1e-3))))
        times = []
        for _ in range(n):
            cache.set_length(0)
            times += self._events(lambda: dec.prefill(ids, cache), 1)
        ms = statistics.median(times)
        rec = self.record(shape, row, phase, batch, s, 0, median_ms=ms, tokens_per_s=batch * s / ms * 1e3,
                          peak_mem_gib=self.peak_gib(), weights_bytes=dec.weight_bytes(),
                          cast_cache_bytes=self.cast_bytes(dec), kv_cache_bytes=cache.nbytes(), n_timed=n,
                          timing="eager", w4_route=self.route_name(dec, batch * s))
        del cache
        self.free()
        return rec

    def layer_mem_case(self, dec, shape, row, kv):
        self.set_routes(dec, 1)
        h = torch.randn(1, 1, dec.embed.shape[1], device=self.device).to(dec.embed.dtype)
        dec.decode_layers(h, dec.new_cache(1, kv + 1, n_layers=1), 1)  # compile / cast caches outside the peak
        self.free()
        self.peak_reset()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        cache = dec.new_cache(1, kv + 1, n_layers=1)
        cache.fill_random(kv)
        dec.decode_layers(h, cache, 1)
        self.sync()
        dyn = (torch.cuda.max_memory_allocated() - base) if self.cuda else cache.nbytes()
        lb = dec.layer_bytes(0)
        rec = self.record(shape, row, "layer_mem", 1, 1, kv, peak_mem_gib=(lb + dyn) / GIB, layer_weight_bytes=lb,
                          kv_cache_bytes=cache.nbytes(), dynamic_peak_bytes=dyn,
                          computed="layer tensor bytes + measured peak of its KV cache and activations")
        del cache
        self.free()
        return rec

    def max_batch(self, dec, shape, row, decodes):
        ok = [r for r in decodes if r and r.get("median_ms") is not None and r.get("peak_mem_gib")]
        if not ok or not self.usable:
            return
        r = max(ok, key=lambda r: r["batch"])
        act = max(0.0, r["peak_mem_gib"] * GIB - r["weights_bytes"] - r["cast_cache_bytes"] - r["kv_cache_bytes"])
        for kv in sorted(set(self.a.max_batch_kv) | {self.a.kv_len}):
            per_seq_kv = r["kv_bytes_per_token"] * (kv + 1)
            per_seq = per_seq_kv + act / r["batch"]  # activations per sequence as measured at --kv-len
            fit = int((self.usable - r["weights_bytes"] - r["cast_cache_bytes"]) // per_seq)
            fit_packed = int((self.usable - r["weights_bytes"]) // per_seq)
            self.record(shape, row, "max_batch", fit, 1, kv, computed=True, from_batch=r["batch"],
                        from_kv_len=self.a.kv_len, per_seq_bytes=per_seq, per_seq_kv_bytes=per_seq_kv,
                        usable_bytes=self.usable, max_batch_without_cast_cache=fit_packed,
                        weights_bytes=r["weights_bytes"], cast_cache_bytes=r["cast_cache_bytes"])

    # ---- per-component time ----------------------------------------------------------------------
    def components_case(self, dec, shape, row, phase, batch):
        """Eager steps under torch.profiler: kernel time per step by component (`classify_kernel`)."""
        from torch.profiler import ProfilerActivity, profile

        long = phase == "prefill"
        s, kv = (self.a.seqlen, 0) if long else (1, self.a.kv_len)
        self.set_routes(dec, batch * s, decode=not long)
        cache = dec.new_cache(batch, s if long else kv + 1)
        ids = torch.randint(0, dec.embed.shape[0], (batch, s), device=self.device)
        if long:
            def fn():
                cache.set_length(0)
                dec.prefill(ids, cache)
        else:
            cache.fill_random(kv)
            fn = lambda: dec.decode_step(ids, cache, advance=False)
        fn()
        self.sync()
        n = 2 if self.a.smoke or long else 5
        wall = statistics.median(self._events(fn, n))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            self.sync()
        per, source = {}, "CUDA kernels (torch.profiler)" if self.cuda else "CPU ops (torch.profiler)"
        for e in prof.key_averages():
            if self.cuda:
                if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                    continue
                us = getattr(e, "self_device_time_total", 0)
            else:
                us = e.self_cpu_time_total
            if us > 0:
                per[e.key] = per.get(e.key, 0.0) + us / 1e3 / n
        if self.cuda and not per:  # no kernel-level events in this build: ops' own device time instead
            source = "ops' self device time (torch.profiler)"
            for e in prof.key_averages():
                if getattr(e, "self_device_time_total", 0) > 0:
                    per[e.key] = per.get(e.key, 0.0) + e.self_device_time_total / 1e3 / n
        comp = {c: 0.0 for c in COMPONENTS}
        for name, ms in per.items():
            comp[classify_kernel(name, self.cuda)] += ms
        total = sum(per.values())
        top = sorted(per.items(), key=lambda kv_: -kv_[1])[:20]
        rec = self.record(shape, row, "components", batch, s, kv, median_ms=wall, of_phase=phase, timing="eager",
                          component_ms=comp, kernel_ms_total=total, host_gap_ms=max(0.0, wall - total) if self.cuda
                          else None, top_kernels=[[k, ms, classify_kernel(k, self.cuda)] for k, ms in top],
                          time_source=source)
        return rec  # (the cache is freed on return; the next case's free() releases it)

    # ---- the Hugging Face generate reference row -------------------------------------------------
    def hf_row(self, shape):
        """Hugging Face `generate` (BF16, its default dynamic cache, greedy, no early stop): prefill = a run
        with one new token; decode ms per step = (run with --hf-new-tokens - that run) / (tokens - 1)."""
        from transformers import LlamaForCausalLM

        a, sh = self.a, synthetic.shape_of(shape)
        n_new = max(2, a.hf_new_tokens)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        t = time.time()
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM._from_config(synthetic.hf_config(sh, sh["layers"], a.seqlen + n_new + 1),
                                                  dtype=dtype).eval()
        self.sync()
        print(f"built {shape} {HF_ROW} in {time.time() - t:.1f} s", flush=True)
        for b in a.hf_batches:
            if self.out_of_time():
                break
            self.guarded(lambda b=b: self._hf_case(model, shape, b, n_new), shape, HF_ROW, "decode", b, 1, a.seqlen)
        model = None  # (dropped before the next row is built)
        self.free()

    def _hf_case(self, model, shape, b, n_new):
        """One batch of the hf_bf16 row: a prefill record and a decode record."""
        a, sh = self.a, synthetic.shape_of(shape)
        ids = torch.randint(0, sh["vocab"], (b, a.seqlen), device=self.device)
        gen = lambda k: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                       min_new_tokens=k, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            gen(2)
            self.peak_reset()
            runs = 2 if a.smoke else 3
            pre = statistics.median(self._events(lambda: gen(1), runs))
            full = statistics.median(self._events(lambda: gen(n_new), runs))
        step = (full - pre) / (n_new - 1) if full > pre else None  # None: below the timing noise
        common = dict(peak_mem_gib=self.peak_gib(), reference_only=True, timing="eager (generate)",
                      generate_ms=full, new_tokens=n_new, weights_bytes=sum(
                          p.numel() * p.element_size() for p in model.parameters()))
        self.record(shape, HF_ROW, "prefill", b, a.seqlen, 0, median_ms=pre,
                    tokens_per_s=b * a.seqlen / pre * 1e3, **common)
        return self.record(shape, HF_ROW, "decode", b, 1, a.seqlen, median_ms=step,
                           note=None if step else "generate time per step below the timing noise",
                           tokens_per_s=b / step * 1e3 if step else None, **common)

    # ---- driver -----------------------------------------------------------------------------------
    def run_row(self, shape, row):
        a = self.a
        if row == HF_ROW:
            return self.hf_row(shape)
        cap = max([a.seqlen, a.kv_len + 1, max(a.layer_kv) + 1]
                  + ([max(a.long_prefill)] if "prefill_long" in a.phases and a.long_prefill else [])
                  + ([max(a.long_kv) + 1] if "decode_long" in a.phases and a.long_kv else []))
        t = time.time()
        dec = synthetic.build(shape, row, self.device, torch.bfloat16, fused=self.fused, cap=cap)
        if row.endswith("_fused") and a.prologue_max_tokens is not None:
            from dataclasses import replace

            dec.prologue = replace(dec.prologue, max_tokens=a.prologue_max_tokens)
        self.sync()
        print(f"built {shape} {row} in {time.time() - t:.1f} s ({dec.weight_bytes() / GIB:.2f} GiB)", flush=True)
        jobs = []  # the targets' cases first (decode b=32, prefill b=4), then the rest, then Table 20
        if "decode" in a.phases:
            jobs += [("decode", b) for b in a.decode_batches]
        if "prefill" in a.phases:
            jobs += [("prefill", b) for b in a.prefill_batches]
        jobs.sort(key=lambda j: (j not in (("decode", 32), ("prefill", 4)),))
        if "layer_mem" in a.phases:
            jobs += [("layer_mem", kv) for kv in a.layer_kv]
        if "components" in a.phases:
            jobs += [("components", pb) for pb in a.components]
        if "prefill_long" in a.phases:
            jobs += [("prefill_long", s) for s in a.long_prefill]
        if "decode_long" in a.phases:
            jobs += [("decode_long", kv) for kv in a.long_kv]
        decodes = []
        for phase, x in jobs:
            if self.out_of_time():
                print(f"time budget reached: skipping the rest of {shape} {row}", flush=True)
                break
            fn = {"decode": lambda: self.decode_case(dec, shape, row, x),
                  "prefill": lambda: self.prefill_case(dec, shape, row, x),
                  "layer_mem": lambda: self.layer_mem_case(dec, shape, row, x),
                  "components": lambda: self.components_case(dec, shape, row, *x),
                  "prefill_long": lambda: self.prefill_case(dec, shape, row, 1, x, "prefill_long"),
                  "decode_long": lambda: self.decode_case(dec, shape, row, a.long_batch, x, "decode_long")}[phase]
            b, s, kv = {"layer_mem": lambda: (1, 1, x), "decode": lambda: (x, 1, a.kv_len),
                        "prefill": lambda: (x, a.seqlen, 0), "prefill_long": lambda: (1, x, 0),
                        "decode_long": lambda: (a.long_batch, 1, x),
                        "components": lambda: ((x[1], 1, a.kv_len) if x[0] == "decode" else (x[1], a.seqlen, 0))}[phase]()
            rec = self.guarded(fn, shape, row, phase, b, s, kv)
            if phase == "decode":
                decodes.append(rec)
        if "decode" in a.phases or "max_batch" in a.phases:
            self.max_batch(dec, shape, row, decodes)
        del dec
        self.free()

    def run(self):
        self.setup()
        for shape in self.a.shapes:
            for row in self.a.rows:
                if self.out_of_time():
                    print(f"time budget reached ({self.a.max_seconds:.0f} s): stopping", flush=True)
                    return
                try:
                    self.run_row(shape, row)
                except torch.OutOfMemoryError:
                    self.free()
                    self.record(shape, row, "build", None, None, None, oom=True)
                except Exception as exc:
                    self.free()
                    self.record(shape, row, "build", None, None, None,
                                error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def main(argv=None) -> int:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_e2e: needs a CUDA GPU (none found); use --smoke for the CPU pipeline check.", file=sys.stderr)
        return 2
    if args.smoke:
        torch.manual_seed(0)
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
