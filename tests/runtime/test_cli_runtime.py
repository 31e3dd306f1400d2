"""`flatquant export` from saved parameters and `flatquant generate` on the packed checkpoint."""
from __future__ import annotations

import json

import torch

import flatquant
from flatquant.cli import main


def test_export_then_generate(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from flatquant import QuantConfig, calib_preset, quantize
    from flatquant.methods.flatquant import load_calibrated
    from flatquant.models.loading import load_model
    from tests.runtime.conftest import SAMPLE_TEXT

    model, tok = load_model(str(tiny_model_dir), dtype=torch.float32)
    ids = tok(SAMPLE_TEXT, return_tensors="pt")["input_ids"][0]
    calib = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(4)])
    params = tmp_path / "params"
    quantize(model, QuantConfig(4, 4, 4), method="flatquant", calib=calib, calib_config=calib_preset("tiny"),
             artifacts=str(params), progress=False)
    out = tmp_path / "packed"
    assert main(["export", "--params", str(params), "--model", str(tiny_model_dir), "--output", str(out),
                 "--dtype", "float32"]) == 0
    assert "of the 16-bit model" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["dtype"] == "float32"

    fake, _ = load_model(str(tiny_model_dir), dtype=torch.float32)
    load_calibrated(fake, str(params))
    packed = flatquant.load_quantized(out, device="cpu")
    x = ids[None, :24]
    with torch.no_grad():
        a, b = fake(x, use_cache=False).logits, packed(x).logits
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()

    for extra in ([], ["--chat"]):
        assert main(["generate", "--model", str(out), "--prompt", "The quick brown", "--max-new-tokens", "6",
                     *extra]) == 0
        text = capsys.readouterr().out
        gen = packed.generate(tok("The quick brown", return_tensors="pt")["input_ids"], max_new_tokens=6,
                              do_sample=False, pad_token_id=tok.pad_token_id)
        assert text.strip() == tok.decode(gen[0, -6:], skip_special_tokens=True).strip()


def test_export_bad_params(tiny_model_dir, tmp_path, capsys):
    assert main(["export", "--params", str(tmp_path / "none"), "--model", str(tiny_model_dir), "--output",
                 str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_moe_export_then_generate(tiny_tokenizer, tmp_path, capsys):
    """`flatquant export` / `generate` on an MoE model (Qwen2-MoE: shared expert, one dense layer)."""
    from flatquant import QuantConfig, calib_preset, quantize
    from tests.models.moe_models import build_moe_model

    src = tmp_path / "moe"
    build_moe_model("qwen2_moe", vocab_size=len(tiny_tokenizer)).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    model = build_moe_model("qwen2_moe", vocab_size=len(tiny_tokenizer))
    calib = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    params = tmp_path / "params"
    quantize(model, QuantConfig(4, 4, 4), method="flatquant", calib=calib, calib_config=calib_preset("tiny", epochs=1),
             artifacts=str(params), progress=False)
    out = tmp_path / "packed"
    assert main(["export", "--params", str(params), "--model", str(src), "--output", str(out),
                 "--dtype", "float32"]) == 0
    assert "moe" in json.loads((out / "config.json").read_text())["quantization_config"]
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "The quick brown", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
