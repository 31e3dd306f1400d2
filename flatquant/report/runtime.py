"""The packed-runtime section: packed vs fake-quant perplexity, greedy agreement, checkpoint size, memory
(records of benchmarks/runtime/runtime_gpu.py: ppl records with a "runtime" field, and the kinds below)."""
from __future__ import annotations

from flatquant.report.common import _caption, _fmt_ppl, _table

RUNTIME_KINDS = ("checkpoint", "generation", "memory")


def is_runtime_record(r: dict) -> bool:
    return "runtime" in r or r.get("kind") in RUNTIME_KINDS


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:,.1f}"


def _ppl_rows(ppl: list[dict]) -> list[list[str]]:
    rows = []
    for r in sorted(ppl, key=lambda r: (r.get("model", ""), r.get("dataset", ""), r["runtime"] != "fake-quant",
                                        r["runtime"])):
        rel = r.get("ppl_vs_fake_quant")
        rows.append([r.get("model", "-"), r.get("dataset", "-"), r["runtime"], _fmt_ppl(r.get("ppl")),
                     "-" if rel is None else f"{100 * rel:+.2f} %", str(r.get("windows", "-"))])
    return rows


def _generation_rows(gen: list[dict]) -> list[list[str]]:
    rows = []
    for r in gen:
        firsts = [p.get("first_difference") for p in r.get("prompts", [])]
        other = "fake-quant in float32" if "noise" in str(r.get("variant")) else "packed"
        rows.append([r.get("model", "-"), f"fake-quant vs {other}", str(r.get("new_tokens", "-")),
                     ", ".join("none" if f is None else str(f) for f in firsts)])
    return rows


def runtime_section(records) -> list[str]:
    recs = [r for r in records if is_runtime_record(r)]
    if not recs:
        return []
    out = ["## Packed W4A4KV4 runtime", "",
           "The exported checkpoint loaded by `flatquant.load_quantized` (int4 weights, Triton W4A4 linears, "
           "KV4 cache) against the fake-quant model with the same parameters.", ""]
    ppl = [r for r in recs if r.get("kind", "ppl") == "ppl" and "runtime" in r]
    if ppl:
        out += ["### Perplexity", "",
                _table(["Model", "Dataset", "Runtime", "PPL", "vs fake-quant", "Windows"], _ppl_rows(ppl),
                       ["l", "l", "l", "r", "r", "r"]), "",
                "Lower is better. `fake-quant-float32`: the fake-quant model computed in float32 instead of float16, "
                "the size of purely numerical differences. " + _caption(ppl), ""]
    gen = [r for r in recs if r.get("kind") == "generation"]
    if gen:
        out += ["### Greedy continuations", "",
                _table(["Model", "Compared", "New tokens", "First differing token per prompt"], _generation_rows(gen)),
                "", "Index of the first generated token where the two greedy continuations differ (none: identical). "
                    + _caption(gen), ""]
    sizes = [r for r in recs if r.get("kind") in ("checkpoint", "memory")]
    rows = []
    for r in sizes:
        if r.get("kind") == "checkpoint":
            rows.append([r.get("model", "-"), "checkpoint files", _mib(r.get("bytes_packed")), _mib(r.get("bytes_fp16")),
                         f"{r['bytes_fp16'] / r['bytes_packed']:.2f}x"])
        elif "packed_tensor_bytes_per_layer" in r:
            rows.append([r.get("model", "-"), "one decoder layer's tensors", _mib(r["packed_tensor_bytes_per_layer"]),
                         _mib(r["fp16_tensor_bytes_per_layer"]),
                         f"{r['fp16_tensor_bytes_per_layer'] / r['packed_tensor_bytes_per_layer']:.2f}x"])
        elif r.get("packed_allocated_bytes") and r.get("fp16_allocated_bytes"):
            rows.append([r.get("model", "-"), "GPU memory of the loaded model", _mib(r["packed_allocated_bytes"]),
                         _mib(r["fp16_allocated_bytes"]),
                         f"{r['fp16_allocated_bytes'] / r['packed_allocated_bytes']:.2f}x"])
    if rows:
        out += ["### Size", "", _table(["Model", "What", "Packed MiB", "16-bit MiB", "Smaller by"], rows,
                                       ["l", "l", "r", "r", "r"]), "",
                "Embeddings, norms and lm_head stay 16-bit (SmolLM2's tied 49k x 576 embedding is most of its "
                "packed size). " + _caption(sizes), ""]
    return out
