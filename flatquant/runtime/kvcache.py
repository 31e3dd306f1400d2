"""The KV4 cache and the attention of the packed model.

Hugging Face attention calls `past_key_values.update(k, v, layer_idx)` with post-RoPE keys BEFORE the
attention function. PackedLayer.update therefore does the KV quantization: keys take P_h, then K and V are
quantized (4-bit, per token and head, asymmetric, with the learned clip; flatquant.kernels.kv4_*
quantize_kv) into a preallocated packed buffer, and it returns the dequantized new keys / values. It
leaves a note on the layer's PackedKV module for `packed_attention`, which then:
- prefill into an empty cache: sdpa on the dequantized current keys / values (what the fake-quant model
  computes), query × P_h^-T;
- one new token, no mask: decode_attention on the packed cache (Triton on CUDA, reference on CPU);
- anything else (a mask during decode, several tokens after a prefix): sdpa on the dequantized cache.
Without a cache (use_cache=False) it quantizes the current keys / values itself.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from flatquant.runtime import layout

ATTN_IMPL = "flatquant_packed"
MIN_CAPACITY = 256
_NOTE = "_fq_pending"


def kv4(device: torch.device, backend: str = "auto"):
    """The KV4 kernels: Triton on CUDA, the PyTorch reference elsewhere (or as `backend` forces)."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        from flatquant.kernels import kv4_attention as mod
    else:
        from flatquant.kernels import kv4_reference as mod
    return mod


class PackedLayer(DynamicLayer):
    """One decoder layer's packed K/V: codes uint8 (B, Hkv, S_max, D/2), scale and zero float32 (B, Hkv, S_max)."""

    NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")

    def __init__(self, kv_module):
        super().__init__()
        self.__dict__["kv"] = kv_module
        self.length = 0
        self.store: dict[str, torch.Tensor] = {}

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, b: int, h: int, d: int, needed: int) -> None:
        cap = self.store["k_codes"].shape[2] if self.store else 0
        if self.store and needed <= cap:
            return
        new_cap = max(needed, 2 * cap, MIN_CAPACITY)
        new = {}
        for name in self.NAMES:
            shape = (b, h, new_cap) + ((d // 2,) if name.endswith("codes") else ())
            dt = torch.uint8 if name.endswith("codes") else torch.float32
            new[name] = torch.zeros(shape, dtype=dt, device=self.device)
            if self.store:
                new[name][:, :, :self.length] = self.store[name][:, :, :self.length]
        self.store = new
        self.keys, self.values = new["k_codes"], new["v_codes"]  # (batch size and device for Cache helpers)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, s, d = key_states.shape
        ops = kv4(key_states.device, self.kv.backend)
        k = self.kv.transform_key(key_states)
        prev = self.length
        self._reserve(b, h, d, prev + s)
        out = []
        for x, tag, clip in ((k, "k", self.kv.k_clip), (value_states, "v", self.kv.v_clip)):
            codes, scale, zero = ops.quantize_kv(x, clip)
            self.store[f"{tag}_codes"][:, :, prev:prev + s] = codes
            self.store[f"{tag}_scale"][:, :, prev:prev + s] = scale
            self.store[f"{tag}_zero"][:, :, prev:prev + s] = zero
            out.append(ops.dequantize_kv(codes, scale, zero, key_states.dtype) if prev == 0 else None)
        self.length = prev + s
        keys, values = (out[0], out[1]) if prev == 0 else (key_states, value_states)  # later: read the cache
        self.kv.__dict__[_NOTE] = (self, prev, s, keys)
        return keys, values

    def dequantized(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ops, n, st = kv4(self.device, self.kv.backend), self.length, self.store
        return tuple(ops.dequantize_kv(st[f"{t}_codes"][:, :, :n], st[f"{t}_scale"][:, :, :n],
                                       st[f"{t}_zero"][:, :, :n], dtype) for t in ("k", "v"))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy form: the length to keep
            tokens_to_remove = max(self.length - tokens_to_remove, 0)
        self.length = max(self.length - abs(tokens_to_remove), 0)

    def _map(self, fn) -> None:
        if self.store:
            self.store = {k: fn(v) for k, v in self.store.items()}
            self.keys, self.values = self.store["k_codes"], self.store["v_codes"]

    def reorder_cache(self, beam_idx) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())


class PackedKVCache(Cache):
    """A KV4 cache for every decoder layer of a packed model (GQA: Hkv heads are stored)."""

    def __init__(self, model):
        from flatquant.models.families import family_for

        family = family_for(model)
        kvs = [getattr(family.attention(layer), layout.KV_MODULE) for layer in family.decoder_layers(model)]
        super().__init__(layers=[PackedLayer(kv) for kv in kvs])


def packed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention of the packed model (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, layout.KV_MODULE)
    note = kv.__dict__.pop(_NOTE, None)
    if note is not None and note[3] is not key:  # left by an update whose attention never ran
        note = None
    query = kv.transform_query(query)
    if note is None:  # no cache: quantize the current keys / values here
        ops = kv4(key.device, kv.backend)
        key = ops.dequantize_kv(*ops.quantize_kv(kv.transform_key(key), kv.k_clip), key.dtype)
        value = ops.dequantize_kv(*ops.quantize_kv(value, kv.v_clip), value.dtype)
    else:
        cache_layer, prev, new, _ = note
        if prev > 0 and new == 1 and attention_mask is None and not kwargs.get("output_attentions"):
            b, hq, _, d = query.shape
            st = cache_layer.store
            lengths = torch.full((b,), cache_layer.length, dtype=torch.int32, device=query.device)
            sm = scaling if scaling is not None else d ** -0.5
            out = kv4(query.device, kv.backend).decode_attention(
                query[:, :, 0].contiguous(), st["k_codes"], st["k_scale"], st["k_zero"], st["v_codes"],
                st["v_scale"], st["v_zero"], lengths, sm)
            return out.unsqueeze(1), None  # (B, 1, Hq, D), as sdpa_attention_forward returns
        if prev > 0:
            key, value = cache_layer.dequantized(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_attention() -> None:
    from flatquant.core.modules import register_attention as register

    register(ATTN_IMPL, packed_attention)


def _cache_hook(module, args, kwargs):
    """Forward pre-hook of the packed model: give it a KV4 cache where HF would use a float one, and pick
    the linears' backend from the device the weights are on."""
    from flatquant.kernels.linear import set_backend

    dev = module.__dict__.get("_fq_first_linear")
    dev = dev.qweight.device.type if dev is not None else "cpu"
    if module.__dict__.get("_fq_backend_device") != dev and "_fq_forced_backend" not in module.__dict__:
        set_backend(module, "triton" if dev == "cuda" else "reference")
        module.__dict__["_fq_backend_device"] = dev
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True)
    past = kwargs.get("past_key_values")
    if isinstance(past, PackedKVCache) or not use_cache or len(args) > 3:
        return args, kwargs
    if past is not None and past.get_seq_length() > 0:
        raise ValueError("a packed flatquant model keeps its KV cache in 4 bits: pass no past_key_values "
                         "(or a PackedKVCache), not a filled float cache")
    kwargs["past_key_values"] = PackedKVCache(module)
    return args, kwargs


def set_runtime_backend(model, backend: str = "auto") -> None:
    """Pin the kernels of a packed model: "triton" or "reference" for the linears and the KV4 attention;
    "auto" (default) = Triton on CUDA, the reference elsewhere, chosen at each forward from the device."""
    from flatquant.kernels.linear import set_backend
    from flatquant.runtime.modules import PackedKV

    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be auto, triton or reference, got {backend!r}")
    model.__dict__.pop("_fq_backend_device", None)
    model.__dict__.pop("_fq_forced_backend", None)
    if backend != "auto":
        model.__dict__["_fq_forced_backend"] = backend
        set_backend(model, backend)
    for m in model.modules():
        if isinstance(m, PackedKV):
            m.backend = backend


def install_runtime(model) -> None:
    """Attention implementation, cache hook and backend selection for a packed model."""
    from flatquant.runtime.modules import packed_linears

    register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPL)
    else:  # pragma: no cover
        model.config._attn_implementation = ATTN_IMPL
    lins = packed_linears(model)
    model.__dict__["_fq_first_linear"] = lins[0] if lins else None
    model.__dict__.pop("_fq_backend_device", None)
    if not getattr(model, "_fq_hooked", False):
        model.register_forward_pre_hook(_cache_hook, with_kwargs=True)
        model._fq_hooked = True
