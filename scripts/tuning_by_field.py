"""Per tuned key of a verbose tuning log, the fastest candidate under each value of one LaunchConfig field (no GPU).

    python scripts/tuning_by_field.py docs/bench/h200-run104-llama-16-tuning.log dot_pairs
    python scripts/tuning_by_field.py docs/bench/h200-run96-qwen-16-tuning.log scale_first

Reads what `tqc bench layers -v` printed (kernels/tuning.read_verbose_log) and prints, for every
key and token bucket, the best time among the candidates with each value of FIELD and the value
the tuner chose: where a knob pays, by how much, from the tuner's own side-by-side timings.
"""

from __future__ import annotations

import argparse

from tqc.kernels.tuning import LaunchConfig, read_verbose_log


def best_by_value(candidates: list[tuple[float, LaunchConfig]], field: str) -> dict:
    """{value: fastest microseconds among the candidates with that value of field}."""
    best: dict = {}
    for microseconds, config in candidates:
        value = getattr(config, field)
        best[value] = min(best.get(value, microseconds), microseconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="stderr of `tqc bench layers -v`")
    parser.add_argument("field", choices=sorted(LaunchConfig.model_fields))
    args = parser.parse_args()
    runs = read_verbose_log(args.log)
    if not runs:
        raise SystemExit(f"{args.log}: no tuning found (was it written by a verbose Tuner?)")
    chosen_counts: dict = {}
    for entry, candidates in runs.items():
        best = best_by_value(candidates, args.field)
        chosen = getattr(min(candidates, key=lambda run: run[0])[1], args.field)
        chosen_counts[chosen] = chosen_counts.get(chosen, 0) + 1
        times = "  ".join(f"{args.field}={value}: {us:6.1f} us" for value, us in sorted(best.items(), key=str))
        print(f"{entry:30s} {times}  chose {chosen}")
    print("chosen: " + ", ".join(f"{value} on {count} of {len(runs)}" for value, count in chosen_counts.items()))


if __name__ == "__main__":
    main()
