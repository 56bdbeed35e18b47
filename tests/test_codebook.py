import pytest
import torch

from tqc.codebook import gaussian_codebook, gaussian_distortion, nearest_code

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
