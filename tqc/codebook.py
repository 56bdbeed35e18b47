"""Lloyd-Max codebooks for the standard normal, derived with scipy (never pasted).

After the randomized Hadamard rotation a group's coordinates are close to Gaussian, so the
mean-squared-error optimal scalar quantizer of N(0, 1) is the codebook TurboQuant uses.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Literal

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


# The levels a stage is encoded with: Lloyd-Max's (the default), or at 3 bits the high-byte grid's
# (`high_byte_codebook`: 1% more squared error on a Gaussian, decoded with fewer instructions on the GPU;
# option "3g", tqc.options).
Codebook = Literal["lloyd-max", "grid"]
CODEBOOKS: tuple[Codebook, ...] = ("lloyd-max", "grid")


def gaussian_codebook(bits: int) -> torch.Tensor:
    """The 2**bits Lloyd-Max reconstruction levels for N(0, 1), ascending, float32."""
    return torch.tensor(_lloyd_max(bits)[0], dtype=torch.float32)


def codebook_levels(bits: int, codebook: Codebook = "lloyd-max") -> torch.Tensor:
    """The 2**bits levels of `codebook` for N(0, 1), ascending, float32."""
    return high_byte_codebook(bits)[0].clone() if codebook == "grid" else gaussian_codebook(bits)


def int8_codebook(bits: int) -> tuple[torch.Tensor, float]:
    """The codebook rounded to int8 (levels / max * 127, ascending, int64) and the factor that maps
    the integers back: the levels of layers on int8 activations (tqc.activations)."""
    levels = _lloyd_max(bits)[0]
    factor = float(np.abs(levels).max() / 127)
    return torch.from_numpy(np.round(levels / factor).astype(np.int64)), factor


def gaussian_distortion(bits: int, codebook: Codebook = "lloyd-max") -> float:
    """Mean squared error of the codebook's nearest-level quantizer on N(0, 1) (theory)."""
    if codebook == "grid":
        return float(symmetric_distortion(high_byte_codebook(bits)[0].double().numpy()[2 ** (bits - 1):]))
    return _lloyd_max(bits)[1]


def nearest_code(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for every value (codebook sorted ascending), as uint8."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, midpoints.to(values.dtype)).to(torch.uint8)


# fp16 numbers whose low byte is zero: 2 mantissa bits, 2^e (1 + j / 4), over the range a codebook scaled into
# [1, 2) per binade can reach (the grid repeats with every power of 2, so one binade of factors covers all)
HIGH_BYTE_GRID = np.array([2.0**e * (1 + j / 4) for e in range(-8, 5) for j in range(4)])
GRID_FACTORS = np.linspace(1.0, 2.0, 20_001)[:-1]


def symmetric_distortion(magnitudes: np.ndarray) -> np.ndarray:
    """E[(X - Q(X))^2] on N(0, 1) of the quantizer to the nearest of +-magnitudes [..., m] (ascending, positive)."""
    zeros, infinite = np.zeros(magnitudes.shape[:-1] + (1,)), np.full(magnitudes.shape[:-1] + (1,), np.inf)
    edges = np.concatenate([zeros, (magnitudes[..., 1:] + magnitudes[..., :-1]) / 2, infinite], -1)
    a, b = edges[..., :-1], edges[..., 1:]
    finite_b = np.where(np.isinf(b), 0.0, b)  # b pdf(b) -> 0 as b -> inf
    b_pdf = finite_b * norm.pdf(finite_b)
    mass = norm.cdf(b) - norm.cdf(a)
    first = norm.pdf(a) - norm.pdf(b)  # E[X; a < X < b]
    second = mass - (b_pdf - a * norm.pdf(a))  # E[X^2; a < X < b]
    return 2 * np.sum(second - 2 * magnitudes * first + magnitudes**2 * mass, -1)


@lru_cache(maxsize=None)
def high_byte_codebook(bits: int) -> tuple[torch.Tensor, float]:
    """The 2**bits levels, ascending, that give N(0, 1) the least squared error among +-HIGH_BYTE_GRID / factor
    (each Lloyd-Max magnitude moved to the grid point below or above it), and that factor: a codebook whose
    levels times the factor are fp16 numbers with a zero low byte, so that a PRMT lookup of their high bytes
    alone decodes them (kernels/lut.py). 3 bits: {0.5, 1.5, 2.5, 4} / 1.873, 1.0% more error than Lloyd-Max's
    (scripts/grid_codebook.py)."""
    lloyd = _lloyd_max(bits)[0][2 ** (bits - 1):]
    scaled = GRID_FACTORS[:, None] * lloyd[None, :]
    below = np.searchsorted(HIGH_BYTE_GRID, scaled) - 1
    best_error, best_magnitudes, best_factor = np.inf, lloyd, 1.0
    for pick in itertools.product((0, 1), repeat=len(lloyd)):
        magnitudes = HIGH_BYTE_GRID[below + np.array(pick)] / GRID_FACTORS[:, None]
        ascending = np.all(np.diff(magnitudes, axis=-1) > 0, -1)
        error = np.where(ascending, symmetric_distortion(magnitudes), np.inf)
        i = int(error.argmin())
        if error[i] < best_error:
            best_error, best_magnitudes, best_factor = error[i], magnitudes[i], float(GRID_FACTORS[i])
    levels = np.concatenate([-best_magnitudes[::-1], best_magnitudes])
    return torch.tensor(levels, dtype=torch.float32), best_factor
