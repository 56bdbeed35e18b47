"""Run the tuned kernels of two Llama-3-8B shapes a few times, for Nsight Compute (CUDA only).

    ncu --profile-from-start off --kernel-name fragment_gemv_kernel --launch-skip 6 --launch-count 1 \
        --set full python scripts/profile_layer_kernels.py                # one token, 14336 x 4096, on Hopper
    ncu --profile-from-start off --kernel-name lut_fma_kernel --launch-skip 6 --launch-count 1 \
        --set full python scripts/profile_layer_kernels.py --lookups      # the same on the lookup kernels
    ncu --profile-from-start off --kernel-name lut_dot_kernel --launch-skip 2 --launch-count 1 \
        --set full python scripts/profile_layer_kernels.py --tokens 16 --shapes 14336x4096 --lookups
    ncu --profile-from-start off --launch-skip 2 --launch-count 2 --set full \
        python scripts/profile_layer_kernels.py --tokens 16 --shapes 14336x4096 --bf16   # cuBLAS

Each shape is called once first, outside the profiled range, so that tuning (from the cache in
$TQC_KERNEL_CACHE, or by timing candidates when it misses) and compilation are not profiled.
Inside the range each shape's kernel runs 4 times, in order: by default launches 0-3 are
4096 x 4096 and 4-7 14336 x 4096. The kernels are those tqc.load runs: on Hopper the fragment
family (fragment_gemv_kernel at one token, fragment_dot_kernel at 2-16), elsewhere or with
--lookups lut_fma_kernel and lut_dot_kernel (each call also launches the rotation before them);
--bf16 runs torch's bf16 linear instead (cuBLAS may launch a split-K reduction after each
product, hence --launch-count 2 and one shape).
"""

import argparse

import torch

from tqc.kernels.bench import add_fragments_argument, bench_registry
from tqc.kernels.registry import prepare
from tqc.kernels.synthetic import random_turboquant_linear
from tqc.layout import LayerSpec
from tqc.options import QuantOption

CALLS = 4


def layer_calls(shapes: list[tuple[int, int]], tokens: int, option: str, bf16: bool,
                fragments: str | None = None) -> list:
    """One callable per shape, warmed up (tuned and compiled) before it is returned; `fragments` as
    bench_registry takes it."""
    registry, _ = bench_registry("profile_layer_kernels.py", fragments=fragments)
    calls = []
    for n, k in shapes:
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        if bf16:
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            call = lambda x=x, weight=weight: torch.nn.functional.linear(x, weight)  # noqa: E731
        else:
            module = random_turboquant_linear(LayerSpec(QuantOption.parse(option), 128, k, n), "cuda")
            kernel = registry.kernel_for(module.spec)
            prepare(module, kernel.layout)
            call = lambda x=x, kernel=kernel, module=module: kernel(x, module)  # noqa: E731
        call()
        if not bf16:
            print(f"{n} x {k}: {kernel.tuned(tokens)}", flush=True)
        calls.append(call)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--option", default="4")
    parser.add_argument("--bf16", action="store_true", help="profile torch's bf16 linear instead")
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"], help="out x in features")
    add_fragments_argument(parser)
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes]
    calls = layer_calls(shapes, args.tokens, args.option, args.bf16, args.fragments)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        for _ in range(CALLS):
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
