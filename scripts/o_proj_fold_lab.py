"""Lab: what a decode step would gain if o_proj needed no launch before its matmul (CUDA only).

    python scripts/o_proj_fold_lab.py [--repeats 2] -o fold.json

o_proj is the one projection whose input comes from attention, so its rotation could not run
inside the step that makes its input (kernels/glue.py). `tqc build --fold` folds the rotation into
v_proj's weights (tqc.folding), and `tqc bench decode --fold` runs o_proj so, yet a launch remains before
its matmul: it converts attention's bf16 output to fp16 and zeroes the output the split-K kernel
adds into. This times the mixed-plan decoder of `tqc bench decode` on its tuned kernels, side by
side in one process:

    tqc          folded (`tqc bench decode --fold`)
    unfolded     o_proj rotating its input at run time (`tqc bench decode`), another decoder
    direct       TQC_DIRECT_INPUTS (registry.DIRECT_INPUTS): o_proj's output zeroed by the q/k/v norm's
                 launch, attention's bf16 output read by o_proj's kernel as it comes, no launch between
    no_launch    o_proj's matmul alone, on a fixed fp16 input, adding into an output never zeroed:
                 the most a kernel that reads bf16 and splits K without a zeroed output could gain
                 (the values are wrong; only the time counts)
    memset       the same with the output zeroed by torch (a memset launch in place of the conversion)

and bf16 beside them, each variant twice (tqc first and last). Nothing here is a result of the model.
"""

from __future__ import annotations

import argparse

import torch

from tqc.kernels import registry as registry_module
from tqc.kernels.bench import add_decoder_lab_arguments, bench_registry, compile_and_report, device_info, save
from tqc.kernels.decode_bench import (LLAMA3_8B, Decoder, bf16_factory, decoder_keys, plan_options,
                                      quantized_factory, step_seconds)


def matmul_only(layer, zero: bool):
    """A forward for o_proj that runs only its tuned matmul on a fixed fp16 input (see the docstring)."""
    kernel = layer.kernel
    config = kernel.tuned(1)  # by the first decode step
    x = torch.randn(1, kernel.key.k, device="cuda", dtype=torch.float16) * 0.01
    out = torch.zeros(1, kernel.key.n, device="cuda", dtype=torch.bfloat16)

    def forward(_attention: torch.Tensor) -> torch.Tensor:
        if zero:
            out.zero_()
        return kernel.multiply(x, layer, config, out)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-o", "--output", default="o_proj_fold_lab.json")
    add_decoder_lab_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    options = plan_options("mixed")
    registry, family = bench_registry("o_proj_fold_lab.py", args.cache_dir, fragments=args.fragments)
    compile_and_report(decoder_keys(options, True, LLAMA3_8B, registry), [1])
    rows: dict[str, list[float]] = {"bf16": [], "unfolded": [], "tqc": [], "direct": [], "no_launch": [], "memset": []}
    for label, linear in (("bf16", bf16_factory()), ("unfolded", quantized_factory(options, registry, fold=False))):
        other = Decoder(linear, LLAMA3_8B, args.layers, args.context, compile_glue=True, rotate_in_glue=True)
        rows[label].append(step_seconds(other) * 1e3)
        del other
        torch.cuda.empty_cache()
    model = Decoder(quantized_factory(options, registry, fold=True), LLAMA3_8B, args.layers, args.context, compile_glue=True,
                    rotate_in_glue=True)
    rows["tqc"].append(step_seconds(model) * 1e3)
    for _ in range(args.repeats):
        registry_module.DIRECT_INPUTS = True
        rows["direct"].append(step_seconds(model) * 1e3)
        registry_module.DIRECT_INPUTS = False
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
          "o_proj_config": model.blocks[0].o_proj.kernel.tuned(1).model_dump()}, args.output)


if __name__ == "__main__":
    main()
