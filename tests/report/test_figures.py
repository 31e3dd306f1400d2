"""Flatness figures (flatquant.report.figures / figure_plots / plot_cli) on tiny random models."""
from __future__ import annotations

import json

import pytest
import torch

from flatquant import QuantConfig, calib_preset
from flatquant.calib import artifacts
from flatquant.methods.flatquant import calibrate
from flatquant.report import figure_plots, figures
from flatquant.report.plot_cli import make_figures


def _windows(model, n=3, seqlen=16):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _params(model, folder, bits=(4, 4, 4), epochs=2):
    calibrate(model, QuantConfig(*bits), _windows(model, 4, 24), calib_preset("tiny", epochs=epochs), progress=False,
              out_dir=folder)
    return folder


def test_transforms_keep_the_product_and_curves_are_sorted(tiny_model_factory, tmp_path):
    """Each plotted transform is the exact pair (X T, W T^-T): X' W'^T = X W^T, for every site (o_proj's
    P_v included); Hadamard keeps the Frobenius norm; curves are sorted channel norms."""
    params = _params(tiny_model_factory("llama"), tmp_path / "p")
    model = tiny_model_factory("llama")
    win = _windows(model)
    data = figures.flatness_data(model, win, 1, params)
    acts = figures.capture_sites(model, win, 1)
    layer = model.model.layers[1]
    learned = figures.saved_layer_transforms(model, params, 1)
    assert set(learned) == set(figures.SITE_LABELS) and set(data["sites"]) == set(figures.SITE_LABELS)
    assert data["tokens"] == 3 * 16
    for site, t in learned.items():
        x, w = acts[site], figures.site_weight(layer, _family(model), site)
        ref = x.double() @ w.double().t()
        got = figures.apply_full(t, x).double() @ t.transform_weight(w).double().t()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item()), site
        entry = data["sites"][site]
        assert set(entry["activations"]) == set(figures.TRANSFORMS) == set(entry["weights"])
        for kind in ("activations", "weights"):
            for name, d in entry[kind].items():
                assert len(d) == x.shape[1] and d == sorted(d, reverse=True), (site, kind, name)
        orig, had = torch.tensor(entry["activations"]["original"]), torch.tensor(entry["activations"]["Hadamard (QuaRot)"])
        assert torch.allclose(orig.norm(), had.norm(), rtol=1e-4)
        assert entry["activations"]["original"] == figures.sorted_channel_norms(x, 0)
    assert learned["attn_in"].channel_scale() is not None  # the learned scale is part of the plotted transform


def _family(model):
    from flatquant.models.families import family_for

    return family_for(model)


def test_flatness_distance():
    assert figures.flatness_distance([2.0, 2.0, 2.0]) == pytest.approx(0.0)
    assert figures.flatness_distance([1.0, 0.0, 0.0, 0.0]) > figures.flatness_distance([1.0, 0.5, 0.5, 0.5])
    assert figures.flatness_distance([3.0, 1.0]) == pytest.approx(figures.flatness_distance([6.0, 2.0]))


def test_error_landscape_zero_at_16_bits_positive_at_4(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    win = _windows(model, 2, 12)
    exact = figures.error_landscape(model, win, _params(tiny_model_factory("llama"), tmp_path / "a", (16, 16, 16), 1))
    assert set(exact["methods"]) == set(figures.LANDSCAPE_METHODS) and exact["bits"] == "W16A16KV16"
    for m, d in exact["methods"].items():
        assert len(d["per_layer"]) == 2 and len(d["per_position"][0]) == 12
        assert max(d["per_layer"]) < 1e-9, m  # hidden states in the FP model's basis: no error at 16 bits
    low = figures.error_landscape(model, win, _params(tiny_model_factory("llama"), tmp_path / "b"), ("rtn", "flatquant"))
    for d in low["methods"].values():
        assert all(v > 0 for v in d["per_layer"])
        assert d["per_layer"][1] == pytest.approx(sum(d["per_position"][1]) / 12, rel=1e-5)


def test_figures_written_with_data_and_embedded(tiny_model_factory, tmp_path):
    params = _params(tiny_model_factory("llama"), tmp_path / "p")
    model = tiny_model_factory("llama")
    out = tmp_path / "figs"
    paths = make_figures(params, out, model=model, windows=_windows(model, 2, 12), model_name="tiny", layer=1)
    assert sorted(p.name for p in paths) == ["error_landscape_tiny.png", "flatness_tiny_layer1.png",
                                             "loss_history_tiny.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        info = json.loads(p.with_suffix(".json").read_text())
        assert info["figure"] == p.name and info["git_commit"] and info["device"] == "cpu"
    hist = json.loads((out / "loss_history_tiny.json").read_text())["data"]
    assert not hist["history_missing"] and sorted(hist["epoch_losses"]) == ["0", "1"]
    assert hist["epoch_losses"]["0"] == artifacts.epoch_losses(artifacts.read_meta(params))[0]
    md = tmp_path / "docs" / "RESULTS.md"
    section = "\n".join(figure_plots.figures_section(out, md))
    for p in paths:
        assert f"](../figs/{p.name})" in section
    assert figure_plots.figures_section(tmp_path / "none", md) == []


def test_old_folder_without_history_says_so(tiny_model_factory, tmp_path):
    params = _params(tiny_model_factory("llama"), tmp_path / "p", epochs=1)
    meta = json.loads((params / artifacts.META).read_text())
    del meta[artifacts.HISTORY]
    for row in meta["report"]:
        row.pop("epoch_losses", None)
    (params / artifacts.META).write_text(json.dumps(meta))
    with pytest.raises(Exception, match="--model"):
        make_figures(params, tmp_path / "f", ("loss", "flatness"))
    [path] = make_figures(params, tmp_path / "f", ("loss",), model_name="old")
    data = json.loads(path.with_suffix(".json").read_text())["data"]
    assert data["history_missing"] and sorted(data["before_after"]) == ["0", "1"]
    assert "history missing" in "\n".join(figure_plots.figures_section(tmp_path / "f", tmp_path / "R.md"))


def test_plot_and_report_commands(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from flatquant import cli
    from flatquant.models.loading import load_model
    from flatquant.results import write_record

    model, _ = load_model(str(tiny_model_dir))
    params = _params(model, tmp_path / "p", epochs=1)
    out = tmp_path / "figs"
    base = ["--params", str(params), "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--windows", "2", "--seqlen", "16", "--device", "cpu"]
    assert cli.main(["plot", *base, "--what", "flatness,loss", "--layer", "1", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["flatness_tiny-llama_layer1.png", "loss_history_tiny-llama.png"]
    assert cli.main(["plot", *base, "--layer", "2", "--out-dir", str(out)]) == 2
    assert "--layer 2: the model has layers 0..1" in capsys.readouterr().err
    assert cli.main(["plot", *base, "--what", "bogus", "--out-dir", str(out)]) == 2
    assert cli.main(["plot", "--params", str(tmp_path / "missing"), "--out-dir", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    results = tmp_path / "results"
    write_record({"kind": "ppl", "model": "M", "method": "fp16", "w_bits": 16, "a_bits": 16, "kv_bits": 16,
                  "dataset": "wikitext2", "ppl": 17.3, "windows": 4, "seqlen": 16}, results)
    md = tmp_path / "docs" / "RESULTS.md"
    figs = tmp_path / "docs" / "figures"
    assert cli.main(["report", "--results-dir", str(results), "--out", str(md), "--plots-dir",
                     str(tmp_path / "docs" / "plots"), "--figures-dir", str(figs), "--params", str(params),
                     "--what", "loss", "--model-name", "tiny"]) == 0
    text = md.read_text()
    assert "## Flatness figures" in text and "](figures/loss_history_tiny.png)" in text
