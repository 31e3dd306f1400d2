"""A calibration stopped by SIGKILL, SIGINT or a full disk at a random layer resumes to byte-identical files."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from fault_helpers import LAYERS, ROOT, assert_one_line_error, layer_bytes, quantize_args, records, run

from flatquant.calib import integrity

KILL_SCRIPT = """
import os, signal, sys
from flatquant import cli, config
from flatquant.calib import artifacts
config.PRESETS["tiny"] = dict(nsamples=4, seqlen=32, epochs=2, batch_size=2)  # tests/conftest.py TINY_PRESET
config.PRESET_EVAL_WINDOWS["tiny"] = 2
at, sig = int(os.environ["FQ_STOP_AT"]), getattr(signal, os.environ["FQ_SIGNAL"])
save = artifacts.LayerStore.save_layer
def stop_then_save(self, i, layer):
    if i == at:  # the layer is trained but not yet saved
        os.kill(os.getpid(), sig)
    return save(self, i, layer)
artifacts.LayerStore.save_layer = stop_then_save
sys.exit(cli.main(sys.argv[1:]))
"""


def _meta_without_report(folder):
    meta = json.loads((folder / "flatquant.json").read_text())
    meta.pop("report")
    return meta


def _assert_same_as_reference(fenv, out, results):
    assert layer_bytes(out) == layer_bytes(fenv["ref"])
    assert _meta_without_report(out) == _meta_without_report(fenv["ref"])
    (rec,) = records(results)
    (ref,) = records(fenv["ref_results"])
    assert rec["ppl"] == ref["ppl"]
    assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGINT"])
def test_signal_at_random_layer_then_resume(fenv, tmp_path, capsys, test_rng, signame):
    at = test_rng.randrange(LAYERS)
    out, results = tmp_path / "params", tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FQ_STOP_AT": str(at), "FQ_SIGNAL": signame, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *quantize_args(fenv, out, results)],
                          capture_output=True, text=True, env=env, timeout=240, check=False)
    if signame == "SIGKILL":
        assert proc.returncode == -9, proc.stderr
    else:
        assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    partial = out.with_name("params.partial")
    assert not out.exists() and partial.is_dir()
    assert sorted(layer_bytes(partial)) == [f"layer_{i:03d}.safetensors" for i in range(at)], f"stopped at {at}"
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp")]
    rc, _, err = run(quantize_args(fenv, out, results), capsys)
    assert rc == 0, err
    _assert_same_as_reference(fenv, out, results)


def test_disk_full_at_random_layer_then_resume(fenv, tmp_path, capsys, monkeypatch, test_rng):
    at = test_rng.randrange(LAYERS)
    out, results = tmp_path / "params", tmp_path / "results"
    write = integrity._write_file

    def full_disk(fd, data):
        if b'"layer":"%d"' % at in data[:4096]:
            os.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(fd, data)

    monkeypatch.setattr(integrity, "_write_file", full_disk)
    rc, _, err = run(quantize_args(fenv, out, results), capsys)
    assert_one_line_error(rc, err, "no space left on device", f"layer_{at:03d}")
    partial = out.with_name("params.partial")
    assert sorted(layer_bytes(partial)) == [f"layer_{i:03d}.safetensors" for i in range(at)]
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    monkeypatch.setattr(integrity, "_write_file", write)
    rc, _, err = run(quantize_args(fenv, out, results), capsys)
    assert rc == 0, err
    _assert_same_as_reference(fenv, out, results)


def test_safetensors_error_is_one_line(fenv, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def broken(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: No space left on device })")

    monkeypatch.setattr(integrity, "safetensors_bytes", broken)
    rc, _, err = run(quantize_args(fenv, tmp_path / "params", tmp_path / "results"), capsys)
    assert_one_line_error(rc, err, "no space left on device")
