"""Triton KV4 cache kernels: the write-path quantizer and flash-decoding attention over packed int4 K/V.

Semantics and cache layout: `flatquant.kernels.kv4_reference` (the plain-PyTorch version).

decode_attention: grid (batch x kv head, sequence split). One program takes all G = Hq / Hkv query
heads of its kv head (the K/V tile is loaded and unpacked once for them), walks its split in blocks of
BLOCK_N tokens with an online softmax, and writes its normalised partial output and log2-sum-exp;
a second kernel combines the splits. With one split the first kernel writes the output directly.
No per-element dequantization: with per-(token, head) scale s and zero z, q . k = s (q . c - z sum(q))
and sum_t p_t s_t (c_t - z_t) = sum_t w_t c_t - sum_t w_t z_t (w = p s), so the dots take the raw codes c
and the zeros enter once per token. The even / odd elements of q and of the output meet the low / high
nibbles (no interleaving shuffles). Codes ("biased", default) become 16 + c in bf16 / fp16 by logic ops on
the byte; the 16 is taken off with the zero. The value side multiplies w split into bf16 high and low
parts (~16 mantissa bits) by the exact codes; float32 q uses IEEE dots on the codes themselves.
"""
from __future__ import annotations

import functools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

from flatquant.kernels import kv4_reference as ref
from flatquant.kernels._triton_utils import _mm, interpreting, num_sms
from flatquant.kernels.kv4_codes import _codes16, _codes16_prmt, _codes_exact

BLOCK_N = 128           # tokens per inner step: K + V codes of 128 tokens x D = 128 are 16 KB
MIN_SPLIT_TOKENS = 256  # a split covers at least this many cache positions
WAVES = 3               # splits are added until the grid has about this many programs per SM
MAX_SPLITS = 64
NUM_WARPS = 4           # H100 sweep (results/kernels/kv4_attention_sweep.json): geomean 0.85x the time of 8
NUM_STAGES = 2          # software-pipeline depth of the block loop (1: loads not prefetched)
CODES = "biased"        # code operands (CODE_MODES): 16 + code by logic ops per byte ("biased") or four bytes
CODE_MODES = ("exact", "biased", "prmt")  # at a time ("prmt", inline PTX), or the code itself via float32
STACK_V = True          # GQA groups <= half the padded rows: w's bf16 high and low parts share one value dot
LOG2E = 1.4426950408889634



def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(1, int(n))))



@triton.jit
def _rne(v, INTERP: tl.constexpr):
    """Round float32 to the nearest integer, ties to even (torch.round)."""
    if INTERP:
        return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: numpy float32 additions round half to even
    else:
        return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _quantize_kv_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, clip_ptr, n_rows, D2,
                        BLOCK_R: tl.constexpr, D2_PAD: tl.constexpr, INTERP: tl.constexpr):
    """Rows of x (n_rows, 2 * D2) -> packed codes (n_rows, D2), scale and zero (n_rows,)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D2_PAD)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D2)
    base = x_ptr + rows.to(tl.int64)[:, None] * (2 * D2) + 2 * cols[None, :]
    xe = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(clip_ptr)
    big = float("inf")
    xmax = tl.maximum(tl.max(tl.where(mask, xe, -big), 1), tl.max(tl.where(mask, xo, -big), 1))
    xmin = tl.minimum(tl.min(tl.where(mask, xe, big), 1), tl.min(tl.where(mask, xo, big), 1))
    xmax = tl.maximum(xmax, 0.0) * alpha
    xmin = tl.minimum(xmin, 0.0) * alpha
    scale = tl.maximum(tl.math.div_rn(xmax - xmin, 15.0), 1e-8)
    zero = _rne(tl.math.div_rn(-xmin, scale), INTERP)
    ce = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xe, scale[:, None]), INTERP) + zero[:, None], 0.0), 15.0)
    co = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xo, scale[:, None]), INTERP) + zero[:, None], 0.0), 15.0)
    packed = ce.to(tl.int32) | (co.to(tl.int32) << 4)
    tl.store(codes_ptr + rows.to(tl.int64)[:, None] * D2 + cols[None, :], packed.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(zero_ptr + rows, zero, mask=rmask)


def quantize_kv(x: torch.Tensor, clip: float | torch.Tensor = 1.0):
    """The cache's write path: the reference quantizer (torch, on any device). `quantize_kv_triton` is not
    yet bit-exact with it on the H100 (docs/KERNELS.md), so the cache does not use it."""
    return ref.quantize_kv(x, clip)


def quantize_kv_triton(x: torch.Tensor, clip: float | torch.Tensor = 1.0):
    """`kv4_reference.quantize_kv` in one Triton launch (exact under the interpreter; not yet on the GPU)."""
    d = x.shape[-1]
    ref.check_head_dim(d)
    if x.device.type != "cuda" and not interpreting():
        return ref.quantize_kv(x, clip)
    lead = x.shape[:-1]
    xr = x.detach().reshape(-1, d).contiguous()
    n = xr.shape[0]
    codes = torch.empty(*lead, d // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    zero = torch.empty(lead, dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, scale, zero
    if isinstance(clip, torch.Tensor):
        clip_t = clip.detach().reshape(1).to(device=x.device, dtype=torch.float32)
    else:
        clip_t = torch.full((1,), float(clip), dtype=torch.float32, device=x.device)
    d2_pad = _pow2(d // 2, 1)
    block_r = max(1, min(64, 4096 // d2_pad))
    _quantize_kv_kernel[(triton.cdiv(n, block_r),)](xr, codes, scale, zero, clip_t, n, d // 2,
                                                   BLOCK_R=block_r, D2_PAD=d2_pad, INTERP=interpreting())
    return codes, scale, zero


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(code - zero) * scale in dtype (torch; not on the decode path)."""
    return ref.dequantize_kv(codes, scale, zero, dtype)


@triton.jit
def _kv_block(qe, qo, qsum, m_i, l_i, acc_e, acc_o, zacc, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
              c_base, s_base, sc_s, ss_s, n0, end, qk_scale, j, jmask,
              BLOCK: tl.constexpr, QKIND: tl.constexpr, CODE_MODE: tl.constexpr, STACK: tl.constexpr,
              INTERP: tl.constexpr):
    """One block of BLOCK cache positions: scores from the raw codes, q . (c + B) - (z + B) * sum(q), times
    the scale; values as sum_t w_t (c_t + B) with w = p * scale, the sum_t w_t (z_t + B) kept apart (zacc)."""
    IS_F32: tl.constexpr = QKIND == 0
    BIAS: tl.constexpr = 16.0 if (CODE_MODE > 0 and not IS_F32) else 0.0
    n = n0 + tl.arange(0, BLOCK)
    nmask = n < end
    cmask = nmask[:, None] & jmask[None, :]
    c_off = c_base + n[:, None].to(tl.int64) * sc_s + j[None, :]
    s_off = s_base + n.to(tl.int64) * ss_s
    kc = tl.load(kc_ptr + c_off, mask=cmask, other=0)
    vc = tl.load(vc_ptr + c_off, mask=cmask, other=0)
    ks = tl.load(ks_ptr + s_off, mask=nmask, other=0.0)
    kz = tl.load(kz_ptr + s_off, mask=nmask, other=0.0)
    vs = tl.load(vs_ptr + s_off, mask=nmask, other=0.0)
    vz = tl.load(vz_ptr + s_off, mask=nmask, other=0.0)
    DT = qe.dtype
    if BIAS != 0.0 and CODE_MODE == 2:
        k_lo, k_hi = _codes16_prmt(kc, QKIND == 2, INTERP)
    elif BIAS != 0.0:
        k16 = kc.to(tl.int16)
        k_lo = _codes16(k16, True, QKIND == 2)
        k_hi = _codes16(k16, False, QKIND == 2)
    else:
        k32 = kc.to(tl.int32)
        k_lo = _codes_exact(k32, True, DT)
        k_hi = _codes_exact(k32, False, DT)
    s = _mm(qe, tl.trans(k_lo), IS_F32, INTERP) + _mm(qo, tl.trans(k_hi), IS_F32, INTERP)
    s = (s - qsum[:, None] * (kz + BIAS)[None, :]) * (ks * qk_scale)[None, :]
    s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * corr + tl.sum(p, 1)
    w = p * vs[None, :]
    if IS_F32:
        v32 = vc.to(tl.int32)
        v_lo = _codes_exact(v32, True, tl.float32)
        v_hi = _codes_exact(v32, False, tl.float32)
        pv_e = _mm(w, v_lo, True, INTERP)
        pv_o = _mm(w, v_hi, True, INTERP)
        wq = w
    else:
        if CODE_MODE == 2:
            v_lo, v_hi = _codes16_prmt(vc, False, INTERP)
        elif BIAS != 0.0:
            v16 = vc.to(tl.int16)
            v_lo = _codes16(v16, True, False)
            v_hi = _codes16(v16, False, False)
        else:
            v32 = vc.to(tl.int32)
            v_lo = _codes_exact(v32, True, tl.bfloat16)
            v_hi = _codes_exact(v32, False, tl.bfloat16)
        w_hi = w.to(tl.bfloat16)  # w as bf16 high + low parts: ~16 mantissa bits against the exact codes
        w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
        if STACK:  # rows r and r + G_PAD / 2 hold the same head: the high part on top, the low part below
            top = tl.arange(0, w.shape[0]) < w.shape[0] // 2
            w16 = tl.where(top[:, None], w_hi, w_lo)
            wq = w16.to(tl.float32)
            pv_e = _mm(w16, v_lo, False, INTERP)
            pv_o = _mm(w16, v_hi, False, INTERP)
        else:
            wq = w_hi.to(tl.float32) + w_lo.to(tl.float32)  # what the dots multiply: the bias cancels exactly
            pv_e = _mm(w_hi, v_lo, False, INTERP) + _mm(w_lo, v_lo, False, INTERP)
            pv_o = _mm(w_hi, v_hi, False, INTERP) + _mm(w_lo, v_hi, False, INTERP)
    zacc = zacc * corr + tl.sum(wq * (vz + BIAS)[None, :], 1)
    acc_e = acc_e * corr[:, None] + pv_e
    acc_o = acc_o * corr[:, None] + pv_o
    return m_new, l_i, acc_e, acc_o, zacc


@triton.jit
def _split_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, out_ptr, opart_ptr, lse_ptr,
                  qk_scale, S_MAX, SPLIT_LEN, NUM_SPLITS,
                  sq_b, sq_h, so_b, so_h, sc_b, sc_h, sc_s, ss_b, ss_h, ss_s,
                  HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D2: tl.constexpr,
                  D2_PAD: tl.constexpr, BLOCK: tl.constexpr, DIRECT: tl.constexpr, QKIND: tl.constexpr,
                  CODE_MODE: tl.constexpr, STACK: tl.constexpr, STAGES: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)

    HALF: tl.constexpr = G_PAD // 2 if STACK else G_PAD
    g = tl.arange(0, G_PAD) % HALF  # STACK: each head twice (w's high and low parts, see _kv_block)
    j = tl.arange(0, D2_PAD)
    gmask = g < G
    jmask = j < D2
    heads = h * G + g
    q_off = b.to(tl.int64) * sq_b + heads[:, None] * sq_h + 2 * j[None, :]
    qm = gmask[:, None] & jmask[None, :]
    qe = tl.load(q_ptr + q_off, mask=qm, other=0.0)  # even elements of head_dim (the low nibbles)
    qo = tl.load(q_ptr + q_off + 1, mask=qm, other=0.0)  # odd elements (the high nibbles)
    qsum = tl.sum(qe.to(tl.float32), 1) + tl.sum(qo.to(tl.float32), 1)

    c_base = b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    s_base = b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    zacc = tl.zeros((G_PAD,), tl.float32)
    acc_e = tl.zeros((G_PAD, D2_PAD), tl.float32)
    acc_o = tl.zeros((G_PAD, D2_PAD), tl.float32)
    n_iters = tl.cdiv(tl.maximum(end - start, 0), BLOCK)
    if INTERP:  # the interpreter cannot range() over loaded bounds
        it = 0
        while it < n_iters:
            m_i, l_i, acc_e, acc_o, zacc = _kv_block(
                qe, qo, qsum, m_i, l_i, acc_e, acc_o, zacc, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                c_base, s_base, sc_s, ss_s, start + it * BLOCK, end, qk_scale, j, jmask, BLOCK, QKIND, CODE_MODE,
                STACK, INTERP)
            it += 1
    else:  # a counted loop: Triton pipelines its loads STAGES deep
        for it in tl.range(0, n_iters, num_stages=STAGES):
            m_i, l_i, acc_e, acc_o, zacc = _kv_block(
                qe, qo, qsum, m_i, l_i, acc_e, acc_o, zacc, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                c_base, s_base, sc_s, ss_s, start + it * BLOCK, end, qk_scale, j, jmask, BLOCK, QKIND, CODE_MODE,
                STACK, INTERP)

    o_e = acc_e - zacc[:, None]
    o_o = acc_o - zacc[:, None]
    if STACK:  # a head's two rows (high and low parts of w) meet; m and l are the same in both
        o_e = tl.sum(tl.reshape(o_e, (2, HALF, D2_PAD)), 0)
        o_o = tl.sum(tl.reshape(o_o, (2, HALF, D2_PAD)), 0)
        l_i = tl.max(tl.reshape(l_i, (2, HALF)), 0)
        m_i = tl.max(tl.reshape(m_i, (2, HALF)), 0)
        g = tl.arange(0, HALF)
        gmask = g < G
        heads = h * G + g
        qm = gmask[:, None] & jmask[None, :]
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    o_e = o_e * inv_l[:, None]
    o_o = o_o * inv_l[:, None]
    if DIRECT:
        o_off = b.to(tl.int64) * so_b + heads[:, None] * so_h + 2 * j[None, :]
        tl.store(out_ptr + o_off, o_e.to(qe.dtype), mask=qm)
        tl.store(out_ptr + o_off + 1, o_o.to(qe.dtype), mask=qm)
    else:
        row = (b * (HKV * G) + heads).to(tl.int64) * NUM_SPLITS + split  # partials (B, Hq, splits, D)
        p_off = row[:, None] * (2 * D2) + 2 * j[None, :]
        tl.store(opart_ptr + p_off, o_e, mask=qm)
        tl.store(opart_ptr + p_off + 1, o_o, mask=qm)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=gmask)


@triton.jit
def _combine_kernel(opart_ptr, lse_ptr, out_ptr, NUM_SPLITS, D, sq_b, sq_h,
                    HQ: tl.constexpr, NS_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """out[b, h] = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M); all splits empty -> zeros."""
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    i = tl.arange(0, NS_PAD)
    d = tl.arange(0, D_PAD)
    imask = i < NUM_SPLITS
    row = pid.to(tl.int64) * NUM_SPLITS
    lse = tl.load(lse_ptr + row + i, mask=imask, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    wgt = tl.exp2(lse - mx)
    den = tl.sum(wgt, 0)
    o = tl.load(opart_ptr + (row + i[:, None]) * D + d[None, :], mask=imask[:, None] & (d[None, :] < D), other=0.0)
    num = tl.sum(o * wgt[:, None], 0)
    res = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + b.to(tl.int64) * sq_b + h * sq_h + d, res.to(out_ty), mask=d < D)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return num_sms(device)  # cached: decode calls it every step


def choose_splits(batch: int, hkv: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Sequence splits: about WAVES programs per SM over batch x kv heads, each split >= MIN_SPLIT_TOKENS.
    Decided from the cache capacity S_max (not the lengths: no host sync, CUDA-graph safe)."""
    sms = _sm_count(torch.device(device))
    want = triton.cdiv(WAVES * sms, max(1, batch * hkv))
    cap = max(1, triton.cdiv(s_max, max(MIN_SPLIT_TOKENS, block_n)))
    return max(1, min(want, cap, MAX_SPLITS))


def decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths,
                     sm_scale: float | None = None, *, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     codes: str | None = None, stack: bool | None = None) -> torch.Tensor:
    """Triton flash-decoding over the KV4 cache; same semantics as `kv4_reference.decode_attention`
    (lengths above S_max are clamped to S_max here). num_splits / block_n / num_warps / num_stages / codes
    (CODE_MODES) / stack override the module defaults."""
    b, hq, hkv, s_max, d = ref.check_decode_shapes(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                                   lengths)
    if q.device.type != "cuda" and not interpreting():
        return ref.decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, sm_scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if b * hq == 0:
        return out
    if s_max == 0:
        return out.zero_()
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    if (v_codes.stride() != k_codes.stride() or k_zero.stride() != k_scale.stride()
            or v_scale.stride() != k_scale.stride() or v_zero.stride() != k_scale.stride()):
        raise ValueError("K and V codes (and all four scale / zero tensors) must share their strides")
    block_n = block_n or BLOCK_N
    codes = codes or CODES
    stack = STACK_V if stack is None else bool(stack)
    if codes not in CODE_MODES:
        raise ValueError(f"codes must be one of {CODE_MODES}, got {codes!r}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    ns = num_splits or choose_splits(b, hkv, s_max, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(s_max, ns), block_n) * block_n
    ns = triton.cdiv(s_max, split_len)
    g = hq // hkv
    direct = ns == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty(b, hq, ns, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, ns, dtype=torch.float32, device=q.device)
    lengths = lengths.to(device=q.device)
    _split_kernel[(b * hkv, ns)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, out, opart, lse,
        sm_scale * LOG2E, s_max, split_len, ns,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        HKV=hkv, G=g, G_PAD=_pow2(g), D2=d // 2, D2_PAD=_pow2(d // 2), BLOCK=block_n, DIRECT=direct,
        QKIND={torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[q.dtype], CODE_MODE=CODE_MODES.index(codes),
        STACK=stack and q.dtype != torch.float32 and 2 * g <= _pow2(g),
        STAGES=num_stages or NUM_STAGES, INTERP=interpreting(), num_warps=num_warps or NUM_WARPS)
    if not direct:
        _combine_kernel[(b * hq,)](opart, lse, out, ns, d, out.stride(0), out.stride(1),
                                   HQ=hq, NS_PAD=_pow2(ns, 2), D_PAD=_pow2(d), num_warps=4)
    return out
