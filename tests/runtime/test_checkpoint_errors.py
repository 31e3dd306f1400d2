"""Bad checkpoint folders: one CheckpointError line from load_quantized, exit status 2 from the CLI."""
from __future__ import annotations

import json
import shutil

import pytest

import flatquant
from flatquant.cli import main
from flatquant.errors import CheckpointError


@pytest.fixture
def ckpt(packed_dirs, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(packed_dirs("llama"), path)
    return path


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _fails(path, capsys, words):
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=words):
        flatquant.load_quantized(path, device="cpu")
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatquant: error:"), err


def test_not_a_folder(tmp_path, capsys):
    _fails(tmp_path / "nothing", capsys, "not a folder")


def test_plain_hf_model_is_not_a_checkpoint(tiny_model_dir, capsys):
    _fails(tiny_model_dir, capsys, "not a flatquant checkpoint")


def test_unknown_layout_version(ckpt, capsys):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(layout_version=99))
    _fails(ckpt, capsys, "unknown flatquant layout version 99")


def test_truncated_shard(ckpt, capsys):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _fails(ckpt, capsys, "truncated")


def test_missing_shard(ckpt, capsys):
    (ckpt / "model.safetensors").unlink()
    _fails(ckpt, capsys, "missing shard")


def test_missing_shard_of_index(packed_dirs, fake_models, tiny_tokenizer, tmp_path, capsys):
    path = tmp_path / "sharded"
    flatquant.save_quantized(fake_models("llama"), path, tokenizer=tiny_tokenizer, shard_bytes=20_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    flatquant.load_quantized(path, device="cpu")  # complete: loads
    shards[1].unlink()
    _fails(path, capsys, "missing shard")


def test_shape_mismatch(ckpt, capsys):
    _edit_config(ckpt, lambda c: c.update(vocab_size=c["vocab_size"] + 8))
    _fails(ckpt, capsys, "shape mismatch")


def test_export_refuses_mixed_precision(tiny_model_factory, tmp_path):
    from flatquant import QuantConfig, quantize

    model = tiny_model_factory("llama")
    quantize(model, QuantConfig(4, 4, 4, w_bits_override={"down_proj": 8}), method="rtn", progress=False)
    with pytest.raises(CheckpointError, match="8 bits"):
        flatquant.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_16_bit_kv(tiny_model_factory, tmp_path):
    from flatquant import QuantConfig, quantize

    model = tiny_model_factory("llama")
    quantize(model, QuantConfig(4, 4, 16), method="rtn", progress=False)
    with pytest.raises(CheckpointError, match="16 bits"):
        flatquant.save_quantized(model, tmp_path / "out")


def test_export_does_not_overwrite_other_folders(fake_models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a flatquant checkpoint"):
        flatquant.save_quantized(fake_models("llama"), out)
    assert (out / "notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left behind
