"""A tuned one-token kernel's time against how widely its weights are spread (CUDA only; run 67).

    python3 scripts/check_footprint.py [--options 3@int8 3 ...] [--layers 32] [-o footprint.json]

Builds the 8B-shaped decoder's fused gate/up layer (kernels/decode_bench.py) `--layers` times
and times the tuned launch over one layer, 5 copies of it (about what the tuner streams), 5 layers
and all of them: the decoder reads its layers' weights from a footprint of gigabytes, the tuner
from STREAM_BYTES (TQC_STREAM_BYTES).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from tqc.kernels.decode_bench import LLAMA3_8B, plan_options, quantized_factory
from tqc.kernels.registry import KernelRegistry, weight_copy
from tqc.kernels.tuning import Tuner


def footprint_times(option: str, count: int, registry: KernelRegistry) -> dict:
    """Microseconds a launch of the fused gate/up at `option`, over 1 layer, 5 copies, 5 and `count` layers."""
    hidden, intermediate = LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"]
    linear = quantized_factory(dict(plan_options("mixed"), gate_proj=option, up_proj=option), registry)
    layers = [linear(("gate_proj", "up_proj"), (intermediate, intermediate), hidden) for _ in range(count)]
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    kernel = layers[0].kernel
    with torch.no_grad():
        layers[0](x)  # tuned here if the cache has no entry
    config = kernel.tuned(1)

    def per_launch(modules: list) -> float:
        return do_bench_cudagraph(lambda: [kernel.run(x, m, config) for m in modules], rep=200,
                                  return_mode="median") * 1e3 / len(modules)

    copies = [weight_copy(layers[0]) for _ in range(5)]
    return {"config": config.model_dump(), "one_layer": per_launch(layers[:1]), "five_copies": per_launch(copies),
            "five_layers": per_launch(layers[:5]), f"{count}_layers": per_launch(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=["3@int8", "3", "2@int8", "4@int8", "4"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("-o", "--output", default="footprint.json")
    args = parser.parse_args()
    registry = KernelRegistry(Tuner.for_device())
    results = {}
    for option in args.options:
        results[option] = row = footprint_times(option, args.layers, registry)
        print(option, {key: round(value, 2) for key, value in row.items() if key != "config"}, flush=True)
        torch.cuda.empty_cache()
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
