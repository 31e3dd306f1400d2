"""Peak resident memory of the README's main job, phase by phase (load, calibration data, each method's
quantize and evaluation), sampled from /proc/self/status every 10 ms while the job runs in this process.

    python scripts/main_job_phases.py                                   # the main job as the README runs it
    python scripts/main_job_phases.py --out /tmp/phases.json -- --max-windows 1 --epochs 1   # shortened

Arguments after `--` are appended to the main job's `flatquant quantize` command. The job's records and
parameters go to a temporary folder. tracemalloc cannot see torch's allocations, hence /proc sampling.
Linux only. The whole job's record (a separate process, no sampler) comes from scripts/measure_main_job.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAIN_JOB = "quantize --model smollm2-135m --preset cpu-quick --output {tmp}/params --no-progress"
GIB = 2**20  # /proc/self/status reports KiB


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line[:5]] = int(line.split()[1])
    return vals["VmRSS"], vals["VmHWM"]


class Phases:
    """A stack of named phases; a thread keeps each phase's peak RSS (nested phases count in their parents)."""

    def __init__(self):
        self.stack: list[dict] = []
        self.done: list[dict] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.is_set():
            rss = rss_kib()[0]
            for ph in list(self.stack):
                ph["peak"] = max(ph["peak"], rss)
            time.sleep(0.01)

    def wrap(self, module, attr, name=None):
        f = getattr(module, attr)

        @functools.wraps(f)
        def g(*args, **kwargs):
            label = name(args) if callable(name) else (name or attr)
            rss = rss_kib()[0]
            ph = {"phase": "/".join([p["phase"].split("/")[-1] for p in self.stack] + [label]), "peak": rss,
                  "start": rss, "t": time.perf_counter()}
            self.stack.append(ph)
            try:
                return f(*args, **kwargs)
            finally:
                self.stack.remove(ph)
                end = rss_kib()[0]
                ph["peak"] = max(ph["peak"], end)
                self.done.append({"phase": ph["phase"], "rss_start_gib": round(ph["start"] / GIB, 3),
                                  "peak_rss_gib": round(ph["peak"] / GIB, 3), "rss_end_gib": round(end / GIB, 3),
                                  "seconds": round(time.perf_counter() - ph["t"], 1)})
                print(f"[phases] {self.done[-1]}", file=sys.stderr, flush=True)

        setattr(module, attr, g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the record (JSON) here; default: print only")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="extra `flatquant quantize` options after `--`")
    args = ap.parse_args(argv)
    phases = Phases()
    from flatquant import cli, runner
    ppl_mod = importlib.import_module("flatquant.eval.perplexity")
    from flatquant.models import loading
    from flatquant.results import atomic_write_text, git_commit

    phases.wrap(loading, "load_model", "load")
    phases.wrap(runner, "calibration_data", "calibration data")
    phases.wrap(runner, "run_config", lambda a: f"method {a[3]}")
    for attr in ("quantize_with_report", "load_calibrated_with_report", "evaluate"):
        phases.wrap(runner, attr)
    phases.wrap(ppl_mod, "perplexity")
    with tempfile.TemporaryDirectory(prefix="flatquant-phases-") as tmp:
        job = shlex.split(MAIN_JOB.format(tmp=tmp)) + ["--results-dir", f"{tmp}/records"]
        job += [a for a in args.extra if a != "--"]
        t = time.perf_counter()
        rc = cli.main(job)
        wall = time.perf_counter() - t
    if rc != 0:
        print(f"the job failed (exit {rc}); no record written", file=sys.stderr)
        return rc
    record = {"kind": "main_job_phases", "command": "flatquant " + shlex.join(job).replace(tmp, "$TMP"),
              "wall_s": round(wall, 1), "peak_rss_gib": round(rss_kib()[1] / GIB, 3), "phases": phases.done,
              "git_commit": git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    print(f"\n{'phase':<52} {'start':>7} {'peak':>7} {'end':>7} {'s':>7}  (GiB RSS)")
    for p in phases.done:
        print(f"{p['phase']:<52} {p['rss_start_gib']:>7.3f} {p['peak_rss_gib']:>7.3f} {p['rss_end_gib']:>7.3f} "
              f"{p['seconds']:>7.1f}")
    print(f"whole job: peak {record['peak_rss_gib']} GiB, {record['wall_s']} s")
    if args.out:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
