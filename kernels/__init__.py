"""tqc kernels: Triton kernels generated per layer configuration, and the hook that attaches them.

`attach(model)` (called by tqc.packed.load_packed) gives every TurboQuant layer on a CUDA device
the kernel generated for its (bits, residual bits, group size, N, K), after repacking its codes
into its kernel family's layout (docs/kernel_layout.md; `detach(model)` puts them back, e.g. before
saving). In Hugging Face's decoder layers it then moves the rotations of q/k/v, gate/up and
down_proj into the norm and SwiGLU steps, the residual add before the MLP with them (hf_glue.install),
and attends one token in one launch, which in Llama-like attention also applies the rotary
embedding and writes a static cache (hf_attention.install). On CPU it does nothing and the layers
keep the torch reference path. Triton is imported only when a CUDA layer is found.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

# The kernels are written for fused multiply-adds, Triton's default so far; Triton 3.9 warns that
# 3.10 turns it off unless this is set. A user's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def attach(model: nn.Module, cache_dir: Path | None = None, verbose: bool = False,
           fragments: bool | None = None) -> int:
    """Set `module.kernel` on each supported quantized layer on CUDA, fuse the rotations into the
    norm and SwiGLU steps where the model allows (hf_glue), and decode attention in one launch
    (hf_attention); return how many layers got a kernel.

    `fragments`: the layers of the options a GPU has checked on it run the Gluon fragment family
    (registry.FragmentLayerKernel, Hopper GPUs; on an H100 the 8B-shaped decoder 7-11% faster than on
    the lookups, 26-51% less time a layer at 16 tokens: docs/performance-history.md, run 126). None (the
    default): where the GPU can run it; True: also, with a warning where it cannot; False: never."""
    from tqc.linear import QuantizedLinear  # noqa: PLC0415

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.codes.is_cuda]
    if not layers:
        return 0
    from . import hf_attention, hf_glue  # noqa: PLC0415
    from .registry import KernelRegistry, prepare, supports  # noqa: PLC0415
    from .tuning import Tuner  # noqa: PLC0415

    device = layers[0].codes.device
    registry = KernelRegistry(Tuner.for_device(device, cache_dir, verbose), fragments=runs_fragments(fragments, device))
    attached = 0
    for module in layers:
        if supports(module.spec):
            kernel = registry.kernel_for(module.spec)
            prepare(module, kernel.layout)
            module.use_kernel(kernel)
            attached += 1
    hf_glue.install(model)
    hf_attention.install(model)
    return attached


def runs_fragments(fragments: bool | None, device: torch.device) -> bool:
    """attach's `fragments` on `device`: None where the GPU can run the family, True too (warning
    where it cannot), False never."""
    from .registry import fragments_available  # noqa: PLC0415

    missing = fragments is not False and fragments_available(device)
    if missing and fragments:
        warnings.warn(f"tqc: no fragment family here ({missing}); the lookup kernels run instead", stacklevel=3)
    return fragments is not False and not missing


def detach(model: nn.Module) -> None:
    """Undo `attach`: codes back in the bitpack layout, every layer on the reference path."""
    from tqc.linear import QuantizedLinear  # noqa: PLC0415

    from .registry import restore  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            restore(module)


__all__ = ["attach", "detach"]
