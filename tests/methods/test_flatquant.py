import json

import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.core.modules import quant_linears
from flatquant.errors import CheckpointError
from flatquant.methods.flatquant import calibrate, load_calibrated


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _windows(model, n=4, seqlen=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("recipe", ["svd-amp", "direct-fp32"])
def test_all_placements_exact_at_16_bits(tiny_model_factory, family, recipe):
    model = tiny_model_factory(family)
    ids = _windows(model)
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, QuantConfig(16, 16, 16), method="flatquant", calib=ids,
             calib_config=calib_preset("tiny", recipe=recipe, epochs=1), progress=False)
    layer = model.model.layers[0]
    assert set(layer.fq_transforms) == {"attn_in", "o_in", "v_head", "mlp_in", "down_in", "k_head"}
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-3


def test_calibration_lowers_layer_loss(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = _windows(model, n=8, seqlen=32)
    report = calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny", epochs=6, batch_size=4), progress=False)
    assert not hasattr(model, "flatquant_report")  # the report is the return value
    for row in report["calib_layers"]:
        assert row["loss_after"] < row["loss_before"]


def test_ablation_flags_change_what_is_learned(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = _windows(model)
    cfg = calib_preset("tiny", learn_transform=False, learn_scale=True, learn_clip=False)
    calibrate(model, QuantConfig(4, 4, 4), ids, cfg, progress=False)
    layer = model.model.layers[0]
    assert set(layer.fq_transforms) == {"attn_in", "mlp_in", "down_in"}
    assert not any("clip_logit" in n for n, _ in layer.named_parameters())


def test_save_load_gives_identical_outputs(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen2")
    ids = _windows(model)
    calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny"), progress=False, out_dir=tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "flatquant.json").read_text())
    assert meta["complete"] and meta["layers_done"] == [0, 1]
    fresh = tiny_model_factory("qwen2")
    load_calibrated(fresh, tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_resume_equals_uninterrupted(tiny_model_factory, tmp_path, monkeypatch):
    ids = _windows(tiny_model_factory("llama"))
    cfg = calib_preset("tiny", epochs=2)
    full = tiny_model_factory("llama")
    calibrate(full, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "a")

    from flatquant.methods import flatquant as cal_mod

    interrupted = tiny_model_factory("llama")
    real_train = cal_mod.train_layer
    calls = {"n": 0}

    def crash_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(cal_mod, "train_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        calibrate(interrupted, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "b")
    monkeypatch.setattr(cal_mod, "train_layer", real_train)
    assert json.loads((tmp_path / "b" / "flatquant.json").read_text())["layers_done"] == [0]
    resumed = tiny_model_factory("llama")
    report = calibrate(resumed, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "b")
    assert report["calib_layers"][0]["resumed"]
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, resumed(ids).logits, atol=1e-6)


def test_corrupt_and_mismatched_parameter_files(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    ids = _windows(model)
    calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny"), progress=False, out_dir=tmp_path / "p")
    bigger = tiny_model_factory("llama", hidden_size=128, num_attention_heads=4)
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_calibrated(bigger, tmp_path / "p")
    (tmp_path / "p" / "layers" / "layer_001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_calibrated(tiny_model_factory("llama"), tmp_path / "p")
    (tmp_path / "p" / "flatquant.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_calibrated(tiny_model_factory("llama"), tmp_path / "p")


def test_saved_transforms_reused_at_other_bits(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    ids = _windows(model)
    calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny"), progress=False, out_dir=tmp_path / "p")
    other = tiny_model_factory("llama")
    with torch.no_grad():
        ref = other(ids).logits
    load_calibrated(other, tmp_path / "p", QuantConfig(16, 16, 16))
    assert all(not m.w_quantizer.enabled for m in quant_linears(other))
    with torch.no_grad():
        assert _rel(other(ids).logits, ref) < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_reparameterized_model_matches_training_mode(tiny_model_factory, family):
    from flatquant.core.reparam import reparameterize

    model = tiny_model_factory(family)
    ids = _windows(model)
    calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny", epochs=3), progress=False)
    with torch.no_grad():
        train_mode = model(ids).logits
        reparameterize(model)
        folded = model(ids).logits
    layer = model.model.layers[0]
    assert all(m.in_transform is None and not m.w_quantizer.enabled for m in quant_linears(model))
    assert layer.fq_transforms["attn_in"].channel_scale() is None  # now inside input_layernorm
    assert _rel(folded, train_mode) < 1e-4


def test_nan_loss_under_mixed_precision_is_retried_in_float32(tiny_model_factory, monkeypatch):
    """A non-finite loss under mixed precision restarts the layer in float32, from the same start,
    and the log says so."""
    import flatquant.methods.flatquant as cal_mod

    real_train, calls = cal_mod.train_layer, []

    def nan_once_under_amp(layer, inps, targets, kwargs, cfg, amp, gen, **kw):
        calls.append(amp)
        if amp:
            return 1.0, float("nan"), False
        return real_train(layer, inps, targets, kwargs, cfg, amp, gen, **kw)

    monkeypatch.setattr(cal_mod, "train_layer", nan_once_under_amp)
    model = tiny_model_factory("llama")
    layer = model.model.layers[0]
    ids = _windows(model)
    from flatquant.core.modules import install_attention_hook

    install_attention_hook(model)
    inps, kwargs = cal_mod.capture_layer_inputs(model, cal_mod.family_for(model), ids, torch.float32)
    logs = []
    _, _, row = cal_mod.calibrate_layer(layer, cal_mod.family_for(model), model.config, QuantConfig(4, 4, 4),
                                        calib_preset("tiny"), inps, kwargs, seed=0, amp=True, log=logs.append)
    assert calls == [True, False]
    assert row["amp"] is False and row["loss_after"] == row["loss_after"]  # finite, from the float32 run
    assert any("retrying in float32" in m for m in logs)


def test_nonfinite_inputs_are_reported_not_hidden():
    """train_layer flags a non-finite loss (checked once per epoch) instead of returning a number."""
    from flatquant.core.transforms import KroneckerAffine
    from flatquant.methods.flatquant import train_layer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fq_transforms = torch.nn.ModuleDict({"t": KroneckerAffine(8, learn_scale=True)})

        def forward(self, x, **_):
            return self.fq_transforms["t"](x)

    inps = torch.randn(4, 3, 8)
    inps[1, 0, 0] = float("nan")
    before, after, finite = train_layer(Toy(), inps, torch.randn(4, 3, 8), {}, calib_preset("tiny"), False,
                                        torch.Generator().manual_seed(0))
    assert not finite and after != after
