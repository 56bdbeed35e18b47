"""Time every tensor-core candidate of a layer under each value of one LaunchConfig field, side by side (CUDA only).

    python scripts/candidate_sweep.py --vary max_registers=null,128 --layers gate_proj/up_proj --options 4 3
    python scripts/candidate_sweep.py --vary dot_pairs=1,2,4 --where scale_first=true --options 4 3 4+4

Every dot candidate the tuner would time for the token count (only those matching --where) runs
under each value, once, as `tqc bench layers` times a layer; then the fastest under each value
are timed again, alternating over --rounds, with the bf16 layer beside them. A field the tuner
does not offer yet (a new knob) is measured this way before it becomes a candidate.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from tqc.kernels.bench import SHAPES, device_info, relative_difference, save, streamed_modules, time_layers
from tqc.kernels.registry import KernelRegistry
from tqc.kernels.tuning import Tuner, stream_copies, token_bucket
from tqc.layout import LayerSpec
from tqc.options import QuantOption


def field_values(text: str) -> tuple[str, list]:
    """'field=v1,v2' -> (field, [v1, v2]), each value read as JSON (null, 128, true)."""
    name, _, values = text.partition("=")
    return name, [json.loads(v) for v in values.split(",")]


def sweep(kernel, modules, x: torch.Tensor, field: str, values: list, where: dict) -> list[dict]:
    """One timing of every matching dot candidate under every value; one that fails to compile is skipped."""
    rows = []
    for config in kernel.candidates(token_bucket(x.shape[0])):
        if config.strategy != "dot" or any(getattr(config, k) != v for k, v in where.items()):
            continue
        try:
            reference = kernel.run(x, modules[0], config)
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: the tuner skips it too
            print(f"  {config}: {type(error).__name__}: {str(error)[:120]}")
            continue
        for value in values:
            varied = config.model_copy(update={field: value})
            layers = [lambda x, m=m, c=varied: kernel.run(x, m, c) for m in modules]
            try:
                difference = relative_difference(reference, kernel.run(x, modules[0], varied))
                us = time_layers(layers, x) * 1e6
            except Exception as error:  # noqa: BLE001 - a lab: report and go on
                print(f"  {varied}: {type(error).__name__}: {str(error)[:120]}")
                continue
            rows.append({"config": varied, "us": us, "relative_difference": difference})
            print(f"  {us:7.2f} us  differs by {difference:.1e}  {varied}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=list(SHAPES))
    parser.add_argument("--layers", nargs="+", default=["gate_proj/up_proj"])
    parser.add_argument("--options", nargs="+", default=["4"])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--vary", required=True, type=field_values, help="field=v1,v2,... (JSON values)")
    parser.add_argument("--where", nargs="*", type=field_values, default=[], help="field=value: only such candidates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-o", "--output", default="candidate-sweep.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    registry = KernelRegistry(Tuner.for_device())
    field, values = args.vary
    where = {name: choices[0] for name, choices in args.where}
    results = []
    for layer in args.layers:
        n, k = SHAPES[args.model][layer]
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(stream_copies(n * k * 2))]
        bf16 = [lambda x, w=w: F.linear(x, w) for w in weights]
        for option in args.options:
            spec = LayerSpec(QuantOption.parse(option), 128, k, n)
            modules = streamed_modules(spec)
            kernel = registry.kernel_for(spec)
            rows = sweep(kernel, modules, x, field, values, where)
            best = {value: min((r for r in rows if getattr(r["config"], field) == value), key=lambda r: r["us"])
                    for value in values}
            finals = {value: [] for value in values} | {"bf16": []}
            for _ in range(args.rounds):
                finals["bf16"].append(time_layers(bf16, x) * 1e6)
                for value, row in best.items():
                    layers = [lambda x, m=m, c=row["config"]: kernel.run(x, m, c) for m in modules]
                    finals[value].append(time_layers(layers, x) * 1e6)
            bf16_us = statistics.median(finals["bf16"])
            print(f"{layer} {option}-bit M={args.tokens}: bf16 {bf16_us:.2f} us")
            for value in values:
                us = statistics.median(finals[value])
                print(f"  {field}={value}: {us:7.2f} us  x{bf16_us / us:.2f}  {best[value]['config']}", flush=True)
            results.append({"layer": layer, "n": n, "k": k, "option": option, "tokens": args.tokens, "bf16_us": bf16_us,
                            "best": {str(value): {"us": statistics.median(finals[value]), "rounds": finals[value],
                                                "config": best[value]["config"].model_dump()} for value in values},
                            "sweep": [r | {"config": r["config"].model_dump()} for r in rows]})
            del modules
            torch.cuda.empty_cache()
        del weights
    save({"device": device_info(), "model": args.model, "vary": field, "where": where, "results": results}, args.output)


if __name__ == "__main__":
    main()
