"""Saved files are byte-reproducible with consistent permissions; calibration never ends worse than it began;
perplexity never builds the full logits; the CLI documents every option and writes outside results/."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from fault_helpers import ROOT, H
from safetensors.torch import load_file, save

from flatquant.calib import integrity


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.codes": torch.randint(-8, 8, (5,), dtype=torch.int8),
            "c.half": torch.randn(2, generator=g).half(), "d.empty": torch.zeros(0)}


def test_safetensors_bytes_do_not_depend_on_order(tmp_path):
    t = _tensors()
    one = integrity.write_safetensors(tmp_path / "one.safetensors", t, {"format": "x", "layer": "1"})
    two = integrity.write_safetensors(tmp_path / "two.safetensors", dict(reversed(list(t.items()))),
                                      {"layer": "1", "format": "x"})
    assert one == two and (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    back = load_file(str(tmp_path / "one.safetensors"))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    from safetensors.torch import load

    assert {k: v.tolist() for k, v in load(save(t)).items()} == {k: v.tolist() for k, v in back.items()}
    assert integrity.sha256_file(tmp_path / "one.safetensors") == one


def test_saved_files_are_0644(fenv):
    """(Byte-reproducibility across runs and processes: test_interrupts compares resumed runs with the reference.)"""
    files = [p for p in fenv["ref"].rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert sorted(p.name for p in (fenv["ref"] / "layers").iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(3)]


def test_training_that_ends_worse_keeps_the_start(monkeypatch, tiny_tokenizer):
    import flatquant.methods.flatquant as fq
    from flatquant.calib import artifacts
    from flatquant.config import QuantConfig, calib_preset
    from flatquant.models.families import family_for

    model = H.build_model("llama", vocab_size=len(tiny_tokenizer))
    family = family_for(model)
    cfg = calib_preset("tiny")
    seen = {}

    def worse(layer, *a, **k):
        seen["start"] = {k: v.clone() for k, v in artifacts.layer_state(layer).items()}
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if n.startswith("fq_transforms.") or "clip_logit" in n:
                    p.add_(0.5)
        return 1.0, 2.0, True

    monkeypatch.setattr(fq, "train_layer", worse)
    windows = torch.randint(0, len(tiny_tokenizer), (cfg.nsamples, cfg.seqlen))
    inps, kwargs = fq.capture_layer_inputs(model, family, windows, torch.float32)
    layer, _, row = fq.calibrate_layer(family.decoder_layers(model)[0], family, model.config, QuantConfig(4, 4, 4),
                                       cfg, inps, kwargs, seed=0, amp=False)
    assert row["loss_after"] == 1.0 and row["loss_trained"] == 2.0
    now = artifacts.layer_state(layer)
    assert now.keys() == seen["start"].keys() and all(torch.equal(now[k], seen["start"][k]) for k in now)


def test_head_nll_in_position_chunks_matches_full_logits(tiny_model_factory):
    from flatquant.eval.perplexity import _head_nll, _window_nll

    model = tiny_model_factory("qwen2")
    batch = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = _window_nll(model(batch).logits, batch, chunk=3)
        for positions in (1, 7, 19, 64):
            assert torch.allclose(_head_nll(model, batch, positions), full, rtol=1e-5, atol=1e-6), positions


def test_help_documents_every_option_with_examples(capsys):
    from flatquant import cli

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert top.count("\n  flatquant ") == 3 and "examples:" in top
    subs = parser._subparsers._group_actions[0].choices
    for name, sub in subs.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        helptext = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert "default" in (sub._get_formatter()._get_help_string(action) or ""), action.option_strings
        assert "default" in helptext


def test_user_records_stay_out_of_the_published_folder():
    from flatquant import cli

    for command in (["eval"], ["quantize", "--output", "x"]):
        assert cli.build_parser().parse_args(command).results_dir == "flatquant-results"
    assert "/flatquant-results/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "--results-dir" in Path(ROOT / "scripts" / "gpu" / "all.sh").read_text()


def test_capped_runs_never_replace_or_hide_full_records():
    from flatquant.report.common import _latest
    from flatquant.results import record_name

    full = {"kind": "zeroshot", "model": "M", "method": "quarot", "w_bits": 4, "a_bits": 4, "kv_bits": 4,
            "limit": None, "date": "2026-01-01"}
    assert record_name({**full, "limit": 20}) != record_name(full) == "zeroshot-M-quarot-W4A4KV4.json"
    ppl = {**full, "kind": "ppl", "dataset": "wikitext2", "seqlen": 2048, "windows": 148, "max_windows": None}
    quick = {**ppl, "windows": 8, "max_windows": 8, "date": "2026-02-01", "device": "cpu"}
    assert record_name(quick) != record_name(ppl)
    assert _latest([ppl, quick]) == [ppl] and _latest([quick, ppl]) == [ppl]
    rerun = {**ppl, "date": "2026-03-01"}
    assert _latest([ppl, rerun]) == [rerun]
