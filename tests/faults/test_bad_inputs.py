"""Hostile inputs end in one line on stderr and exit status 2, with no record and nothing half-written."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from fault_helpers import H, assert_one_line_error, eval_args, quantize_args, records, run, save_model
from safetensors.torch import load_file, save_file


def _params_copy(fenv, tmp_path):
    dst = tmp_path / "params"
    shutil.copytree(fenv["ref"], dst)
    return dst


def _data_start(path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_flipped_tensor_bytes(fenv, tmp_path, capsys):
    params = _params_copy(fenv, tmp_path)
    path = params / "layers" / "layer_001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[_data_start(path) + 5] ^= 0x40  # a bit inside the tensor data; the header stays valid
    path.write_bytes(bytes(raw))
    results = tmp_path / "results"
    rc, _, err = run(eval_args(fenv, results, "--method", "flatquant", "--params", params), capsys)
    assert_one_line_error(rc, err, "layer_001", "sha256")
    assert records(results) == []


def test_nan_in_saved_parameters_without_checksums(fenv, tmp_path, capsys):
    params = _params_copy(fenv, tmp_path)
    meta = json.loads((params / "flatquant.json").read_text())
    meta.pop("checksums")  # a folder written before checksums existed
    (params / "flatquant.json").write_text(json.dumps(meta))
    path = params / "layers" / "layer_002.safetensors"
    state = load_file(str(path))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path))
    results = tmp_path / "results"
    rc, _, err = run(eval_args(fenv, results, "--method", "flatquant", "--params", params), capsys)
    assert_one_line_error(rc, err, "layer_002", "NaN")
    assert records(results) == []


def test_corrupt_partial_layer_on_resume(fenv, tmp_path, capsys):
    out = tmp_path / "params"
    partial = tmp_path / "params.partial"
    shutil.copytree(fenv["ref"], partial)
    meta = json.loads((partial / "flatquant.json").read_text())
    meta["complete"] = False
    (partial / "flatquant.json").write_text(json.dumps(meta))
    path = partial / "layers" / "layer_000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    rc, _, err = run(quantize_args(fenv, out, tmp_path / "results"), capsys)
    assert_one_line_error(rc, err, "layer_000", "sha256")
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_nan_weight_in_model(fenv, tmp_path, capsys, command):
    model_dir = save_model(tmp_path / "nan-llama", fenv["tok"])
    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in sorted(state) if k.endswith("down_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    results, out = tmp_path / "results", tmp_path / "params"
    argv = (eval_args(fenv, results, "--method", "rtn", model=model_dir) if command == "eval"
            else quantize_args(fenv, out, results, model=model_dir))
    rc, _, err = run(argv, capsys)
    assert_one_line_error(rc, err, key, "NaN")
    assert records(results) == [] and not out.exists() and not (tmp_path / "params.partial").exists()


def test_non_finite_perplexity_is_an_error_not_a_record(fenv, tmp_path):
    from flatquant.errors import NonFiniteError
    from flatquant.runner import EvalSpec, evaluate

    model = H.build_model("llama", vocab_size=len(fenv["tok"]))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # finite inputs, NaN logits
    spec = EvalSpec(datasets=["wikitext2"], seqlen=32, max_windows=2, batch_size=2, data_dir=str(fenv["data"]))
    with pytest.raises(NonFiniteError, match="perplexity on wikitext2 is nan"):
        evaluate(model, fenv["tok"], spec, {"method": "rtn"}, tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()


def test_binary_jsonl_dataset(fenv, tmp_path, capsys):
    bad = tmp_path / "garbage.jsonl"
    bad.write_bytes(b"\xff\xfe\x00\x9c" * 4096)
    rc, _, err = run(eval_args(fenv, tmp_path / "results", "--dataset", bad), capsys)
    assert_one_line_error(rc, err, "garbage.jsonl", "UTF-8")


def test_broken_config_json(fenv, tmp_path, capsys):
    model_dir = tmp_path / "broken"
    shutil.copytree(fenv["model"], model_dir)
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    rc, _, err = run(eval_args(fenv, tmp_path / "results", model=model_dir), capsys)
    assert_one_line_error(rc, err, "config.json", "unreadable")
    assert "not a built-in name" not in err


def test_foreign_params_rejected_before_weights_load(fenv, tmp_path, capsys, monkeypatch):
    other = save_model(tmp_path / "wide-llama", fenv["tok"], hidden_size=48)
    import flatquant.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    rc, _, err = run(eval_args(fenv, tmp_path / "results", "--method", "flatquant", "--params", fenv["ref"],
                               model=other), capsys)
    assert_one_line_error(rc, err, "hidden_size is 64 in the file, 48 in the model")
    rc, _, err = run(quantize_args(fenv, _params_copy(fenv, tmp_path), tmp_path / "results", model=other), capsys)
    assert_one_line_error(rc, err, "hidden_size")


def test_same_shapes_other_model(fenv, tmp_path, capsys):
    other = save_model(tmp_path / "other-llama", fenv["tok"], seed=1)
    params = _params_copy(fenv, tmp_path)
    rc, _, err = run(quantize_args(fenv, params, tmp_path / "results", model=other), capsys)
    assert_one_line_error(rc, err, "calibrated on a different model", "--no-resume")
    results = tmp_path / "results-eval"
    rc, _, err = run(eval_args(fenv, results, "--method", "flatquant", "--params", params, model=other), capsys)
    assert rc == 0 and "calibrated on a different model" in err, err
    (rec,) = records(results)
    assert rec["params_model_fingerprint"] != rec["model_fingerprint"]


def test_reuse_is_announced_and_training_bits_recorded(fenv, tmp_path, capsys):
    params = _params_copy(fenv, tmp_path)
    rc, _, err = run(quantize_args(fenv, params, ""), capsys)
    assert rc == 0 and "reusing the finished calibration" in err, err
    results = tmp_path / "results"
    rc, out, err = run(eval_args(fenv, results, "--method", "flatquant", "--params", params, "--w-bits", "8",
                                 "--a-bits", "8", "--kv-bits", "8"), capsys)
    assert rc == 0 and "trained at W4A4KV4 and are evaluated at W8A8KV8" in err, err
    assert "lower is better" in out and "not comparable" in out and f"1 JSON record(s) written to {results}" in out
    (rec,) = records(results)
    assert rec["params_trained_bits"] == "W4A4KV4" and (rec["w_bits"], rec["a_bits"]) == (8, 8)
    assert rec["params_model_fingerprint"] == rec["model_fingerprint"]
