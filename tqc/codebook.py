"""Lloyd-Max codebooks for the standard normal, derived with scipy (never pasted).

After the randomized Hadamard rotation a group's coordinates are close to Gaussian, so the
mean-squared-error optimal scalar quantizer of N(0, 1) is the codebook TurboQuant uses.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.stats import norm


@lru_cache(maxsize=None)
def _lloyd_max(bits: int, iterations: int = 10_000, tol: float = 1e-13) -> tuple[np.ndarray, float]:
    levels = 2**bits
    # Start from equal-probability cells; Lloyd's iteration converges to the unique optimum
    # because the Gaussian density is log-concave.
    centroids = norm.ppf((np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        edges = np.concatenate(([-np.inf], (centroids[1:] + centroids[:-1]) / 2, [np.inf]))
        mass = norm.cdf(edges[1:]) - norm.cdf(edges[:-1])
        updated = (norm.pdf(edges[:-1]) - norm.pdf(edges[1:])) / mass
        converged = np.max(np.abs(updated - centroids)) < tol
        centroids = updated
        if converged:
            break
    edges = np.concatenate(([-np.inf], (centroids[1:] + centroids[:-1]) / 2, [np.inf]))
    mass = norm.cdf(edges[1:]) - norm.cdf(edges[:-1])
    distortion = 1.0 - float(np.sum(mass * centroids**2))  # E[(X - Q(X))^2] at the centroid condition
    return centroids, distortion


def gaussian_codebook(bits: int) -> torch.Tensor:
    """The 2**bits Lloyd-Max reconstruction levels for N(0, 1), ascending, float32."""
    return torch.tensor(_lloyd_max(bits)[0], dtype=torch.float32)


def int8_codebook(bits: int) -> tuple[torch.Tensor, float]:
    """The codebook rounded to int8 (levels / max * 127, ascending, int64) and the factor that maps
    the integers back: the levels of layers on int8 activations (tqc.activations)."""
    levels = _lloyd_max(bits)[0]
    factor = float(np.abs(levels).max() / 127)
    return torch.from_numpy(np.round(levels / factor).astype(np.int64)), factor


def gaussian_distortion(bits: int) -> float:
    """Mean squared error of the Lloyd-Max quantizer on N(0, 1) (theory)."""
    return _lloyd_max(bits)[1]


def nearest_code(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every value (codebook sorted ascending), as uint8."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, midpoints.to(values.dtype)).to(torch.uint8)
