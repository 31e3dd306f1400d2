"""Export: a fake-quant FlatQuant model (or a loaded packed one) -> a packed checkpoint folder.

Weights are folded in float64 as flatquant.core.reparam does, W' = T_out · W diag(c) · P⁻ᵀ, then quantized
to int4 per output channel with the learned weight clip (or taken from the GPTQ codes); channel scales go
into the norms (P_a, P_ug) and into up_proj's row scales (P_d); P_v is in v_proj's rows. The online Kronecker
factors, activation and KV clip values stay as tensors. Written to a temporary folder, then renamed.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from flatquant.core.modules import ActSite, KVQuant, NormWithSite, QuantLinear, unfreeze
from flatquant.core.quantizer import Quantizer
from flatquant.core.transforms import Transform
from flatquant.errors import CheckpointError
from flatquant.models.families import family_for
from flatquant.runtime import layout
from flatquant.runtime.moe_export import block_tensors
from flatquant.runtime.packing import _alpha, _check_quantizer, _factors, _linear_tensors, _refuse, _sizes, _weight

SHARD_BYTES = 2 << 30


@torch.no_grad()
def _fake_layer(layer: nn.Module, family, names: dict, dtype: torch.dtype, meta: dict) -> dict:
    """The packed tensors of one fake-quant decoder layer (computed on a float64 copy)."""
    if not hasattr(layer, "fq_transforms"):
        _refuse("a decoder layer is not quantized (quantize or load_calibrated the model first)")
    lay = copy.deepcopy(layer)
    unfreeze(lay)
    lay.double()
    lp = names[id(layer)]
    rel = {id(m): n for n, m in lay.named_modules()}
    attn_p = f"{lp}.{rel[id(family.attention(lay))]}"
    mlp_p = f"{lp}.{rel[id(family.mlp_module(lay))]}"
    t = lay.fq_transforms
    lin = family.linears(lay)
    if not all(isinstance(m, QuantLinear) for m in lin.values()):
        _refuse("the projections are not fake-quant QuantLinear modules")
    if any(m.w_quantizer.bits >= 16 for m in lin.values()):
        _refuse("weights were already folded (reparameterize); export the model before folding")
    norms = {w: family.norm(lay, w) for w in ("input", "post")}
    out, sites = {}, {}
    scale = {s: (t[s].channel_scale() if s in t else None) for s in layout.SITES}
    w = {role: _weight(lin[role], role) for role in lin}
    moe_layer = family.is_moe_layer(lay)  # its MLP: flatquant/runtime/moe_export.py
    if scale["down_in"] is not None:  # row scales are equivariant: c_d moves into up_proj's quantized rows
        c = scale["down_in"].double().cpu()
        producer = family.producer["down_in"]
        codes, s, b = w[producer]
        rows = family.producer_rows("down_in", lin[producer])  # the up half of a fused gate/up
        s, b = s.clone(), None if b is None else b.clone()
        s[rows] /= c
        if b is not None:
            b[rows] /= c
        w[producer] = (codes, s, b)
    for which, site in (("input", "attn_in"),) + ((("post", "mlp_in"),) if not moe_layer else ()):
        norm = norms[which]
        if not isinstance(norm, NormWithSite):
            _refuse("the norms carry no quantized input site")
        nw = norm.norm.weight.double()
        if scale[site] is not None:
            nw = nw / scale[site].double()
        out[f"{lp}.{rel[id(norm)]}.weight"] = nw.to(dtype).cpu().contiguous()
    (o_role,), (down_role,) = family.sites["o_in"], family.sites["down_in"]
    groups = [(f"{attn_p}.{layout.FUSED_QKV}", family.sites["attn_in"], "attn_in", norms["input"].site),
              (f"{lp}.{rel[id(lin[o_role])]}", (o_role,), "o_in", lin[o_role].input_site)]
    if not moe_layer:
        groups[1:1] = [(f"{mlp_p}.{layout.FUSED_GATE_UP}", family.sites["mlp_in"], "mlp_in", norms["post"].site)]
        groups.append((f"{lp}.{rel[id(lin[down_role])]}", (down_role,), "down_in", lin[down_role].input_site))
    for prefix, roles, site, act in groups:
        if not isinstance(act, ActSite):
            _refuse(f"{roles[0]} has no activation quantizer")
        _check_quantizer(act.quantizer, f"activations of {site}", symmetric=True)
        f = _factors(t[site] if site in t else None, site)
        sites[site] = _sizes(f)
        out.update(_linear_tensors(prefix, [w[r] for r in roles], f, _alpha(act.quantizer)))
    kvq = getattr(family.attention(lay), "fq_kv", None)
    if not isinstance(kvq, KVQuant):
        _refuse("attention has no KV quantizer")
    for q, what in ((kvq.k_quantizer, "keys"), (kvq.v_quantizer, "values")):
        _check_quantizer(q, f"KV cache ({what})", symmetric=False)
    kt = kvq.key_transform
    kf = _factors(kt, "k_head", online=False)
    inv = (None, None) if kt is None else tuple(None if m is None else m.t().float().cpu().contiguous()
                                                for m in kt.inverse_matrices())
    kv_p = f"{attn_p}.{layout.KV_MODULE}"
    for side, fs in (("key", kf), ("query", inv)):
        for name, f in zip(("p1", "p2"), fs):
            if f is not None:
                out[f"{kv_p}.{side}_{name}"] = f.contiguous()
    out[f"{kv_p}.k_clip"], out[f"{kv_p}.v_clip"] = _alpha(kvq.k_quantizer), _alpha(kvq.v_quantizer)
    skip = (QuantLinear, Quantizer, Transform, KVQuant, ActSite, NormWithSite)
    for name, mod in layer.named_modules():  # anything else of the layer (e.g. Qwen3's q_norm / k_norm)
        parts = name.split(".") if name else []
        chain = [layer.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
        if any(isinstance(m, skip) or (isinstance(m, nn.ModuleDict) and m is layer.fq_transforms) for m in chain):
            continue
        for pname, p in list(mod._parameters.items()) + [(k, v) for k, v in mod._buffers.items()
                                                          if k not in mod._non_persistent_buffers_set]:
            if p is not None:
                out[f"{lp}.{name + '.' if name else ''}{pname}"] = p.detach().to(dtype).cpu().contiguous()
    parts = [("sites", sites)]
    if moe_layer:  # after the loop above: the post norm and the router carry P_ug's folded scale
        moe_out, moe_sites = block_tensors(lay, family, lp, rel, w, dtype)
        out.update(moe_out)
        parts.append(("moe", moe_sites))
    for key, got in parts:  # a dense layer of an MoE model adds its MLP sites next to the MoE layers' attention
        known = meta.setdefault(key, {})
        if any(known.setdefault(k, v) != v for k, v in got.items()):
            _refuse("decoder layers differ in their transform structure")
    meta.setdefault("key_transform", _sizes(kf))
    if meta["key_transform"] != _sizes(kf):
        _refuse("decoder layers differ in their transform structure")
    return out


def _tied_key(model) -> str | None:
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return None
    out_emb = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    return None if out_emb is None else f"{names[id(out_emb)]}.weight"


def fake_state(model: nn.Module, dtype: torch.dtype) -> tuple[dict, dict]:
    """(tensors, quantization_config block) of a fake-quant model."""
    family = family_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    layers = family.decoder_layers(model)
    lay_p = names[id(layers)] + "."
    tensors, meta = {}, {}
    for name, t in model.state_dict().items():
        if not name.startswith(lay_p):
            tensors[name] = t.detach().to(dtype).cpu().contiguous()
    for layer in layers:
        tensors.update(_fake_layer(layer, family, names, dtype, meta))
    tied = _tied_key(model)
    tensors.pop(tied, None)
    conf = model.config
    head_dim = family.head_dim(conf)
    block = layout.quant_block(4, 4, 4, head_dim, meta["sites"], meta["key_transform"], str(dtype).split(".")[-1])
    if "moe" in meta:
        block["moe"] = {"sites": meta["moe"]}
    return tensors, block


def _config_dict(model, block: dict) -> dict:
    d = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_attn_implementation_autoset", "_attn_implementation",
              "torch_dtype", "transformers_version", "_commit_hash"):
        d.pop(k, None)
    d.update({"architectures": [type(model).__name__], "use_cache": True, "dtype": block["dtype"],
              "quantization_config": block})
    return d


def skeleton(config_dict: dict):
    """The packed model's module tree on the meta device (no memory), for names, shapes and dtypes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flatquant.runtime.modules import convert_model

    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(**d)
    dtype = getattr(torch, config_dict["quantization_config"]["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return convert_model(model, config_dict["quantization_config"], device="meta")


def expected_tensors(config_dict: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    model = skeleton(config_dict)
    tied = _tied_key(model)
    return {k: (tuple(v.shape), layout.ST_DTYPES[str(v.dtype)]) for k, v in model.state_dict().items() if k != tied}


def fp16_bytes(config_dict: dict) -> int:
    """Bytes of the same model with every tensor in 16 bits (linears as float weights and biases)."""
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.runtime.modules import PackedKV

    model = skeleton(config_dict)
    n = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, W4A4Linear):
            n += mod.in_features * mod.out_features + (mod.out_features if mod.bias is not None else 0)
        elif not isinstance(mod, PackedKV):
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return 2 * n


def _write_shards(tensors: dict, folder: Path, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nb
    shards.append(cur)
    meta = {"format": "pt"}  # one key: safetensors writes metadata in hash order
    if len(shards) == 1:
        save_file(shards[0], str(folder / layout.SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in sh})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / layout.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2, sort_keys=True) + "\n")


def _replace_folder(tmp: Path, out: Path) -> None:
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / layout.CONFIG).is_file()):
            shutil.rmtree(tmp)
            raise CheckpointError(f"{out} exists and is not a flatquant checkpoint; not overwriting it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@torch.no_grad()
def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                   shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the packed checkpoint of `model` (fake-quant FlatQuant/QuaRot/RTN at W4A4KV4, or a model from
    load_quantized) to `out`. dtype: of embeddings, norms and lm_head (default: the model's dtype; the CLI
    exports float16). Returns {"path", "bytes_packed" (safetensors files), "bytes_fp16" (16-bit model)}."""
    from flatquant.runtime.modules import is_packed

    out = Path(out)
    if is_packed(model):
        block = model.config.quantization_config
        block = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        tied = _tied_key(model)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != tied}
    else:
        dtype = dtype or next(model.parameters()).dtype
        tensors, block = fake_state(model, dtype)
    config = _config_dict(model, block)
    expected = expected_tensors(config)
    got = {k: (tuple(v.shape), layout.ST_DTYPES[str(v.dtype)]) for k, v in tensors.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[0]
        _refuse(f"tensor {bad[0]} does not fit the packed layout ({bad[1]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_shards(tensors, tmp, shard_bytes)
        (tmp / layout.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_folder(tmp, out)
    packed = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"path": str(out), "bytes_packed": packed, "bytes_fp16": fp16_bytes(config)}
