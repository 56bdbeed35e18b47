"""Sizes as reported by `tqc eval`: MB are 10^6 bytes; bits per weight count codes and scales."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from torch import nn

from .layout import layer_bytes


def packed_size(weights_file: Path, manifest) -> dict[str, float]:
    """Size of a packed model file and the bits per weight of its quantized linear layers."""
    specs = [entry.spec() for entry in manifest.layers.values()]
    weights = sum(spec.weights for spec in specs)
    bits = 8 * sum(layer_bytes(spec) for spec in specs)
    return {"size_mb": weights_file.stat().st_size / 1e6, "bits_per_weight": bits / weights if weights else 16.0}


def source_size(model: nn.Module) -> dict[str, float]:
    """Size of the model with every parameter stored in 16 bits (tied tensors once)."""
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    return {"size_mb": 2 * sum(unique.values()) / 1e6, "bits_per_weight": 16.0}


class EvalResult(BaseModel):
    """What `tqc eval` writes (JSON), one file per evaluated model."""

    model_config = ConfigDict(extra="forbid")

    model: str
    source: str
    data: str
    seq_len: int
    windows: int
    batch_size: int
    device: str = "cpu"  # cuda: the packed model ran the generated kernels, in bf16
    perplexity: float
    source_perplexity: float
    kl_divergence: float
    top1_agreement: float
    tokens: int
    size_mb: float
    bits_per_weight: float
