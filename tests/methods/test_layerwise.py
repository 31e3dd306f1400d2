"""The layer-wise pipeline (flatquant.calib.layerwise) against a plain forward pass of the whole model."""
import pytest
import torch

from flatquant.calib.layerwise import layer_input_absmax, run_layerwise
from flatquant.methods.stats import input_absmax
from flatquant.models.families import family_for


def _reference_absmax(model, family, windows, batch_size=4):
    """Per layer and site, max |x| from hooks on one whole-model forward pass per batch."""
    stats = [{} for _ in family.decoder_layers(model)]
    hooks = []

    def rec(i, site):
        def hook(_m, args, output=None):
            x = output if output is not None else args[0]
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            stats[i][site] = m if site not in stats[i] else torch.maximum(stats[i][site], m)
        return hook

    for i, layer in enumerate(family.decoder_layers(model)):
        lin = family.linears(layer)
        hooks += [family.norm(layer, "input").register_forward_hook(rec(i, "attn_in")),
                  family.norm(layer, "post").register_forward_hook(rec(i, "mlp_in")),
                  lin["o_proj"].register_forward_pre_hook(rec(i, "o_in")),
                  lin["down_proj"].register_forward_pre_hook(rec(i, "down_in"))]
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            model(windows[s:s + batch_size], use_cache=False)
    for h in hooks:
        h.remove()
    return stats


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_layerwise_statistics_equal_a_whole_model_pass(tiny_model_factory, family):
    model = tiny_model_factory(family)
    fam = family_for(model)
    windows = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    ref = _reference_absmax(model, fam, windows)
    got = input_absmax(model, fam, windows)
    assert len(got) == len(ref) == model.config.num_hidden_layers
    for r, g in zip(ref, got):
        assert set(g) == set(r) == {"attn_in", "o_in", "mlp_in", "down_in"}
        for site in r:
            assert torch.equal(g[site], r[site]), site  # same batches, same dtype: bit-identical


def test_layerwise_outputs_feed_the_next_layer(tiny_model_factory):
    model = tiny_model_factory("llama")
    fam = family_for(model)
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    seen = []

    def step(i, layer, inps, kwargs):
        out, _ = layer_input_absmax(layer, fam, inps, kwargs, batch_size=2, out=torch.empty_like(inps))
        seen.append(i)
        return out, out.clone()

    outs = run_layerwise(model, fam, windows, step)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    assert seen == [0, 1]
    torch.testing.assert_close(outs[0], hidden[1], rtol=1e-5, atol=1e-5)  # after layer 0
    # the last hidden state has the final norm applied; compare the layer output before it
    final = model.model.norm(outs[1])
    torch.testing.assert_close(final, hidden[2], rtol=1e-5, atol=1e-5)
