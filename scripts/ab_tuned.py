"""Time each tuned lookup kernel as cached and with one LaunchConfig field changed, side by side (CUDA only).

    python scripts/ab_tuned.py --set prefetch=true --options 4 3 2 4+2 4+4 --tokens 1 16 -o ab.json
    python scripts/ab_tuned.py --set prefetch=true --write-cache /tmp/b   # then: TQC_KERNEL_CACHE=/tmp/b tqc bench decode

The configurations come from the tuning cache ($TQC_KERNEL_CACHE): the tuned choice of every
Llama-3 layer shape, option and token bucket (tuned here first where missing). Each pair is timed
as `tqc bench layers` times a layer (CUDA graphs over enough weight copies to stream them from
memory), A and B alternating over --rounds, so that drift in clocks hits both alike.
--write-cache writes a copy of the cache with the field changed in every lookup-kernel entry, for
an end-to-end comparison (`tqc bench decode` under each cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tqc.kernels.bench import SHAPES, device_info, relative_difference, save, streamed_modules, time_layers
from tqc.kernels.registry import KernelRegistry
from tqc.kernels.tuning import LaunchConfig, Tuner, token_bucket
from tqc.layout import LayerSpec
from tqc.options import QuantOption


def parse_change(text: str) -> dict:
    """'field=value' -> {field: value}, the value read as JSON (true, 3, "fp16")."""
    name, _, value = text.partition("=")
    if name not in LaunchConfig.model_fields:
        raise SystemExit(f"--set: LaunchConfig has no field {name!r}")
    return {name: json.loads(value)}


def write_changed_cache(tuner: Tuner, change: dict, directory: Path) -> None:
    changed = tuner.data.model_copy(deep=True)
    for entry in changed.entries.values():
        if entry.config.strategy != "dequant":
            entry.config = entry.config.model_copy(update=change)
    path = directory / tuner.path.name
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(changed.model_dump_json(indent=1) + "\n")
    print(f"wrote {path}")


def compare(args: argparse.Namespace, registry: KernelRegistry, change: dict) -> list[dict]:
    rows = []
    for model in args.models:
        for layer, (n, k) in SHAPES[model].items():
            if args.layers and layer not in args.layers:
                continue
            for option in args.options:
                spec = LayerSpec(QuantOption.parse(option), args.group_size, k, n)
                modules = streamed_modules(spec)
                kernel = registry.kernel_for(spec)
                for tokens in args.tokens:
                    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
                    kernel(x, modules[0])  # tuned here if the cache lacks it
                    a = kernel.tuned(tokens)
                    if a.strategy == "dequant":
                        continue
                    b = a.model_copy(update=change)
                    times = {"a": [], "b": []}
                    for _ in range(args.rounds):
                        for name, config in (("a", a), ("b", b)):
                            layers = [lambda x, m=m, c=config: kernel.run(x, m, c) for m in modules]
                            times[name].append(time_layers(layers, x) * 1e6)
                    a_us, b_us = statistics.median(times["a"]), statistics.median(times["b"])
                    difference = relative_difference(kernel.run(x, modules[0], a), kernel.run(x, modules[0], b))
                    rows.append({"model": model, "layer": layer, "option": option, "tokens": tokens,
                                 "bucket": token_bucket(tokens), "config": a.model_dump(), "a_us": a_us, "b_us": b_us,
                                 "a_rounds": times["a"], "b_rounds": times["b"], "relative_difference": difference})
                    print(f"{model:<10} {layer:<17} {option:>4} M={tokens:<3} {a_us:7.2f} -> {b_us:7.2f} us "
                          f"({(a_us / b_us - 1) * 100:+5.1f}%), outputs differ by {difference:.1e}", flush=True)
                del modules
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="change", required=True, type=parse_change, help="field=value (JSON value)")
    parser.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    parser.add_argument("--layers", nargs="+", help="only these layer names (e.g. q_proj/o_proj); default all")
    parser.add_argument("--options", nargs="+", default=["4", "3", "2", "4+2", "4+4"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-cache", type=Path, help="also write the changed cache into this directory")
    parser.add_argument("-o", "--output", default="ab-tuned.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    tuner = Tuner.for_device()
    rows = compare(args, KernelRegistry(tuner), args.change)
    if args.write_cache:
        write_changed_cache(tuner, args.change, args.write_cache)
    save({"device": device_info(), "change": args.change, "rows": rows}, args.output)


if __name__ == "__main__":
    main()
