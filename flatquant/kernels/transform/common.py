"""What the fused transform + quantize kernels share: the call plan, the PDL trigger, the code stores."""
from __future__ import annotations

import triton
import triton.language as tl

from flatquant.kernels._triton_utils import gdc_launch_dependents
from flatquant.kernels.reference import kron_factors

# Padded factor tiles (X / T: N1P x N2P, P2: N2P x N2P) above this many elements take the tiled kernel;
# 128 x 128 holds every Llama/Qwen size.
ONCHIP_MAX_ELEMENTS = 128 * 128


def plan(n: int, p1, p2, bits: int, packed: bool = True):
    """(n1, n2, pack, H, S, RLO) of a call: factor sizes, whether codes are packed, and the packing split
    (H = (n/2) // n2 rows and S = (n/2) % n2 columns before the high nibbles start; RLO low-nibble rows)."""
    if p1 is not None:
        n1 = p1.shape[0]
    elif p2 is not None:
        n1 = n // p2.shape[0]
    else:
        n1 = kron_factors(n)[0]
    n2 = n // n1
    if n1 * n2 != n:
        raise ValueError(f"factor sizes do not divide the hidden size {n}")
    if p1 is not None and tuple(p1.shape) != (n1, n1):
        raise ValueError(f"P1 must be ({n1}, {n1}), got {tuple(p1.shape)}")
    if p2 is not None and tuple(p2.shape) != (n2, n2):
        raise ValueError(f"P2 must be ({n2}, {n2}), got {tuple(p2.shape)}")
    pack = bits == 4 and packed
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if pack and n % 2:
        raise ValueError(f"int4 packing needs an even hidden size, got {n}")
    nh = n // 2
    h, s = (nh // n2, nh % n2) if pack else (0, 0)
    rlo = (h + (1 if s else 0)) if pack else n1
    return n1, n2, pack, h, s, rlo


@triton.jit
def pdl_trigger(TRIGGER: tl.constexpr, HERE: tl.constexpr, INTERP: tl.constexpr):
    """Let a programmatic dependent (the decode GEMM) start here if TRIGGER names this point (1 start,
    2 end; `RouteConfig.pdl_trigger_code`); it still waits for all our writes in gdc_wait."""
    if TRIGGER == HERE and not INTERP:
        gdc_launch_dependents()


@triton.jit
def code_cast(q, OUT_T: tl.constexpr):
    """Unpacked codes as the output wants them: int8, or float8 e4m3 (|q| <= 8 is exact there) for the
    cuBLASLt FP8 GEMM."""
    if OUT_T == tl.int8:
        return q.to(tl.int8)
    else:
        return q.to(tl.float32).to(OUT_T)


@triton.jit
def pack_nibbles(qlo, qhi):
    """int4 codes (int32) -> packed bytes lo | hi << 4 (two's complement nibbles)."""
    return ((qlo & 15) | ((qhi & 15) << 4)).to(tl.uint8)


@triton.jit
def store_code_pair(ob, qlo, qhi, mask, HI_OFFSET: tl.constexpr, PACK: tl.constexpr):
    """Store codes whose low / high halves sit at the same (row, column): one packed byte lo | hi << 4 at
    ob, or (unpacked) lo at ob and hi at ob + HI_OFFSET (= n/2 elements on)."""
    if PACK:
        tl.store(ob, pack_nibbles(qlo, qhi), mask=mask)
    else:
        tl.store(ob, code_cast(qlo, ob.dtype.element_ty), mask=mask)
        tl.store(ob + HI_OFFSET, code_cast(qhi, ob.dtype.element_ty), mask=mask)


@triton.jit
def persistent_start(TRIGGER: tl.constexpr, INTERP: tl.constexpr):
    """Start of a persistent-grid kernel: the PDL "start" trigger, then (program id, number of programs)."""
    pdl_trigger(TRIGGER, 1, INTERP)
    return tl.program_id(0), tl.num_programs(0)
