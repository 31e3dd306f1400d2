"""A static KV cache and a CUDA-graph-friendly decoder over the runtime's modules (docs/E2E.md).

StaticCache: per-layer K/V preallocated for (batch, capacity); `length` cached tokens, the same for every
sequence, kept on the device (`length_t`, what a captured graph reads) and mirrored on the host. Formats:
"float" (the model dtype, (B, Hkv, S, D)), "fp8" (float8 e4m3 codes of K / FP8_KV_SCALE and V / FP8_KV_SCALE,
a static per-tensor scale as serving engines default to; decode attention reads the codes per tile on CUDA
(flatquant.kernels.fp8_attention), prefill attention the new K/V cast back to the model dtype)
and "kv4" (the KV4 interface layout, /work/tools/KV4_INTERFACE.md; the same tensors and quantize_kv calls as
flatquant.runtime.kvcache.PackedLayer).

StaticDecoder: a Llama-style decoder (embedding, layers, final norm, lm_head) whose linears are any callables
(the runtime's W4A4Linear, FP8 or dense), with the runtime's semantics:
- prefill into an empty cache: SDPA (causal) on the current keys / values; with KV4 on their dequantized
  codes and the query times P_h^-T (PackedKV), as flatquant.runtime.kvcache.packed_attention does;
- decode (one token per sequence): the new K/V written at position `length_t` (no host value read, so the
  step can be captured in a CUDA graph), then attention over [0, length + 1): decode_attention on the packed
  cache for KV4, SDPA on the first length + 1 positions for float K/V.
Elementwise ops (residual add + RMSNorm, SiLU·up) use flatquant.runtime.fused_ops; with `prologue`
(flatquant.kernels.fused_norm.PrologueConfig; default fused_norm.DEFAULT) on, a W4A4 linear after them takes
its input from one fused pass (norm or SiLU·up -> transform -> quantize) instead, the unfused ops staying
the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flatquant.kernels import fused_norm
from flatquant.runtime import fused_ops
from flatquant.runtime.kvcache import kv4

KV4_NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
FP8_KV_SCALE = 1.0
FORMATS = ("float", "fp8", "kv4")


class StaticCache:
    """K/V of every layer for `batch` sequences of up to `capacity` tokens (see the module docstring)."""

    def __init__(self, fmt: str, n_layers: int, batch: int, hkv: int, head_dim: int, capacity: int,
                 device, dtype=torch.bfloat16):
        if fmt not in FORMATS:
            raise ValueError(f"cache format must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.batch, self.hkv, self.head_dim, self.capacity = fmt, batch, hkv, head_dim, capacity
        self.device, self.dtype = torch.device(device), dtype
        shape = (batch, hkv, capacity)
        self.layers = []
        for _ in range(n_layers):
            if fmt != "kv4":
                kv_dt = dtype if fmt == "float" else torch.float8_e4m3fn
                self.layers.append({n: torch.zeros(shape + (head_dim,), dtype=kv_dt, device=device)
                                    for n in ("k", "v")})
            else:
                self.layers.append({n: torch.zeros(shape + ((head_dim // 2,) if n.endswith("codes") else ()),
                                                   dtype=torch.uint8 if n.endswith("codes") else torch.float32,
                                                   device=device) for n in KV4_NAMES})
        self.backend = "auto"  # KV4 write / FP8 attention kernels: auto | triton | reference (_triton_write)
        self.length = 0
        self.length_t = torch.zeros(1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)  # attended tokens during a step

    def set_length(self, n: int) -> None:
        if not 0 <= n <= self.capacity:
            raise ValueError(f"length {n} outside [0, {self.capacity}]")
        self.length = n
        self.length_t.fill_(n)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in lay.values())

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in every layer."""
        return self.nbytes() // (self.batch * self.capacity)

    @torch.no_grad()
    def fill_random(self, length: int, seed: int = 0) -> None:
        """Random content in [0, length) (speed does not depend on the values), length set to `length`."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        dev = self.device
        for lay in self.layers:
            for name, t in lay.items():
                for b in range(self.batch):  # one sequence at a time: no large temporaries
                    view = t[b, :, :length]
                    if t.dtype == torch.uint8:
                        view.copy_(torch.randint(0, 256, view.shape, generator=g, device=dev, dtype=torch.int32))
                    elif name.endswith("zero"):
                        view.copy_(torch.randint(0, 16, view.shape, generator=g, device=dev).float())
                    elif name.endswith("scale"):
                        view.copy_(torch.rand(view.shape, generator=g, device=dev) * 0.05 + 0.01)
                    else:
                        view.copy_(torch.randn(view.shape, generator=g, device=dev) * 0.5)
        self.set_length(length)

    # ---- writes ---------------------------------------------------------------------------------
    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, kv_mod, decode: bool):
        """Store the new K/V (B, Hkv, S, D) of layer i (at length_t when decoding, at 0 in a prefill).
        Returns what prefill attention reads: K/V as stored (dequantized for KV4)."""
        lay = self.layers[i]
        if self.fmt == "kv4" and self._triton_write(k):  # one launch per K / V: quantize, store, dequantize
            from flatquant.kernels import kv4_write

            out = tuple(kv4_write.write_kv(x, clip, lay[f"{t}_codes"], lay[f"{t}_scale"], lay[f"{t}_zero"],
                                           pos=self.length_t if decode else None, dequant=not decode)
                        for t, x, clip in (("k", k, kv_mod.k_clip), ("v", v, kv_mod.v_clip)))
            return None if decode else out
        if self.fmt == "float":
            new = {"k": k.to(self.dtype), "v": v.to(self.dtype)}
        elif self.fmt == "fp8":
            new = {n: _to_fp8(x) for n, x in (("k", k), ("v", v))}
        else:
            ops = kv4(k.device)
            new = {}
            for tag, x, clip in (("k", k, kv_mod.k_clip), ("v", v, kv_mod.v_clip)):
                codes, scale, zero = ops.quantize_kv(x, clip)
                new.update({f"{tag}_codes": codes, f"{tag}_scale": scale, f"{tag}_zero": zero})
        for name, t in new.items():
            if decode:  # (fp8 codes as bytes: index_copy_ has no float8 kernels)
                dst = lay[name]
                if dst.dtype == torch.float8_e4m3fn:
                    dst, t = dst.view(torch.uint8), t.view(torch.uint8)
                dst.index_copy_(2, self.length_t, t)
            else:
                lay[name][:, :, :t.shape[2]] = t
        if decode:
            return None
        if self.fmt == "float":
            return new["k"], new["v"]
        if self.fmt == "fp8":
            return _from_fp8(new["k"], k.dtype), _from_fp8(new["v"], k.dtype)
        ops = kv4(k.device)
        return tuple(ops.dequantize_kv(new[f"{t}_codes"], new[f"{t}_scale"], new[f"{t}_zero"], k.dtype)
                     for t in ("k", "v"))

    def _triton_write(self, x: torch.Tensor) -> bool:
        """KV4 writes through kv4_write (backend "triton"; "auto": on CUDA where it matches the reference bit
        for bit), else the reference quantize_kv + copies."""
        if self.backend == "auto":
            from flatquant.kernels import kv4_write

            return x.is_cuda and kv4_write.gpu_ok(x.device)
        return self.backend == "triton"

    def decode_attention(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q (B, Hq, D) of the new token over positions [0, length + 1) -> (B, Hq, D)."""
        lay = self.layers[i]
        if self.fmt == "kv4":
            return kv4(q.device).decode_attention(q.contiguous(), lay["k_codes"], lay["k_scale"], lay["k_zero"],
                                                  lay["v_codes"], lay["v_scale"], lay["v_zero"], self.lengths,
                                                  scale)
        if self.fmt == "fp8" and (self.backend == "triton" or (self.backend == "auto" and q.is_cuda)):
            from flatquant.kernels import fp8_attention  # the codes read per tile: no bf16 copy of the cache

            return fp8_attention.decode_attention(q, lay["k"], lay["v"], self.lengths, scale, FP8_KV_SCALE)
        n = self.length + 1
        b, hq, d = q.shape
        g = hq // self.hkv  # the G query heads of one kv head attend as G rows: no K/V repeat
        kc, vc = lay["k"][:, :, :n], lay["v"][:, :, :n]
        if self.fmt == "fp8":
            kc, vc = _from_fp8(kc, q.dtype), _from_fp8(vc, q.dtype)
        out = F.scaled_dot_product_attention(q.reshape(b, self.hkv, g, d), kc, vc, scale=scale)
        return out.reshape(b, hq, d)


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    x = x.float() if FP8_KV_SCALE == 1.0 else x.float() / FP8_KV_SCALE
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def _from_fp8(c: torch.Tensor, dtype) -> torch.Tensor:
    return c.to(dtype) if FP8_KV_SCALE == 1.0 else (c.float() * FP8_KV_SCALE).to(dtype)


def _is_w4(lin) -> bool:
    from flatquant.kernels.linear import W4A4Linear

    return isinstance(lin, W4A4Linear)


class Layer:
    """One decoder layer: norm weights, linears (callables on (..., in)), the KV module (PackedKV or None)."""

    def __init__(self, in_norm, post_norm, qkv, o, gate_up, down, kv=None):
        self.in_norm, self.post_norm = in_norm, post_norm
        self.qkv, self.o, self.gate_up, self.down, self.kv = qkv, o, gate_up, down, kv


def rope_table(positions: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (positions, head_dim) as Hugging Face's default rotary embedding computes them."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class StaticDecoder:
    """See the module docstring. cos / sin: (max positions, D) rope tables in the model dtype."""

    def __init__(self, embed, layers: list[Layer], norm, lm_head, cos, sin, hq: int, hkv: int, head_dim: int,
                 eps: float, kv_format: str, fused: bool = True,
                 prologue: fused_norm.PrologueConfig = fused_norm.DEFAULT):
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.cos, self.sin = cos, sin
        self.hq, self.hkv, self.head_dim, self.eps = hq, hkv, head_dim, eps
        self.kv_format, self.fused, self.prologue = kv_format, fused, prologue
        self.scale = head_dim ** -0.5

    def new_cache(self, batch: int, capacity: int, n_layers: int | None = None) -> StaticCache:
        if capacity > self.cos.shape[0]:
            raise ValueError(f"capacity {capacity} beyond the rope table ({self.cos.shape[0]} positions)")
        return StaticCache(self.kv_format, n_layers or len(self.layers), batch, self.hkv, self.head_dim, capacity,
                           self.embed.device, self.embed.dtype)

    def _norm(self, x, res, w):
        return fused_ops.add_rmsnorm(x, res, w, self.eps, fused=self.fused)

    def _layer(self, i: int, lay: Layer, h, res, cache: StaticCache, decode: bool, cos, sin):
        b, s, _ = h.shape
        hq, hkv, d = self.hq, self.hkv, self.head_dim
        qkv, res = self._norm_linear(lay.qkv, h, res, lay.in_norm)
        qk = qkv[..., :(hq + hkv) * d].view(b, s, hq + hkv, d)
        q, k = fused_ops.rope(qk, cos, sin, fused=self.fused, split=hq)  # HF's apply_rotary_pos_emb
        if lay.kv is not None:  # (B, S, H, D): contiguous on the fused path, so the transform GEMMs copy nothing
            k = lay.kv.transform_key(k)
            q = lay.kv.transform_query(q)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = qkv[..., (hq + hkv) * d:].view(b, s, hkv, d).transpose(1, 2)
        kd_vd = cache.write(i, k, v, lay.kv, decode)
        if decode:
            att = cache.decode_attention(i, q[:, :, 0], self.scale).reshape(b, 1, hq * d)
        else:
            kd, vd = kd_vd
            if hq != hkv:  # GQA: repeat K/V (a small copy next to the GEMMs) so every SDPA backend takes it
                kd, vd = kd.repeat_interleave(hq // hkv, dim=1), vd.repeat_interleave(hq // hkv, dim=1)
            att = F.scaled_dot_product_attention(q, kd, vd, is_causal=s > 1, scale=self.scale)
            att = att.transpose(1, 2).reshape(b, s, hq * d)
        h = lay.o(att)
        gu, res = self._norm_linear(lay.gate_up, h, res, lay.post_norm)
        pl = self.prologue
        if pl.silu_quant and pl.takes(gu) and (pl.silu_w4 or not _is_w4(lay.down)):
            return fused_norm.silu_linear(lay.down, gu, self.fused), res
        return lay.down(fused_ops.silu_mul(gu, fused=self.fused)), res

    def _norm_linear(self, lin, h, res, w):
        """lin(RMSNorm(res + h) * w), res + h: fused with lin's transform + quantize when prologue says so."""
        if self.prologue.norm_quant and self.prologue.takes(h):
            return fused_norm.norm_linear(lin, h, res, w, self.eps, self.fused)
        x, res = self._norm(h, res, w)
        return lin(x), res

    def _run(self, h, cache: StaticCache, decode: bool, cos, sin, layers=None):
        res = None
        for i, lay in enumerate(self.layers if layers is None else layers):
            h, res = self._layer(i, lay, h, res, cache, decode, cos, sin)
        return h, res

    def _logits(self, h, res):
        x, _ = self._norm(h, res, self.norm)
        return F.linear(x[:, -1], self.lm_head)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Fill an empty cache with `ids` (B, S); the last token's logits (B, vocab)."""
        if cache.length != 0:
            raise ValueError("prefill needs an empty cache (set_length(0))")
        s = ids.shape[1]
        if s > cache.capacity:
            raise ValueError(f"{s} tokens do not fit a cache of capacity {cache.capacity}")
        cos, sin = self.cos[None, :s], self.sin[None, :s]
        h, res = self._run(F.embedding(ids, self.embed), cache, False, cos, sin)
        cache.set_length(s)
        return self._logits(h, res)

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, cache: StaticCache, advance: bool = True) -> torch.Tensor:
        """One token per sequence (ids (B, 1)) at position `length`; logits (B, vocab). No host value is
        read, so the call can be captured in a CUDA graph (with advance=False: replays repeat the step)."""
        if cache.length >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} tokens)")
        cache.lengths.copy_((cache.length_t + 1).to(torch.int32).expand(cache.batch))
        cos, sin = self.cos[cache.length_t][None], self.sin[cache.length_t][None]  # (1, 1, D)
        h, res = self._run(F.embedding(ids, self.embed), cache, True, cos, sin)
        out = self._logits(h, res)
        if advance:
            cache.length_t += 1
            cache.length += 1
        return out

    @torch.no_grad()
    def decode_layers(self, h: torch.Tensor, cache: StaticCache, n_layers: int = 1) -> torch.Tensor:
        """The first n_layers of a decode step on hidden states h (B, 1, hidden) (one-layer memory)."""
        cache.lengths.copy_((cache.length_t + 1).to(torch.int32).expand(cache.batch))
        cos, sin = self.cos[cache.length_t][None], self.sin[cache.length_t][None]
        return self._run(h, cache, True, cos, sin, layers=self.layers[:n_layers])[0]

    # ---- accounting -----------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The model's stored tensors (no caches of casts), each once."""
        seen, out = set(), []
        mods = [self.embed, self.norm, self.lm_head]
        for lay in self.layers:
            mods += [lay.in_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.kv]
        for m in mods:
            ts = [m] if isinstance(m, torch.Tensor) else [] if m is None else list(m.state_dict().values())
            for t in ts:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def layer_bytes(self, i: int = 0) -> int:
        lay, n = self.layers[i], 0
        for m in (lay.in_norm, lay.post_norm, lay.qkv, lay.o, lay.gate_up, lay.down, lay.kv):
            ts = [m] if isinstance(m, torch.Tensor) else [] if m is None else list(m.state_dict().values())
            n += sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
        return n


def from_packed_hf(model, cos=None, sin=None, fused: bool = True,
                   prologue: fused_norm.PrologueConfig = fused_norm.DEFAULT) -> StaticDecoder:
    """A StaticDecoder over a packed Hugging Face model's own modules (flatquant.runtime.modules): the fused
    W4A4Linears, PackedKV, norms, embedding and lm_head are shared, not copied."""
    from flatquant.models.families import family_for
    from flatquant.runtime import layout

    family = family_for(model)
    if family.qk_norm:
        raise ValueError("the static decoder does not implement per-head q/k norms")
    if family.moe:
        raise ValueError("the static decoder does not implement mixture-of-experts blocks (use generate)")
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = family.head_dim(cfg)
    layers = []
    for layer in family.decoder_layers(model):
        attn, mlp, lin = family.attention(layer), family.mlp_module(layer), family.linears(layer)
        layers.append(Layer(family.norm(layer, "input").weight, family.norm(layer, "post").weight,
                            getattr(attn, layout.FUSED_QKV), lin["o_proj"], getattr(mlp, layout.FUSED_GATE_UP),
                            lin["down_proj"], getattr(attn, layout.KV_MODULE)))
    embed = model.get_input_embeddings().weight
    if cos is None:
        pos = torch.arange(cfg.max_position_embeddings, device=embed.device)[None]
        cos, sin = model.base_model.rotary_emb(embed[:1], pos)
        cos, sin = cos[0], sin[0]
    return StaticDecoder(embed, layers, model.base_model.norm.weight, model.get_output_embeddings().weight, cos, sin,
                         hq, hkv, d, cfg.rms_norm_eps, "kv4", fused=fused, prologue=prologue)
