"""Round-to-nearest baseline: per-group asymmetric min/max, fp16 scale and zero point."""

from __future__ import annotations

import torch

from .bitpack import pack, unpack
from .layout import LayerSpec


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int) -> dict[str, torch.Tensor]:
    """The packed tensors of an RTN layer (seed unused: RTN is deterministic)."""
    bits = spec.option.base_bits
    n, k = spec.out_features, spec.in_features
    grouped = weight.detach().float().reshape(n, spec.groups, spec.group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scales = ((high - low) / (2**bits - 1)).to(torch.float16)
    zeros = low.to(torch.float16)
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
    codes = ((grouped - zeros.float()[..., None]) / safe).round().clamp(0, 2**bits - 1)
    return {"codes": pack(codes.reshape(n, k), bits), "scales": scales, "zeros": zeros}


def dequantize(tensors: dict[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
    bits = spec.option.base_bits
    n, k = spec.out_features, spec.in_features
    codes = unpack(tensors["codes"], bits, k, torch.int32).view(n, spec.groups, spec.group_size)
    weight = codes.float().mul_(tensors["scales"].float()[..., None]).add_(tensors["zeros"].float()[..., None])
    return weight.reshape(n, k)
