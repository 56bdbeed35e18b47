"""Seeded randomized Hadamard rotation, applied per group of input columns.

For a group of g columns the rotation is R = H D / sqrt(g): D a diagonal of random signs drawn
from the layer's seed, H the g x g Walsh-Hadamard matrix. R is orthogonal, so
W x = (W R^T)(R x): the weight is stored rotated and the activation is rotated at run time.
The transform is the fast O(g log g) butterfly, never a dense matrix product.
"""

from __future__ import annotations

import torch


def random_signs(seed: int, n: int) -> torch.Tensor:
    """n random +-1 values (float32) drawn deterministically from seed, on any machine."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float32)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dimension (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x * n**-0.5


def rotate(x: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Apply R to every group of `group_size` entries along the last dimension of x."""
    grouped = x.reshape(*x.shape[:-1], -1, group_size) * signs.to(x.device, x.dtype).view(-1, group_size)
    return fwht(grouped).reshape(x.shape)


def unrotate(x: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Apply R^T (the inverse of `rotate`)."""
    grouped = fwht(x.reshape(*x.shape[:-1], -1, group_size))
    return (grouped * signs.to(x.dtype).view(-1, group_size)).reshape(x.shape)
