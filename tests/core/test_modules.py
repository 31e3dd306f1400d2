import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from flatquant import QuantConfig, quantize
from flatquant.core.modules import KVQuant, NormWithSite, QuantLinear, quant_linears
from flatquant.models.families import family_for

METHODS = ["rtn", "smoothquant", "quarot"]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", METHODS)
def test_baselines_exact_at_16_bits(tiny_model_factory, family, method):
    model = tiny_model_factory(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, QuantConfig(16, 16, 16), method=method, calib=ids)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_linear_wrapped_exactly_once(tiny_model_factory, method):
    model = tiny_model_factory("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    quantize(model, QuantConfig(4, 4, 4), method=method, calib=ids)
    fam = family_for(model)
    wrapped = quant_linears(model)
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    assert len({id(m) for m in wrapped}) == len(wrapped)
    for layer in fam.decoder_layers(model):
        assert all(isinstance(m, QuantLinear) and not isinstance(m.weight, QuantLinear)
                   for m in fam.linears(layer).values())
        assert isinstance(fam.norm(layer, "input"), NormWithSite)
        assert isinstance(fam.attention(layer).fq_kv, KVQuant)
    # embeddings and lm_head stay in high precision
    assert not isinstance(model.lm_head, QuantLinear)
    with pytest.raises(RuntimeError, match="already quantized"):
        quantize(model, QuantConfig(4, 4, 4), method="rtn")


def test_4bit_weights_lie_on_a_per_channel_grid(tiny_model_factory):
    model = tiny_model_factory("llama")
    quantize(model, QuantConfig(4, 16, 16), method="rtn")
    w = quant_linears(model)[0]._cached[0]
    for row in w:
        assert len(torch.unique(row)) <= 16


def test_kv_quantized_after_rope(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    quantize(model, QuantConfig(16, 16, 4), method="rtn")
    fam = family_for(model)
    layer = fam.decoder_layers(model)[0]
    attn = fam.attention(layer)
    seen = {}
    attn.fq_kv.k_quantizer.register_forward_hook(lambda m, a, o: seen.update(k_in=a[0], k_out=o))
    captured = {}
    layer.register_forward_pre_hook(lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"],
                                                                    pe=k["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model(ids)
        normed = layer.input_layernorm.norm(captured["h"])
        k = attn.k_proj(normed).view(1, 12, -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(normed).view(1, 12, -1, attn.head_dim).transpose(1, 2)
        _, k_rope = apply_rotary_pos_emb(q, k, *captured["pe"])
    assert torch.allclose(seen["k_in"], k_rope, atol=1e-5)  # the quantizer sees keys after RoPE
    assert not torch.allclose(seen["k_out"], k_rope)
    # asymmetric 4-bit per (token, head): at most 16 levels in each head vector
    assert max(len(torch.unique(v)) for v in seen["k_out"].reshape(-1, attn.head_dim)) <= 16


@pytest.mark.parametrize("setting", [(4, 16, 16), (16, 4, 16), (16, 16, 4)])
def test_each_quantizer_kind_changes_output(tiny_model_factory, setting):
    model = tiny_model_factory("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, QuantConfig(*setting), method="rtn")
        out = model(ids).logits
    assert 1e-4 < _rel(out, ref) < 1.0


def test_quarot_beats_rtn_at_w4a4kv4_with_outliers(tiny_model_factory):
    errs = {}
    for method in ("rtn", "quarot"):
        model = tiny_model_factory("llama")
        with torch.no_grad():  # a few outlier channels in the residual stream, as real LLMs have
            model.model.embed_tokens.weight[:, :3] *= 25
        ids = torch.randint(0, model.config.vocab_size, (4, 32))
        with torch.no_grad():
            ref = model(ids).logits
            quantize(model, QuantConfig(4, 4, 4, w_clip_search=method == "quarot"), method=method, calib=ids)
            errs[method] = _rel(model(ids).logits, ref)
    assert errs["quarot"] < errs["rtn"]


def test_quant_linear_holds_gptq_weights():
    from flatquant.core.quantizer import Quantizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=True)
    m = QuantLinear(lin, Quantizer(4))
    rtn, b = m.effective_weight_and_bias()
    assert not m.has_gptq and "gptq_codes" not in m.state_dict()
    codes = torch.randint(-8, 8, (8, 16), dtype=torch.int8)
    scale = torch.rand(8, 1) + 0.1
    m.set_gptq(codes, scale)
    w, b2 = m.effective_weight_and_bias()
    assert torch.equal(w, codes.float() * scale) and torch.equal(b, b2)  # bias handling unchanged
    assert torch.equal(m.effective_weight_and_bias(quantize=False)[0], lin.weight.float())  # the target, as before
    assert set(m.state_dict()) >= {"gptq_codes", "gptq_scale"} and "gptq_zero" not in m.state_dict()
    m.freeze()
    x = torch.randn(3, 16)
    assert torch.allclose(m(x), x @ w.t() + b, atol=1e-6)
    m.double()  # .to(): codes stay integers, the weight is unchanged
    assert m.gptq_codes.dtype == torch.int8 and m.gptq_scale.dtype == torch.float64
    assert torch.equal(m.gptq_weight(), w)
    with pytest.raises(ValueError, match="do not fit"):
        m.set_gptq(codes[:4], scale)
    m.clear_gptq()
    assert not m.has_gptq and torch.equal(m.effective_weight_and_bias()[0], rtn)


def test_cast_weights_keeps_what_freeze_computed_from(tiny_model_factory):
    """After freeze + cast to fp16, the transforms and quantizers keep float32, so recomputing a layer's
    quantized weight (what export does) gives exactly the weight evaluation uses. A plain layer.to(fp16)
    would round the Kronecker factors and clip logits first."""
    from flatquant import FlatQuantConfig, calib_preset
    from flatquant.core.modules import cast_weights, freeze, unfreeze
    from flatquant.core.quantizer import Quantizer
    from flatquant.core.transforms import Transform

    model = tiny_model_factory("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    quantize(model, FlatQuantConfig(4, 4, 4, calib=calib_preset("tiny")), calib=ids, progress=False)
    layer = family_for(model).decoder_layers(model)[0]
    for m in quant_linears(layer):  # an fp16 model's weights: on the fp16 grid when freeze runs
        m.weight.data = m.weight.data.half().float()
    freeze(layer, dtype=torch.float16)
    cast_weights(layer, torch.float16)
    kept = [p for m in layer.modules() if isinstance(m, (Transform, Quantizer)) for p in m.parameters()]
    assert len(kept) > 10 and all(p.dtype == torch.float32 for p in kept), sorted({str(p.dtype) for p in kept})
    cached = {id(m): m._cached[0] for m in quant_linears(layer)}
    unfreeze(layer)  # as export does: the transforms recomputed from their parameters
    for m in quant_linears(layer):
        assert m.weight.dtype == torch.float16
        w, _ = m.effective_weight_and_bias(torch.float32)
        assert torch.equal(w.half(), cached[id(m)])
