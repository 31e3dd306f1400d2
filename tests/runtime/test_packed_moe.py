"""Packed W4A4KV4 MoE models (Mixtral, Qwen2-MoE with a shared expert and a dense layer, Qwen3-MoE).

Tolerances as tests/runtime/test_packed_model.py: against the fake-quant model after flatquant.core.reparam
(same float64 folding, same integer codes) the packed model differs by float32 summation order only,
|Δlogit| <= 1e-4 · max|logit|; against the unfolded fake-quant model 2 % (folding the channel scales moves
activations by float32 rounding, which can flip a 4-bit code at a tie).
"""
from __future__ import annotations

import filecmp
import json

import pytest
import torch

import flatquant
from flatquant.errors import CheckpointError
from flatquant.kernels import W4A4Linear
from flatquant.runtime.kvcache import PackedKVCache
from flatquant.runtime.moe import CodesLinear, PackedMoE
from tests.models.moe_models import MOE_FAMILIES
from tests.runtime.conftest import reparameterized

TIGHT, LOOSE = 1e-4, 2e-2


def _ids(n=2, length=20, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol):
    return (a - b).abs().max().item() <= tol * a.abs().max().item()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_logits_match_fake_quant(family, moe_models, moe_packed_dirs):
    fake = moe_models(family)
    packed = flatquant.load_quantized(moe_packed_dirs(family), device="cpu")
    ids = _ids()
    with torch.no_grad():
        ref = reparameterized(fake)(ids, use_cache=False).logits
        unfolded = fake(ids, use_cache=False).logits
        got = packed(ids, use_cache=False).logits
        got_cached = packed(ids).logits  # prefill through the KV4 cache
    assert _close(ref, got, TIGHT), (ref - got).abs().max()
    assert _close(ref, got_cached, TIGHT)
    assert _close(unfolded, got, LOOSE), (unfolded - got).abs().max()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_prefill_then_decode_matches_full_forward(family, moe_models, moe_packed_dirs):
    packed = flatquant.load_quantized(moe_packed_dirs(family), device="cpu")
    ids = _ids(length=14, seed=1)
    with torch.no_grad():
        ref = reparameterized(moe_models(family))(ids, use_cache=False).logits
        out = packed(ids[:, :9], past_key_values=PackedKVCache(packed), use_cache=True)
        steps = [out.logits]
        for t in range(9, 14):  # decode: one token at a time through the experts
            out = packed(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == 14
    assert _close(ref, torch.cat(steps, 1), TIGHT)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_greedy_generate_matches_fake_quant(family, moe_models, moe_packed_dirs):
    packed = flatquant.load_quantized(moe_packed_dirs(family), device="cpu")
    ids = _ids(n=1, length=6, seed=2)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = packed.generate(ids, **kw)
        assert got.shape == (1, 16)
        assert torch.equal(got, reparameterized(moe_models(family)).generate(ids, **kw))


def test_moe_modules_router_and_shared_site(moe_models, moe_packed_dirs):
    fake = moe_models("qwen2_moe")
    packed = flatquant.load_quantized(moe_packed_dirs("qwen2_moe"), device="cpu")
    moe_layer, dense_layer = packed.model.layers
    block = moe_layer.mlp
    assert isinstance(block, PackedMoE) and not isinstance(dense_layer.mlp, PackedMoE)  # mlp_only_layers: dense
    assert isinstance(block.gate.weight, torch.nn.Parameter) and block.gate.weight.dtype == torch.float32
    assert all(isinstance(e.gate_up, CodesLinear) and type(e.down) is W4A4Linear for e in block.experts)
    assert isinstance(block.shared_expert.fq_gate_up, CodesLinear) and block.shared_expert.fq_gate_up.out_features == 96
    assert block.experts[0].down.p1 is not None and block.fq_in.p1 is not None
    keys = set(packed.state_dict())
    assert "model.layers.0.mlp.fq_in.alpha" in keys and "model.layers.0.mlp.experts.0.gate_up.alpha" not in keys
    # P_ug's channel scale sits in the post norm and back in the router's and shared gate's columns
    fl = fake.model.layers[0]
    c = fl.fq_transforms["mlp_in"].channel_scale().double()
    for ours, theirs in ((block.gate, fl.mlp.gate), (block.shared_expert_gate, fl.mlp.shared_expert_gate)):
        assert torch.allclose(ours.weight.double(), theirs.weight.double() * c, rtol=1e-6, atol=1e-7)
    calls = []
    block.fq_in.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        packed(_ids(), use_cache=False)
    assert len(calls) == 1  # every expert's gate/up (and the shared expert's) read one quantization


def test_moe_export_load_export_is_byte_identical(moe_packed_dirs, tmp_path):
    first = moe_packed_dirs("qwen2_moe")
    again = tmp_path / "again"
    flatquant.save_quantized(flatquant.load_quantized(first, device="cpu"), again)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(first, again, files, shallow=False)
    assert not mismatch and not errors


def test_rtn_moe_export_matches_unfolded(moe_models, moe_packed_dirs):
    fake = moe_models("qwen3_moe", method="rtn")  # no transforms, no scales: exact against the fake model
    packed = flatquant.load_quantized(moe_packed_dirs("qwen3_moe", method="rtn"), device="cpu")
    ids = _ids()
    with torch.no_grad():
        assert _close(fake(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


def test_gptq_moe_export(moe_models, moe_packed_dirs):
    fake = moe_models("qwen2_moe", gptq=True)  # one Hessian per expert, the shared expert's own
    assert fake.model.layers[0].mlp.experts[0].gate_up.has_gptq
    packed = flatquant.load_quantized(moe_packed_dirs("qwen2_moe", gptq=True), device="cpu")
    ids = _ids()
    with torch.no_grad():
        assert _close(reparameterized(fake)(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


def test_unrouted_expert_exports_identity_factors(tmp_path):
    """An expert no calibration token reached keeps identity P_d: written as identity factors."""
    from tests.models.test_moe import _starved_model

    model = _starved_model()
    flatquant.quantize(model, flatquant.QuantConfig(4, 4, 4), method="flatquant", calib=_ids(4, 24),
                       calib_config=flatquant.calib_preset("tiny", epochs=1), progress=False)
    flatquant.save_quantized(model, tmp_path / "p")
    packed = flatquant.load_quantized(tmp_path / "p", device="cpu")
    down = packed.model.layers[0].mlp.experts[3].down
    assert torch.equal(down.p1, torch.eye(down.p1.shape[0])) and torch.equal(down.p2, torch.eye(down.p2.shape[0]))
    ids = _ids()
    with torch.no_grad():
        assert _close(reparameterized(model)(ids, use_cache=False).logits, packed(ids).logits, TIGHT)


# ------------------------------------------------------------------------------ bad checkpoints ---

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _one_line(exc):
    return "\n" not in str(exc.value)


def test_moe_checkpoint_without_moe_entry_is_refused(moe_packed_dirs, tmp_path):
    path = _copy(moe_packed_dirs("mixtral"), tmp_path / "bad")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["moe"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not describe a packed model") as e:
        flatquant.load_quantized(path, device="cpu")
    assert _one_line(e)


def test_moe_checkpoint_missing_expert_tensor_is_refused(moe_packed_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(moe_packed_dirs("mixtral"), tmp_path / "bad")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.down.p1"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="experts.2.down.p1 is missing") as e:
        flatquant.load_quantized(path, device="cpu")
    assert _one_line(e)


def test_foreign_moe_folder_is_refused(tmp_path):
    from tests.models.moe_models import build_moe_model

    build_moe_model("qwen3_moe").save_pretrained(tmp_path / "hf")  # an ordinary (unquantized) MoE checkpoint
    with pytest.raises(CheckpointError, match="not a flatquant checkpoint") as e:
        flatquant.load_quantized(tmp_path / "hf", device="cpu")
    assert _one_line(e)


def test_moe_export_of_unsupported_settings_is_refused(tmp_path):
    from tests.models.moe_models import build_moe_model

    model = build_moe_model("mixtral")
    flatquant.quantize(model, flatquant.QuantConfig(4, 8, 4), method="rtn", progress=False)
    with pytest.raises(CheckpointError, match="8 bits") as e:
        flatquant.save_quantized(model, tmp_path / "packed")
    assert _one_line(e) and not (tmp_path / "packed").exists()


# ------------------------------------------------------------------------------------ kernels ---

@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors: the interpreter only")
def test_moe_triton_backend_matches_reference(moe_packed_dirs):
    """The GPU kernels (Triton's CPU interpreter, float32): prefill and a decode step as the reference."""
    from flatquant.runtime import set_runtime_backend

    packed = flatquant.load_quantized(moe_packed_dirs("qwen2_moe"), device="cpu")
    ids = _ids(n=1, length=6, seed=4)
    logits = {}
    for backend in ("reference", "triton"):
        set_runtime_backend(packed, backend)
        assert all(m.backend == backend for m in packed.modules() if isinstance(m, W4A4Linear))
        with torch.no_grad():
            out = packed(ids[:, :5])
            steps = [out.logits, packed(ids[:, 5:], past_key_values=out.past_key_values).logits]
        logits[backend] = torch.cat(steps, 1)
    assert _close(logits["reference"], logits["triton"], TIGHT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_packed_on_gpu(family, moe_models, moe_packed_dirs):
    """On the GPU (float32): the reference kernels as on the CPU up to a 4-bit code flipped at a tie by another
    summation order (LOOSE); the Triton kernels (float32 dots may round like TF32) within a relative error
    norm of 5 %; generate runs."""
    from flatquant.runtime import set_runtime_backend

    packed = flatquant.load_quantized(moe_packed_dirs(family), device="cuda", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        ref = reparameterized(moe_models(family))(ids, use_cache=False).logits
        got = {}
        for backend in ("reference", "triton"):
            set_runtime_backend(packed, backend)
            got[backend] = packed(ids.cuda()).logits.cpu()
        gen = packed.generate(ids[:1, :6].cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 14) and torch.isfinite(got["triton"]).all()
    assert _close(ref, got["reference"], LOOSE), (ref - got["reference"]).abs().max()
    rel = ((got["triton"] - ref).norm() / ref.norm()).item()
    assert rel <= 0.05, rel
