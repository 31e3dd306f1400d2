"""Layer streaming: shards read lazily match the model, activations round-trip through a memmap, and the
`quantize --offload` command saves the same parameters as the in-memory path (GPTQ included)."""
from __future__ import annotations

import json

import pytest
import torch

from flatquant import cli
from flatquant.calib import offload
from tests.conftest import build_model


@pytest.fixture
def sharded_dir(tmp_path, tiny_tokenizer):
    model = build_model("llama", vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index
    tiny_tokenizer.save_pretrained(path)
    return model, path


def test_sharded_source_matches_the_model_one_layer_at_a_time(sharded_dir):
    model, path = sharded_dir
    assert (path / "model.safetensors.index.json").is_file()
    src = offload.ShardedSource(path, "cpu", torch.float32)
    skel = src.skeleton()
    layers = src.family.decoder_layers(skel)
    assert all(p.is_meta for p in layers.parameters())  # nothing of the layers read yet
    assert skel.get_output_embeddings().weight.is_meta  # calibration never reaches the head
    assert torch.equal(skel.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(skel.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    layer = src.layer(1)
    ref = dict(model.model.layers[1].named_parameters())
    for name, p in layer.named_parameters():
        assert not p.is_meta and torch.equal(p, ref[name]), name
    assert sum(not p.is_meta for p in layers.parameters()) == len(ref)  # only that layer is real
    x = torch.randn(2, 8, model.config.hidden_size)
    pos = torch.arange(8)[None].expand(2, -1)
    pe = model.model.rotary_emb(x, pos)
    assert torch.equal(_out(layer(x, position_embeddings=pe, attention_mask=None)),
                       _out(model.model.layers[1](x, position_embeddings=pe, attention_mask=None)))
    src.release(1)
    assert all(p.is_meta for p in layers.parameters())
    src.unload()  # embeddings freed once the inputs are captured, read again on demand
    assert skel.get_input_embeddings().weight.is_meta
    assert torch.equal(src.skeleton().get_input_embeddings().weight, model.get_input_embeddings().weight)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_activations_round_trip(tmp_path, dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    acts = offload.activations("disk", tuple(x.shape), dtype, tmp_path / "acts", "a")
    acts.copy_(x)
    assert torch.equal(offload.open_activations(tmp_path / "acts", "a", tuple(x.shape), dtype), x)
    del acts
    offload.drop_activations(tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def _run(argv, capsys):
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return (rc, *capsys.readouterr())


def test_quantize_offload_disk_equals_in_memory_with_gptq(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    common = ["--model", tiny_model_dir, "--preset", "tiny", "--device", "cpu", "--data-dir", tiny_data_dir,
              "--weight-quantizer", "gptq", "--results-dir", tmp_path / "res", "--no-progress", "--seqlen", "32"]
    rc, out, err = _run(["quantize", *common, "--output", tmp_path / "streamed", "--offload", "disk"], capsys)
    assert rc == 0, err
    assert "layer   1 [2/2]" in out and "ETA" in out
    rc, _, err = _run(["quantize", *common, "--output", tmp_path / "memory", "--compare", ""], capsys)
    assert rc == 0, err
    a, b = tmp_path / "streamed", tmp_path / "memory"
    files = sorted(p.name for p in (a / "layers").iterdir())
    assert files == ["layer_000.safetensors", "layer_001.safetensors"]
    for f in files:
        assert (a / "layers" / f).read_bytes() == (b / "layers" / f).read_bytes(), f
    meta = json.loads((a / "flatquant.json").read_text())
    assert meta["complete"] and meta["gptq"]["streamed"] and meta["calib"]["offload"] == "disk"
    assert meta["model_fingerprint"] == json.loads((b / "flatquant.json").read_text())["model_fingerprint"]
    assert not (tmp_path / "streamed.partial").exists() and not (a / "_activations").exists()
    rc, _, err = _run(["eval", "--method", "flatquant", "--params", a, *common], capsys)  # usable as saved
    assert rc == 0, err


def test_offload_refusals_are_one_line(tmp_path, capsys):
    rc, _, err = _run(["quantize", "--model", "smollm2-135m", "--offload", "disk", "--device", "cpu",
                       "--output", tmp_path / "o"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "GGUF" in err and "--offload cpu" in err, err
    rc, _, err = _run(["quantize", "--model", "some-org/some-model", "--offload", "cpu", "--device", "cpu",
                       "--output", tmp_path / "o"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err


def test_module_source_streaming_equals_in_memory_calibration(tmp_path, tiny_tokenizer):
    """A model held in CPU memory (how GGUF files stream) calibrates to the same bytes as `calibrate`."""
    from flatquant.calib.streaming import calibrate_streaming
    from flatquant.config import CalibConfig, method_config
    from flatquant.methods.flatquant import calibrate

    cc = CalibConfig(nsamples=4, seqlen=32, epochs=2, batch_size=2)
    q = method_config("flatquant", calib=cc)
    windows = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    model = build_model("llama", vocab_size=len(tiny_tokenizer))
    src = offload.ModuleSource(build_model("llama", vocab_size=len(tiny_tokenizer)), "cpu")
    report = calibrate_streaming(src, q, windows, cc, tmp_path / "a", mode="cpu", seed=3, log=lambda _m: None)
    calibrate(model, q, windows, cc, seed=3, out_dir=tmp_path / "b", progress=False, log=lambda _m: None)
    files = sorted((tmp_path / "b" / "layers").iterdir())
    assert len(files) == 2 and len(report["calib_layers"]) == 2
    for f in files:
        assert (tmp_path / "a" / "layers" / f.name).read_bytes() == f.read_bytes()
    assert all(not hasattr(lay, "fq_transforms") for lay in src.family.decoder_layers(src.model))  # untouched


def test_shard_fingerprint_equals_the_loaded_models(sharded_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from flatquant.calib.integrity import model_fingerprint

    for path in (sharded_dir[1], tiny_model_dir):  # untied and tied output head
        for dtype in (torch.float32, torch.float16):
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            src = offload.ShardedSource(path, "cpu", dtype)
            assert offload.shard_fingerprint(src) == model_fingerprint(loaded)
            src.skeleton()
            src.unload()
            assert offload.shard_fingerprint(src) == model_fingerprint(loaded)  # after streaming too
            src.skeleton()  # a tied head read again after unload


def test_streamed_resume_refuses_another_model(sharded_dir, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from flatquant.calib.stream_job import _stamp_or_check
    from flatquant.config import CalibConfig, method_config

    cc = CalibConfig(nsamples=4, seqlen=32, epochs=2, batch_size=2, seed=0, offload="disk")
    _stamp_or_check(tmp_path / "out.partial", offload.ShardedSource(sharded_dir[1], "cpu", torch.float32),
                    method_config("flatquant", w_clip_search=False, calib=cc), cc, no_resume=False)
    rc, _, err = _run(["quantize", "--model", tiny_model_dir, "--preset", "tiny", "--device", "cpu", "--data-dir",
                       tiny_data_dir, "--offload", "disk", "--output", tmp_path / "out"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "different model" in err, err
