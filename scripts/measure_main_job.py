"""Time the README's main job and measure its peak memory; write one JSON record (kind "main_job").

    python scripts/measure_main_job.py                       # the README's quick start, on this machine
    python scripts/measure_main_job.py --out /tmp/piece.json -- flatquant eval --method rtn --max-windows 2  # a piece

Run it on an idle machine: the wall time is only meaningful when nothing else competes for the cores.
Peak RSS is the largest resident set of the job's process (getrusage of the waited-for child).
The job's own records and parameters go to a temporary folder, so nothing published is touched.
Where the peak comes from, phase by phase: scripts/main_job_phases.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAIN_JOB = "flatquant quantize --model smollm2-135m --preset cpu-quick --output {tmp}/params --no-progress"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/main_job-cpu.json", help="record to write")
    ap.add_argument("job", nargs=argparse.REMAINDER, help="command to measure after `--` (default: the main job)")
    args = ap.parse_args(argv)
    from flatquant.results import atomic_write_text, git_commit

    with tempfile.TemporaryDirectory(prefix="flatquant-main-job-") as tmp:
        job = [a for a in args.job if a != "--"] or shlex.split(MAIN_JOB.format(tmp=tmp))
        if "--results-dir" not in job:
            job += ["--results-dir", f"{tmp}/records"]
        argv_run = [sys.executable, "-m", "flatquant", *job[1:]] if job[0] == "flatquant" else job
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        load = round(os.getloadavg()[0], 2)  # 1-minute load before the start: near 0 on an idle machine
        t = time.perf_counter()
        proc = subprocess.run(argv_run, cwd=ROOT, env=env, check=False)
        wall = time.perf_counter() - t
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        n_records = len(list(Path(tmp, "records").glob("*.json")))
    if proc.returncode != 0:
        print(f"the job failed (exit {proc.returncode}); no record written", file=sys.stderr)
        return proc.returncode
    record = {"kind": "main_job", "command": shlex.join(job).replace(tmp, "$TMP"), "wall_s": round(wall, 1),
              "peak_rss_gib": round(peak_kib / 2**20, 3), "cpus": len(os.sched_getaffinity(0)),
              "device": f"cpu ({cpu_name()})", "git_commit": git_commit(),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "load_average_before": load, "job_records": n_records}
    atomic_write_text(args.out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"{record['wall_s']} s, peak RSS {record['peak_rss_gib']} GiB on {record['cpus']} CPU(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
