"""The CPU time of one quantized layer call: tqc's side alone (no GPU), or with real launches.

    python3 scripts/launch_overhead.py [--calls 20000] [--profile]
    python3 scripts/launch_overhead.py --device cuda [-o launch_overhead.json]

A decode step run eagerly is bound by the CPU (docs/performance-history.md, runs 71-75): each quantized
layer call is tqc's Python (launch choice, grids, allocations) plus two Triton launches. On the
CPU this measures the first part alone, for a 4096 x 4096 4-bit layer at one token: the rotation
and lookup kernels are replaced by stand-ins whose compiled launch does nothing, reached through
kernels/launch.py's direct path as on a GPU, so what is timed is everything tqc does around them,
alone, as the fused q/k/v of a loaded model (tqc/fusion.py) calls it, and with the norm before
it (Hugging Face's, then with the rotation in the norm's launch: kernels/hf_glue.py).
With `--device cuda` the same layer runs its real kernels, calls issued back to back (the GPU's
few microseconds a call hide behind the CPU's), through Triton's launcher and through the
compiled kernels directly (kernels/launch.py), alternated twice.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import sys
import time
from types import SimpleNamespace

if "cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # kernels built on the CPU; they are stubbed out below anyway

import torch  # noqa: E402

from tqc.kernels import launch  # noqa: E402
from tqc.kernels import triton_kernels as tk  # noqa: E402
from tqc.kernels.registry import KernelKey, LayerKernel, prepare  # noqa: E402
from tqc.kernels.synthetic import random_turboquant_linear  # noqa: E402
from tqc.kernels.tuning import LaunchConfig, TuneEntry, Tuner, token_bucket  # noqa: E402
from tqc.fusion import FusedSiblings  # noqa: E402
from tqc.layout import LayerSpec  # noqa: E402
from tqc.options import QuantOption  # noqa: E402


class NoLaunch:
    """Stands in for a Triton kernel (here an interpreted one): `kernel[grid](...)` returns a
    compiled kernel whose launch does nothing, so that kernels/launch.py keeps it and calls it
    directly from then on, as it does a real one's."""

    def __init__(self, kernel):
        self.params = [SimpleNamespace(name=p.name, default=p.default)
                       for p in inspect.signature(kernel.fn).parameters.values()]

    def __getitem__(self, grid):
        compiled = SimpleNamespace(run=lambda *args: None, function=None, packed_metadata=None)
        return lambda *args, **kwargs: compiled


def stub_launches() -> None:
    """The lookup, rotation and norm kernels replaced by NoLaunch, launched by the direct path."""
    from tqc.kernels import glue

    tk.fwht_kernel, tk.lut_fma_kernel = NoLaunch(tk.fwht_kernel), NoLaunch(tk.lut_fma_kernel)
    glue.norm_rotate_kernel = NoLaunch(glue.norm_rotate_kernel)
    launch.ENABLED = True
    launch.driver = SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0,
                                                           get_current_stream=lambda device: 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="also print where the time goes (cProfile)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: real launches")
    parser.add_argument("-o", "--output", help="JSON of the timings (with --device cuda)")
    args = parser.parse_args()
    if args.device == "cpu":
        stub_launches()
    module = random_turboquant_linear(LayerSpec(QuantOption.parse("4"), 128, 4096, 4096), args.device)
    prepare(module)
    kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
    config = LaunchConfig(strategy="fma", block_n=32, slots=32, iters=1)
    kernel.tuner.data.entries[f"{kernel.key.name}/m{token_bucket(1)}"] = TuneEntry(config=config, microseconds=0)
    module.use_kernel(kernel)
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device=args.device)

    def calls() -> None:
        for _ in range(args.calls):
            module(x)

    if args.device == "cuda":
        with torch.no_grad():
            time_real_launches(calls, args.calls, args.output)
        return
    with torch.no_grad():
        module(x)
        start = time.perf_counter()
        calls()
        print(f"tqc's side of a layer call: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us")
        fused = FusedSiblings(module, ["q_proj", "k_proj", "v_proj"])  # as tqc.load fuses q/k/v
        start = time.perf_counter()
        for _ in range(args.calls):
            for name in fused.names:
                fused.output_for(x, name)
        print(f"the same through a fused q/k/v (the layer once, three slices): "
              f"{(time.perf_counter() - start) / args.calls * 1e6:.1f} us")
        time_norm_and_fused(module, x, args.calls)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(calls)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


def time_norm_and_fused(module, x: torch.Tensor, count: int) -> None:
    """A decoder layer's norm and the fused q/k/v reading its output: Hugging Face's RMSNorm (torch
    ops) and the rotation in the layer's launch, against kernels/hf_glue.py's RotatingRMSNorm."""
    from tqc.kernels import hf_glue
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = hf_glue.RotatingRMSNorm(LlamaRMSNorm(x.shape[-1], eps=1e-5).to(x.dtype),
                                   FusedSiblings(module, ["q_proj", "k_proj", "v_proj"]))
    fused = norm._consumer[0]
    for enabled in (False, True):
        hf_glue.ENABLED = enabled
        start = time.perf_counter()
        for _ in range(count):
            normed = norm(x)
            for name in fused.names:
                fused.output_for(normed, name)
        label = "RotatingRMSNorm, one launch" if enabled else "Hugging Face's RMSNorm (torch ops), then the rotation"
        print(f"norm + fused q/k/v, {label}: {(time.perf_counter() - start) / count * 1e6:.1f} us")


def time_real_launches(calls, count: int, output: str | None) -> None:
    """Microseconds a call through Triton's launcher and directly, alternated twice."""
    timings = {"triton": [], "direct": []}
    for _ in range(2):
        for path in timings:
            launch.ENABLED = path == "direct"
            calls()  # warm: the direct path's first call goes through Triton
            torch.cuda.synchronize()
            start = time.perf_counter()
            calls()
            torch.cuda.synchronize()
            timings[path].append((time.perf_counter() - start) / count * 1e6)
    for path, times in timings.items():
        print(f"a layer call, {path} launches: {', '.join(f'{t:.1f}' for t in times)} us")
    if output:
        with open(output, "w") as handle:
            json.dump({"layer": "4-bit 4096 x 4096, one token", "calls": count, "microseconds": timings,
                       "device": torch.cuda.get_device_name()}, handle, indent=1)


if __name__ == "__main__":
    main()
