"""benchmarks/calib/calib_scale.py --smoke: the whole GPU benchmark pipeline (write a sharded random model,
streamed calibration with --offload disk, GPTQ and full-precision-pass timings, extrapolation) on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("kind", "model_shape", "world_size", "offload", "layers_measured", "s_per_layer", "peak_gpu_gib",
          "peak_host_gib", "extrapolated_min", "extrapolation", "device", "git_commit", "command", "date")


def test_calib_scale_smoke(tmp_path):
    out = tmp_path / "calib_scale.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/calib/calib_scale.py"), "--smoke", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = json.loads(out.read_text())
    assert all(k in rec for k in FIELDS), set(FIELDS) - set(rec)
    assert rec["kind"] == "calib_scale" and rec["offload"] == "disk" and rec["world_size"] == 1
    assert rec["layers_measured"] == 2 and rec["s_per_layer"] > 0 and rec["smoke"]
    assert rec["extrapolated_min"]["gpus_8"] < rec["extrapolated_min"]["gpus_1"]
    assert "ceil(L/N)" in rec["extrapolation"] and "L=80" in rec["extrapolation"]
    assert rec["targets_met"] == {"peak_gpu_le_40_gib": None} and rec["peak_gpu_gib"] is None  # CPU: not measured
    assert "ETA" in proc.stdout and not (tmp_path / "work" / "tiny").exists()  # work folder cleaned up
