"""The TMA GEMM (flatquant/kernels/gemm/tma.py) vs integer references. The integer sum must be exact in
both code formats (int32 wgmma; fp8 with float32 promotion), so float32 output with unit scales equals
the int64 product exactly; with scales, bias and a bf16/fp16 output the only difference left is the
final rounding (one unit in the last place, as in test_w4a4_gemm.py)."""
import pytest
import torch

pytest.importorskip("triton")

from tolerances import DEVICE, ON_GPU

from flatquant.kernels.gemm.tma import DEFAULT_CONFIGS, FORMATS, config_for, tma_gemm, tma_supported

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _codes(rows, k, fmt, gen, fill=None):
    c = torch.randint(-8, 8, (rows, k), generator=gen, dtype=torch.int8) if fill is None else \
        torch.full((rows, k), fill, dtype=torch.int8)
    c = c.to(DEVICE)
    return c, (c if fmt == "int8" else c.float().to(torch.float8_e4m3fn))


def _exact(m, n, k, fmt, config=None, fill=None):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a, aa = _codes(m, k, fmt, g, fill)
    w, ww = _codes(n, k, fmt, g, fill)
    y = tma_gemm(aa, torch.ones(m, device=DEVICE), ww, torch.ones(n, device=DEVICE), None, torch.float32,
                 config=config)
    want = a.cpu().long() @ w.cpu().long().t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.equal(y.cpu().double(), want.double()), float((y.cpu().double() - want.double()).abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (5, 40, 80), (33, 70, 96), (17, 96, 576)])
def test_exact_integer_sums(fmt, m, n, k):
    _exact(m, n, k, fmt)  # 80 and 96 are not multiples of the interpreter's BLOCK_K: zero-filled tails


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fill", [-8, 7])
def test_largest_codes_exact(fmt, fill):
    # every product 64 (sums 98304: past float16 / fp8 precision) or 49 (odd sums up to 75264: every bit used)
    _exact(9, 48, 1536, fmt, fill=fill)


@pytest.mark.parametrize("cfg", [dict(persistent=False), dict(tma_store=True), dict(GROUP_M=1, BLOCK_N=16)])
def test_configs_agree(cfg):
    _exact(37, 50, 128, "int8", config=cfg)  # N = 50: bf16 rows of 100 bytes are not TMA-storable: pointer store
    _exact(37, 64, 128, "fp8", config=cfg)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_scales_bias_one_ulp(fmt, out_dtype):
    g = torch.Generator().manual_seed(7)
    m, n, k = 21, 72, 160
    a, aa = _codes(m, k, fmt, g)
    w, ww = _codes(n, k, fmt, g)
    sa = (torch.rand(m, generator=g) * 0.02 + 1e-3).to(DEVICE)
    sw = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    y = tma_gemm(aa, sa, ww, sw, bias, out_dtype)
    acc = (a.cpu().long() @ w.cpu().long().t()).float()
    ref = acc * sa.cpu()[:, None] * sw.cpu()[None, :] + bias.cpu()
    tol = ULP[out_dtype]
    torch.testing.assert_close(y.float().cpu(), ref.to(out_dtype).float(), rtol=tol, atol=tol * 1e-2)


def test_empty_and_errors():
    g = torch.Generator().manual_seed(0)
    _, a = _codes(4, 32, "int8", g)
    _, w = _codes(8, 32, "int8", g)
    one4, one8 = torch.ones(4, device=DEVICE), torch.ones(8, device=DEVICE)
    assert tma_gemm(a[:0], one4[:0], w, one8).shape == (0, 8)
    with pytest.raises(ValueError, match="both int8"):
        tma_gemm(a.float(), one4, w, one8)
    with pytest.raises(ValueError, match="both int8"):
        tma_gemm(a, one4, w.float().to(torch.float8_e4m3fn), one8)
    with pytest.raises(ValueError, match="shape mismatch"):
        tma_gemm(a, one4, w[:, :16], one8)
    _, a24 = _codes(4, 24, "int8", g)
    _, w24 = _codes(8, 24, "int8", g)
    with pytest.raises(ValueError, match="K % 16"):
        tma_gemm(a24, one4, w24, one8)
    assert not tma_supported(4, 8, 24, torch.device(DEVICE))


def test_default_configs_complete():
    for fmt in FORMATS:
        cfg = DEFAULT_CONFIGS[fmt]
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= set(cfg)
        assert set(config_for(fmt)) <= set(__import__("flatquant.kernels.gemm.tma", fromlist=["x"]).CONFIG_KEYS)


@pytest.mark.skipif(not ON_GPU, reason="model sizes with the default tiles: GPU only")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", [(300, 11008, 4096), (257, 4096, 14336)])
def test_model_sizes_exact_gpu(fmt, m, n, k):
    _exact(m, n, k, fmt)
    _exact(m, n, k, fmt, fill=-8)  # 64 * 14336 = 917504 per output: every promotion step at its largest
    _exact(m, n, k, fmt, fill=7)   # 49 * K: odd partial sums past 2**19 (a narrow fp8 accumulator loses bits)
