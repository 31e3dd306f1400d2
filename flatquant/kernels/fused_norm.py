"""One pass from the decoder's elementwise op to a W4A4 linear's quantized input (the activation is read once).

Two prologues, each followed by the Kronecker transform and per-token quantization of
`flatquant.kernels.transform` (Y = P1ᵀ X P2 per token, scale = max(alpha * max|Y| / maxq, 1e-8), codes
rounded half to even, packed or one per byte), in one Triton kernel:
- "norm": r = res + x (rounded to the model dtype, stored: the next residual), X = w * RMSNorm(r)
  (Hugging Face's LlamaRMSNorm order, `flatquant.runtime.fused_ops.add_rmsnorm_reference`); the channel
  scale of the linear's transform is already folded into w, as the packed runtime stores it;
- "silu": X = SiLU(gate) * up from the fused gate / up output (`fused_ops.silu_mul_reference`).
Semantics: `norm_quant_reference` / `silu_quant_reference` (the unfused ops, then
`reference.transform_quantize_reference` with the intermediate T = X P2 rounded to the dot dtype, as the
Triton transform kernels do). `norm_linear` / `silu_linear` run the whole linear (prologue + GEMM) and fall
back to the unfused ops where the fused kernel does not take the case (`supported`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flatquant.kernels import reference as ref
from flatquant.kernels._triton_utils import (
    _mm,
    _mm_f32rhs,
    _quantize,
    _scale,
    interpreting,
    mask_and,
    next_pow2,
    num_sms,
    triton_dtype,
)
from flatquant.kernels.transform.common import ONCHIP_MAX_ELEMENTS, code_cast, plan

PROGRAMS_PER_SM = 4
MODES = {"norm": 0, "add_norm": 1, "silu": 2}
OUT_DTYPES = {"packed": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class PrologueConfig:
    """Which decoder prologues run fused with the next linear's transform + quantize (off: the unfused ops)."""
    norm_quant: bool = False  # residual add + RMSNorm -> qkv / gate_up input
    silu_quant: bool = False  # SiLU(gate) * up -> down_proj input
    max_tokens: int | None = None  # fuse only calls of at most this many tokens (None: all)
    silu_w4: bool = True  # the SiLU prologue also before a W4A4 down_proj (False: only before FP8 ones)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a call on activations x (..., hidden) is within max_tokens."""
        return self.max_tokens is None or x.numel() // x.shape[-1] <= self.max_tokens


UNFUSED = PrologueConfig()
FUSED = PrologueConfig(True, True)
# The runtime's default (docs/KERNELS.md, "Fused prologues"): the norm prologue wins at every M; the W4 SiLU
# prologue loses to the unfused SiLU + transform, the FP8 one wins.
DEFAULT = PrologueConfig(True, True, silu_w4=False)


# ------------------------------------------------------------------------------------ references ---

def _store_format(codes_packed: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """Stored reference codes (packed int4 / int8) in the output format `fmt`."""
    if fmt == "packed" or (bits == 8 and fmt == "int8"):
        return codes_packed
    codes = ref.unpack_codes(codes_packed, bits)
    return codes.to(torch.int8) if fmt == "int8" else codes.float().to(torch.float8_e4m3fn)


def norm_quant_reference(x, res, w, eps: float, p1, p2, alpha: float, bits: int = 4, fmt: str = "packed"):
    """(codes, scale, res + x) of the fused norm prologue; res None: the residual returned is x."""
    from flatquant.runtime.fused_ops import add_rmsnorm_reference

    h, r = add_rmsnorm_reference(x, res, w, eps)
    a, s = ref.transform_quantize_reference(h, p1, p2, alpha, bits, round_intermediate=True)
    return _store_format(a, bits, fmt), s, r


def silu_quant_reference(gu, p1, p2, alpha: float, bits: int = 4, fmt: str = "packed"):
    """(codes, scale) of SiLU(gu[..., :n]) * gu[..., n:] transformed and quantized."""
    from flatquant.runtime.fused_ops import silu_mul_reference

    a, s = ref.transform_quantize_reference(silu_mul_reference(gu), p1, p2, alpha, bits, round_intermediate=True)
    return _store_format(a, bits, fmt), s


# ---------------------------------------------------------------------------------------- kernel ---

@triton.jit
def _prologue_quant_kernel(x_ptr, r_ptr, w_ptr, rout_ptr, p1_ptr, p2_ptr, out_ptr, scale_ptr, M, stride_o, eps, alpha,
                           NITER,
                           NITER_C: tl.constexpr, MODE: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                           N1P: tl.constexpr, N2P: tl.constexpr, RP: tl.constexpr, RLO: tl.constexpr,
                           H: tl.constexpr, HAS_P2: tl.constexpr, PACK: tl.constexpr, IS_F32: tl.constexpr,
                           MAXQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    N: tl.constexpr = N1 * N2
    NH: tl.constexpr = N // 2
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    r = tl.arange(0, RP)
    xmask = (i[:, None] < N1) & (j[None, :] < N2)
    offs = i[:, None] * N2 + j[None, :]
    if HAS_P2:
        pm = (j[:, None] < N2) & (j[None, :] < N2)
        P2 = tl.load(p2_ptr + j[:, None] * N2 + j[None, :], mask=pm, other=0.0).to(DT)
    a = i[None, :]
    rows = r[:, None]
    c = j[None, :]
    P1lo = tl.load(p1_ptr + a * N1 + rows, mask=(rows < RLO) & (a < N1), other=0.0).to(DT)  # P1ᵀ rows [0, RLO)
    if PACK:
        P1A = tl.load(p1_ptr + a * N1 + (H + rows), mask=(rows < RLO) & (H + rows < N1) & (a < N1),
                      other=0.0).to(DT)  # P1ᵀ rows [H, 2H): the high nibbles
        valid = (rows * N2 + c < NH) & (c < N2) & (rows < RLO)
    else:
        valid = (rows < N1) & (c < N2)
    if MODE != 2:
        W = tl.load(w_ptr + offs, mask=xmask, other=0.0).to(tl.float32)
    for it in range(NITER_C if INTERP else NITER):  # interpreter: a Python int
        t = (pid + it * nprog).to(tl.int64)
        ok = t < M
        m = mask_and(xmask, ok)
        if MODE == 2:
            g = tl.load(x_ptr + t * (2 * N) + offs, mask=m, other=0.0)
            u = tl.load(x_ptr + t * (2 * N) + N + offs, mask=m, other=0.0)
            gf = g.to(tl.float32)
            sg = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
            X = (sg.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        else:
            xv = tl.load(x_ptr + t * N + offs, mask=m, other=0.0)
            if MODE == 1:
                rv = (xv.to(tl.float32) + tl.load(r_ptr + t * N + offs, mask=m, other=0.0).to(tl.float32)).to(xv.dtype)
                tl.store(rout_ptr + t * N + offs, rv, mask=m)
            else:
                rv = xv
            hf = rv.to(tl.float32)
            var = tl.sum(tl.sum(hf * hf, axis=1), axis=0) / N
            y = (hf * tl.math.rsqrt(var + eps)).to(xv.dtype)
            X = (y.to(tl.float32) * W).to(xv.dtype)
        X = X.to(DT)
        if HAS_P2:
            T = _mm(X, P2, IS_F32, INTERP)
        else:
            T = X.to(tl.float32)
        Ylo = _mm_f32rhs(P1lo, T, DT, IS_F32, False, INTERP)
        amax = tl.max(tl.max(tl.where(valid, tl.abs(Ylo), 0.0), axis=1), axis=0)
        if PACK:
            Yhi = _mm_f32rhs(P1A, T, DT, IS_F32, False, INTERP)
            amax = tl.maximum(amax, tl.max(tl.max(tl.where(valid, tl.abs(Yhi), 0.0), axis=1), axis=0))
        s = _scale(amax, alpha, MAXQ, INTERP)
        tl.store(scale_ptr + t, s, mask=ok)
        qlo = _quantize(Ylo, s, MAXQ, INTERP)
        ob = out_ptr + t * stride_o
        if PACK:
            qhi = _quantize(Yhi, s, MAXQ, INTERP)
            byte = (qlo & 15) | ((qhi & 15) << 4)
            tl.store(ob + rows * N2 + c, byte.to(tl.uint8), mask=mask_and(valid, ok))
        else:
            tl.store(ob + rows * N2 + c, code_cast(qlo, ob.dtype.element_ty), mask=mask_and(valid, ok))


def _warps(tile: int) -> int:
    """Warps per program: a 128 x 128 token tile and its factors would spill at 8 (several tiles live at once)."""
    return 4 if tile <= 64 * 64 else 8 if tile <= 64 * 128 else 16


def supported(n: int, p1, p2, bits: int, fmt: str = "packed") -> bool:
    """Whether the fused kernel takes a hidden size n with these factors: an even n1 (the nibble split falls
    on a factor row) and factor tiles on chip (ONCHIP_MAX_ELEMENTS)."""
    try:
        n1, n2, _, _, s, _ = plan(n, p1, p2, bits, packed=fmt == "packed")
    except ValueError:
        return False
    return s == 0 and n1 % 2 == 0 and next_pow2(n1) * next_pow2(n2) <= ONCHIP_MAX_ELEMENTS and \
        (p2 is None or next_pow2(n2) ** 2 <= ONCHIP_MAX_ELEMENTS)


def prologue_quantize(mode: str, x: torch.Tensor, p1, p2, alpha: float, bits: int = 4, fmt: str = "packed", *,
                      res: torch.Tensor | None = None, w: torch.Tensor | None = None, eps: float = 1e-6,
                      num_programs: int | None = None):
    """The Triton pass: mode "norm" (x, res, w, eps) -> (codes (M, ·), scale (M,), residual (M, n)) or
    "silu" (x = gate|up (..., 2n)) -> (codes, scale, None). Codes in `fmt` ("packed" / "int8" / "fp8")."""
    if mode not in ("norm", "silu"):
        raise ValueError(f"mode must be 'norm' or 'silu', got {mode!r}")
    if fmt not in OUT_DTYPES or (bits == 8 and fmt != "int8"):
        raise ValueError(f"out format {fmt!r} is not valid for {bits} bits")
    n = x.shape[-1] // (2 if mode == "silu" else 1)
    if not supported(n, p1, p2, bits, fmt):
        raise ValueError(f"the fused prologue does not take hidden size {n} with these factors")
    n1, n2, pack, h, _, rlo = plan(n, p1, p2, bits, packed=fmt == "packed")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    dd = ref.dot_dtype_for(x.dtype)
    p1c = (torch.eye(n1, device=x.device, dtype=dd) if p1 is None else p1.to(device=x.device, dtype=dd)).contiguous()
    p2c = p2.to(device=x.device, dtype=dd).contiguous() if p2 is not None else p1c
    out = torch.empty((m, n // 2 if pack else n), device=x.device, dtype=OUT_DTYPES[fmt])
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    kmode = MODES["silu"]
    r2 = rout = wc = x2
    if mode == "norm":
        if w is None or w.numel() != n:
            raise ValueError("the norm prologue needs the norm weight of the hidden size")
        wc = w.to(x.dtype).contiguous()
        if res is not None:
            kmode, r2 = MODES["add_norm"], res.reshape(-1, n).contiguous()
            rout = torch.empty_like(x2)
        else:
            kmode = MODES["norm"]
    if m:
        interp = interpreting()
        grid = num_programs or min(m, num_sms(x.device) * PROGRAMS_PER_SM)
        niter = triton.cdiv(m, grid)
        n1p, n2p = next_pow2(n1), next_pow2(n2)
        alpha32 = float(torch.tensor(float(alpha), dtype=torch.float32))  # the float32 value the kernels see
        _prologue_quant_kernel[(grid,)](
            x2, r2, wc, rout, p1c, p2c, out, scale, m, out.stride(0), float(eps), alpha32, niter,
            NITER_C=niter if interp else 1, MODE=kmode, N1=n1, N2=n2, N1P=n1p, N2P=n2p, RP=next_pow2(rlo), RLO=rlo,
            H=h, HAS_P2=p2 is not None, PACK=pack, IS_F32=dd == torch.float32, MAXQ=2 ** (bits - 1) - 1,
            DT=triton_dtype(dd), INTERP=interp, num_warps=_warps(n1p * n2p))
    resid = None if mode == "silu" else (rout if res is not None else x2)
    return out, scale, resid


# ------------------------------------------------------------------------------ whole linears ---

def input_plan(lin, m: int, out_dtype: torch.dtype, device: torch.device):
    """(route, fmt) the linear's Triton GEMM takes for m tokens and the activation format it reads, or None
    where the linear's own path must run (reference backend, the one-launch decode kernel, split
    intermediate, a size the fused kernel does not take)."""
    from flatquant.kernels.gemm.decode import activation_format
    from flatquant.kernels.linear import CODE_FORMAT

    if lin.backend != "triton" or lin.split_intermediate or (
            m <= lin.routes.fused_decode_max_m and (lin.gemm_route or "auto") in ("auto", "decode")):
        return None
    route = lin.gemm_route_for(m, out_dtype, device)
    fmt = CODE_FORMAT.get(route)
    if route == "decode":
        fmt = activation_format(m, lin.out_features, lin.in_features // 2, device, lin.bits, lin.routes)
    fmt = fmt or ("packed" if lin.bits == 4 else "int8")
    if not supported(lin.in_features, lin.p1, lin.p2, lin.bits, fmt):
        return None
    return route, fmt


def quantized_gemm(lin, a, sa, route: str, fmt: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM half of `W4A4Linear.forward` on activations already transformed and quantized."""
    from flatquant.kernels.gemm.decode import w4a4_gemm_decode
    from flatquant.kernels.gemm.w4a4_gemm import w4a4_gemm
    from flatquant.kernels.linear import CODE_FORMAT, one_byte_gemm

    if route == "decode":
        return w4a4_gemm_decode(a, sa, lin.qweight, lin.weight_scale, lin.bias, out_dtype, lin.bits, routes=lin.routes)
    if route.startswith("tma_"):
        return one_byte_gemm(route)(a, sa, lin._weight_codes(fmt), lin.weight_scale, lin.bias, out_dtype,
                                    config=lin.routes.tma_configs.get(fmt))
    if route in CODE_FORMAT:
        return one_byte_gemm(route)(a, sa, lin._weight_codes(fmt), lin.weight_scale, lin.bias, out_dtype)
    return w4a4_gemm(a, sa, lin.qweight, lin.weight_scale, lin.bias, out_dtype, lin.bits, route=route)


def _plan_for(lin, x: torch.Tensor, n: int):
    from flatquant.kernels.linear import W4A4Linear

    if not isinstance(lin, W4A4Linear) or lin.in_features != n:
        return None
    return input_plan(lin, x.numel() // x.shape[-1], lin.out_dtype or x.dtype, x.device)


def _fp8_fused(lin, x: torch.Tensor, fused_ops_on: bool) -> bool:
    """Whether an Fp8Linear takes its codes from `fp8.prologue_fp8` (CUDA, half-precision activations)."""
    from flatquant.runtime.fp8 import Fp8Linear

    return isinstance(lin, Fp8Linear) and fused_ops_on and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def norm_linear(lin, x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, eps: float, fused_ops_on: bool = True):
    """(lin(w * RMSNorm(res + x)), res + x): fused where `input_plan` allows (or, for an FP8 linear, the norm
    fused into its FP8 quantizer), else the unfused ops."""
    from flatquant.runtime import fp8, fused_ops

    if _fp8_fused(lin, x, fused_ops_on) and w.dtype == x.dtype:
        q, s, r = fp8.prologue_fp8("norm", x, res, w, eps)
        m = x.numel() // x.shape[-1]
        return lin.gemm_codes(q, s, m, x.dtype).reshape(*x.shape[:-1], lin.out_features), r.view(x.shape)
    pl = _plan_for(lin, x, x.shape[-1])
    if pl is None or w.dtype != x.dtype:
        h, r = fused_ops.add_rmsnorm(x, res, w, eps, fused=fused_ops_on)
        return lin(h), r
    route, fmt = pl
    p1, p2 = lin._factors(x.dtype)
    a, sa, r = prologue_quantize("norm", x, p1, p2, lin._alpha(), lin.bits, fmt, res=res, w=w, eps=eps)
    y = quantized_gemm(lin, a, sa, route, fmt, lin.out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], lin.out_features), r.view(x.shape)


def silu_linear(lin, gu: torch.Tensor, fused_ops_on: bool = True) -> torch.Tensor:
    """lin(SiLU(gate) * up) for gu = gate|up (..., 2n): fused where `input_plan` allows, else unfused."""
    from flatquant.runtime import fp8, fused_ops

    if _fp8_fused(lin, gu, fused_ops_on):
        q, s, _ = fp8.prologue_fp8("silu", gu)
        return lin.gemm_codes(q, s, gu.numel() // gu.shape[-1], gu.dtype).reshape(*gu.shape[:-1], lin.out_features)
    pl = _plan_for(lin, gu, gu.shape[-1] // 2)
    if pl is None:
        return lin(fused_ops.silu_mul(gu, fused=fused_ops_on))
    route, fmt = pl
    p1, p2 = lin._factors(gu.dtype)
    a, sa, _ = prologue_quantize("silu", gu, p1, p2, lin._alpha(), lin.bits, fmt)
    y = quantized_gemm(lin, a, sa, route, fmt, lin.out_dtype or gu.dtype)
    return y.reshape(*gu.shape[:-1], lin.out_features)


def self_check(device, dtype=torch.bfloat16) -> str | None:
    """None if the fused passes (W4 prologues at Llama hidden / intermediate factor shapes, and the FP8
    prologue) match their references on `device` within the tests' tolerances, else the first mismatch."""
    from flatquant.runtime import fp8

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)
    for n1, n2 in ((64, 64), (86, 128)):
        n = n1 * n2
        p1, p2 = torch.eye(n1, device=device) + rnd(n1, n1) * 0.1 / n1 ** 0.5, torch.eye(n2, device=device) + \
            rnd(n2, n2) * 0.1 / n2 ** 0.5
        x, res, w = rnd(5, n).to(dtype), rnd(5, n).to(dtype), (rnd(n).abs() + 0.5).to(dtype)
        for fmt in ("packed", "int8", "fp8"):
            got = prologue_quantize("norm", x, p1, p2, 0.9, 4, fmt, res=res, w=w, eps=1e-5)
            want = norm_quant_reference(x, res, w, 1e-5, p1, p2, 0.9, 4, fmt)
            got2 = prologue_quantize("silu", torch.cat((x, res), -1), p1, p2, 0.9, 4, fmt)
            want2 = silu_quant_reference(torch.cat((x, res), -1), p1, p2, 0.9, 4, fmt)
            for (a, s), (b, t), what in (((got[0], got[1]), want[:2], "norm"), (got2[:2], want2, "silu")):
                ca = ref.unpack_codes(a, 4).float() if fmt == "packed" else a.float()
                cb = ref.unpack_codes(b, 4).float() if fmt == "packed" else b.float()
                d = (ca - cb).abs()
                if not torch.allclose(s, t, rtol=1e-2, atol=0) or d.max() > 1 or (d > 0).float().mean() > 0.01:
                    return f"fused {what} prologue mismatch at n={n} ({fmt})"
            if not torch.equal(got[2], want[2]):
                return f"fused norm prologue residual mismatch at n={n}"
        for mode, inp in (("norm", x), ("silu", torch.cat((x, res), -1))):
            q, s, _ = fp8.prologue_fp8(mode, inp, res if mode == "norm" else None, w, 1e-5)
            qr, sr, _ = fp8.prologue_fp8_reference(mode, inp, res if mode == "norm" else None, w, 1e-5)
            if not torch.allclose(s, sr, rtol=1e-2, atol=0) or \
                    (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean() > 0.01:
                return f"fp8 {mode} prologue mismatch at n={n}"
    return None
