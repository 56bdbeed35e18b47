"""tqc kernels: Triton kernels generated per layer configuration, and the hook that attaches them.

`attach(model)` (called by tqc.packed.load_packed) gives every TurboQuant layer on a CUDA device
the kernel generated for its (bits, residual bits, group size, N, K), after repacking its codes
into its kernel family's layout (docs/kernel_layout.md; `detach(model)` puts them back, e.g. before
saving). In Hugging Face's decoder layers it then moves the rotations of q/k/v, gate/up and
down_proj into the norm and SwiGLU steps (hf_glue.install). On CPU it does nothing and the layers
keep the torch reference path. Triton is imported only when a CUDA layer is found.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

# The kernels are written for fused multiply-adds, Triton's default so far; Triton 3.9 warns that
# 3.10 turns it off unless this is set. A user's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def attach(model: nn.Module, cache_dir: Path | None = None, verbose: bool = False, fragments: bool = False) -> int:
    """Set `module.kernel` on each supported quantized layer on CUDA, and fuse the rotations into
    the norm and SwiGLU steps where the model allows (hf_glue); return how many layers got a kernel.

    `fragments`: 4-bit layers without a residual run the Gluon fragment family (registry.
    FragmentLayerKernel, Hopper GPUs): 28-41% less time at 16 tokens (Llama-3-8B), about the same at one
    (docs/performance.md, runs 114-120)."""
    from tqc.linear import QuantizedLinear  # noqa: PLC0415

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.codes.is_cuda]
    if not layers:
        return 0
    from . import hf_glue  # noqa: PLC0415
    from .registry import KernelRegistry, fragments_available, prepare, supports  # noqa: PLC0415
    from .tuning import Tuner  # noqa: PLC0415

    missing = fragments and fragments_available(layers[0].codes.device)
    if missing:
        warnings.warn(f"tqc: no fragment family here ({missing}); the lookup kernels run instead", stacklevel=2)
        fragments = False
    registry = KernelRegistry(Tuner.for_device(layers[0].codes.device, cache_dir, verbose), fragments=fragments)
    attached = 0
    for module in layers:
        if supports(module.spec):
            kernel = registry.kernel_for(module.spec)
            prepare(module, kernel.layout)
            module.use_kernel(kernel)
            attached += 1
    hf_glue.install(model)
    return attached


def detach(model: nn.Module) -> None:
    """Undo `attach`: codes back in the bitpack layout, every layer on the reference path."""
    from tqc.linear import QuantizedLinear  # noqa: PLC0415

    from .registry import restore  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            restore(module)


__all__ = ["attach", "detach"]
