"""Device check of the one-token int8 kernel (int8_gemv_kernel, dp4a) against the reference path.

    source scripts/device_setup.sh && python3 scripts/check_dp4a.py

Prints the relative error of every bit width and a few launch shapes at one token (bf16 and fp16),
beside the int8 tensor-core kernel's at one token, on a 1024 x 4096 layer.
"""

from __future__ import annotations

import copy

import torch

from tqc.kernels.registry import Int8LayerKernel, KernelKey, prepare
from tqc.kernels.synthetic import random_turboquant_linear
from tqc.kernels.tuning import LaunchConfig, Tuner
from tqc.layout import LayerSpec
from tqc.options import QuantOption

SHAPES = [(16, 1, 4), (64, 8, 8), (128, 8, 4), (64, 4, 4), (32, 8, 4)]  # (block_n, groups, warps)

for bits in (2, 3, 4):
    spec = LayerSpec(QuantOption("turboquant", bits), 128, 4096, 1024, activations="int8")
    module = random_turboquant_linear(spec, "cuda")
    original = copy.deepcopy(module).to("cpu").double()
    prepare(module)
    kernel = Int8LayerKernel(KernelKey.of(spec), Tuner("none", "none", None))
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
        ref = copy.deepcopy(original).forward(x.double().cpu())
        configs = [LaunchConfig(strategy="dp4a", block_n=n, iters=s, num_warps=w) for n, s, w in SHAPES]
        configs.append(LaunchConfig(strategy="int8", block_m=16, block_n=64, iters=8, num_stages=3))
        for config in filter(kernel.fits, configs):  # the others are refused (fewer than 4 words a thread)
            out = kernel.run(x, module, config).double().cpu()
            error = float((out - ref).norm() / ref.norm())
            print(f"{bits}-bit {str(dtype):>14} {config.strategy} {config.block_n:>3} {config.iters:>2} "
                  f"{config.num_warps}: {error:.2e}", flush=True)
