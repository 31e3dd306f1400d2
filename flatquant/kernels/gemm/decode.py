"""Small-M (decode, M <= 128) W4A4 GEMM: reads the PACKED int4 weight directly, at weight bandwidth.

At small M the GEMM is bound by reading the weight (packed int4: 4x fewer bytes than bf16), so the kernels
(decode_kernels.py) stream W with the unpack done in registers. Two kernels, picked by M (`resolved_config`):

- M <= `gemv_max_m` (RouteConfig.gemv_max_m, fewer for large weights): `_gemv_kernel`, dp4a on the CUDA
  cores (no tensor-core tile, which would be mostly padding at M = 1); rows read as int32 words (8 codes),
  nibbles turned into offset-binary bytes in two logic ops, the offset taken off at the end.
- otherwise (and for rows that are not whole int32 words): `_decode_kernel`, int8 tensor-core dots against a
  16-row activation tile, the weight as the MMA's A operand (SWAP_AB), nibbles as 16 x code (3 instructions
  per 8 codes), K split into SUB sub-ranges with one warp each, the K loop pipelined through shared memory;
  BLOCK_M activation rows per program (16 up to M = 16, then the M bucket's tile: MMA_M_CONFIG), so the
  weight is read once for M up to MAX_M.
  It takes the activation codes one per byte by default (`activation_format`). With SPLIT_K > 1 the splits
  meet in ONE launch: int32 atomic adds into a workspace tile, an arrival counter, and the last program
  takes the sums out with an atomic exchange (leaving the workspace zeroed), applies the scales and writes
  the output. Integer adds are exact and order independent: deterministic, no memset, no epilogue launch.

On sm_90+ both launch as programmatic dependents (PDL) of the kernel before them (the fused transform;
RouteConfig.pdl_gemv / pdl_mma). No autotuning: the config is a function of (M, N, K, SMs), which keeps the
host-side launch cost low; the choices come from the H200 sweeps in docs/KERNELS.md, "Decode GEMM".
"""
from __future__ import annotations

import torch
import triton

from flatquant.kernels._triton_utils import interpreting, num_sms, pdl_supported, stream_state
from flatquant.kernels.gemm.decode_kernels import _decode_kernel, _gemv_kernel
from flatquant.kernels.routes import DECODE_MAX_M, DEFAULT_ROUTES, RouteConfig

MAX_M = DECODE_MAX_M
M_BUCKETS = (16, 32, 64, 128)
# Fixed tile sizes for the interpreter (CPU tests); tests also force split_k.
INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, SUB=2, SPLIT_K=2, GEMV_BLOCK_N=16, GEMV_BLOCK_K=32)
# The dp4a kernel's rows of W and K bytes per step at M = 1 and M > 1 (larger tiles spill at M = 4), and the
# tensor-core kernel's operand order (SWAP_AB: weight as the MMA's A operand); H200 sweep, docs/KERNELS.md.
GEMV_CONFIG = {1: dict(GEMV_BLOCK_N=4, GEMV_BLOCK_K=1024, GEMV_WARPS=2, SWAP_AB=True),
               4: dict(GEMV_BLOCK_N=8, GEMV_BLOCK_K=512, GEMV_WARPS=4, SWAP_AB=True)}
# The tensor-core kernel's tiles above M = 16, by M bucket (the smallest bucket >= M): the H100 sweep's pick
# (bench_decode_gemm_m.py --sweep; docs/KERNELS.md, "Decode GEMM at M = 8-128"); at 128 two M tiles of 64.
MMA_M_CONFIG = {32: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SUB=2, SPLIT_K=1, MMA_WARPS=2),
                64: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, SUB=2, SPLIT_K=1, MMA_WARPS=4),
                128: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, SUB=1, SPLIT_K=1, MMA_WARPS=4)}
# Pipeline depth of the tensor-core kernel's K loop (config key "num_stages"; 1 = synchronous loads).
MMA_STAGES = 3
# Weight nibbles as int8 MMA operands (config key "W_NIBBLES"): "x16" (16 x code, 3 instructions per 8
# codes, sums shifted back once), "signed" (sign-extended, 7 per 8) or "offset" (code + 8, two more MMAs).
MMA_WEIGHT_NIBBLES = "x16"


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (MAX_M, n) partial sums and int32 arrival counters per 16 rows x 16 columns, per (device, stream,
    n); zero between calls (the last program of each tile leaves them so)."""
    return stream_state("decode_gemm", device, n, lambda d: (
        torch.zeros((MAX_M, n), device=d, dtype=torch.int32),
        torch.zeros(MAX_M // 16 * triton.cdiv(n, 16), device=d, dtype=torch.int32)))


def m_bucket(m: int) -> int:
    """The smallest of M_BUCKETS that holds m rows (ValueError above MAX_M)."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    raise ValueError(f"the decode GEMM takes M <= {MAX_M}, got {m}")


def decode_config(n: int, kh: int, device: torch.device, m: int = 16) -> dict:
    """BLOCK_N / SUB / BLOCK_K / SPLIT_K / MMA_WARPS of the tensor-core kernel on the GPU: 32-row W tiles, no
    split over programs (it costs more than it gains); while the tiles fit in one wave over the SMs, 4 K
    sub-ranges (4 warps) of 256 bytes per step, else 2 of 128 bytes (a 1 KB step's pipeline needs 192 KB of
    shared memory: one program per SM). From the H200 sweep at M = 16 (docs/KERNELS.md, "Decode GEMM").
    Above M = 16: MMA_M_CONFIG of m's bucket (the interpreter: its tiles with BLOCK_M = the bucket)."""
    bucket = m_bucket(max(1, m))
    if interpreting():
        return dict(INTERPRETER_CONFIG, BLOCK_M=bucket)
    if bucket > 16:
        return dict(MMA_M_CONFIG[bucket])
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
                    word_aligned: bool = True, routes: RouteConfig = DEFAULT_ROUTES) -> dict:
    """The config a call runs with: `config` (else decode_config with routes.decode_overrides) over
    GEMV_CONFIG (by M), and KERNEL ("gemv" for M <= gemv_max_m(N, K/2) when the rows can be read as int32
    words, else "mma", unless the config names one)."""
    cfg = {**GEMV_CONFIG[1 if m <= 1 else 4],
           **(config or {**decode_config(n, kh, device, m), **routes.decode_overrides})}
    cfg.setdefault("KERNEL", "gemv" if m <= gemv_max_m(n, kh, routes) and word_aligned else "mma")
    return cfg


def gemv_max_m(n: int, kh: int, routes: RouteConfig = DEFAULT_ROUTES) -> int:
    """Up to which M the dp4a kernel is the default for an (N, K = 2 kh) weight: routes.gemv_max_m, and above
    routes.gemv_all_m_max_weights weights at most 2 (K <= 4096) or 1 (longer K)."""
    if n * 2 * kh <= routes.gemv_all_m_max_weights:
        return routes.gemv_max_m
    return min(routes.gemv_max_m, 2 if 2 * kh <= 4096 else 1)


def activation_format(m: int, n: int, kh: int, device: torch.device, bits: int = 4,
                      routes: RouteConfig = DEFAULT_ROUTES) -> str:
    """The activation layout `w4a4_gemm_decode` wants for a default call, as the fused transform's out_format:
    "int8" (codes one per byte: always for 8 bits; for 4 bits where the tensor-core kernel runs and
    routes.mma_unpacked_activations is on), else "packed"."""
    if bits == 8 or (routes.mma_unpacked_activations
                     and resolved_config(m, n, kh, device, routes=routes)["KERNEL"] == "mma"):
        return "int8"
    return "packed"


def w4a4_gemm_decode(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, bits: int = 4,
                     config: dict | None = None, routes: RouteConfig | None = None) -> torch.Tensor:
    """Same contract as `w4a4_gemm.w4a4_gemm` for M <= MAX_M (128): w (N, K/2) packed int4 (or (N, K) int8 codes for
    bits=8); a (M, K/2) packed int4, or, for bits=4, (M, K) int8 holding the 4-bit codes one per byte
    (tensor-core kernel only; see `activation_format`), or (M, K) int8 codes for bits=8. config: kernel
    keys (`resolved_config`; also "PDL", "L2_PREFETCH"); routes: DEFAULT_ROUTES when None."""
    routes = routes or DEFAULT_ROUTES
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
    cfg = resolved_config(m, n, kh, a.device, config, aligned, routes)
    if a_codes and cfg["KERNEL"] != "mma":
        raise ValueError("one-code-per-byte activations take the tensor-core decode kernel (KERNEL 'mma')")
    sa = a_scale.reshape(-1).float().contiguous()
    sw = w_scale.reshape(-1).float().contiguous()
    b = bias.reshape(-1).float().contiguous() if bias is not None else sw
    pdl = bool(cfg.get("PDL", routes.pdl(cfg["KERNEL"]))) and pdl_supported(a.device)
    launch = dict(launch_pdl=True) if pdl else {}
    l2 = bool(cfg.get("L2_PREFETCH", routes.l2_prefetch(cfg["KERNEL"]))) and not interpreting()
    if cfg["KERNEL"] == "gemv":
        if not aligned:  # (any M <= MAX_M runs; by default only M <= gemv_max_m comes here)
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
    bm = int(cfg.get("BLOCK_M", m_bucket(m)))
    nibbles = cfg.get("W_NIBBLES", MMA_WEIGHT_NIBBLES)
    if bn < 16:
        raise ValueError(f"BLOCK_N must be >= 16, got {bn}")
    if bm not in M_BUCKETS:
        raise ValueError(f"BLOCK_M must be one of {M_BUCKETS}, got {bm}")
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
    _decode_kernel[(triton.cdiv(n, bn), split, triton.cdiv(m, bm))](
        a8, w8, sa, sw, b, out, ws, counters, m, n, kh, a8.stride(0), w8.stride(0), out.stride(0), k_per, split,
        ITERS=k_per // step, HAS_BIAS=bias is not None, PACK=pack, ATOMIC=atomic, SWAP_AB=bool(cfg["SWAP_AB"]),
        EMULATE=interpreting(), USE_GDC=pdl, A_CODES=a_codes, W_NIBBLES=nibbles, SUB=sub, BLOCK_N=bn, BLOCK_K=bk,
        STAGES=int(cfg.get("num_stages", MMA_STAGES)), L2_LINES=_lines(k_per, 128) if l2 else 0, BLOCK_M=bm,
        num_warps=cfg.get("num_warps", cfg.get("MMA_WARPS", sub)), **launch)
    return out
