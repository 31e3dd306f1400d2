"""Shared Triton helpers: interpreter detection, exact division/rounding, the dot wrappers."""
from __future__ import annotations

import os

import torch

# Without a GPU the kernels can only run through Triton's CPU interpreter; it must be chosen before
# the kernels are decorated (i.e. before the kernel modules are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Fixed at import, like the kernels' decoration (the interpreter is chosen before the kernel modules load).
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def mask_and(mask, ok):
    """mask & ok for a block mask and a scalar condition, as a boolean block. Triton 3.9's interpreter gives
    that `&` an integer dtype (a scalar comparison keeps its operands' integer type when splatted), which
    tl.load / tl.store refuse; `!= 0` makes it boolean there. On the GPU it is the plain `&`."""
    if _INTERPRETED:
        return (mask & ok) != 0
    else:
        return mask & ok


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (a kernel launched while the previous one finishes; it waits in
    `gdc_wait` before reading that kernel's output): Hopper (sm_90) and newer, never in the interpreter."""
    return (device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def gdc_wait():
    """Wait until the grids this one depends on have finished and their writes are visible (PTX
    griddepcontrol.wait; returns at once when the kernel was not launched as a dependent)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def gdc_launch_dependents():
    """Let the next kernel in the stream, if launched as a programmatic dependent, start now (PTX
    griddepcontrol.launch_dependents); it still waits for this grid's writes in gdc_wait."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines that hold `ptrs` (PTX prefetch.global.L2): no register is written and
    nothing waits for it, so a kernel can have its weight on the way while it waits in `gdc_wait`. GPU
    only (callers skip it in the interpreter)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


_STREAM_STATE: dict = {}


def stream_state(name: str, device: torch.device, extra, make):
    """Device buffers a kernel keeps between calls (zeroed workspaces, counters), one set per (device,
    stream, extra): two streams must not share one. `make(device)` builds them on first use; "cuda"
    and "cuda:<current>" are the same device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (name, device, stream, extra)
    if key not in _STREAM_STATE:
        _STREAM_STATE[key] = make(device)
    return _STREAM_STATE[key]




def triton_dtype(dt: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dt]


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def _mm(a, b, IS_F32: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with a float32 accumulator. float32 operands use exact IEEE products (no tf32)."""
    if INTERP:
        # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast, the values are the same.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        if IS_F32:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)


@triton.jit
def _mm_f32rhs(p, t, DT: tl.constexpr, IS_F32: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """p (in DT) @ t (float32). Half precision: t = hi + lo (both DT), two dots, ~float32 accuracy
    (SPLIT), or one dot on t rounded to DT (not SPLIT)."""
    if IS_F32:
        return _mm(p, t, IS_F32, INTERP)
    else:
        hi = t.to(DT)
        if SPLIT:
            lo = (t - hi.to(tl.float32)).to(DT)
            return _mm(p, hi, IS_F32, INTERP) + _mm(p, lo, IS_F32, INTERP)
        else:
            return _mm(p, hi, IS_F32, INTERP)


# 1.5 * 2**23: adding it to a float32 of magnitude < 2**22 rounds that float to an integer (half to even),
# which then sits in the low mantissa bits (the sum's bits are 0x4B400000 + the integer).
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _codes_of_rounded_sum(t, MAXQ: tl.constexpr):
    """Codes from t = v + 1.5 * 2**23 (v rounded to an integer in the sum's mantissa): a clamp of the sum
    to [magic - MAXQ - 1, magic + MAXQ] (clamping to integer bounds before or after rounding is the same;
    values too large to round exactly land beyond the bounds), then the sum's bits minus the magic's. The
    low nibble / byte of the result are those of the bits, so callers' packing masks fold the subtraction
    away."""
    t = tl.minimum(tl.maximum(t, _ROUND_MAGIC - MAXQ - 1.0), _ROUND_MAGIC + MAXQ)
    return t.to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _round_clamp(v, MAXQ: tl.constexpr, INTERP: tl.constexpr):
    """clamp(round_half_even(v), -MAXQ - 1, MAXQ) as int32 (on the GPU a NaN gives -MAXQ - 1).

    Four full-rate instructions and no conversion unit: one IEEE addition of 1.5 * 2**23 (on the GPU
    add.rn, kept apart from the product before it, so the rounding is that of fl(v)), then
    `_codes_of_rounded_sum` (clamp, rint, clamp, convert would cost two conversions per element)."""
    if INTERP:
        t = v + _ROUND_MAGIC  # numpy: one IEEE float32 addition
    else:
        t = tl.inline_asm_elementwise("add.rn.f32 $0, $1, 0f4B400000;", "=f,f", [v], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return _codes_of_rounded_sum(t, MAXQ)


@triton.jit
def _round_clamp_product(y, inv, MAXQ: tl.constexpr, INTERP: tl.constexpr):
    """clamp(round_half_even(y * inv), -MAXQ - 1, MAXQ) as int32, the product rounded ONCE: on the GPU
    fma(y, inv, 1.5 * 2**23) rounds the exact y * inv to an integer, which saves the multiply of
    `_round_clamp(y * inv)` (that form rounds the product to float32 first; the two differ only where
    y * inv is within half a float32 ulp of a .5 tie, as y * inv and y / s do). The interpreter computes
    `_round_clamp(y * inv)`."""
    if INTERP:
        return _round_clamp(y * inv, MAXQ, INTERP)
    else:
        return _codes_of_rounded_sum(tl.fma(y, inv, _ROUND_MAGIC), MAXQ)


@triton.jit
def _div_rn(a, b, INTERP: tl.constexpr):
    """a / b in float32, rounded to nearest even like torch's division. On the GPU written out as the
    hardware division's fast path: reciprocal estimate, one Newton step, quotient, one residual
    correction (each residual an exact FMA), correctly rounded for operands in the normal range away from
    overflow (here: scales, their inverses and activations over a scale; a denormal quotient can only
    round to code 0). libdevice's div_rn adds a range check and a slow-path call (docs/KERNELS.md);
    tests/kernels checks this one bit for bit against torch."""
    if INTERP:
        return tl.math.div_rn(a, b)
    else:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [b], dtype=tl.float32, is_pure=True,
                                      pack=1)
        y = tl.fma(y, tl.fma(-b, y, 1.0), y)
        q = a * y
        return tl.fma(tl.fma(-b, q, a), y, q)


@triton.jit
def _quantize(y, s, MAXQ: tl.constexpr, INTERP: tl.constexpr):
    """clamp(round_half_even(y / s), -MAXQ - 1, MAXQ) as int32 (IEEE division, like torch)."""
    return _round_clamp(_div_rn(y, s, INTERP), MAXQ, INTERP)


@triton.jit
def _scale(amax, alpha, MAXQ: tl.constexpr, INTERP: tl.constexpr):
    """max(alpha * amax / MAXQ, 1e-8) in the order of flatquant.core.quantizer.quantize_symmetric."""
    s = _div_rn(amax * alpha, MAXQ * 1.0, INTERP)
    return tl.maximum(s, 1e-8)
