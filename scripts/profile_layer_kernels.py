"""Run the tuned kernels of two 4-bit Llama-3-8B shapes a few times, for Nsight Compute (CUDA only).

    ncu --kernel-name lut_fma_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        python scripts/profile_layer_kernels.py
    ncu --kernel-name lut_dot_kernel --launch-skip 6 --launch-count 1 --set full \
        python scripts/profile_layer_kernels.py --tokens 16          # the tensor-core kernel, 14336 x 4096

Tuning comes from the cache ($TQC_KERNEL_CACHE), so the profiled launch is the one a model runs.
Tune first (e.g. `tqc bench layers`, or a cache carried in): with an empty cache the first launches
are the tuner's candidates, and --launch-skip counts them. Launches 0-3 are 4096 x 4096, 4-7
14336 x 4096. One token runs lut_fma_kernel; 2-16 tokens lut_dot_kernel.
"""

import argparse

import torch

from tqc.kernels.registry import KernelRegistry, prepare
from tqc.kernels.synthetic import random_turboquant_linear
from tqc.kernels.tuning import Tuner
from tqc.layout import LayerSpec
from tqc.options import QuantOption

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, default=1)
parser.add_argument("--option", default="4")
args = parser.parse_args()
registry = KernelRegistry(Tuner.for_device())
for n, k in ((4096, 4096), (14336, 4096)):
    module = random_turboquant_linear(LayerSpec(QuantOption.parse(args.option), 128, k, n), "cuda")
    prepare(module)
    kernel = registry.kernel_for(module.spec)
    x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        kernel(x, module)
torch.cuda.synchronize()
