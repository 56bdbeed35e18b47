import numpy as np
import pytest
import torch

from tqc.codebook import (HIGH_BYTE_GRID, gaussian_codebook, gaussian_distortion, high_byte_codebook, nearest_code,
                          symmetric_distortion)
from tqc.kernels.lut import HIGH_BYTE_LEVELS

# Max (1960), Table I: mean squared error of the optimal N(0,1) quantizer.
MAX_1960 = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_lloyd_max_theory(bits):
    assert gaussian_distortion(bits) == pytest.approx(MAX_1960[bits], rel=0.01)
    samples = torch.randn(2_000_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    codebook = gaussian_codebook(bits).double()
    measured = (samples - codebook[nearest_code(samples, codebook).long()]).pow(2).mean().item()
    assert measured == pytest.approx(gaussian_distortion(bits), rel=0.01)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_is_symmetric_and_sorted(bits):
    codebook = gaussian_codebook(bits)
    assert codebook.numel() == 2**bits
    assert torch.all(codebook[1:] > codebook[:-1])
    assert torch.allclose(codebook, -codebook.flip(0), atol=1e-6)


def test_nearest_code_picks_the_closest_level():
    codebook = gaussian_codebook(3)
    values = torch.linspace(-4, 4, 1001)
    brute = (values[:, None] - codebook).abs().argmin(-1)
    assert torch.equal(nearest_code(values, codebook).long(), brute)


def test_high_byte_codebook_lies_on_fp16_numbers_with_a_zero_low_byte():
    """3 bits: the levels times the factor are fp16 numbers whose low byte is zero, so a PRMT of their high bytes
    decodes them (the 2-bit lookups' HIGH_BYTES way); their error on N(0, 1), measured, is within 1.1% of
    Lloyd-Max's, and below what moving each Lloyd-Max level to its nearest such number gives."""
    levels, factor = high_byte_codebook(3)
    assert levels.numel() == 8 and torch.all(levels[1:] > levels[:-1]) and torch.allclose(levels, -levels.flip(0))
    on_grid = (levels.double() * factor).numpy()
    raw = on_grid.astype(np.float16)
    np.testing.assert_allclose(raw.astype(np.float64), on_grid, rtol=1e-6)
    assert not np.any(raw.view(np.uint16) & 0xFF)
    samples = torch.randn(2_000_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    measured = (samples - levels.double()[nearest_code(samples, levels.double()).long()]).pow(2).mean().item()
    assert gaussian_distortion(3) < measured < 1.011 * gaussian_distortion(3)
    lloyd = gaussian_codebook(3).double().numpy()[4:] * factor
    nearest = HIGH_BYTE_GRID[np.abs(lloyd[:, None] - HIGH_BYTE_GRID).argmin(-1)] / factor
    assert symmetric_distortion(levels.double().numpy()[4:]) < symmetric_distortion(nearest)


def test_high_byte_codebook_of_2_bits_is_the_high_byte_lookups():
    """At 2 bits the search lands where kernels/lut.py's HIGH_BYTE_LEVELS were chosen by hand (a factor of 2 apart:
    the grid repeats every binade), at Lloyd-Max's error."""
    levels, factor = high_byte_codebook(2)
    magnitudes = levels.double().numpy()[2:] * factor
    np.testing.assert_allclose(magnitudes / magnitudes[0], np.array(HIGH_BYTE_LEVELS) / HIGH_BYTE_LEVELS[0], rtol=1e-6)
    assert symmetric_distortion(levels.double().numpy()[2:]) == pytest.approx(gaussian_distortion(2), rel=1e-5)
