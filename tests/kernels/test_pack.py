import pytest
import torch

from flatquant.kernels.reference import pack_codes, pack_int4, unpack_codes, unpack_int4


@pytest.mark.parametrize("shape", [(1, 2), (5, 64), (3, 4, 576), (2, 1536)])
def test_int4_round_trip(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), codes)


def test_layout_low_high_halves():
    k = 16
    codes = torch.randint(-8, 8, (3, k), dtype=torch.int8)
    packed = pack_int4(codes).to(torch.int32)
    for j in range(k // 2):
        lo, hi = packed[:, j] & 0xF, (packed[:, j] >> 4) & 0xF
        assert torch.equal(torch.where(lo >= 8, lo - 16, lo), codes[:, j].int())
        assert torch.equal(torch.where(hi >= 8, hi - 16, hi), codes[:, j + k // 2].int())


def test_extremes_and_float_codes():
    codes = torch.tensor([[-8, 7, 0, -1, 1, -8, 7, 3]], dtype=torch.float32)  # quantizer gives floats
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.int8))
    assert pack_int4(codes)[0, 0].item() == ((-8 & 0xF) | ((1 & 0xF) << 4))


def test_int8_passthrough():
    codes = torch.randint(-128, 128, (4, 10)).float()
    stored = pack_codes(codes, 8)
    assert stored.dtype == torch.int8 and torch.equal(unpack_codes(stored, 8), codes.to(torch.int8))


def test_errors():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 2), 8))
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 2), 3)
