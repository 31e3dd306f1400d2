"""The arithmetic of benchmarks/calib/calib_scale.py's extrapolation and target verdicts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("calib_scale", REPO / "benchmarks/calib/calib_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_epochs_from_a_shorter_run(cs):
    assert cs.train_seconds(30.0, 8.0, 1) == pytest.approx(30.0 + 14 * 8.0)
    assert cs.train_seconds(120.0, 8.0, 15) == 120.0  # the paper's epochs run: nothing extrapolated


def test_one_and_n_gpus(cs):
    # 1 GPU: L (t_train + t_gptq); N GPUs: L t_fp + ceil(L/N) t_train + L t_gptq; in minutes
    assert cs.extrapolate(80, 100.0, 10.0, 5.0, 1) == pytest.approx(80 * 110.0 / 60)
    assert cs.extrapolate(80, 100.0, 10.0, 5.0, 8) == pytest.approx((80 * 5 + 10 * 100 + 80 * 10) / 60)
    assert cs.extrapolate(32, 60.0, 0.0, 2.0, 3) == pytest.approx((32 * 2 + 11 * 60) / 60)  # ceil(32/3) = 11


def test_verdicts(cs):
    v = cs.verdicts("llama3-70b", {"gpus_1": 500.0, "gpus_8": 44.9}, 36.0)
    assert v == {"peak_gpu_le_40_gib": True, "gpus_8_le_45_min": True}
    v = cs.verdicts("llama3-8b", {"gpus_1": 20.1, "gpus_8": 5.0}, 41.0)
    assert v == {"peak_gpu_le_40_gib": False, "gpus_1_le_20_min": False}
    assert cs.verdicts("tiny", {"gpus_1": 1.0, "gpus_8": 1.0}, None) == {"peak_gpu_le_40_gib": None}
