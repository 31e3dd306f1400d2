"""What a streamed calibration keeps on its compute device, measured on the CPU (calib.residency): the
layer, its training state and one mini-batch, never a whole activation set. The bytes it holds must not
grow with the number of calibration windows; the in-memory path (whole sets on the device) does."""
from __future__ import annotations

import pytest
import torch

from flatquant.calib.offload import ShardedSource
from flatquant.calib.residency import DeviceResidency
from flatquant.calib.streaming import calibrate_streaming
from flatquant.config import CalibConfig, method_config
from flatquant.methods.flatquant import calibrate
from tests.conftest import build_model

SEQ = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("residency") / "model"
    build_model("llama", num_hidden_layers=1).save_pretrained(path)
    return path


def _windows(n):
    return torch.randint(0, 320, (n, SEQ), generator=torch.Generator().manual_seed(0))


def _streamed(model_dir, out, n, mode):
    cc = CalibConfig(nsamples=n, seqlen=SEQ, epochs=1, batch_size=2)
    with DeviceResidency() as r:
        calibrate_streaming(ShardedSource(model_dir, "cpu", torch.float32),
                            method_config("flatquant", weight_quantizer="gptq", calib=cc), _windows(n), cc, out,
                            mode=mode, log=lambda _m: None, resume=False)
    return r


@pytest.mark.parametrize("mode", ["disk"])
def test_streamed_calibration_keeps_no_activation_set_on_the_device(model_dir, tmp_path, mode):
    hidden = 64
    small, large = 4, 48
    set_bytes = large * SEQ * hidden * 4  # one activation set (inputs, or targets) of the larger run
    r_small = _streamed(model_dir, tmp_path / "a", small, mode)
    r_large = _streamed(model_dir, tmp_path / "b", large, mode)
    assert r_large.largest < set_bytes / 2, r_large.largest  # no tensor near a whole set (embeddings are)
    growth = r_large.peak - r_small.peak  # 12x the windows: resident bytes must stay those of one mini-batch
    assert growth < set_bytes / 4, (r_small.peak, r_large.peak, set_bytes)


def test_the_tracker_sees_whole_sets_of_the_in_memory_path():
    """The control: the in-memory path keeps inputs and targets on the device; the tracker must show it."""
    peaks = []
    for n in (4, 48):
        model = build_model("llama", num_hidden_layers=1)
        cc = CalibConfig(nsamples=n, seqlen=SEQ, epochs=1, batch_size=2)
        with DeviceResidency() as r:
            calibrate(model, method_config("flatquant", calib=cc), _windows(n), cc, progress=False,
                      log=lambda _m: None)
        peaks.append(r)
    set_bytes = 48 * SEQ * 64 * 4
    assert peaks[1].largest >= set_bytes and peaks[1].peak - peaks[0].peak >= set_bytes
