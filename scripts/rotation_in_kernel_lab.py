"""Lab: the activation rotation inside the one-token lookup kernel, instead of a launch of its own.

    python3 scripts/rotation_in_kernel_lab.py check              # CPU (TRITON_INTERPRET=1 set here): small shapes
    python3 scripts/rotation_in_kernel_lab.py static             # no GPU: compile for sm_90, registers and SASS
    python3 scripts/rotation_in_kernel_lab.py time -o lab.json   # CUDA: Llama-3-8B shapes, against tqc and bf16

Today a lone quantized layer at one token makes two launches: `fwht_kernel` rotates the input
(and zeroes the output when the matmul is split over K), then `lut_fma_kernel` multiplies. Here
each program of the lookup kernel first rotates its own K-range of the input into a scratch row
(every program over the same K-range writes the same values there: a benign race, each program
reading back only after its own writes and a barrier), then runs the same steps on it. Split
over K, nothing zeroes the output first any more: the splits add into a float32 buffer kept zero
between calls and count themselves per row block; the last one writes the output and clears
buffer and counter (a stream-K fix-up; docs/performance.md, "What would be next"). `check` compares the lab kernel with tqc's two launches under Triton's interpreter;
`time` measures the tuned configuration of each layer both ways, replayed from CUDA graphs over
enough weight copies to stream from memory, with bf16 beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "check":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch
import triton
import triton.language as tl

from tqc.kernels import triton_kernels as tk
from tqc.kernels.registry import KernelKey, LayerKernel, cdiv, pdl_launch, prepare, weight_copy
from tqc.kernels.synthetic import random_turboquant_linear
from tqc.kernels.tuning import LaunchConfig, Tuner, slot_choices, stream_copies
from tqc.layout import LayerSpec, layer_bytes
from tqc.options import QuantOption

ROTATE_BLOCK = 512  # inputs rotated per inner step of the prologue (a multiple of the group size)
LLAMA3_8B_LAYERS = {"q_proj/o_proj": (4096, 4096), "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)}


@triton.jit
def lut_fma_rotating_kernel(x_ptr, signs_ptr, scratch_ptr, partial_ptr, counter_ptr, out_ptr, codes_ptr, scales_ptr,
                            table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, N: tl.constexpr, K: tl.constexpr,
                            G: tl.constexpr,
                            B: tl.constexpr, BITS: tl.constexpr, RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                            SLOTS: tl.constexpr, ITERS: tl.constexpr, ASM: tl.constexpr, THREADS: tl.constexpr,
                            LOG_G: tl.constexpr, ROTATE: tl.constexpr, HALF_ACC: tl.constexpr = False,
                            PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False,
                            LOOKAHEAD: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """lut_fma_kernel on the unrotated input x [K]: the program's K-range rotated into scratch [K]
    first. Split over K, the splits add into partial [N] (float32, zero between calls) and count
    themselves per row block in counter; the last one writes the output and leaves zeros behind."""
    rows, row_mask = tk.block_rows(N, BLOCK_N)
    table, res_table = tk._tables(table_ptr, res_table_ptr, rows, BITS, RES_BITS)
    tk._start(codes_ptr, res_codes_ptr, rows, tl.program_id(1) * ITERS * SLOTS, K, B, BITS, RES_BITS, SLOTS * ITERS,
              PREFETCH, PDL)
    first = tl.program_id(1) * ITERS * SLOTS * B
    token = tl.arange(0, 1)
    for start in tl.static_range(0, ITERS * SLOTS * B, ROTATE):
        cols = first + start + tl.arange(0, ROTATE)
        x = tl.load(x_ptr + cols[None, :]).to(tl.float32)
        tk.store_rotated(x, signs_ptr, scratch_ptr, token, cols, (cols < K)[None, :], K, LOG_G, 1, ROTATE, B)
    tl.debug_barrier()  # this program's scratch writes are visible to all its threads
    if HALF_ACC:
        acc = tl.zeros((BLOCK_N, 2 * B), dtype=tl.float16)
    else:
        acc = tl.zeros((BLOCK_N, 2 * B), dtype=tl.float32)
    acc = tk._lut_steps(acc, scratch_ptr, codes_ptr, scales_ptr, table, res_codes_ptr, res_scales_ptr, res_table, rows,
                        rows, row_mask, K, G, B, BITS, RES_BITS, SLOTS, ITERS, ASM, False, HALF_ACC, False, LOOKAHEAD,
                        STAGES)
    sums = tl.sum(acc.to(tl.float32), axis=1)
    SPLITS: tl.constexpr = K // (SLOTS * B * ITERS)
    if SPLITS == 1:
        tk._accumulate_rows(out_ptr, rows, sums, row_mask, False, N % 2 == 0, THREADS, ASM)
    else:
        tl.atomic_add(partial_ptr + rows, sums, mask=row_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds before the count (release, as CUTLASS's semaphore)
        count = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel")
        if count == SPLITS - 1:  # the last split of this row block
            total = tl.load(partial_ptr + rows, mask=row_mask, cache_modifier=".cg")  # from L2, not a stale L1
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)
            tl.store(partial_ptr + rows, tl.zeros_like(total), mask=row_mask)
            tl.atomic_xchg(counter_ptr + tl.program_id(0), 0)


class Workspace:
    """A layer call's scratch: the rotated input [K] (fp16), and for split-K the float32 partial
    sums [N] and the counters per row block, zero between calls (the kernel leaves them so)."""

    def __init__(self, n: int, k: int, block_n: int, device):
        self.scratch = torch.empty(k, device=device, dtype=torch.float16)
        self.partial = torch.zeros(n, device=device, dtype=torch.float32)
        self.counter = torch.zeros(cdiv(n, block_n), device=device, dtype=torch.int32)


def rotating_call(kernel: LayerKernel, config: LaunchConfig, x: torch.Tensor, module, work: Workspace) -> torch.Tensor:
    """One token through the lab kernel under a one-token (fma) configuration; x is [1, K]. One launch."""
    splits, constexprs = kernel.specialise(config)
    rotate = min(ROTATE_BLOCK, config.slots * constexprs["ITERS"] * kernel.slot_width)
    if rotate % kernel.key.group_size:
        raise ValueError(f"a program's K-range of {rotate} inputs is not whole groups of {kernel.key.group_size}")
    out = torch.empty(1, kernel.key.n, device=x.device, dtype=x.dtype)
    launch = {"num_warps": config.num_warps, "num_stages": config.num_stages, **constexprs,
              "LOG_G": kernel.key.group_size.bit_length() - 1, "ROTATE": rotate, **pdl_launch(x.device)}
    lut_fma_rotating_kernel[(cdiv(kernel.key.n, config.block_n), splits)](
        x, module.signs, work.scratch, work.partial, work.counter, out, *kernel.weights(module), **launch)
    return out


def layer(option: str, n: int, k: int, group_size: int, device: str, seed: int = 0):
    spec = LayerSpec(QuantOption.parse(option), group_size, k, n)
    module = random_turboquant_linear(spec, device, seed=seed)
    prepare(module)
    return spec, module


def check() -> None:
    """The lab kernel against tqc's rotation + lookup launches, small shapes, whole-K and split."""
    for option in ("4", "3", "2", "4+2"):
        for n, k, group_size in ((24, 256, 64), (21, 512, 128)):
            spec, module = layer(option, n, k, group_size, "cpu")
            kernel = LayerKernel(KernelKey.of(spec), Tuner("none", "none", None))
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(n)).to(torch.float16)  # no bf16 here
            slots = min(slot_choices(spec.option.base_bits, spec.option.residual_bits))
            for iters in (k // (slots * kernel.slot_width), 1):  # one program over all of K; then split
                config = LaunchConfig(strategy="fma", block_n=8, num_warps=1, slots=slots, iters=iters)
                work = Workspace(n, k, config.block_n, "cpu")
                expected = kernel.run(x, module, config).float()
                rotating_call(kernel, config, x, module, work)  # a second call must find zeros left behind
                got = rotating_call(kernel, config, x, module, work).float()
                if work.partial.any() or work.counter.any():
                    raise SystemExit("the split-K fix-up left its buffers dirty")
                error = ((got - expected).norm() / expected.norm()).item()
                print(f"{option:4} {n}x{k} g{group_size} splits {kernel.splits(config)}: relative difference {error:.1e}")
                if error > 1e-2:
                    raise SystemExit("the lab kernel disagrees with tqc's launches")
    print("check passed")


def static() -> None:
    """Compile the lab kernel ahead of time for sm_90 (Triton's bundled ptxas, no GPU) at two 8B
    layers' kinds of launch, whole-K and split, and print registers, stack and SASS instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tqc.kernels.static_report import ARGUMENT_TYPES, sass_summary

    types = dict(ARGUMENT_TYPES, x_ptr="*bf16", signs_ptr="*fp32", scratch_ptr="*fp16", partial_ptr="*fp32",
                 counter_ptr="*i32")
    fn = lut_fma_rotating_kernel
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    names = list(signature)
    for option, (n, k), shape in (("4", LLAMA3_8B_LAYERS["gate_proj/up_proj"], dict(block_n=8, slots=32, iters=2)),
                                  ("3", LLAMA3_8B_LAYERS["down_proj"], dict(block_n=16, slots=32, iters=1))):
        kernel = LayerKernel(KernelKey.of(LayerSpec(QuantOption.parse(option), 128, k, n)), None)
        config = LaunchConfig(strategy="fma", accumulate="fp16", num_warps=4, **shape)
        splits, constexprs = kernel.specialise(config)
        constexprs = constexprs | {"ASM": True, "PDL": True, "LOG_G": 7,
                                   "ROTATE": min(ROTATE_BLOCK, config.slots * constexprs["ITERS"] * kernel.slot_width)}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(c),): v for c, v in constexprs.items()},
                           attrs={(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
                                  if t.startswith("*")})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        summary = sass_summary(compiled)
        print(f"{option}-bit {n}x{k}, {splits} split(s): {summary['registers']} registers, stack {summary['stack']} "
              f"bytes, {summary['instructions']} SASS instructions")


def time_layers(output: str) -> None:
    """Each Llama-3-8B layer at 4, 3 and 2 bits: bf16, tqc's two launches and the lab kernel."""
    from tqc.kernels.bench import device_info, graph_seconds

    tuner = Tuner.for_device()
    rows = []
    for name, (n, k) in LLAMA3_8B_LAYERS.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(stream_copies(n * k * 2))]
        bf16 = graph_seconds(lambda: [torch.nn.functional.linear(x, w) for w in weights]) / len(weights)
        del weights
        for option in ("4", "3", "2"):
            spec, module = layer(option, n, k, 128, "cuda")
            kernel = LayerKernel(KernelKey.of(spec), tuner)
            config = kernel.config_for(x, module)  # tqc's tuned choice (tunes if the cache has none)
            if config.strategy != "fma":
                print(f"{name} {option}: tuned strategy {config.strategy}, not the one-token kernel; skipped")
                continue
            copies = [weight_copy(module) for _ in range(stream_copies(layer_bytes(spec)))]
            work = Workspace(n, k, config.block_n, "cuda")
            tqc = graph_seconds(lambda: [kernel.run(x, c, config) for c in copies]) / len(copies)
            lab = graph_seconds(lambda: [rotating_call(kernel, config, x, c, work) for c in copies]) / len(copies)
            expected = kernel.run(x, module, config).float()
            got = rotating_call(kernel, config, x, module, work).float()
            error = ((got - expected).norm() / expected.norm()).item()
            row = {"layer": name, "n": n, "k": k, "option": option, "config": config.model_dump(),
                   "splits": kernel.splits(config), "bf16_us": bf16 * 1e6, "tqc_us": tqc * 1e6, "lab_us": lab * 1e6,
                   "tqc_speedup": bf16 / tqc, "lab_speedup": bf16 / lab, "relative_difference": error}
            rows.append(row)
            print(f"{name:18} {option}: bf16 {bf16 * 1e6:6.1f} us, tqc {tqc * 1e6:6.1f} (x{bf16 / tqc:.2f}), "
                  f"lab {lab * 1e6:6.1f} (x{bf16 / lab:.2f}), splits {row['splits']}, difference {error:.1e}")
            del copies
            torch.cuda.empty_cache()
    with open(output, "w") as handle:
        json.dump({"device": device_info(), "rows": rows}, handle, indent=1)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["check", "static", "time"])
    parser.add_argument("-o", "--output", default="rotation_in_kernel_lab.json")
    args = parser.parse_args()
    if args.mode == "time" and not torch.cuda.is_available():
        parser.error("time needs a CUDA device (check runs on the CPU)")
    {"check": check, "static": static}.get(args.mode, lambda: time_layers(args.output))()


if __name__ == "__main__":
    main()
