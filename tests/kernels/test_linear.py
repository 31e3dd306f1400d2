import pytest
import torch

from flatquant.kernels.linear import W4A4Linear, set_backend
from flatquant.kernels.reference import kron_factors
from flatquant.kernels.testing import DEVICE


def _layer(in_f, out_f, bits=4, transform="both", bias=True, act_clip=0.9, device=DEVICE):
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    n1, n2 = kron_factors(in_f)
    p1 = torch.linalg.qr(torch.randn(n1, n1))[0] if transform in ("both", "p1") else None
    p2 = torch.linalg.qr(torch.randn(n2, n2))[0] if transform == "both" else None
    m = W4A4Linear.from_float(w, b, p1, p2, act_clip=act_clip, bits=bits)
    return m.to(device), w, b, p1, p2


def _float_ref(x, w, b, p1, p2):
    from flatquant.kernels.reference import kron_transform_reference

    y = kron_transform_reference(x.float(), p1, p2) @ w.t().to(x.device)
    return y + b.to(x.device) if b is not None else y


@pytest.mark.parametrize("bits,tol", [(4, 0.25), (8, 0.02)])
def test_reference_backend_close_to_float(bits, tol):
    """CPU reference path, no triton needed: close to the float linear within quantization error."""
    m, w, b, p1, p2 = _layer(64, 48, bits=bits, act_clip=1.0, device="cpu")
    x = torch.randn(2, 5, 64)
    y = m(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    ref = _float_ref(x, w, b, p1, p2)
    assert ((y - ref).norm() / ref.norm()).item() < tol


def test_state_dict_round_trip_and_backend_validation():
    m, *_ = _layer(32, 16, device="cpu")
    m2 = W4A4Linear(32, 16, bias=True, p1=torch.eye(4), p2=torch.eye(8))
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError):
        m.backend = "cuda"
    with pytest.raises(ValueError):
        W4A4Linear(32, 16, p1=torch.eye(5))


@pytest.mark.parametrize("transform", ["both", "p1", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_reference(transform, dtype):
    pytest.importorskip("triton")
    m, *_ = _layer(96, 40, transform=transform, bias=transform != "none")
    x = (torch.randn(2, 3, 96) * 2).to(dtype).to(DEVICE)
    y_ref = m(x)
    set_backend(m, "triton")
    y = m(x)
    assert y.shape == y_ref.shape == (2, 3, 40) and y.dtype == dtype
    tol = 2.0 ** -10 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * float(y_ref.float().abs().max()))


def test_o_proj_head_mixing_9_heads():
    pytest.importorskip("triton")
    heads, head_dim = 9, 16
    w = torch.randn(24, heads * head_dim)
    p1 = torch.linalg.qr(torch.randn(heads, heads))[0]
    m = W4A4Linear.from_float(w, None, p1, None, act_clip=0.95).to(DEVICE)
    x = torch.randn(4, heads * head_dim, device=DEVICE)
    y_ref = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
