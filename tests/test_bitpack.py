import pytest
import torch

from tqc.bitpack import pack, packed_words, plane_widths, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_unpack_is_exact(bits):
    codes = torch.randint(0, 2**bits, (7, 3, 192), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, 3, 192 * bits // 32)  # dense: no wasted bits
    assert torch.equal(unpack(packed, bits, 192), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_extreme_codes_survive_the_sign_bit(bits):
    codes = torch.full((2, 64), 2**bits - 1)
    codes[1] = 0
    assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)


def test_planes_add_up_to_the_width():
    assert plane_widths(3) == (2, 1)
    assert all(sum(plane_widths(b)) == b for b in range(1, 9))


def test_rows_must_be_whole_words():
    with pytest.raises(ValueError, match="multiple of 32"):
        packed_words(100, 3)
