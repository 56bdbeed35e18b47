import pytest
import torch

from tqc.rotation import fwht, random_signs, rotate, unrotate


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_rotation_is_orthogonal_and_inverts(group_size):
    k = group_size * 3
    signs = random_signs(7, k)
    matrix = rotate(torch.eye(k, dtype=torch.float64), signs, group_size)  # rows are R e_i
    assert torch.allclose(matrix @ matrix.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, k, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, signs, group_size), signs, group_size), x, atol=1e-12)


def test_fwht_matches_the_dense_hadamard():
    n = 16
    dense = torch.ones(1, 1)
    while dense.shape[0] < n:
        dense = torch.cat([torch.cat([dense, dense], 1), torch.cat([dense, -dense], 1)], 0)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ dense.double().T / n**0.5, atol=1e-12)


def test_signs_are_seeded():
    assert torch.equal(random_signs(3, 64), random_signs(3, 64))
    assert not torch.equal(random_signs(3, 64), random_signs(4, 64))
    assert set(random_signs(3, 64).tolist()) == {-1.0, 1.0}


def test_rotation_gaussianises_an_outlier():
    x = torch.zeros(1, 128)
    x[0, 5] = 100.0  # a single outlier spreads evenly over the group
    assert rotate(x, random_signs(0, 128), 128).abs().max() == pytest.approx(100 / 128**0.5)


def test_non_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(2, 96))
