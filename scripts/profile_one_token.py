"""Run the tuned one-token kernels of two 4-bit Llama-3-8B shapes a few times, for Nsight Compute (CUDA only).

    ncu --kernel-name lut_fma_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        python scripts/profile_one_token.py

Tuning comes from the cache ($TQC_KERNEL_CACHE), so the profiled launch is the one a model runs.
Tune first (e.g. `tqc bench layers`, or a cache carried in): with an empty cache the first launches
are the tuner's candidates, and --launch-skip counts them. Launches 0-3 are 4096 x 4096, 4-7
14336 x 4096.
"""

import torch

from tqc.kernels.registry import KernelRegistry, prepare
from tqc.kernels.synthetic import random_turboquant_linear
from tqc.kernels.tuning import Tuner
from tqc.layout import LayerSpec
from tqc.options import QuantOption

registry = KernelRegistry(Tuner.for_device())
for n, k in ((4096, 4096), (14336, 4096)):
    module = random_turboquant_linear(LayerSpec(QuantOption.parse("4"), 128, k, n), "cuda")
    prepare(module)
    kernel = registry.kernel_for(module.spec)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        kernel(x, module)
torch.cuda.synchronize()
