"""A/B timings, back to back in one process, of the two main-job phases sped up without changing results:
loading the built-in GGUF (transformers' parses vs one shared parse) and QuaRot's weight clip search (the
per-candidate loop vs the blocked, pruned search) on SmolLM2-135M's rotated weights, checking that both
searches pick the same ratio for every row of every weight.

    python scripts/search_load_ab.py --out results/search_load_ab-cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the record (JSON) here; default: print only")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)
    load_average = round(os.getloadavg()[0], 2)
    import torch

    from flatquant.api import quantize_with_report
    from flatquant.config import QuaRotConfig
    from flatquant.core.modules import quant_linears
    from flatquant.core.quantizer import clip_search_best, clip_search_loop
    from flatquant.models import loading
    from flatquant.results import atomic_write_text, git_commit
    from flatquant.runner import _weight_sharing_copy

    shared = loading._gguf_parsed_once
    load_s = {}
    for name, ctx in (("transformers", lambda spec: contextlib.nullcontext()), ("parsed_once", shared)):
        loading._gguf_parsed_once = ctx
        t = time.perf_counter()
        model, _tok = loading.load_model(args.model)
        load_s[name] = round(time.perf_counter() - t, 1)
    loading._gguf_parsed_once = shared
    cfg = QuaRotConfig(w_clip_search=False)  # rotated weights only; both searches run below
    q = _weight_sharing_copy(model)
    quantize_with_report(q, cfg, method="quarot", progress=False)
    ratios = torch.tensor([1.0 - i / 100 for i in range(80)])
    search_s = {"loop": 0.0, "blocked": 0.0}
    rows = same = 0
    for m in quant_linears(q):
        m.unfreeze()
        w, _ = m.effective_weight_and_bias(quantize=False)
        wq = m.w_quantizer
        t = time.perf_counter()
        a = clip_search_loop(w, ratios, wq.bits, wq.symmetric, wq.group_size)
        search_s["loop"] += time.perf_counter() - t
        t = time.perf_counter()
        b = clip_search_best(w, ratios, wq.bits, wq.symmetric, wq.group_size)
        search_s["blocked"] += time.perf_counter() - t
        rows += a.numel()
        same += int((a == b).sum())
    record = {"kind": "search_load_ab", "model": args.model, "load_seconds": load_s,
              "clip_search_seconds": {k: round(v, 1) for k, v in search_s.items()},
              "weights": len(quant_linears(q)), "rows": rows, "rows_same_ratio": same,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average_before": load_average, "device": f"cpu ({platform.processor() or platform.machine()})",
              "command": "python scripts/search_load_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "git_commit": git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    print(json.dumps(record, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0 if same == rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
