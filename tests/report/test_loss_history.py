"""Per-epoch training losses: produced by train_layer, saved per layer in flatquant.json, kept on resume."""
import json

import torch

from flatquant import QuantConfig, calib_preset
from flatquant.calib import artifacts
from flatquant.methods.flatquant import calibrate


def _windows(model, n=4, seqlen=24):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_epoch_losses_saved_per_layer_and_match_the_report(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    report = calibrate(model, QuantConfig(4, 4, 4), _windows(model), calib_preset("tiny", epochs=3), progress=False,
                       out_dir=tmp_path)
    meta = json.loads((tmp_path / artifacts.META).read_text())
    hist = artifacts.epoch_losses(meta)
    assert sorted(hist) == [0, 1]
    for row in report["calib_layers"]:
        losses = hist[row["layer"]]
        assert len(losses) == 3 and all(x > 0 for x in losses)
        assert row["epoch_losses"] == losses
        # the first epoch's mean training loss lies near the untrained loss, not at zero or a stale value
        assert losses[0] < 10 * row["loss_before"]


def test_epoch_losses_follow_training_and_reset_each_epoch():
    """The mean of each epoch's step losses: reading the accumulator resets it (a stale sum would grow)."""
    from flatquant.calib.train_step import LayerStepper

    w = torch.nn.Parameter(torch.zeros(4, 4))

    class Toy(torch.nn.Module):
        def forward(self, x):
            return x @ w

    x, t = torch.randn(8, 4), torch.randn(8, 4)
    stepper = LayerStepper(Toy(), [{"params": [w], "lr": 0.0}], {}, False, 0.0, x, t, cuda_graph=False)
    for i in range(3):
        stepper.step(x, t, i, 3)
    assert abs(stepper.epoch_loss() - torch.mean(t ** 2).item()) < 1e-6  # lr 0: every step sees w = 0
    stepper.step(x, t, 0, 1)
    assert abs(stepper.epoch_loss() - torch.mean(t ** 2).item()) < 1e-6


def test_folder_without_history_still_loads(tiny_model_factory, tmp_path):
    from flatquant.methods.flatquant import load_calibrated

    model = tiny_model_factory("llama")
    calibrate(model, QuantConfig(4, 4, 4), _windows(model), calib_preset("tiny", epochs=1), progress=False,
              out_dir=tmp_path)
    meta_path = tmp_path / artifacts.META
    meta = json.loads(meta_path.read_text())
    meta.pop(artifacts.HISTORY)
    for row in meta["report"]:
        row.pop("epoch_losses", None)
    meta_path.write_text(json.dumps(meta))
    assert artifacts.epoch_losses(artifacts.read_meta(tmp_path)) == {}
    load_calibrated(tiny_model_factory("llama"), tmp_path)
