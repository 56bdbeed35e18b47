"""Lab: what a decode step would gain if o_proj needed no launch before its matmul (CUDA only).

    python scripts/o_proj_fold_lab.py [--repeats 2] -o fold.json

o_proj is the one projection whose input rotation runs in a launch of its own (fwht_kernel, which
also zeroes the output the split-K matmul adds into): its input comes from attention. Folding the
rotation into v_proj's weights (each head's values rotated, so attention's output arrives rotated)
removes the rotation, but the split-K matmul still needs a zeroed output. This times the mixed-plan
decoder of `tqc bench decode` on its tuned kernels, side by side in one process:

    tqc          as it runs today
    no_launch    o_proj's matmul alone, on a fixed fp16 input, adding into an output never zeroed:
                 the most a fold plus a split-K that needs no zeroed output could gain (the values
                 are wrong; only the time counts)
    memset       the same with the output zeroed by torch (a fold plus a memset launch)

and bf16 beside them, each variant twice (tqc first and last). Nothing here is a result of the model.
"""

from __future__ import annotations

import argparse

import torch

from tqc.kernels.bench import add_fragments_argument, bench_registry, compile_and_report, device_info, save
from tqc.kernels.decode_bench import (LLAMA3_8B, Decoder, bf16_factory, decoder_keys, plan_options,
                                      quantized_factory, step_seconds)


def matmul_only(layer, zero: bool):
    """A forward for o_proj that runs only its tuned matmul on a fixed fp16 input (see the docstring)."""
    kernel = layer.kernel
    config = kernel._configs[1]  # tuned by the first decode step
    x = torch.randn(1, kernel.key.k, device="cuda", dtype=torch.float16) * 0.01
    out = torch.zeros(1, kernel.key.n, device="cuda", dtype=torch.bfloat16)

    def forward(_attention: torch.Tensor) -> torch.Tensor:
        if zero:
            out.zero_()
        return kernel.multiply(x, layer, config, out)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir")
    parser.add_argument("-o", "--output", default="o_proj_fold_lab.json")
    add_fragments_argument(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    options = plan_options("mixed")
    registry, family = bench_registry("o_proj_fold_lab.py", args.cache_dir, fragments=args.fragments)
    compile_and_report(decoder_keys(options, True, LLAMA3_8B, registry), [1])
    rows: dict[str, list[float]] = {"bf16": [], "tqc": [], "no_launch": [], "memset": []}
    bf16 = Decoder(bf16_factory(), LLAMA3_8B, args.layers, args.context, compile_glue=True, rotate_in_glue=True)
    rows["bf16"].append(step_seconds(bf16) * 1e3)
    del bf16
    torch.cuda.empty_cache()
    model = Decoder(quantized_factory(options, registry), LLAMA3_8B, args.layers, args.context, compile_glue=True,
                    rotate_in_glue=True)
    rows["tqc"].append(step_seconds(model) * 1e3)
    for _ in range(args.repeats):
        for variant in ("no_launch", "memset"):
            for block in model.blocks:
                block.o_proj.forward = matmul_only(block.o_proj, zero=variant == "memset")
            rows[variant].append(step_seconds(model) * 1e3)
            for block in model.blocks:
                del block.o_proj.forward  # back to the class's forward
        rows["tqc"].append(step_seconds(model) * 1e3)
    for label, times in rows.items():
        print(f"{label:>10}: {' '.join(f'{t:.3f}' for t in times)} ms per step", flush=True)
    save({"device": device_info(), "family": family, "step_ms": rows,
          "o_proj_config": model.blocks[0].o_proj.kernel._configs[1].model_dump()}, args.output)


if __name__ == "__main__":
    main()
