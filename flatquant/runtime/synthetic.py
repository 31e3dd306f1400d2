"""Random-weight models of real shapes for the end-to-end benchmark (speed does not depend on the values).

Rows (all run by flatquant.runtime.static.StaticDecoder, so they share the cache, graph and attention code):
- "bf16":      dense bf16 linears (q/k/v and gate/up fused), float K/V cache;
- "fp8":       flatquant.runtime.fp8.Fp8Linear (W8A8, per-channel / per-token), float K/V cache;
- "fp8_kv8":   the same linears with an FP8 (e4m3, per-tensor scale) K/V cache (StaticCache format "fp8");
- "int4":      the runtime's packed model (flatquant.runtime.modules.convert_model) without transforms
               (W4A4Linear with p1 = p2 = None), KV4 cache without the key transform;
- "flatquant": the same with random invertible Kronecker factors at every site (P_a, P_o (heads only, P_v
               folded), P_ug, P_d) and the key transform P_h, as an exported FlatQuant model has them;
- "quarot":    QuaRot-style W4A4KV4: online rotations only where QuaRot has them (down_proj's input, the heads
               before o_proj, the keys); q/k/v and gate/up inputs are rotated offline (no online transform).
               The rotations are orthonormal (Sylvester Hadamard factors where the size is a power of two,
               else random orthogonal) applied as Kronecker factors through the same kernels;
- "<row>_fused": the row with every fused prologue on (flatquant.kernels.fused_norm.FUSED): W4 rows
               norm / SiLU·up -> transform -> quantize in one pass, FP8 rows norm / SiLU·up -> FP8 quantize;
               the plain rows run the runtime's default (fused_norm.DEFAULT: no W4 SiLU prologue).
The packed rows are built as Hugging Face models on the meta device, converted by the runtime, then
materialised on the device layer by layer and filled with random packed tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from flatquant.errors import FlatQuantError
from flatquant.runtime.static import Layer, StaticDecoder, from_packed_hf, rope_table

SHAPES = {
    "llama2-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, layers=32, vocab=32000, theta=1e4),
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, layers=32, vocab=128256, theta=5e5),
    "tiny": dict(hidden=64, inter=160, heads=4, kv_heads=2, layers=2, vocab=256, theta=1e4),
}
ROWS = ("bf16", "fp8", "fp8_kv8", "int4", "quarot", "flatquant", "fp8_fused", "fp8_kv8_fused", "int4_fused",
        "quarot_fused", "flatquant_fused")
EPS = 1e-5


class UnknownShapeError(FlatQuantError):
    pass


def shape_of(name: str) -> dict:
    if name not in SHAPES:
        raise UnknownShapeError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


class Dense(nn.Module):
    """A bias-free dense linear (the bf16 row)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", w)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def _randn(shape, g, device, dtype, std=0.02):
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)


def _orthonormal(n: int, g, device) -> torch.Tensor:
    """A normalised Sylvester Hadamard matrix where n is a power of two, else a random orthogonal one."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, device=device)
        while h.shape[0] < n:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        return h / n ** 0.5
    return torch.linalg.qr(torch.randn(n, n, generator=g, device=device))[0]


def _invertible(n: int, g, device) -> torch.Tensor:
    """A random well-conditioned matrix: identity plus a small random part."""
    return torch.eye(n, device=device) + torch.randn(n, n, generator=g, device=device) * (0.2 / n ** 0.5)


def _dense_model(s: dict, row: str, device, dtype, n_layers: int, g, fused: bool, cap: int) -> StaticDecoder:
    from flatquant.runtime.fp8 import Fp8Linear

    h, i, hq, hkv = s["hidden"], s["inter"], s["heads"], s["kv_heads"]
    d = h // hq
    make = (lambda o, k: Dense(_randn((o, k), g, device, dtype))) if row == "bf16" else \
        (lambda o, k: Fp8Linear.from_float(_randn((o, k), g, device, torch.float32)))
    layers = []
    for _ in range(n_layers):
        layers.append(Layer(torch.ones(h, dtype=dtype, device=device), torch.ones(h, dtype=dtype, device=device),
                            make((hq + 2 * hkv) * d, h), make(h, hq * d), make(2 * i, h), make(h, i)))
    cos, sin = rope_table(cap, d, s["theta"], device, dtype)
    return StaticDecoder(_randn((s["vocab"], h), g, device, dtype), layers, torch.ones(h, dtype=dtype, device=device),
                         _randn((s["vocab"], h), g, device, dtype), cos, sin, hq, hkv, d, EPS,
                         "fp8" if row == "fp8_kv8" else "float", fused)


def packed_config(s: dict, row: str) -> dict:
    """The quantization_config block of a packed model of shape s (int4: no transforms)."""
    from flatquant.core.transforms import kron_factors
    from flatquant.runtime import layout

    d = s["hidden"] // s["heads"]
    none = {"p1": None, "p2": None}
    f = lambda n: dict(zip(("p1", "p2"), kron_factors(n)))
    if row == "int4":
        sites, key = {k: dict(none) for k in layout.SITES}, dict(none)
    elif row == "quarot":
        sites = {"attn_in": dict(none), "o_in": {"p1": s["heads"], "p2": None}, "mlp_in": dict(none),
                 "down_in": f(s["inter"])}
        key = {"p1": None, "p2": d}
    else:
        sites = {"attn_in": f(s["hidden"]), "o_in": {"p1": s["heads"], "p2": None}, "mlp_in": f(s["hidden"]),
                 "down_in": f(s["inter"])}
        key = {"p1": None, "p2": d}
    return layout.quant_block(4, 4, 4, d, sites, key, "bfloat16")


def hf_config(s: dict, n_layers: int, cap: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], num_hidden_layers=n_layers, vocab_size=s["vocab"],
                       rope_theta=s["theta"], max_position_embeddings=cap, rms_norm_eps=EPS,
                       tie_word_embeddings=False)


@torch.no_grad()
def fill_packed(model, g, device, dtype, orthonormal: bool = False) -> None:
    """Materialise a converted (meta) packed model on `device`, module by module, with random tensors
    (transforms: random invertible, or orthonormal (`_orthonormal`) for the QuaRot-style row)."""
    make = _orthonormal if orthonormal else _invertible
    from flatquant.kernels.linear import W4A4Linear
    from flatquant.runtime.modules import PackedKV

    for mod in model.modules():
        if any(t.is_meta for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))):
            mod.to_empty(device=device, recurse=False)
        if isinstance(mod, W4A4Linear):
            mod.qweight.copy_(torch.randint(0, 256, mod.qweight.shape, generator=g, device=device,
                                            dtype=torch.int32))
            mod.weight_scale.copy_(torch.rand(mod.weight_scale.shape, generator=g, device=device) * 0.01 + 1e-3)
            mod.alpha.fill_(0.95)
            for p in (mod.p1, mod.p2):
                if p is not None:
                    p.copy_(make(p.shape[0], g, device))
            if mod.bias is not None:
                mod.bias.zero_()
            mod.clear_cache()
        elif isinstance(mod, PackedKV):
            for side in ("p1", "p2"):
                k = getattr(mod, f"key_{side}")
                if k is not None:
                    k.copy_(make(k.shape[0], g, device))
                    getattr(mod, f"query_{side}").copy_(torch.linalg.inv(k).t())
            mod.k_clip.fill_(0.95)
            mod.v_clip.fill_(0.95)
        elif isinstance(mod, nn.Embedding) or isinstance(mod, nn.Linear):
            mod.weight.copy_(_randn(mod.weight.shape, g, device, dtype))
        else:
            for name, p in list(mod.named_parameters(recurse=False)):
                p.fill_(1.0)


def packed_model(s: dict, row: str, device, dtype=torch.bfloat16, n_layers: int | None = None, seed: int = 0,
                 cap: int = 4096):
    """The runtime's packed Hugging Face model of shape s, random, on `device` (with its runtime installed)."""
    from transformers import LlamaForCausalLM

    from flatquant.kernels.linear import set_backend
    from flatquant.runtime.kvcache import install_runtime
    from flatquant.runtime.modules import convert_model

    cfg = hf_config(s, n_layers or s["layers"], cap)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    convert_model(model, packed_config(s, row), device="meta")
    g = torch.Generator(device=device).manual_seed(seed)
    fill_packed(model, g, torch.device(device), dtype, orthonormal=row == "quarot")
    rot = model.base_model.rotary_emb
    rot.to_empty(device=device)
    d = s["hidden"] // s["heads"]
    inv = 1.0 / s["theta"] ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    for name in ("inv_freq", "original_inv_freq"):  # non-persistent buffers: recomputed after to_empty
        if isinstance(getattr(rot, name, None), torch.Tensor):
            getattr(rot, name).copy_(inv)
    model.eval()
    install_runtime(model)
    set_backend(model, "triton" if torch.device(device).type == "cuda" else "reference")
    return model


def build(shape: str, row: str, device, dtype=torch.bfloat16, n_layers: int | None = None, seed: int = 0,
          fused: bool = True, cap: int = 4096) -> StaticDecoder:
    """A random StaticDecoder of a named shape and row on `device`; rope tables for `cap` positions."""
    s = shape_of(shape)
    if row not in ROWS:
        raise UnknownShapeError(f"unknown row {row!r}; known: {', '.join(ROWS)}")
    n = n_layers or s["layers"]
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    from flatquant.kernels.fused_norm import DEFAULT, FUSED

    base = row[:-len("_fused")] if row.endswith("_fused") else row
    if base in ("bf16", "fp8", "fp8_kv8"):
        dec = _dense_model(s, base, device, dtype, n, g, fused, cap)
        dec.prologue = FUSED if base != row else DEFAULT
        return dec
    model = packed_model(s, base, device, dtype, n, seed, cap)
    cos, sin = rope_table(cap, s["hidden"] // s["heads"], s["theta"], device, dtype)
    dec = from_packed_hf(model, cos, sin, fused=fused, prologue=FUSED if base != row else DEFAULT)
    dec.hf_model = model
    return dec
