"""MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) on tiny random models: structure, exactness, calibration."""
import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize
from flatquant.core.modules import QuantLinear
from flatquant.methods.flatquant import calibrate, load_calibrated
from flatquant.models.families import family_for
from flatquant.models.moe import MoEBlock
from tests.models.moe_models import MOE_FAMILIES, build_moe_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ids(n=4, seqlen=24, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_block_equals_transformers_block(family):
    model = build_moe_model(family)
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    hf_block = fam.mlp_module(layer)
    x = torch.randn(3, 7, model.config.hidden_size)
    with torch.no_grad():
        ref = hf_block(x)
        block = fam.prepare_layer(layer)
        assert isinstance(block, MoEBlock) and fam.mlp_module(layer) is block and fam.prepare_layer(layer) is block
        assert torch.allclose(block(x), ref, atol=1e-6, rtol=1e-5)
    assert block.experts[1].gate_up.weight.data_ptr() != block.experts[0].gate_up.weight.data_ptr()


def test_site_map_of_moe_layers():
    model = build_moe_model("qwen2_moe")
    fam = family_for(model)
    moe_layer, dense_layer = fam.decoder_layers(model)
    sites = fam.layer_sites(moe_layer)
    assert list(sites)[:3] == ["attn_in", "o_in", "mlp_in"]
    assert [s for s in sites if s.startswith("down_in")] == [f"down_in.{e}" for e in range(4)] + ["down_in.shared"]
    assert sites["mlp_in"][-2:] == ("shared_expert.gate_proj", "shared_expert.up_proj")
    assert fam.site_norm("mlp_in", moe_layer) is None and fam.site_norm("mlp_in", dense_layer) == "post"
    assert fam.site_width(moe_layer, "down_in.2") == 32 and fam.site_width(moe_layer, "down_in.shared") == 48
    assert fam.layer_sites(dense_layer) == fam.sites  # mlp_only_layers stay dense
    assert fam.base_role("experts.3.down") == "down_proj" and fam.base_role("shared_expert.up_proj") == "up_proj"


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["flatquant", "quarot", "smoothquant"])
def test_all_moe_placements_exact_at_16_bits(family, method):
    model = build_moe_model(family)
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, QuantConfig(16, 16, 16), method=method, calib=ids,
             calib_config=calib_preset("tiny", epochs=1), progress=False)
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    block = fam.mlp_module(layer)
    assert block.input_site is not None  # one shared gate/up site ...
    assert all(ex.gate_up.input_site is None for ex in block.experts)
    assert not isinstance(block.gate, QuantLinear)  # ... and the router stays full precision
    if method != "smoothquant":  # each expert its own P_d
        downs = [ex.down.input_site.transform for ex in block.experts]
        assert all(t is not None for t in downs) and len({id(t) for t in downs}) == len(downs)
    assert _rel(_logits(model, ids), ref) < 1e-4


def test_calibration_lowers_moe_layer_loss():
    model = build_moe_model("mixtral")
    report = calibrate(model, QuantConfig(4, 4, 4), _ids(8, 32), calib_preset("tiny", epochs=6, batch_size=4),
                       progress=False, log=lambda m: None)
    for row in report["calib_layers"]:
        assert row["loss_after"] < row["loss_before"]


def test_each_expert_sees_only_its_routed_tokens():
    model = build_moe_model("qwen3_moe")
    fam = family_for(model)
    block = fam.prepare_layer(fam.decoder_layers(model)[0])
    seen = [0] * block.num_experts
    hooks = [ex.gate_up.register_forward_pre_hook(lambda _m, a, e=e: seen.__setitem__(e, seen[e] + a[0].shape[0]))
             for e, ex in enumerate(block.experts)]
    block.token_counts = torch.zeros(block.num_experts, dtype=torch.long)
    with torch.no_grad():
        block(torch.randn(2, 9, 64))
    for h in hooks:
        h.remove()
    assert seen == block.token_counts.tolist() and sum(seen) == 2 * 9 * model.config.num_experts_per_tok


def _starved_model():
    """Mixtral, top-1 routing, expert 3's router row the mean of rows 0 and 1: its logit never wins."""
    model = build_moe_model("mixtral", num_experts_per_tok=1)
    fam = family_for(model)
    for layer in fam.decoder_layers(model):
        w = fam.mlp_module(layer).gate.weight
        with torch.no_grad():
            w[3] = (w[0] + w[1]) / 2
    return model


def test_unrouted_expert_keeps_identity_and_save_load_round_trip(tmp_path):
    model = _starved_model()
    ids = _ids()
    logs = []
    report = calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny"), progress=False,
                       out_dir=tmp_path / "p", log=logs.append)
    fam = family_for(model)
    for row, layer in zip(report["calib_layers"], fam.decoder_layers(model)):
        assert row["unrouted_experts"] == [3]
        assert "down_in_3" not in layer.fq_transforms and "down_in_2" in layer.fq_transforms
        assert fam.mlp_module(layer).experts[3].down.input_site.transform is None  # identity
    assert any("no calibration tokens" in m and "[3]" in m for m in logs)
    fresh = _starved_model()
    load_calibrated(fresh, tmp_path / "p")
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


@pytest.mark.parametrize("method", ["rtn", "quarot", "smoothquant"])
def test_baselines_with_gptq_per_expert(method):
    model = build_moe_model("qwen2_moe")
    ids = _ids()
    ref = _logits(model, ids)
    quantize(model, QuantConfig(4, 4, 16, weight_quantizer="gptq"), method=method, calib=ids, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < 1.0


def test_gptq_one_hessian_per_expert():
    from flatquant.api import quantize_with_report

    model = _starved_model()
    ids = _ids()
    report = quantize_with_report(model, QuantConfig(4, 16, 16, weight_quantizer="gptq"), method="rtn", calib=ids,
                                  progress=False)
    fam = family_for(model)
    groups = fam.gptq_groups(fam.decoder_layers(model)[0])
    assert [k for k in groups if k.startswith("mlp_in.")] == [f"mlp_in.{e}" for e in range(4)]
    for row in report["gptq"]["layers"]:
        assert row["rtn_kept"] == ["mlp_in.3", "down_in.3"]  # expert 3 saw no token: its RTN weights stay
        assert row["gptq_err"] < row["rtn_err"]
    ql = fam.mlp_module(fam.decoder_layers(model)[0]).experts[3].down
    ql.unfreeze()
    w, _ = ql.effective_weight_and_bias(quantize=False)
    assert torch.allclose(ql.gptq_weight(), ql.w_quantizer(w), atol=1e-6)  # GPTQ with H = I is RTN


def test_flatquant_with_gptq_weights_on_moe(tmp_path):
    model = _starved_model()
    ids = _ids()
    report = calibrate(model, QuantConfig(4, 4, 4, weight_quantizer="gptq"), ids, calib_preset("tiny", epochs=1),
                       progress=False, out_dir=tmp_path / "p", log=lambda m: None)
    for row in report["calib_layers"]:
        assert row["gptq_err"] < row["gptq_rtn_err"]
    fam = family_for(model)
    block = fam.mlp_module(fam.decoder_layers(model)[0])
    assert all(block.experts[e].down.has_gptq for e in range(4))
    ql = block.experts[3].gate_up  # expert 3 saw no token: its GPTQ codes are its RTN codes
    w, _ = ql.effective_weight_and_bias(quantize=False)
    assert torch.allclose(ql.gptq_weight(), ql.w_quantizer(w), atol=1e-6)
    fresh = _starved_model()  # the saved GPTQ codes load back (expert 3 without any)
    load_calibrated(fresh, tmp_path / "p", calib=ids)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def _scaled_sites(layer):
    return {k: t.channel_scale() for k, t in layer.fq_transforms.items()
            if (k.startswith("down_in") or k == "mlp_in") and t.channel_scale() is not None}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_scale_fold_is_exact_at_16_bits(family):
    """P_ug's scale into the post norm (and back into the 16-bit router / shared gate columns), each expert's
    c_d into its up rows: with quantizers off the folded model computes the same function."""
    import copy

    from flatquant.core.reparam import reparameterize

    model = build_moe_model(family)
    ids = _ids()
    quantize(model, QuantConfig(16, 16, 16), method="flatquant", calib=ids,
             calib_config=calib_preset("tiny", epochs=1), progress=False)
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    scales = _scaled_sites(layer)
    want = {"mlp_in", "down_in_0"} | ({"down_in_shared"} if family == "qwen2_moe" else set())
    assert want <= set(scales) and all((c - 1).abs().max() > 1e-3 for c in scales.values())
    folded = reparameterize(copy.deepcopy(model))
    flayer = fam.decoder_layers(folded)[0]
    assert not _scaled_sites(flayer)  # every MoE scale now lives in a norm, router columns or up rows
    c = scales["mlp_in"].double()
    assert torch.allclose(flayer.mlp.gate.weight.double(), layer.mlp.gate.weight.double() * c, rtol=1e-6)
    assert _rel(_logits(folded, ids), _logits(model, ids)) < 1e-5


def test_reparameterized_moe_model_matches_training_mode():
    """W4A4KV4: folding moves activations by float32 rounding only (a 4-bit code may flip at a tie)."""
    import copy

    from flatquant.core.reparam import reparameterize

    model = build_moe_model("qwen2_moe")
    ids = _ids()
    calibrate(model, QuantConfig(4, 4, 4), ids, calib_preset("tiny", epochs=1), progress=False, log=lambda m: None)
    assert _scaled_sites(family_for(model).decoder_layers(model)[0])
    folded = reparameterize(copy.deepcopy(model))
    assert not _scaled_sites(family_for(folded).decoder_layers(folded)[0])
    a, b = _logits(model, ids), _logits(folded, ids)
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
