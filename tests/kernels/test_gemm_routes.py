"""The extra GEMM routes vs the reference: the decode (split-K, packed-weight) kernel, the one-pass
int4 unpack, the int32 scale epilogue, and the cuBLASLt routes (torch._int_mm / torch._scaled_mm run
on CPU too, so the whole route is tested here, not only its pieces).

Tolerances: the integer sums are exact in every route, so results must match the reference to about
one unit in the last place of the output dtype (the float32 epilogue may contract into an FMA on GPU;
_scaled_mm multiplies the two scales in another order and adds a bf16-rounded bias: 2 ulps)."""
import pytest
import torch

pytest.importorskip("triton")

from tolerances import DEVICE, ON_GPU

from flatquant.kernels.gemm import decode as decode_gemm
from flatquant.kernels.gemm.cublas import (
    int_mm_gemm,
    route_supported,
    scale_epilogue,
    scaled_mm_gemm,
    unpack_int4_codes,
)
from flatquant.kernels.gemm.decode import w4a4_gemm_decode
from flatquant.kernels.reference import (
    pack_int4,
    quantize_weight_reference,
    transform_quantize_reference,
    unpack_int4,
    w4a4_gemm_reference,
)
from flatquant.kernels.routes import DEFAULT_ROUTES, RouteConfig

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}


def _operands(m, n, k, bits=4, bias=True):
    x = torch.randn(m, k, device=DEVICE)
    x[0, 0] = 50.0  # outlier
    a, sa = transform_quantize_reference(x, None, None, 1.0, bits)
    qw, sw = quantize_weight_reference(torch.randn(n, k, device=DEVICE), bits)
    return a, sa, qw, sw, (torch.randn(n, device=DEVICE) if bias else None)


def _close(y, yr, out_dtype, ulps=1.0, bf16_bias=None):
    tol = ulps * ULP[out_dtype]
    atol = tol * float(yr.float().abs().max()) * 1e-2
    if bf16_bias is not None:  # _scaled_mm adds a bf16-rounded bias: up to half a bf16 ulp of |bias|
        atol += 2.0 ** -8 * float(bf16_bias.abs().max())
    torch.testing.assert_close(y.float().cpu(), yr.float().cpu(), rtol=tol, atol=atol)


@pytest.mark.parametrize("m,n,k,split", [(1, 32, 64, 1), (1, 70, 96, 2), (5, 40, 576, 3), (16, 96, 1536, 4),
                                         (3, 33, 200, 8)])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("nibbles,sub", [("x16", 1), ("x16", 2), ("signed", 4), ("offset", 2)])
def test_decode_gemm_int4(m, n, k, split, out_dtype, swap_ab, nibbles, sub):
    """The tensor-core decode kernel (pinned: KERNEL "mma"), both operand orders, split-K 1-8 across
    programs and 1-4 K sub-ranges inside one, weight nibbles as 16 x code, sign-extended or offset codes."""
    a, sa, qw, sw, b = _operands(m, n, k, bias=(n % 2 == 0))
    cfg = dict(KERNEL="mma", SWAP_AB=swap_ab, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, SUB=sub, W_NIBBLES=nibbles)
    y = w4a4_gemm_decode(a, sa, qw, sw, b, out_dtype, 4, config=cfg)
    assert y.shape == (m, n) and y.dtype == out_dtype
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, out_dtype, 4), out_dtype)


@pytest.mark.parametrize("m,n,k,split", [(5, 40, 576, 1), (16, 96, 1536, 4), (3, 33, 200, 8), (16, 64, 64, 1)])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("nibbles,sub", [("x16", 2), ("signed", 1), ("offset", 2)])
def test_decode_gemm_one_code_per_byte_activations(m, n, k, split, swap_ab, nibbles, sub):
    """The tensor-core kernel on 4-bit activation codes one per byte ((M, K) int8, natural order, as the
    fused transform writes with out_format="int8"; with offset weight codes the offset then comes off by
    MMAs against a constant tile): equal to the packed call and to the reference. Pinned to the dp4a
    kernel such activations are refused."""
    a, sa, qw, sw, b = _operands(m, n, k, bias=(n % 2 == 0))
    codes = unpack_int4(a)
    assert codes.dtype == torch.int8 and codes.shape == (m, k)
    cfg = dict(KERNEL="mma", SWAP_AB=swap_ab, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, SUB=sub, W_NIBBLES=nibbles)
    y = w4a4_gemm_decode(codes, sa, qw, sw, b, torch.float32, 4, config=cfg)
    yr = w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4)
    _close(y, yr, torch.float32)
    assert torch.equal(y, w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4, config=cfg))
    with pytest.raises(ValueError, match="tensor-core"):
        w4a4_gemm_decode(codes, sa, qw, sw, b, torch.float32, 4, config=dict(KERNEL="gemv"))


def test_decode_gemm_int8_codes_and_limits():
    a, sa, qw, sw, b = _operands(7, 48, 128, bits=8)
    y = w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 8, config=dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2))
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 8), torch.float32)
    a, sa, qw, sw, _ = _operands(decode_gemm.MAX_M + 1, 32, 64)
    with pytest.raises(ValueError):
        w4a4_gemm_decode(a, sa, qw, sw)
    a, sa, qw, sw, _ = _operands(2, 32, 64)
    with pytest.raises(ValueError, match="GEMV_PREFETCH"):
        w4a4_gemm_decode(a, sa, qw, sw, config=dict(KERNEL="gemv", GEMV_PREFETCH=3))
    with pytest.raises(ValueError, match="SUB"):
        w4a4_gemm_decode(a, sa, qw, sw, config=dict(KERNEL="mma", BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, SUB=3))
    with pytest.raises(ValueError, match="W_NIBBLES"):
        w4a4_gemm_decode(a, sa, qw, sw, config=dict(KERNEL="mma", BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, W_NIBBLES="x8"))


@pytest.mark.parametrize("nibbles", ["x16", "signed", "offset"])
def test_decode_gemm_extreme_codes_exact(nibbles):
    """-8 x -8 everywhere and -8 x 7 (the code range's ends), packed and one code per byte."""
    m, n, k = 2, 32, 512
    cfg = dict(KERNEL="mma", BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, SUB=2, W_NIBBLES=nibbles)
    for wv, want in ((-8, 64.0 * k), (7, -56.0 * k)):
        codes = torch.full((m, k), -8, dtype=torch.int8)
        w = pack_int4(torch.full((n, k), wv, dtype=torch.int8)).to(DEVICE)
        for a in (pack_int4(codes).to(DEVICE), codes.to(DEVICE)):
            y = w4a4_gemm_decode(a, torch.ones(m, device=DEVICE), w, torch.ones(n, device=DEVICE), None,
                                 torch.float32, config=cfg)
            assert torch.all(y == want)


@pytest.mark.parametrize("rows,k", [(1, 2), (5, 64), (33, 300)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_unpack_int4_codes(rows, k, dtype):
    codes = torch.randint(-8, 8, (rows, k), dtype=torch.int8, device=DEVICE)
    out = unpack_int4_codes(pack_int4(codes), dtype)
    assert out.dtype == dtype and out.shape == (rows, k)
    assert torch.equal(out.float().cpu(), codes.float().cpu())
    assert torch.equal(unpack_int4(pack_int4(codes)).cpu(), codes.cpu())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_scale_epilogue(out_dtype, bias):
    m, n = 19, 45
    acc = torch.randint(-2 ** 15, 2 ** 15, (m, n), dtype=torch.int32, device=DEVICE)  # |y| < fp16 max
    sa, sw = torch.rand(m, device=DEVICE), torch.rand(n, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if bias else None
    y = scale_epilogue(acc, sa, sw, b, out_dtype)
    yr = acc.float() * sa[:, None] * sw[None, :]
    yr = (yr + b[None, :] if bias else yr).to(out_dtype)
    _close(y, yr, out_dtype)


@pytest.mark.parametrize("m,n,k", [(17, 32, 64), (40, 48, 576), (33, 80, 1536)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_int_mm_route(m, n, k, out_dtype):
    a, sa, qw, sw, b = _operands(m, n, k)
    y = int_mm_gemm(unpack_int4_codes(a), sa, unpack_int4_codes(qw), sw, b, out_dtype)
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, out_dtype, 4), out_dtype)


@pytest.mark.parametrize("m,n,k", [(17, 32, 64), (3, 48, 576), (33, 80, 1536)])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_route(m, n, k, bias):
    a, sa, qw, sw, b = _operands(m, n, k, bias=bias)
    f8 = torch.float8_e4m3fn
    y = scaled_mm_gemm(unpack_int4_codes(a, f8), sa, unpack_int4_codes(qw, f8), sw, b, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.bfloat16, 4), torch.bfloat16, ulps=2.0, bf16_bias=b)
    with pytest.raises(ValueError):
        scaled_mm_gemm(unpack_int4_codes(a, f8), sa, unpack_int4_codes(qw, f8), sw, b, torch.float16)


def test_route_supported_limits():
    cuda = torch.device("cuda")
    assert not route_supported("int_mm", 16, 4096, 4096, torch.bfloat16, cuda)
    assert route_supported("int_mm", 17, 4096, 4096, torch.bfloat16, cuda)
    assert not route_supported("int_mm", 64, 4096, 4100, torch.bfloat16, cuda)
    assert not route_supported("scaled_mm", 64, 4096, 4096, torch.float16, cuda)
    with pytest.raises(ValueError):
        route_supported("cutlass", 1, 1, 1, torch.bfloat16, cuda)


@pytest.mark.skipif(not ON_GPU, reason="model shapes: GPU only")
@pytest.mark.parametrize("m", [1, 3, 7, 16, 24, 64, 128])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336)])
def test_decode_gemm_gpu_default_config(m, n, k):
    a, sa, qw, sw, b = _operands(m, n, k)
    y = w4a4_gemm_decode(a, sa, qw, sw, b, torch.bfloat16)
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.bfloat16, 4), torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="model shapes: GPU only")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_decode_gemm_gpu_sub_ranges_and_nibbles_bitwise(m, n, k):
    """Tensor-core tiles with 1-8 K sub-ranges per program, splits over programs, and the three weight-nibble
    forms at model shapes, on codes one per byte: the int32 sums are exact, so every config gives the same
    output bit for bit, and it matches the reference."""
    a, sa, qw, sw, b = _operands(m, n, k)
    codes = unpack_int4(a)
    cfgs = [dict(BLOCK_N=bn, SUB=sub, BLOCK_K=bk, SPLIT_K=sk, W_NIBBLES=nib)
            for bn, sub, bk, sk, nib in [(32, 2, 256, 1, "x16"), (32, 4, 128, 1, "x16"), (16, 8, 64, 1, "x16"),
                                         (64, 4, 64, 2, "x16"), (32, 1, 512, 4, "x16"), (32, 2, 256, 1, "signed"),
                                         (32, 4, 128, 1, "offset")]]
    ys = [w4a4_gemm_decode(codes, sa, qw, sw, b, torch.float32, 4, config=dict(KERNEL="mma", SWAP_AB=True, **c))
          for c in cfgs]
    for y, c in zip(ys[1:], cfgs[1:]):
        assert torch.equal(y, ys[0]), c
    _close(ys[0], w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4), torch.float32)


@pytest.mark.skipif(not ON_GPU, reason="L2 prefetch: GPU only (the interpreter skips it)")
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (40, 1000), (33, 264)])
def test_decode_l2_prefetch_same_result(m, n, k):
    """Both decode kernels with and without the L2 prefetch of their weight slice (a hint: the results must
    be bitwise equal), over default tiles, a K that is not a whole number of steps and rows that end
    inside a 128-byte line; and equal to the reference."""
    from flatquant.kernels.gemm import decode as decode_gemm

    a, sa, qw, sw, b = _operands(m, n, k)
    base = decode_gemm.decode_config(n, k // 2, torch.device(DEVICE))
    ys = [w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4, config={**base, "L2_PREFETCH": on})
          for on in (False, True)]
    assert torch.equal(ys[0], ys[1])
    _close(ys[1], w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4), torch.float32)


def test_prefetch_lines_per_row():
    from flatquant.kernels.gemm.decode import _lines

    assert [_lines(s, 128) for s in (0, -5, 1, 128, 129, 2048, 7168)] == [0, 0, 1, 1, 2, 16, 64]


@pytest.mark.skipif(not ON_GPU, reason="cuBLASLt: GPU only")
@pytest.mark.parametrize("m", [32, 300, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_cublas_routes_gpu(m, n, k):
    a, sa, qw, sw, b = _operands(m, n, k)
    yr = w4a4_gemm_reference(a, sa, qw, sw, b, torch.bfloat16, 4)
    _close(int_mm_gemm(unpack_int4_codes(a), sa, unpack_int4_codes(qw), sw, b), yr, torch.bfloat16)
    f8 = torch.float8_e4m3fn
    _close(scaled_mm_gemm(unpack_int4_codes(a, f8), sa, unpack_int4_codes(qw, f8), sw, b), yr, torch.bfloat16,
           ulps=2.0, bf16_bias=b)


@pytest.mark.parametrize("kernel", ["gemv", "gemv_prefetch2", "gemv_pipelined", "mma", "mma_swap", "mma_swap_stages1",
                                    "mma_swap_stages4"])
@pytest.mark.parametrize("bits,k", [(4, 96), (4, 1000), (8, 72)])
@pytest.mark.parametrize("m", [1, 3, 4, 16])
def test_decode_gemm_small_m_kernels(kernel, bits, k, m):
    """Small M through the CUDA-core dp4a kernel (the default up to routes.gemv_max_m, any M <= 16 when pinned; its
    weight tiles requested one or two steps ahead, or its loop pipelined through shared memory) and
    through the tensor-core kernel in both operand
    orders, its K loop pipelined MMA_STAGES (3) deep, 4 deep or not at all: all equal the reference; a K
    not a multiple of the block, an odd M and 8-bit codes included."""
    a, sa, qw, sw, b = _operands(m, 40, k, bits=bits)
    cfg = dict(KERNEL="gemv" if kernel.startswith("gemv") else "mma", SWAP_AB=kernel.startswith("mma_swap"),
               BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GEMV_BLOCK_N=16, GEMV_BLOCK_K=64,
               GEMV_PREFETCH=2 if "2" in kernel else 0 if "pipelined" in kernel else 1)
    if "stages" in kernel:
        cfg["num_stages"] = int(kernel[-1])
    y = w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, bits, config=cfg)
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, bits), torch.float32)


def test_decode_gemv_extreme_codes_limits_and_default():
    """The dp4a kernel's offset arithmetic at the extreme codes (-8 x -8 and 7 x -8, exact); it is the
    default up to RouteConfig.gemv_max_m; pinned, it refuses rows that are not whole int32 words, and the default
    then falls back to the tensor-core kernel."""
    from flatquant.kernels.gemm import decode as decode_gemm

    n, k = 24, 520
    for m, av, wv in [(1, -8, -8), (4, 7, -8), (2, -8, 7)]:
        a = pack_int4(torch.full((m, k), av, dtype=torch.int8)).to(DEVICE)
        w = pack_int4(torch.full((n, k), wv, dtype=torch.int8)).to(DEVICE)
        y = w4a4_gemm_decode(a, torch.ones(m, device=DEVICE), w, torch.ones(n, device=DEVICE), None, torch.float32)
        assert torch.all(y == float(av * wv * k))
    gemv_max_m = DEFAULT_ROUTES.gemv_max_m
    assert decode_gemm.resolved_config(gemv_max_m, n, k // 2, torch.device(DEVICE))["KERNEL"] == "gemv"
    assert decode_gemm.resolved_config(gemv_max_m + 1, n, k // 2, torch.device(DEVICE))["KERNEL"] == "mma"
    assert decode_gemm.resolved_config(1, n, 150, torch.device(DEVICE), word_aligned=False)["KERNEL"] == "mma"
    # above 4096 x 4096 weights the dp4a kernel stays the default only to M = 2 (K <= 4096) or M = 1 (longer K)
    dev = torch.device(DEVICE)
    assert [decode_gemm.resolved_config(m, 4096, 2048, dev)["KERNEL"] for m in (1, 4)] == ["gemv", "gemv"]
    assert [decode_gemm.resolved_config(m, 14336, 2048, dev)["KERNEL"] for m in (2, 3)] == ["gemv", "mma"]
    assert [decode_gemm.resolved_config(m, 4096, 7168, dev)["KERNEL"] for m in (1, 2)] == ["gemv", "mma"]
    gemv = dict(KERNEL="gemv", GEMV_BLOCK_N=16, GEMV_BLOCK_K=64)
    a, sa, qw, sw, b = _operands(1, n, 300)  # 150 bytes per row: not whole words
    with pytest.raises(ValueError, match="int32 words"):
        w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, config=gemv)
    _close(w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32), w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4),
           torch.float32)


def test_decode_gemm_split_k_workspace_left_zero_and_reused():
    """The one-launch split-K reduction: repeated calls (other M, other operands, same N) stay exact, and the
    shared workspace and arrival counters are zero again after each call (the next call relies on that)."""
    from flatquant.kernels.gemm import decode as decode_gemm

    n, k = 48, 256
    cfg = dict(KERNEL="mma", BLOCK_N=16, BLOCK_K=32, SPLIT_K=4)
    for m in (3, 16, 1):
        a, sa, qw, sw, b = _operands(m, n, k)
        y = w4a4_gemm_decode(a, sa, qw, sw, b, torch.float32, 4, config=cfg)
        _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4), torch.float32)
        ws, counters = decode_gemm._workspace(a.device, n)
        assert int(ws.abs().sum()) == 0 and int(counters.abs().sum()) == 0


@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch: GPU only")
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_layer_pdl_in_cuda_graph(m, l2):
    """The decode GEMM launched as a programmatic dependent of the fused transform (it may start before the
    transform has finished and must wait before reading the codes; with and without its weight's L2
    prefetch before that wait), replayed from a CUDA graph on fresh inputs: bitwise equal to the plain
    launch each time (same codes, exact integer sums)."""
    from dataclasses import replace

    from flatquant.kernels.linear import W4A4Linear
    from flatquant.kernels.routes import DEFAULT_ROUTES

    base = replace(DEFAULT_ROUTES, l2_prefetch_gemv=l2, l2_prefetch_mma=l2)
    pdl_on, pdl_off = (replace(base, pdl_gemv=on, pdl_mma=on) for on in (True, False))
    k, n = 4096, 4096
    p1 = torch.linalg.qr(torch.randn(64, 64, device=DEVICE))[0]
    p2 = torch.linalg.qr(torch.randn(64, 64, device=DEVICE))[0]
    layer = W4A4Linear.from_float(torch.randn(n, k, device=DEVICE) / 64, None, p1, p2, backend="triton",
                                  routes=pdl_on)  # whichever kernel M picks
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    layer(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x) * 3)
        graph.replay()
        layer.routes = pdl_off
        y_plain = layer(x)
        layer.routes = pdl_on
        torch.cuda.synchronize()
        assert torch.equal(y, y_plain)


def test_route_config_values_and_validation():
    """RouteConfig is immutable, validated, and its decode settings reach the decode GEMM's config."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_ROUTES.small_m_max = 1
    for bad in (dict(large_m_route="cutlass"), dict(pdl_trigger="middle"), dict(triton_gemm_route="int4"),
                dict(fallback_routes=("int8",))):
        with pytest.raises(ValueError):
            RouteConfig(**bad)
    assert DEFAULT_ROUTES.pdl("gemv") and DEFAULT_ROUTES.pdl("mma") and not DEFAULT_ROUTES.l2_prefetch("mma")
    assert [RouteConfig(pdl_trigger=t).pdl_trigger_code() for t in (None, "start", "end")] == [0, 1, 2]
    dev, n, kh = torch.device(DEVICE), 4096, 2048
    assert decode_gemm.resolved_config(2, n, kh, dev)["KERNEL"] == "gemv"
    assert decode_gemm.resolved_config(2, n, kh, dev, routes=RouteConfig(gemv_max_m=1))["KERNEL"] == "mma"
    over = RouteConfig(decode_overrides={"GEMV_PREFETCH": 2, "num_stages": 1})
    assert decode_gemm.resolved_config(1, n, kh, dev, routes=over)["GEMV_PREFETCH"] == 2
    assert "GEMV_PREFETCH" not in decode_gemm.resolved_config(1, n, kh, dev, config={"KERNEL": "gemv"}, routes=over)
    assert RouteConfig(tma_configs={"int8": {"BLOCK_M": 64}}).as_dict()["tma_configs"] == {"int8": {"BLOCK_M": 64}}


# ------------------------------------------------------------------- decode GEMM above M = 16 ---

@pytest.mark.parametrize("m,block_m,split", [(17, None, 1), (40, None, 2), (64, 32, 1), (100, None, 3),
                                             (128, 16, 2), (33, 64, 1)])
@pytest.mark.parametrize("a_codes", [False, True])
def test_decode_gemm_large_m(m, block_m, split, a_codes):
    """M = 17-128 through the tensor-core kernel: one M tile (the bucket) or several (BLOCK_M pinned smaller),
    split-K with per-(M tile, N tile) counters, packed or one-code-per-byte activations; exact sums."""
    n, k = 40, 192
    a, sa, qw, sw, b = _operands(m, n, k)
    cfg = dict(KERNEL="mma", SWAP_AB=True, BLOCK_N=16, BLOCK_K=32, SUB=2, SPLIT_K=split)
    if block_m:
        cfg["BLOCK_M"] = block_m
    act = unpack_int4(a) if a_codes else a
    y = w4a4_gemm_decode(act, sa, qw, sw, b, torch.float32, 4, config=cfg)
    _close(y, w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4), torch.float32)
    ws, counters = decode_gemm._workspace(a.device, n)
    assert int(ws.abs().sum()) == 0 and int(counters.abs().sum()) == 0


def test_decode_gemm_m_buckets_and_limits():
    dev = torch.device(DEVICE)
    assert [decode_gemm.m_bucket(m) for m in (1, 16, 17, 32, 33, 64, 65, 128)] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert decode_gemm.resolved_config(100, 4096, 2048, dev)["KERNEL"] == "mma"
    assert decode_gemm.resolved_config(100, 4096, 2048, dev)["BLOCK_M"] == 128
    a, sa, qw, sw, _ = _operands(decode_gemm.MAX_M + 1, 16, 64)
    with pytest.raises(ValueError, match="M <="):
        w4a4_gemm_decode(a, sa, qw, sw)
    with pytest.raises(ValueError, match="BLOCK_M"):
        w4a4_gemm_decode(a[:20], sa[:20], qw, sw, config=dict(KERNEL="mma", BLOCK_N=16, BLOCK_K=32, SPLIT_K=1,
                                                               BLOCK_M=48))
    with pytest.raises(ValueError, match="small_m_max"):
        RouteConfig(small_m_max=decode_gemm.MAX_M + 1)


@pytest.mark.skipif(not ON_GPU, reason="model shapes: GPU only")
@pytest.mark.parametrize("m", [32, 100, 128])
def test_decode_gemm_gpu_large_m_tiles_bitwise(m):
    """Every tile bench_decode_gemm_m.py sweeps for M's bucket, on codes one per byte: exact int32 sums, so
    all give the same output bit for bit, equal to the reference's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_decode_gemm_m.py"
    spec = importlib.util.spec_from_file_location("bench_decode_gemm_m", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n, k = 4096, 4096
    a, sa, qw, sw, b = _operands(m, n, k)
    codes = unpack_int4(a)
    cfgs = [bench._cfg(t) for t in bench.SWEEP[decode_gemm.m_bucket(m)]]
    ys = [w4a4_gemm_decode(codes, sa, qw, sw, b, torch.float32, 4)]
    ys += [w4a4_gemm_decode(codes, sa, qw, sw, b, torch.float32, 4, config=c) for c in cfgs]
    for y, c in zip(ys[1:], cfgs):
        assert torch.equal(y, ys[0]), c
    _close(ys[0], w4a4_gemm_reference(a, sa, qw, sw, b, torch.float32, 4), torch.float32)
