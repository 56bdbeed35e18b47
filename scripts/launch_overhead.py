"""tqc's own CPU time around one quantized layer call, the Triton launches stubbed out (no GPU).

    python3 scripts/launch_overhead.py [--calls 20000] [--profile]

A decode step run eagerly is bound by the CPU (docs/performance.md, runs 71-75): each quantized
layer call is tqc's Python (launch choice, grids, allocations) plus two Triton launches. This
measures the first part alone, for a 4096 x 4096 4-bit layer at one token: the rotation and
lookup kernels are replaced by no-ops, so what is timed is everything tqc does around them.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"  # kernels built on the CPU; they are stubbed out below anyway

import torch  # noqa: E402

from tqc.kernels import triton_kernels as tk  # noqa: E402
from tqc.kernels.registry import KernelKey, LayerKernel, prepare  # noqa: E402
from tqc.kernels.synthetic import random_turboquant_linear  # noqa: E402
from tqc.kernels.tuning import LaunchConfig, TuneEntry, Tuner, token_bucket  # noqa: E402
from tqc.layout import LayerSpec  # noqa: E402
from tqc.options import QuantOption  # noqa: E402


class NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (cProfile)")
    args = parser.parse_args()
    tk.fwht_kernel = tk.lut_fma_kernel = NoLaunch()
    module = random_turboquant_linear(LayerSpec(QuantOption.parse("4"), 128, 4096, 4096), "cpu")
    prepare(module)
    kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
    config = LaunchConfig(strategy="fma", block_n=32, slots=32, iters=1)
    kernel.tuner.data.entries[f"{kernel.key.name}/m{token_bucket(1)}"] = TuneEntry(config=config, microseconds=0)
    module.use_kernel(kernel)
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16)

    def calls() -> None:
        for _ in range(args.calls):
            module(x)

    with torch.no_grad():
        module(x)
        start = time.perf_counter()
        calls()
        print(f"tqc's side of a layer call: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(calls)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
