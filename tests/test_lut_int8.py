"""tqc.kernels.lut_int8: the int8 codebook lookups, checked through the numpy emulation of their PTX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tqc.codebook import gaussian_codebook
from tqc.kernels.lut_int8 import emulate, int8_levels, int8_table_words, pack_words


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_code_decodes_to_its_int8_level(bits):
    levels, _ = int8_levels(bits)
    index = torch.randint(0, 2**bits, (16, 1024), generator=torch.Generator().manual_seed(bits))
    words = pack_words(index, bits)
    assert words.shape == (16, 1024 * bits // 32)
    decoded = emulate(words.numpy().view(np.uint32), bits, 1024)
    assert (decoded == levels[index.numpy()]).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_levels_stay_within_half_a_step_of_the_codebook(bits):
    levels, factor = int8_levels(bits)
    codebook = gaussian_codebook(bits).double().numpy()
    assert np.abs(levels).max() == 127 and len(set(levels.tolist())) == 2**bits
    assert np.abs(levels * factor - codebook).max() <= factor / 2 + 1e-12


def test_4_bit_second_table_has_clear_sign_bits():
    """The xor of the two PRMTs only works if the second pair of words never replicates a set sign."""
    _, _, c, d = int8_table_words(4)
    assert not (c | d) & 0x80808080


def test_codes_wider_than_4_bits_have_no_int8_lookup():
    with pytest.raises(ValueError, match="5-bit"):
        int8_table_words(5)
