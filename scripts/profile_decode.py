"""Where a decode step's time goes: kernel launches and kernel time per step, bf16 and tqc (CUDA only).

    python scripts/profile_decode.py [--model qwen2.5-7b] [--plan mixed] [--activations int8 [--int8-layers ...]]
                                     [--attention sdpa] [--steps 20] [--lookups | --fragments [all]] [-o profile.json]

Builds the decoders of `tqc bench decode` (kernels/decode_bench.py), on the kernels it runs (the
fragment family where the GPU can run it; --lookups: the lookup kernels) and attention (the one
launch; --attention sdpa: torch's), with the tuning cache
($TQC_KERNEL_CACHE or --cache-dir), captures one step in a CUDA graph, replays it under
torch.profiler and sums the GPU kernels by name and grid (a layer's shape; kernels/profiling.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tqc.kernels.bench import DECODER_SHAPES, add_fragments_argument, bench_registry
from tqc.kernels.decode_bench import Decoder, bf16_factory, plan_options, quantized_factory
from tqc.kernels.profiling import print_kernel_table, replay_kernel_table


def kernel_table(model: Decoder, steps: int) -> dict[str, dict[str, float]]:
    """{kernel name: {launches, us}} per step of a graph-captured decode step."""
    token, pos = torch.ones(1, dtype=torch.long, device="cuda"), torch.full((1,), 7, device="cuda")
    with torch.no_grad():
        for _ in range(2):  # tune, then compile what runs once the layers are tuned
            model(token, pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(token, pos)
    return replay_kernel_table(graph.replay, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(DECODER_SHAPES), default="llama3-8b", help="the decoder's shapes")
    parser.add_argument("--plan", default="mixed", help="'mixed' or one option for every layer")
    parser.add_argument("--activations", choices=["fp16", "int8"], default="fp16")
    parser.add_argument("--int8-layers", nargs="+", metavar="NAME", help="with --activations int8: only these")
    parser.add_argument("--attention", choices=["triton", "sdpa"], default="triton", help="a decode step's (Decoder)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("-o", "--output", default="profile-decode.json")
    add_fragments_argument(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    options = plan_options(args.plan, args.activations, args.int8_layers)
    registry, family = bench_registry("profile_decode.py", args.cache_dir, fragments=args.fragments)
    shape, layers = DECODER_SHAPES[args.model]
    results = {"model": args.model, "plan": options, "steps": args.steps, "fragments": family,
               "attention": args.attention, "gpu": torch.cuda.get_device_name()}
    for label, linear in (("bf16", bf16_factory()), ("tqc", quantized_factory(options, registry))):
        model = Decoder(linear, shape, layers, 1024, compile_glue=True, rotate_in_glue=True, attention=args.attention)
        results[label] = kernel_table(model, args.steps)
        print_kernel_table(label, results[label])
        del model
        torch.cuda.empty_cache()
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
