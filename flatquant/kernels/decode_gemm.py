"""Small-M (decode, M <= 16) W4A4 GEMM: reads the PACKED int4 weight directly, at weight bandwidth.

At M <= 16 the GEMM is bound by reading the weight: packed int4 is 4x fewer bytes than bf16, so the
kernels stream W with the unpack done in registers. Two kernels, picked by M (`resolved_config`):

- M <= GEMV_MAX_M (4; 1-2 for weights above 4096 x 4096, `gemv_max_m`): `_gemv_kernel`, on the CUDA
  cores, no tensor-core tile (which would be mostly padding at M = 1). Rows are read as int32 words (8
  int4 codes); weight nibbles become offset-binary bytes in two logic ops and meet the activation's
  signed bytes in dp4a (4 multiply-adds per instruction); the offset comes off at the end. One program
  per GEMV_BLOCK_N rows of W walks all of K.
- otherwise (and for rows that are not whole int32 words): `_decode_kernel`, int8 tensor-core dots
  against a 16-row activation tile (rows beyond M masked to 0: tl.dot on int8 needs >= 16 rows), the
  weight as the MMA's A operand (SWAP_AB), its nibbles turned into 16 x code with 3 instructions per 8
  codes (`_nibbles_x16`, `MMA_WEIGHT_NIBBLES`; sign-extended or offset codes as options), each program's
  K steps split into SUB sub-ranges with one warp each (batched dots, summed once at the end), the K loop
  pipelined through shared memory (cp.async, MMA_STAGES deep). By default it takes the activation codes
  one per byte (`activation_format`), so their tiles go from cp.async straight into the MMA. Grid = N
  tiles x SPLIT_K (`decode_config`: 32-row tiles, no split by default). With SPLIT_K > 1 the splits
  meet in ONE launch: each program atomically adds its int32 partial sums into a workspace tile and
  bumps that tile's arrival counter; the program that arrives last takes the finished sums out with an
  atomic exchange (which also leaves the workspace zeroed for the next call), applies the scales, writes
  the output and resets the counter. Integer adds are exact and order independent, so the result is
  deterministic, and a decode step needs no memset and no separate epilogue launch.

On sm_90+ both kernels are launched as programmatic dependents (PDL) of the kernel before it (the fused
transform); the gemv requests its first weight tile before waiting for the activation codes. No
autotuning: the config is a function of (M, N, K, SMs), which keeps the host-side launch cost low; the
tile choices come from the H200 sweeps of benchmarks/bench_decode_parts.py (results/kernels/,
results/archive/).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from flatquant.kernels._triton_utils import gdc_wait, interpreting, num_sms, pdl_supported, prefetch_l2, stream_state

MAX_M = 16
# M up to this takes the CUDA-core dp4a kernel (`_gemv_kernel`) by default; larger M the tensor cores.
GEMV_MAX_M = 4
# Above this many weights (N x K) the dp4a kernel is the default only up to M = 2 for K <= 4096 and only at M = 1
# for longer K (`gemv_max_m`): in the layer on the H200 (586da58, results/archive/kernels-h200-586da58/) the
# tensor-core kernel was faster at M = 3-4 on 4096 -> 14336 (15.0 against 16.1-16.2 us) and at M = 2-4 on
# 14336 -> 4096 (17.1-17.2 against 17.8-17.9 us), slower at M = 2-4 on 4096 x 4096 (9.0-9.1 against 7.3-7.9).
GEMV_ALL_M_MAX_WEIGHTS = 4096 * 4096
# Fixed tile sizes for the interpreter (CPU tests); tests also force split_k.
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SUB=2, SPLIT_K=2, GEMV_BLOCK_N=16, GEMV_BLOCK_K=32)
# The gemv kernel: rows of W and bytes of K per step, by M (a config may override either; KERNEL "mma"
# sends small M to the tensor-core kernel instead). From the H200 sweep (bench_decode_parts.py, 5aea87e):
# 8 rows x 1024 bytes was within 5 % of the best config on all three shapes at M = 1; at M = 4 the
# (BLOCK_M, rows, words) accumulator must stay small (larger tiles spill), 8 x 512 had no bad case.
# SWAP_AB: the tensor-core kernel's operand order (weight as the MMA's A operand: 1.3-1.5x faster at
# M = 16 in the same sweep).
# Which decode kernels launch as a programmatic dependent of the previous kernel on sm_90+ (config key
# "PDL" overrides per call): the launch and first weight loads overlap the fused transform's tail. On
# the H200 that saved 1.2-2.4 us per layer at M = 1 and 4 (gemv; a02c88b). The tensor-core kernel (M = 16)
# was slower with it at a02c88b (14336x4096: 32.7 vs 28.0 us; synchronous loads then), faster once its
# loads were pipelined and took codes one per byte (ca6806c: 12.8 / 17.4 / 24.9 against 13.7 / 18.3 /
# 25.6 us on the three decode shapes; results/archive/kernels-h200-ca6806c/).
PDL = {"gemv": True, "mma": True}
# Pipeline depth of the tensor-core kernel's K loop (config key "num_stages"; 1 = synchronous loads).
MMA_STAGES = 3
# The fused transform writes 4-bit activation codes one per byte (out_format "int8") for the tensor-core
# kernel (`activation_format`): its activation tiles then go from cp.async straight into the MMA.
MMA_UNPACKED_ACTIVATIONS = True
# How the tensor-core kernel turns weight nibbles into int8 MMA operands (config key "W_NIBBLES"): "x16"
# (16 x code: 3 instructions per 8 codes, sums shifted back once), "signed" (sign-extended codes: 7
# instructions per 8 codes), or "offset" (code + 8; with codes one per byte two more MMAs against a -8 tile
# remove the offset). Two MMAs per K step for the first two.
MMA_WEIGHT_NIBBLES = "x16"
# Which decode kernels ask L2 for their whole weight slice (prefetch.global.L2, one request per 128-byte
# line) before the PDL wait (config key "L2_PREFETCH"): the weight does not depend on the transform, so
# its read could overlap the transform. Off: in the layer on the H200 (9428087) it gained <= 0.3 us on
# 4096 x 4096 and lost 1.2-2.3 us on 4096 -> 14336 and 14336 -> 4096 at M = 1 and 16 (bench_decode_parts.py).
L2_PREFETCH = {"gemv": False, "mma": False}


@contextlib.contextmanager
def pdl_for_all(on: bool):
    """PDL on (or off) for every decode kernel inside the block, then the defaults again (benchmarks and
    tests compare the two launches)."""
    global PDL
    saved, PDL = PDL, {kern: on for kern in PDL}
    try:
        yield
    finally:
        PDL = saved
# M = 1: 4 rows x 1024 bytes on 2 warps was the best of the 52b9cb8 sweep on all three shapes (5.8 / 11.1 /
# 11.1 us against 6.1 / 12.3 / 11.1 for 8 rows on 4 warps;
# results/archive/kernels-h200-52b9cb8/bench_decode_parts.json).
GEMV_CONFIG = {1: dict(GEMV_BLOCK_N=4, GEMV_BLOCK_K=1024, GEMV_WARPS=2, SWAP_AB=True),
               GEMV_MAX_M: dict(GEMV_BLOCK_N=8, GEMV_BLOCK_K=512, GEMV_WARPS=4, SWAP_AB=True)}

@triton.jit
def _decode_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, KH, stride_am, stride_wn,
                   stride_cm, K_PER_SPLIT, SPLIT_K, ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
                   ATOMIC: tl.constexpr, SWAP_AB: tl.constexpr, EMULATE: tl.constexpr, USE_GDC: tl.constexpr,
                   A_CODES: tl.constexpr, W_NIBBLES: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, L2_LINES: tl.constexpr):
    """Tiles are (SUB, rows, BLOCK_K): each K step covers SUB * BLOCK_K bytes, sub-range s the bytes
    [s * BLOCK_K, (s + 1) * BLOCK_K) of it, and the dots are batched over s (Triton puts the warps on the
    batch dimension: one warp per sub-range at num_warps = SUB). The SUB partial sums meet once, after the
    loop. This splits K inside the program: at M = 16 the weight tile is the only work, so more warps per
    tile, each on its own K bytes, is what hides latency (2 warps on 32 rows issued one instruction every
    2.8 cycles, ncu at 1bd4ca1), where more warps on the same 2-D tile only duplicated it."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, 16)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, SUB)
    m_ok = rm < M
    n_ok = rn < N
    rn_l = tl.where(n_ok, rn, 0).to(tl.int64)  # clamped rows: W loads need only the K mask
    k_start = pid_k * K_PER_SPLIT
    if L2_LINES > 0:  # this program's weight slice, one request per 128-byte line, before the wait
        _prefetch_rows(w_ptr + rn_l * stride_wn, k_start, tl.minimum(k_start + K_PER_SPLIT, KH), 128, L2_LINES)
    if USE_GDC:  # launched as a programmatic dependent: its launch overlaps the previous kernel's tail
        gdc_wait()
    if SWAP_AB:
        acc = tl.zeros((SUB, BLOCK_N, 16), dtype=tl.int32)
    else:
        acc = tl.zeros((SUB, 16, BLOCK_N), dtype=tl.int32)
    asum = tl.zeros((SUB, 16), dtype=tl.int32)
    w_rows = w_ptr + rn_l[None, :, None] * stride_wn
    a_rows = a_ptr + rm[None, :, None] * stride_am
    # tl.range with explicit stages: without it Triton's pipeliner leaves these loads synchronous (the
    # weight passes through the unpack before the dot; sm_90 TTGIR at 38a3875: one tile's full memory
    # latency per step); with it both tiles stream into shared memory by cp.async, STAGES deep.
    for it in tl.range(ITERS, num_stages=STAGES):
        kk = k_start + it * (SUB * BLOCK_K) + rs[:, None] * BLOCK_K + rk[None, :]  # (SUB, BLOCK_K)
        k_ok = (kk < KH)[:, None, :]
        am = m_ok[None, :, None] & k_ok
        w8 = tl.load(w_rows + kk[:, None, :], mask=k_ok, other=0).to(tl.int8, bitcast=True)
        if A_CODES:  # 4-bit codes one per byte, natural order: element kk meets the low nibbles, kk + K/2 the high
            a_lo = tl.load(a_rows + kk[:, None, :], mask=am, other=0)
            a_hi = tl.load(a_rows + (KH + kk)[:, None, :], mask=am, other=0)
        else:
            a8 = tl.load(a_rows + kk[:, None, :], mask=am, other=0).to(tl.int8, bitcast=True)
            if PACK:
                a_lo, a_hi = (a8 << 4) >> 4, a8 >> 4
        if PACK:
            # Weight nibbles, 4 bytes per instruction sequence (`_weight_nibbles`): 16 x code (W_NIBBLES "x16":
            # the sums come out 16x, exact, and are shifted back once), sign-extended codes ("signed"), or
            # offset codes code + 8 ("offset", 0..15: still valid int8 MMA operands) whose offset comes off as
            # 8 * sum(activation codes) per row: summed from the unpacked tile, or (A_CODES: the activation
            # tiles then go from cp.async straight to the MMA, never through registers) by two more MMAs
            # against a constant -8 tile.
            w_lo, w_hi = _weight_nibbles(w8, W_NIBBLES, EMULATE)
            offset = W_NIBBLES == "offset"
            if SWAP_AB:  # the weight is the MMA's A operand, as loaded (no transpose of the big tile)
                acc = tl.dot(w_lo, tl.permute(a_lo, (0, 2, 1)), acc, out_dtype=tl.int32)
                acc = tl.dot(w_hi, tl.permute(a_hi, (0, 2, 1)), acc, out_dtype=tl.int32)
                if A_CODES and offset:
                    minus8 = tl.full((SUB, BLOCK_N, BLOCK_K), -8, tl.int8)
                    acc = tl.dot(minus8, tl.permute(a_lo, (0, 2, 1)), acc, out_dtype=tl.int32)
                    acc = tl.dot(minus8, tl.permute(a_hi, (0, 2, 1)), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a_lo, tl.permute(w_lo, (0, 2, 1)), acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, tl.permute(w_hi, (0, 2, 1)), acc, out_dtype=tl.int32)
                if A_CODES and offset:
                    minus8 = tl.full((SUB, BLOCK_K, BLOCK_N), -8, tl.int8)
                    acc = tl.dot(a_lo, minus8, acc, out_dtype=tl.int32)
                    acc = tl.dot(a_hi, minus8, acc, out_dtype=tl.int32)
            if not A_CODES and offset:
                asum += tl.sum(a_lo.to(tl.int32) + a_hi.to(tl.int32), axis=2)
        else:
            if SWAP_AB:
                acc = tl.dot(w8, tl.permute(a8, (0, 2, 1)), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a8, tl.permute(w8, (0, 2, 1)), acc, out_dtype=tl.int32)
    acc = tl.sum(acc, axis=0)  # the sub-ranges meet
    if SWAP_AB:
        acc = tl.trans(acc)
    if PACK and W_NIBBLES == "x16":
        acc = acc >> 4  # every product was 16x: exact
    if PACK and not A_CODES and W_NIBBLES == "offset":
        acc -= 8 * tl.sum(asum, axis=0)[:, None]
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        ws = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        # Every thread's adds are issued before the counter bump; its acq_rel makes them visible to the
        # program that sees the last arrival (and that program's exchange reads them through L2).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Relaxed: the counter's acquire (one thread, then the CTA barrier that hands `arrived` to all)
            # already orders these after the other programs' adds, and atomics read L2. An acq_rel exchange
            # costs a MEMBAR.ALL.GPU and an L1 invalidation per element (sm_90 SASS).
            acc = tl.atomic_xchg(ws, tl.zeros((16, BLOCK_N), dtype=tl.int32), mask=mask, sem="relaxed")
            _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
    else:
        _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


@triton.jit
def _weight_nibbles(w8, MODE: tl.constexpr, EMULATE: tl.constexpr):
    """Packed int4 weight bytes -> (low, high) nibbles as int8 MMA operands, by MODE: "x16" 16 x code
    (`_nibbles_x16`), "signed" the code (`_sign_extend_nibbles`), "offset" code + 8 (`_offset_nibbles`)."""
    if MODE == "x16":
        return _nibbles_x16(w8, EMULATE)
    elif MODE == "signed":
        return _sign_extend_nibbles(w8, EMULATE)
    else:
        return _offset_nibbles(w8, EMULATE)


@triton.jit
def _nibbles_x16(w8, EMULATE: tl.constexpr):
    """Packed int4 bytes (int8 tensor) -> (low, high) nibbles as 16 x code: a nibble moved to the top of its
    byte, low bits zero, IS the signed byte 16 * code (the nibble's sign bit lands on the byte's). So the
    high nibbles are one AND with 0xF0F0F0F0 and the low ones a shift left by 4 and the same AND, four
    bytes per 32-bit register (inline PTX, pack=4): 3 instructions per 8 codes against 7 for sign extension.
    Products and sums are then 16x the codes' (|sum| <= 16 * 64 * K: int32 holds K < 2**21), and one exact
    arithmetic shift by 4 after the loop gives the sums."""
    if EMULATE:
        return w8 << 4, w8 & -16
    else:
        lo = tl.inline_asm_elementwise("shl.b32 $0, $1, 4;\n\tand.b32 $0, $0, 0xF0F0F0F0;", "=r,r", [w8],
                                       dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [w8], dtype=tl.int8, is_pure=True,
                                       pack=4)
        return lo, hi


@triton.jit
def _offset_nibbles(w8, EMULATE: tl.constexpr):
    """Packed int4 bytes (int8 tensor) -> (low, high) nibbles as offset codes code + 8 in 0..15: XOR 0x8
    turns a two's-complement nibble into offset binary. On the GPU each instruction handles four bytes in
    one 32-bit register (inline PTX, pack=4; ptxas fuses xor/and into one LOP3) instead of a shift pair
    per byte; the interpreter runs the same arithmetic per byte."""
    if EMULATE:
        u = w8.to(tl.uint8, bitcast=True)
        lo = ((u & 0x0F) ^ 0x08).to(tl.int8, bitcast=True)
        hi = ((u >> 4) ^ 0x08).to(tl.int8, bitcast=True)
        return lo, hi
    else:
        lo = tl.inline_asm_elementwise("xor.b32 $0, $1, 0x88888888;\n\tand.b32 $0, $0, 0x0F0F0F0F;", "=r,r",
                                       [w8], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise("shr.u32 $0, $1, 4;\n\tand.b32 $0, $0, 0x0F0F0F0F;\n\t"
                                       "xor.b32 $0, $0, 0x08080808;", "=r,r", [w8], dtype=tl.int8, is_pure=True,
                                       pack=4)
        return lo, hi


@triton.jit
def _sign_extend_nibbles(w8, EMULATE: tl.constexpr):
    """Packed int4 bytes (int8 tensor) -> (low, high) nibbles sign-extended to int8 codes -8..7. On the GPU,
    four bytes per 32-bit register (inline PTX, pack=4) without carries between bytes: (nibble ^ 0x88)
    is 0x80 + code + 8, minus 0x08 per byte is 0x80 + code (never below zero, so no borrow), and XOR 0x80
    leaves the code's two's-complement byte. The interpreter shifts per byte."""
    if EMULATE:
        return (w8 << 4) >> 4, w8 >> 4
    else:
        lo = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;\n\txor.b32 $0, $0, 0x88888888;\n\t"
                                       "sub.u32 $0, $0, 0x08080808;\n\txor.b32 $0, $0, 0x80808080;", "=r,r",
                                       [w8], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise("shr.u32 $0, $1, 4;\n\tand.b32 $0, $0, 0x0F0F0F0F;\n\t"
                                       "xor.b32 $0, $0, 0x88888888;\n\tsub.u32 $0, $0, 0x08080808;\n\t"
                                       "xor.b32 $0, $0, 0x80808080;", "=r,r", [w8], dtype=tl.int8,
                                       is_pure=True, pack=4)
        return lo, hi


@triton.jit
def _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS: tl.constexpr):
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]  # the reference's order
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefetch_rows(row_ptrs, start, stop, LINE: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of elements [start, stop) of each row (row_ptrs: one pointer per row), one request per
    LINE elements (128 bytes), LINES requests per row (>= the span / LINE; the excess repeats the last
    element, so nothing outside the rows is touched)."""
    off = tl.minimum(start + tl.arange(0, LINES) * LINE, stop - 1)
    prefetch_l2(row_ptrs[:, None] + off[None, :])


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, EMULATE: tl.constexpr):
    """c + sum over the 4 bytes j of byte_j(a) * byte_j(b), on int32 words: b's bytes signed, a's signed if
    SIGNED_A else unsigned. One IDP4A instruction on the GPU; the same sum from shifts in the interpreter."""
    if EMULATE:
        for j in tl.static_range(4):
            bj = (b << (24 - 8 * j)) >> 24
            if SIGNED_A:
                aj = (a << (24 - 8 * j)) >> 24
            else:
                aj = (a >> (8 * j)) & 0xFF
            c += aj * bj
        return c
    else:
        if SIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _nibbles_signed(t):
    """Bytes holding 4-bit two's-complement codes (0..15) -> the same codes as signed bytes: bit 3 of each
    byte times 0x1E sets bits 4-7 (0x08 * 0x1E = 0xF0, no carry into the next byte)."""
    return t | ((t & 0x08080808) * 0x1E)


@triton.jit
def gemv_step(a, w, acc, asum, PACK: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """One K step of the dp4a gemv: activation words a (BLOCK_M, 1, BLOCK_KW) x weight words w (1, BLOCK_N,
    BLOCK_KW) into acc (BLOCK_M, BLOCK_N, BLOCK_KW); for packed int4 also the activation code sums asum
    (BLOCK_M, 1, BLOCK_KW) that take the weights' +8 offset off at the end (see `_gemv_kernel`). Also used by
    `fused_decode.py`."""
    if PACK:
        ones = tl.full((BLOCK_M, 1, BLOCK_KW), 0x01010101, tl.int32)
        a_lo = _nibbles_signed(a & 0x0F0F0F0F)
        a_hi = _nibbles_signed((a >> 4) & 0x0F0F0F0F)
        asum = _dp4a(a_hi, ones, _dp4a(a_lo, ones, asum, True, EMULATE), True, EMULATE)
        u = w ^ -0x77777778  # 0x88888888: every nibble's sign bit flipped
        w_lo = tl.broadcast_to(u & 0x0F0F0F0F, (BLOCK_M, BLOCK_N, BLOCK_KW))
        w_hi = tl.broadcast_to((u >> 4) & 0x0F0F0F0F, (BLOCK_M, BLOCK_N, BLOCK_KW))
        acc = _dp4a(w_lo, tl.broadcast_to(a_lo, (BLOCK_M, BLOCK_N, BLOCK_KW)), acc, False, EMULATE)
        acc = _dp4a(w_hi, tl.broadcast_to(a_hi, (BLOCK_M, BLOCK_N, BLOCK_KW)), acc, False, EMULATE)
    else:
        acc = _dp4a(tl.broadcast_to(w, (BLOCK_M, BLOCK_N, BLOCK_KW)),
                    tl.broadcast_to(a, (BLOCK_M, BLOCK_N, BLOCK_KW)), acc, True, EMULATE)
    return acc, asum


@triton.jit
def _gemv_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, M, N, KW, stride_am, stride_wn, stride_cm,
                 ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr, EMULATE: tl.constexpr,
                 USE_GDC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 PREFETCH: tl.constexpr, STAGES: tl.constexpr, L2_LINES: tl.constexpr):
    """M <= GEMV_MAX_M on the CUDA cores with 4-way byte dot products (dp4a), no tensor-core tile (which
    would be mostly padding at M = 1). a and w are read as int32 words (4 packed bytes = 8 int4 codes).
    Per weight word: low and high nibbles become unsigned bytes code + 8 in two logic ops (XOR 0x8 flips
    a two's-complement nibble to offset binary), then two dp4a against the activation's signed bytes; the
    offset comes off at the end as 8 * sum(activation codes). That is ~4 integer instructions per 8
    multiply-adds where a byte-wise unpack needs ~3 per multiply-add (the earlier kernel was ALU bound:
    0.8-1.2 TB/s at M = 1). Word products accumulate in a (BLOCK_M, BLOCK_N, BLOCK_KW) int32 tile, reduced
    once at the end. 8-bit codes: one dp4a per word of signed bytes, no offset."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_KW)
    m_ok = rm < M
    n_ok = rn < N
    rn_l = tl.where(n_ok, rn, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M, 1, BLOCK_KW), dtype=tl.int32)
    w_rows = w_ptr + rn_l[None, :, None] * stride_wn
    # The weight does not depend on the previous kernel: its first PREFETCH (1 or 2) tiles are requested
    # before waiting for that kernel (USE_GDC: launched as a programmatic dependent of the fused
    # transform), and each step requests the tile PREFETCH steps ahead before computing on this one.
    # PREFETCH 0: no register prefetch; the loop is pipelined through shared memory instead (cp.async,
    # STAGES deep, as in `_decode_kernel`), its first weight tiles then requested after the wait.
    if PREFETCH > 0:
        w_next = tl.load(w_rows + rk[None, None, :], mask=(rk < KW)[None, None, :], other=0)
    if PREFETCH == 2:
        w_next2 = tl.load(w_rows + (rk + BLOCK_KW)[None, None, :], mask=(rk + BLOCK_KW < KW)[None, None, :], other=0)
    if L2_LINES > 0:  # the rest of this program's rows (32 words = 128 bytes per request), before the wait
        _prefetch_rows(w_ptr + rn_l * stride_wn, PREFETCH * BLOCK_KW, KW, 32, L2_LINES)
    if USE_GDC:
        gdc_wait()
    for it in tl.range(ITERS, num_stages=STAGES if PREFETCH == 0 else 1):
        kk = it * BLOCK_KW + rk
        k_ok = kk < KW
        a = tl.load(a_ptr + rm[:, None, None] * stride_am + kk[None, None, :],
                    mask=m_ok[:, None, None] & k_ok[None, None, :], other=0)
        if PREFETCH == 0:
            w = tl.load(w_rows + kk[None, None, :], mask=k_ok[None, None, :], other=0)
        else:
            w = w_next
            ahead = kk + PREFETCH * BLOCK_KW
            w_ahead = tl.load(w_rows + ahead[None, None, :], mask=(ahead < KW)[None, None, :], other=0)
            if PREFETCH == 2:
                w_next = w_next2
                w_next2 = w_ahead
            else:
                w_next = w_ahead
        acc, asum = gemv_step(a, w, acc, asum, PACK, EMULATE, BLOCK_M, BLOCK_N, BLOCK_KW)
    tot = tl.sum(acc, axis=2)
    if PACK:
        tot -= 8 * tl.sum(asum, axis=2)
    mask = m_ok[:, None] & n_ok[None, :]
    _store_scaled(tot, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (MAX_M, n) partial sums and int32 arrival counters per 16 columns, per (device, stream, n); zero
    between calls (the last program of each tile leaves them so)."""
    return stream_state("decode_gemm", device, n, lambda d: (
        torch.zeros((MAX_M, n), device=d, dtype=torch.int32),
        torch.zeros(triton.cdiv(n, 16), device=d, dtype=torch.int32)))


def decode_config(n: int, kh: int, device: torch.device) -> dict:
    """BLOCK_N / SUB / BLOCK_K / SPLIT_K / MMA_WARPS of the tensor-core kernel on the GPU: 32-row W tiles, no
    split over programs; while the tiles fit in one wave over the SMs, 4 K sub-ranges (4 warps) of 256 bytes
    per step, else 2 of 128 bytes (a 1 KB step's pipeline needs 192 KB of shared memory, one program per
    SM, which is slow once there is more than one wave). From the 1891a5b sweep at M = 16 (weight nibbles
    as 16 x code, codes one per byte; results/archive/kernels-h200-1891a5b/bench_decode_parts.json):
    6.6 / 12.7 / 13.0 us on 4096 x 4096, 4096 -> 14336 and 14336 -> 4096, where 2 sub-ranges of 256 bytes
    took 7.4 / 14.7 / 15.5 and 4 of 256 bytes 6.6 / 19.4 / 13.0. The earlier kernel (one 2-D tile, rows
    split over 2 warps, sign-extended nibbles) took 8.0 / 12.1 / 16.3 us (cf09cdb). A split over programs
    (SPLIT_K) still costs more than it gains: 9.1 / 23.1 / 14.5 us split 2 ways at 4 x 128 bytes, against
    6.8 / 15.4 / 13.6 unsplit."""
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    bn = 32
    if triton.cdiv(n, bn) <= num_sms(device):  # one wave: 4 sub-ranges of 256 bytes per step
        return dict(BLOCK_N=bn, BLOCK_K=256, SUB=4, SPLIT_K=1, MMA_WARPS=4)
    return dict(BLOCK_N=bn, BLOCK_K=128, SUB=2, SPLIT_K=1, MMA_WARPS=2)


def _lines(span: int, line: int) -> int:
    """Prefetch requests per row for `span` elements, `line` elements per request (a power of two; 0 for
    an empty span)."""
    return triton.next_power_of_2(triton.cdiv(span, line)) if span > 0 else 0


def _word_aligned(t: torch.Tensor) -> bool:
    """Rows of t (uint8 / int8, last dim contiguous) can be read as int32 words."""
    return t.shape[1] % 4 == 0 and (t.shape[0] <= 1 or t.stride(0) % 4 == 0) and t.data_ptr() % 4 == 0


def resolved_config(m: int, n: int, kh: int, device: torch.device, config: dict | None = None,
                    word_aligned: bool = True) -> dict:
    """The config a call runs with: `config` (else decode_config) over GEMV_CONFIG (by M), and KERNEL ("gemv"
    for M <= gemv_max_m(N, K/2) when the rows can be read as int32 words, else "mma", unless the config
    names one)."""
    cfg = {**GEMV_CONFIG[1 if m <= 1 else GEMV_MAX_M], **(config or decode_config(n, kh, device))}
    cfg.setdefault("KERNEL", "gemv" if m <= gemv_max_m(n, kh) and word_aligned else "mma")
    return cfg


def gemv_max_m(n: int, kh: int) -> int:
    """Up to which M the dp4a kernel is the default for an (N, K = 2 kh) weight (see GEMV_ALL_M_MAX_WEIGHTS)."""
    if n * 2 * kh <= GEMV_ALL_M_MAX_WEIGHTS:
        return GEMV_MAX_M
    return min(GEMV_MAX_M, 2 if 2 * kh <= 4096 else 1)


def activation_format(m: int, n: int, kh: int, device: torch.device, bits: int = 4) -> str:
    """The activation layout `w4a4_gemm_decode` wants for a default call, as the fused transform's out_format:
    "int8" (codes one per byte: always for 8 bits; for 4 bits where the tensor-core kernel runs and
    MMA_UNPACKED_ACTIVATIONS is on), else "packed"."""
    if bits == 8 or (MMA_UNPACKED_ACTIVATIONS and resolved_config(m, n, kh, device)["KERNEL"] == "mma"):
        return "int8"
    return "packed"


def w4a4_gemm_decode(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, bits: int = 4,
                     config: dict | None = None) -> torch.Tensor:
    """Same contract as `w4a4_gemm.w4a4_gemm` for M <= 16: w (N, K/2) packed int4 (or (N, K) int8 codes for
    bits=8); a (M, K/2) packed int4, or, for bits=4, (M, K) int8 holding the 4-bit codes one per byte
    (tensor-core kernel only; see `activation_format`), or (M, K) int8 codes for bits=8."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    pack = bits == 4
    a_codes = pack and a.dim() == 2 and w.dim() == 2 and a.dtype == torch.int8 and a.shape[1] == 2 * w.shape[1]
    if a.dim() != 2 or w.dim() != 2 or (a.shape[1] != w.shape[1] and not a_codes):
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, w {tuple(w.shape)}")
    m, n, kh = a.shape[0], w.shape[0], w.shape[1]
    if m > MAX_M:
        raise ValueError(f"the decode GEMM takes M <= {MAX_M}, got {m}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    if a_codes:
        a8, w8 = a, w.view(torch.uint8)
    else:
        a8, w8 = (a.view(torch.uint8), w.view(torch.uint8)) if pack else (a.view(torch.int8), w.view(torch.int8))
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    aligned = (not a_codes) and _word_aligned(a8) and _word_aligned(w8)
    cfg = resolved_config(m, n, kh, a.device, config, aligned)
    if a_codes and cfg["KERNEL"] != "mma":
        raise ValueError("one-code-per-byte activations take the tensor-core decode kernel (KERNEL 'mma')")
    sa = a_scale.reshape(-1).float().contiguous()
    sw = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sw
    pdl = bool(cfg.get("PDL", PDL[cfg["KERNEL"]])) and pdl_supported(a.device)
    launch = dict(launch_pdl=True) if pdl else {}
    l2 = bool(cfg.get("L2_PREFETCH", L2_PREFETCH[cfg["KERNEL"]])) and not interpreting()
    if cfg["KERNEL"] == "gemv":
        if not aligned:  # (any M <= MAX_M runs; by default only M <= GEMV_MAX_M comes here)
            raise ValueError(f"the gemv decode kernel takes rows of whole int32 words (K/2 bytes a multiple "
                             f"of 4), got {kh} bytes")
        bn, bkw = cfg["GEMV_BLOCK_N"], max(1, cfg["GEMV_BLOCK_K"] // 4)
        ahead = int(cfg.get("GEMV_PREFETCH", 1))
        if ahead not in (0, 1, 2):
            raise ValueError(f"GEMV_PREFETCH must be 0 (pipelined loop), 1 or 2, got {ahead}")
        a32, w32 = a8.view(torch.int32), w8.view(torch.int32)
        kw = kh // 4
        _gemv_kernel[(triton.cdiv(n, bn),)](a32, w32, sa, sw, b, out, m, n, kw, a32.stride(0), w32.stride(0),
                                            out.stride(0), ITERS=triton.cdiv(kw, bkw), HAS_BIAS=bias is not None,
                                            PACK=pack, EMULATE=interpreting(), USE_GDC=pdl,
                                            BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_KW=bkw,
                                            PREFETCH=ahead, STAGES=int(cfg.get("GEMV_STAGES", 3)),
                                            L2_LINES=_lines(kw - ahead * bkw, 32) if l2 else 0,
                                            num_warps=cfg.get("num_warps", cfg.get("GEMV_WARPS", 4)), **launch)
        return out
    bn, bk, split, sub = cfg["BLOCK_N"], cfg["BLOCK_K"], max(1, int(cfg["SPLIT_K"])), int(cfg.get("SUB", 1))
    nibbles = cfg.get("W_NIBBLES", MMA_WEIGHT_NIBBLES)
    if bn < 16:
        raise ValueError(f"BLOCK_N must be >= 16, got {bn}")
    if sub < 1 or sub & (sub - 1):
        raise ValueError(f"SUB (K sub-ranges per program) must be a power of two, got {sub}")
    if nibbles not in ("x16", "signed", "offset"):
        raise ValueError(f"W_NIBBLES must be 'x16', 'signed' or 'offset', got {nibbles!r}")
    if nibbles == "x16" and 2 * kh >= 2 ** 21:  # 16x sums would overflow int32 (|sum| <= 1024 K)
        nibbles = "signed"
    # K slice per split, a whole number of steps (SUB x BLOCK_K bytes); drop splits that would be empty.
    step = sub * bk
    k_per = triton.cdiv(triton.cdiv(kh, split), step) * step
    split = triton.cdiv(kh, k_per)
    atomic = split > 1
    ws, counters = _workspace(a.device, n) if atomic else (out, out)
    _decode_kernel[(triton.cdiv(n, bn), split)](
        a8, w8, sa, sw, b, out, ws, counters, m, n, kh, a8.stride(0), w8.stride(0), out.stride(0), k_per, split,
        ITERS=k_per // step, HAS_BIAS=bias is not None, PACK=pack, ATOMIC=atomic, SWAP_AB=bool(cfg["SWAP_AB"]),
        EMULATE=interpreting(), USE_GDC=pdl, A_CODES=a_codes, W_NIBBLES=nibbles, SUB=sub, BLOCK_N=bn, BLOCK_K=bk,
        STAGES=int(cfg.get("num_stages", MMA_STAGES)), L2_LINES=_lines(k_per, 128) if l2 else 0,
        num_warps=cfg.get("num_warps", cfg.get("MMA_WARPS", sub)), **launch)
    return out
