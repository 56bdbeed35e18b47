"""Quantized layers with random contents, for kernel tests and benchmarks at any shape.

Uniformly random codes are what quantizing random Gaussian weights produces (every codebook cell
of the Lloyd-Max quantizer has its own probability, but kernels do not care), and building them
takes milliseconds where quantizing a 70B-sized layer takes minutes.
"""

from __future__ import annotations

import torch

from tqc.layout import LayerSpec, tensor_layout
from tqc.linear import TurboQuantLinear

SCALE = 0.02  # about the RMS of a trained LLM weight


def random_turboquant_linear(spec: LayerSpec, device: str | torch.device, seed: int = 0) -> TurboQuantLinear:
    """A TurboQuantLinear with random codes and scales, holding exactly the tensors of its layout."""
    generator = torch.Generator(device=device).manual_seed(seed)
    module = TurboQuantLinear(spec, device=device)
    for name, (shape, dtype) in tensor_layout(spec).items():
        if dtype == torch.int32:
            value = torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, device=device, dtype=torch.int32)
        elif name == "seed":
            value = torch.tensor([seed + 1], dtype=dtype, device=device)
        else:
            value = ((torch.rand(shape, generator=generator, device=device) + 0.5) * SCALE).to(dtype)
        setattr(module, name, value)
    module.refresh_signs()
    return module
