"""The chunked fused transform + quantize kernel (n1 cut into power-of-two chunks) vs the PyTorch reference.

Same bounds as the block kernel's tests (test_fused_transform_quant.py): the kernel rounds V = X P2 once
to the half dtype (the reference with round_intermediate=True); codes equal bit for bit, or off by one
only near a .5 tie; on the CPU fp32 and fp16 inputs (the interpreter's bf16 cast truncates).
"""
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from tolerances import (
    DEVICE,
    ON_GPU,
    ROUNDED_T_SCALE_RTOL,
    assert_codes_match,
    max_rounded_t_flips,
    rounded_t_tie_tol,
)

from flatquant.kernels.reference import kron_transform_reference, transform_quantize_reference, unpack_codes
from flatquant.kernels.routes import DEFAULT_ROUTES
from flatquant.kernels.transform import dispatch as ftq
from flatquant.kernels.transform.chunked import chunked_supported, n1_chunks, n2_chunks, rows_padded
from flatquant.kernels.transform.dispatch import fused_transform_quantize


def _factor(n, dtype=torch.float32):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q + 0.1 * torch.randn(n, n, dtype=torch.float64) / n ** 0.5).to(dtype).to(DEVICE)


def _inputs(m, n, dtype):
    x = torch.randn(m, n) * torch.rand(m, 1) * 3
    x[0] = 0.0                        # all-zero token
    x[1, n // 3] = 1e3                # one huge outlier
    x[-1] = 1e-2 * torch.randn(n)     # a small token
    return x.to(dtype).to(DEVICE)




def _check(x, p1, p2, bits=4, fmt=None, **kw):
    """Run the chunked kernel and compare codes and scales with the reference; returns (codes, scales)."""
    q, s = fused_transform_quantize(x, p1, p2, 0.9, bits, kernel="chunked", out_format=fmt, **kw)
    qr, sr = transform_quantize_reference(x, p1, p2, 0.9, bits, round_intermediate=True)
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=ROUNDED_T_SCALE_RTOL, atol=0)
    pre = (kron_transform_reference(x, p1, p2, round_intermediate=True).float() / sr.unsqueeze(-1)).cpu()
    codes = unpack_codes(q, bits) if fmt in (None, "packed") else q.float().to(torch.int8)
    assert q.shape[:-1] == x.shape[:-1]
    flips = assert_codes_match(codes, unpack_codes(qr, bits), pre, rounded_t_tie_tol(x.dtype, bits, 0.9))
    assert flips <= max_rounded_t_flips(x.numel(), bits)
    return codes, s


def test_n1_chunks_and_support():
    assert n1_chunks(86) == (64, 32, 0)      # 11008 = 86 x 128
    assert n1_chunks(40) == (32, 16, 0)      # 5120
    assert n1_chunks(108) == (64, 32, 16)    # 13824: 112, padded by 4 rows
    assert n1_chunks(112) == (64, 32, 16)    # 14336: exact
    assert n1_chunks(64) == (64, 0, 0)
    assert n1_chunks(2) == (16, 0, 0)
    assert n2_chunks(128) == (128, 0) and n2_chunks(80) == (64, 16)   # 5120 = 64 x 80
    assert n2_chunks(112) == (128, 0)                                 # three parts: one padded chunk instead
    assert n2_chunks(80, has_p2=False) == (128, 0)                    # no first dot: the padded rows
    assert rows_padded(80) == 128 and rows_padded(64) == 64
    assert chunked_supported(86, 128, True) and chunked_supported(40, 64, False) and chunked_supported(64, 80, True)
    assert not chunked_supported(3, 128, True)      # odd n1 (packing splits a row)
    assert not chunked_supported(24, 24, True)      # n2 < 64: mostly padding at 64 rows per warpgroup
    assert not chunked_supported(200, 256, True)    # factors beyond on-chip sizes


CASES = [  # (n1, n2, has_p1, has_p2): chunk sets 1, 2 and 3 long, with and without padding in each
    (86, 128, True, True),    # 11008: 64 + 32
    (40, 64, True, True),     # 32 + 16
    (22, 64, True, True),     # 16 + 16 (6 padded rows)
    (108, 64, True, True),    # 64 + 32 + 16 (4 padded rows)
    (64, 64, True, True),     # one chunk, nothing padded
    (64, 80, True, True),     # 5120: n2 = 80 -> K chunks 64 + 16, rows padded to 128
    (40, 96, True, True),     # K chunks 64 + 32
    (20, 112, True, True),    # K as one chunk padded to 128
    (28, 128, True, False),   # o_proj head mixing: 28 heads, head_dim 128, P2 = identity
    (20, 64, False, True),    # only P2
]


@pytest.mark.parametrize("n1,n2,has_p1,has_p2", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_chunked_matches_reference(n1, n2, has_p1, has_p2, dtype, bits):
    x = _inputs(7, n1 * n2, dtype)
    _check(x, _factor(n1) if has_p1 else None, _factor(n2) if has_p2 else None, bits)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("n1", [86, 108])
def test_chunked_unpacked_formats(fmt, n1):
    x = _inputs(5, n1 * 64, torch.float16)
    q, _ = _check(x, _factor(n1), _factor(64), 4, fmt)
    assert q.shape == x.shape


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("programs", [1, 2, 3])
def test_chunked_persistent_grid_covers_all_tokens(prefetch, programs):
    """Programs walk several tokens each (with the next token's tiles requested ahead, or not); 11 tokens are
    not a multiple of any grid here, so the last step of some programs is masked off."""
    x = _inputs(11, 40 * 64, torch.float16)
    q, s = _check(x, _factor(40), _factor(64), num_programs=programs, config={"prefetch": prefetch})
    assert s[0].item() == pytest.approx(1e-8) and not q[0].any()  # the all-zero token


def test_chunked_errors_and_default_dispatch(monkeypatch):
    x = _inputs(20, 3 * 128, torch.float16)
    with pytest.raises(ValueError, match="chunked kernel"):
        fused_transform_quantize(x, _factor(3), _factor(128), kernel="chunked")   # odd n1
    with pytest.raises(ValueError, match="chunked kernel"):
        fused_transform_quantize(_inputs(3, 24 * 24, torch.float16), _factor(24), _factor(24), kernel="chunked")
    with pytest.raises(ValueError, match="chunked kernel"):
        fused_transform_quantize(_inputs(3, 40 * 64, torch.float16), _factor(40), _factor(64), kernel="chunked",
                                 split_intermediate=True)
    # the default takes it for more than split_max_m tokens with a non-power-of-two n1, and only then
    calls = []
    real = ftq.launch_chunked
    monkeypatch.setattr(ftq, "launch_chunked", lambda *a, **k: (calls.append(a[7:9]), real(*a, **k)))
    p1, p2, p64 = _factor(40), _factor(64), _factor(64)
    prefill = DEFAULT_ROUTES.split_max_m + 1
    for on in (False, True):
        routes = replace(DEFAULT_ROUTES, chunked_prefill=on)

        def run_default(m, n1, f1):  # the default dispatch on m tokens of n1 x 64 factors
            fused_transform_quantize(_inputs(m, n1 * 64, torch.float16), f1, p2, routes=routes)
        calls.clear()
        run_default(prefill, 40, p1)   # non-power-of-two n1, prefill: chunked when on
        run_default(prefill, 64, p64)  # n1 = 64: the block kernel
        run_default(2, 40, p1)                     # decode: not chunked
        assert calls == ([(40, 64)] if on else [])


@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes: GPU only (the interpreter is slow at 300 tokens)")
@pytest.mark.parametrize("n,single", [(5120, False), (11008, False), (13824, False), (14336, False), (8192, False),
                                      (4096, False), (40 * 128, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefetch", [True, False])
def test_chunked_model_sizes_gpu(n, single, dtype, prefetch):
    """bf16 / fp16 at model sizes, 4 and 8 bits, packed and fp8 output (the tie band of V's rounding as on
    the CPU: the block kernel's GPU test uses the same)."""
    from flatquant.kernels.reference import kron_factors

    n1, n2 = (n // 128, 128) if single else kron_factors(n)
    x = _inputs(301, n, dtype)
    p1 = _factor(n1).to(dtype)
    p2 = None if single else _factor(n2).to(dtype)
    for bits, fmt in ((4, None), (8, None), (4, "fp8")):
        _check(x, p1, p2, bits, fmt, config={"prefetch": prefetch})


def test_default_kernel_choice():
    """The dispatch at the model sizes: chunked at prefill where a factor is not a power of two, the block
    kernel where both are, the split kernel at decode with 128 x 128 tiles, the per-token / tiled kernels
    for odd n1 or factors off chip."""
    from flatquant.kernels.transform.dispatch import default_kernel

    dev = torch.device(DEVICE)
    prefill = DEFAULT_ROUTES.split_max_m + 1
    assert [default_kernel(prefill, n1, n2, True, dev) for n1, n2 in ((86, 128), (108, 128), (112, 128), (64, 80))] \
        == ["chunked"] * 4
    assert default_kernel(prefill, 64, 64, True, dev) == "block" and default_kernel(prefill, 64, 128, True, dev) == "block"
    assert default_kernel(prefill, 24, 24, True, dev) == "block"     # n2 < 64: the chunked kernel does not take it
    assert default_kernel(1, 112, 128, True, dev) == "split"
    assert default_kernel(1, 64, 64, True, dev) == "block"           # small tiles at decode
    assert default_kernel(prefill, 3, 128, True, dev) == "token"     # odd n1
    assert default_kernel(prefill, 86, 128, True, dev, onchip=False) == "tiled"
    assert default_kernel(prefill, 86, 128, True, dev, split_intermediate=True) == "token"
