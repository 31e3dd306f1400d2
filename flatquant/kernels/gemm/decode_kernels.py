"""The decode GEMM's Triton kernels (M <= 128, packed int4 weight read directly): `_gemv_kernel` (dp4a on
the CUDA cores) and `_decode_kernel` (int8 tensor cores), with their nibble and epilogue helpers. The host
side (config, launch) is `decode.py`."""
from __future__ import annotations

import triton
import triton.language as tl

from flatquant.kernels._triton_utils import gdc_wait, prefetch_l2


@triton.jit
def _decode_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, KH, stride_am, stride_wn,
                   stride_cm, K_PER_SPLIT, SPLIT_K, ITERS: tl.constexpr, HAS_BIAS: tl.constexpr, PACK: tl.constexpr,
                   ATOMIC: tl.constexpr, SWAP_AB: tl.constexpr, EMULATE: tl.constexpr, USE_GDC: tl.constexpr,
                   A_CODES: tl.constexpr, W_NIBBLES: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, L2_LINES: tl.constexpr, BLOCK_M: tl.constexpr = 16):
    """Tiles are (SUB, rows, BLOCK_K): each K step covers SUB * BLOCK_K bytes, sub-range s the bytes
    [s * BLOCK_K, (s + 1) * BLOCK_K) of it, and the dots are batched over s (Triton puts the warps on the
    batch dimension: one warp per sub-range at num_warps = SUB). The SUB partial sums meet once, after the
    loop. This splits K inside the program: at M = 16 the weight tile is the only work, so more warps per
    tile, each on its own K bytes, hide latency (docs/KERNELS.md, "Decode GEMM"). BLOCK_M (16-128) activation
    rows per program; the third grid axis walks the M tiles (one tile, the weight read once, by default)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        acc = tl.zeros((SUB, BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((SUB, BLOCK_M, BLOCK_N), dtype=tl.int32)
    asum = tl.zeros((SUB, BLOCK_M), dtype=tl.int32)
    w_rows = w_ptr + rn_l[None, :, None] * stride_wn
    a_rows = a_ptr + rm[None, :, None] * stride_am
    # Explicit stages: otherwise Triton leaves these loads synchronous (the weight is unpacked before the dot).
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
            # Weight nibbles as MMA operands (`_weight_nibbles`); "offset" codes (code + 8) lose their offset as
            # 8 * sum(activation codes): summed from the unpacked tile, or with A_CODES by two MMAs on a -8 tile.
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
        cnt = cnt_ptr + pid_m * tl.cdiv(N, 16) + pid_n  # one counter per (M tile, N tile)
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Relaxed: the counter's acquire already orders this after the other programs' adds (an acq_rel
            # exchange would cost a full GPU memory barrier per element).
            acc = tl.atomic_xchg(ws, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=mask, sem="relaxed")
            _store_scaled(acc, rm, rn, m_ok, n_ok, mask, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS)
            tl.atomic_xchg(cnt, 0, sem="relaxed")
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
    `flatquant.kernels.fused_decode`."""
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
    """M <= routes.gemv_max_m on the CUDA cores with 4-way byte dot products (dp4a), no tensor-core tile (which
    would be mostly padding at M = 1). a and w are read as int32 words (4 packed bytes = 8 int4 codes).
    Per weight word: low and high nibbles become unsigned bytes code + 8 in two logic ops (XOR 0x8 flips
    a two's-complement nibble to offset binary), then two dp4a against the activation's signed bytes; the
    offset comes off at the end as 8 * sum(activation codes). That is ~4 integer instructions per 8
    multiply-adds where a byte-wise unpack needs ~3 per multiply-add. Word products accumulate in a
    (BLOCK_M, BLOCK_N, BLOCK_KW) int32 tile, reduced once at the end. 8-bit codes: one dp4a per word of
    signed bytes, no offset."""
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
    # before the PDL wait, and each step requests the tile PREFETCH steps ahead. PREFETCH 0: the loop is
    # pipelined through shared memory instead (STAGES deep), its first tiles requested after the wait.
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
