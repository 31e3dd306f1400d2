"""GPTQ (flatquant/gptq.py): the maths on random data, and GPTQ weights end to end on tiny models."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from flatquant import QuantConfig, calib_preset, quantize, quantize_with_report
from flatquant.config import ConfigError
from flatquant.core.modules import quant_linears
from flatquant.core.quantizer import fake_quantize
from flatquant.eval.perplexity import perplexity
from flatquant.methods.flatquant import calibrate, load_calibrated, load_calibrated_with_report
from flatquant.methods.gptq import GPTQError, Hessian, factor_hessian, gptq, gptq_quantize, row_grid


def _correlated_inputs(n=96, tokens=2048, seed=0):
    """Inputs with correlated channels and a few outlier channels, as transformed LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 1.5 * torch.randn(n, n, generator=g) / n**0.5
    x = torch.randn(tokens, n, generator=g) @ mix
    x[:, :3] *= 8
    return x


def _hessian(x):
    h = Hessian(x.shape[1], "cpu")
    for chunk in x.split(500):  # accumulated over batches, as the model-level pass does
        h.add(chunk)
    return h.value()


def _out_err(x, w, wq):
    return (x @ (w - wq).t()).norm().item()


def test_hessian_is_2_over_n_xtx():
    x = _correlated_inputs(tokens=1000)
    assert torch.allclose(_hessian(x), 2 / 1000 * x.t() @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_codes_lie_on_the_rtn_grid(act_order):
    x = _correlated_inputs()
    w = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1))
    res = gptq(w, _hessian(x), bits=4, act_order=act_order)
    assert res.codes.dtype == torch.int8 and res.zero is None
    assert res.codes.min() >= -8 and res.codes.max() <= 7
    scale, _ = row_grid(w, 4, True)
    assert torch.equal(res.scale, scale)  # the grid is RTN's, fixed from the full rows
    assert torch.equal(res.dequantize(), res.codes.float() * scale)
    ratio = _out_err(x, w, res.dequantize()) / _out_err(x, w, fake_quantize(w, 4, True))
    assert ratio < 0.9, ratio


def test_diagonal_hessian_gives_rtn_in_any_order():
    """With a diagonal H nothing is propagated, so GPTQ (either column order) is RTN, exactly."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g)
    h = torch.diag(torch.rand(48, generator=g) + 0.1)
    alpha = torch.rand(32, 1, generator=g) * 0.3 + 0.7
    for sym in (True, False):
        rtn = fake_quantize(w, 4, sym, alpha)
        plain = gptq(w, h, 4, symmetric=sym, alpha=alpha, act_order=False)
        ordered = gptq(w, h, 4, symmetric=sym, alpha=alpha, act_order=True)
        assert torch.equal(plain.codes, ordered.codes)
        assert torch.equal(plain.dequantize(), rtn) and torch.equal(ordered.dequantize(), rtn)


def test_act_order_permutes_back():
    """Act order = the natural-order sweep of the column-permuted problem, with the codes permuted back."""
    x = _correlated_inputs()
    x = x * torch.linspace(0.2, 3.0, x.shape[1])  # distinct diag H, so the order is not the natural one
    h = _hessian(x)
    w = torch.randn(40, x.shape[1], generator=torch.Generator().manual_seed(3))
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(len(perm)))
    ordered = gptq(w, h, 4, act_order=True, block=32)
    manual = gptq(w[:, perm], h[perm][:, perm], 4, act_order=False, block=32)
    assert torch.equal(ordered.codes, manual.codes[:, torch.argsort(perm)])


def test_lazy_blocks_do_not_change_the_result():
    x = _correlated_inputs()
    h = _hessian(x)
    w = torch.randn(24, x.shape[1], generator=torch.Generator().manual_seed(4))
    ref = gptq(w, h, 4, block=x.shape[1]).dequantize()
    for block in (1, 7, 32):
        assert torch.allclose(gptq(w, h, 4, block=block).dequantize(), ref, atol=1e-4)


def test_dead_inputs():
    x = _correlated_inputs()
    dead = torch.tensor([5, 17, 60])
    x[:, dead] = 0
    h = _hessian(x)
    w = torch.randn(32, x.shape[1], generator=torch.Generator().manual_seed(5))
    for sym in (True, False):
        res = gptq(w, h, 4, symmetric=sym)
        deq = res.dequantize()
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[:, dead], torch.zeros(32, 3))  # the grid's zero: no effect, no error spent
        assert _out_err(x, w, deq) < 0.9 * _out_err(x, w, fake_quantize(w, 4, sym))
    assert factor_hessian(h).dead[dead].all()


def test_asymmetric_weights():
    x = _correlated_inputs()
    w = torch.rand(48, x.shape[1], generator=torch.Generator().manual_seed(6)) * 2 + 0.5  # all positive
    res = gptq(w, _hessian(x), 4, symmetric=False)
    scale, zero = row_grid(w, 4, False)
    assert res.codes.dtype == torch.int8 and res.codes.min() >= -8 and res.codes.max() <= 7  # stored minus 8
    assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero - 8)
    codes = res.codes.float() + 8  # the asymmetric codes 0..15
    assert torch.equal(res.dequantize(), (codes - zero) * scale)
    assert _out_err(x, w, res.dequantize()) < 0.9 * _out_err(x, w, fake_quantize(w, 4, False))
    res8 = gptq(w, _hessian(x), 8, symmetric=False)
    assert res8.codes.dtype == torch.int8  # 0..255 stored as -128..127


def test_damping_grows_until_cholesky_succeeds():
    n = 64
    h = torch.eye(n)
    h[0, 0] = -0.05  # indefinite: 1% of mean(diag H) is not enough, 10% is
    w = torch.randn(8, n, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(gptq(w, h, 4, damp=0.01).dequantize()).all()
    with pytest.raises(GPTQError, match="not positive definite"):
        gptq(w, -torch.eye(n), 4)
    bad = torch.eye(n)
    bad[3, 3] = float("nan")
    with pytest.raises(GPTQError, match="non-finite"):
        gptq(w, bad, 4)


def test_factor_is_shared_by_linears_of_one_input():
    x = _correlated_inputs()
    h = _hessian(x)
    factor = factor_hessian(h)
    w1, w2 = torch.randn(2, 16, x.shape[1], generator=torch.Generator().manual_seed(8))
    both = gptq_quantize(torch.cat([w1, w2]), factor, 4)
    assert torch.equal(both.codes[:16], gptq_quantize(w1, factor, 4).codes)  # rows are independent


def test_config_validation():
    for bad in (dict(gptq_damp=0.0), dict(gptq_damp=2.0), dict(gptq_block=0), dict(gptq_act_order="yes"),
                dict(weight_quantizer="bogus")):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    old = {k: v for k, v in QuantConfig().to_dict().items() if not k.startswith("gptq_")}  # a file from before
    assert QuantConfig.normalized(old) == QuantConfig().to_dict()


# ------------------------------------------------------------------------------------------ model level ---

def _windows(model, n=8, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logit_err(model, ids, ref):
    with torch.no_grad():
        return ((model(ids).logits - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_baselines_with_gptq_weights(tiny_model_factory, method):
    base = tiny_model_factory("llama")
    ids = _windows(base)
    with torch.no_grad():
        ref = base(ids).logits
    out = {}
    for bits in ((4, 4, 4), (4, 16, 16)):
        for wq in ("rtn", "gptq"):
            model = copy.deepcopy(base)
            report = quantize_with_report(model, QuantConfig(*bits, weight_quantizer=wq,
                                                             w_clip_search=method == "quarot"),
                                          method=method, calib=ids, progress=False)
            out[bits, wq] = (_logit_err(model, ids, ref),
                             perplexity(model, ids.reshape(1, -1), seqlen=32, progress=False)["ppl"])
            if wq == "gptq":
                for m in quant_linears(model):
                    assert m.gptq_codes.dtype == torch.int8 and m.gptq_codes.abs().max() <= 8
                    assert torch.equal(m._cached[0], m.gptq_weight(m._cached[0].dtype))
                assert [r["layer"] for r in report["gptq"]["layers"]] == [0, 1]
                assert all(r["gptq_err"] < 0.9 * r["rtn_err"] for r in report["gptq"]["layers"])
    # on calibration-like data (the windows GPTQ saw): lower output error, perplexity no worse than RTN's + 2%
    (err_rtn, ppl_rtn), (err_gptq, ppl_gptq) = out[(4, 4, 4), "rtn"], out[(4, 4, 4), "gptq"]
    assert err_gptq < err_rtn and ppl_gptq == ppl_gptq and ppl_gptq < 1.02 * ppl_rtn, out
    assert out[(4, 16, 16), "gptq"][0] < 0.8 * out[(4, 16, 16), "rtn"][0], out  # weights alone: clearly better


def test_gptq_needs_calibration_windows(tiny_model_factory):
    model = tiny_model_factory("llama")
    with pytest.raises(ConfigError, match="calibration windows"):
        quantize(model, QuantConfig(4, 4, 4, weight_quantizer="gptq"), method="quarot")
    assert not hasattr(model.model.layers[0], "fq_transforms")  # nothing changed


def test_flatquant_gptq_save_load_reparam(tiny_model_factory, tmp_path):
    from flatquant.core.reparam import reparameterize

    base = tiny_model_factory("qwen2")
    ids = _windows(base)
    qcfg = QuantConfig(4, 4, 4, weight_quantizer="gptq")
    model = copy.deepcopy(base)
    report = calibrate(model, qcfg, ids, calib_preset("tiny", nsamples=8, seqlen=32), progress=False,
                       out_dir=tmp_path / "p")
    rows = report["calib_layers"]
    assert all(r["loss_after"] < r["loss_before"] and r["gptq_err"] < r["gptq_rtn_err"] for r in rows)
    meta = json.loads((tmp_path / "p" / "flatquant.json").read_text())
    assert meta["complete"] and meta["quant"]["weight_quantizer"] == "gptq" and meta["gptq"]["nsamples"] == 8
    # saved with each layer, loaded back: identical logits, and nothing is recomputed
    fresh = copy.deepcopy(base)
    assert load_calibrated_with_report(fresh, tmp_path / "p")["gptq"]["loaded_from"] == str(tmp_path / "p")
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, fresh(ids).logits)
    # the RTN weights of the same transforms, on request
    rtn = copy.deepcopy(base)
    load_calibrated(rtn, tmp_path / "p", QuantConfig(4, 4, 4))
    assert not any(m.has_gptq for m in quant_linears(rtn))
    with torch.no_grad():
        assert not torch.equal(rtn(ids).logits, logits)
        reparameterize(fresh)  # GPTQ weights fold like RTN ones
        assert ((fresh(ids).logits - logits).norm() / logits.norm()).item() < 1e-4
    assert not any(m.has_gptq for m in quant_linears(fresh))


def test_posthoc_gptq_on_rtn_parameters(tiny_model_factory, tmp_path):
    base = tiny_model_factory("llama")
    ids = _windows(base)
    calibrate(copy.deepcopy(base), QuantConfig(4, 4, 4), ids, calib_preset("tiny", nsamples=8, seqlen=32),
              progress=False, out_dir=tmp_path / "p")
    qcfg = QuantConfig(4, 4, 4, weight_quantizer="gptq")
    with pytest.raises(ConfigError, match="calibration windows"):
        load_calibrated(copy.deepcopy(base), tmp_path / "p", qcfg)
    with torch.no_grad():
        ref = base(ids).logits
    rtn, post = copy.deepcopy(base), copy.deepcopy(base)
    load_calibrated(rtn, tmp_path / "p")
    report = load_calibrated_with_report(post, tmp_path / "p", qcfg, calib=ids)
    assert all(m.has_gptq for m in quant_linears(post)) and report["gptq"]["nsamples"] == 8
    assert _logit_err(post, ids, ref) < _logit_err(rtn, ids, ref)


def test_parameters_saved_before_gptq_fields_still_load(tiny_model_factory, tmp_path):
    """A folder written before weight_quantizer / gptq_* existed loads, resumes and compares equal."""
    base = tiny_model_factory("llama")
    ids = _windows(base, n=4)
    cfg = calib_preset("tiny")
    first = copy.deepcopy(base)
    calibrate(first, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "p")
    meta_path = tmp_path / "p" / "flatquant.json"
    meta = json.loads(meta_path.read_text())
    meta["quant"] = {k: v for k, v in meta["quant"].items() if not k.startswith("gptq_") and k != "weight_quantizer"}
    meta_path.write_text(json.dumps(meta))
    fresh = copy.deepcopy(base)
    load_calibrated(fresh, tmp_path / "p")
    resumed = copy.deepcopy(base)  # the saved config compares equal to today's: every layer is resumed
    report = calibrate(resumed, QuantConfig(4, 4, 4), ids, cfg, progress=False, out_dir=tmp_path / "p")
    assert all(r["resumed"] for r in report["calib_layers"])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, fresh(ids).logits)
        assert torch.equal(first(ids).logits, resumed(ids).logits)
