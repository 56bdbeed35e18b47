"""int8 activations: a plan's `activations: int8`, for TurboQuant layers without a residual stage.

Such a layer multiplies on int8 units (tensor cores' int8 mma, `dp4a`), as llama.cpp's q8_1 paths
do: its rotated input is rounded to int8 per (token, group) with the scale absmax / 127, and its
codebook to int8 levels (`codebook.int8_codebook`: level / max * 127, the factor back folded into
the output). The reference path computes the same numbers in floating point, so CPU and GPU agree;
the GPU kernels (tqc.kernels.int8_dot) sum the int8 products exactly in int32 per group.

Layers with a residual stage (4+4, 4+2) keep 16-bit activations: the int8 rounding (about 0.4% of
a group's largest value) would be larger than their error. Measured on SmolLM2 in
docs/performance.md ("int8 activations").
"""

from __future__ import annotations

from typing import Literal

import torch

from .options import QuantOption

Activations = Literal["fp16", "int8"]
INT8_MAX = 127


def takes_int8(option: QuantOption, activations: Activations) -> bool:
    """Whether a layer of `option` runs on int8 activations under a plan's `activations`."""
    return (activations == "int8" and option.scheme == "turboquant" and not option.residual_bits
            and option.codebook == "lloyd-max")  # the int8 kernels' tables hold Lloyd-Max's levels


def quantize_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 values as int8 [..., K], float32 scales [..., K / group_size]).

    Per group: scale = absmax / 127 (1 for an all-zero group), value = round-half-even(x / scale).
    """
    groups = x.float().reshape(*x.shape[:-1], -1, group_size)
    scales = groups.abs().amax(-1) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(groups / scales[..., None]).clamp_(-INT8_MAX, INT8_MAX)
    return values.to(torch.int8).reshape(x.shape), scales


def round_to_int8(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x with every group rounded to its int8 grid (quantize_groups, multiplied back), in x's dtype."""
    values, scales = quantize_groups(x, group_size)
    grouped = values.float().reshape(*x.shape[:-1], -1, group_size) * scales[..., None]
    return grouped.reshape(x.shape).to(x.dtype)
