"""A layer's time as a fixed part plus its bytes streamed, from `tqc bench layers` runs at two sizes.

    python scripts/fixed_time.py docs/bench/h100-run126-layers-family.json docs/bench/h100-run128-layers70b-family.json

For each (layer, option, tokens) found in both runs, a line through the two points (weight bytes,
microseconds) gives the rate it streams at and the time it takes whatever its size: the rotation,
the launch, the program's start and tail. With bf16 in both runs it also says what fixed time the
first run's shape allows for the issue's targets (plot_performance's TARGETS),
at the rate measured. Prints a table and writes JSON (-o).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plot_performance import TARGETS

from tqc.plan import write_text_atomic


def fit(small: dict, large: dict) -> tuple[float, float]:
    """(fixed microseconds, GB/s streamed) of the line through two rows' (weight_bytes, us)."""
    us_per_byte = (large["us"] - small["us"]) / (large["weight_bytes"] - small["weight_bytes"])
    return small["us"] - us_per_byte * small["weight_bytes"], 1e-3 / us_per_byte


def fixed_times(small_rows: list[dict], large_rows: list[dict]) -> list[dict]:
    """One entry per (layer, option, tokens) in both runs: its fit, and at the small shape the fixed
    time its target allows (None without a target or a bf16 row)."""
    large = {(row["layer"], row["option"], row["tokens"]): row for row in large_rows}
    bf16 = {(row["layer"], row["tokens"]): row["us"] for row in small_rows if row["option"] == "bf16"}
    entries = []
    for row in small_rows:
        other = large.get((row["layer"], row["option"], row["tokens"]))
        if other is None or row["option"] == "rotate" or other["weight_bytes"] == row["weight_bytes"]:
            continue
        fixed_us, gbps = fit(row, other)
        target = TARGETS.get(row["tokens"], {}).get(row["option"])
        baseline = bf16.get((row["layer"], row["tokens"]))
        allowed = None
        if target and baseline:  # the target's time, less the bytes at the measured rate
            allowed = baseline / target - row["weight_bytes"] / gbps / 1e3
        entries.append({"layer": row["layer"], "option": row["option"], "tokens": row["tokens"],
                        "small_us": row["us"], "large_us": other["us"], "fixed_us": fixed_us, "gbps": gbps,
                        "target": target, "fixed_us_allowed": allowed})
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("small", type=Path, help="`tqc bench layers` JSON at the smaller shapes (e.g. 8B)")
    parser.add_argument("large", type=Path, help="the same layers and options at larger shapes (e.g. 70B)")
    parser.add_argument("-o", "--output", type=Path, help="write the entries as JSON")
    args = parser.parse_args()
    entries = fixed_times(*(json.loads(path.read_text())["rows"] for path in (args.small, args.large)))
    print(f"{'layer':18} {'option':6} {'tokens':>6} {'small us':>9} {'large us':>9} {'fixed us':>9} {'GB/s':>6}"
          f"  target: fixed us allowed")
    for e in entries:
        allowed = f"  x{e['target']}: {e['fixed_us_allowed']:.1f}" if e["fixed_us_allowed"] is not None else ""
        print(f"{e['layer']:18} {e['option']:6} {e['tokens']:6} {e['small_us']:9.1f} {e['large_us']:9.1f} "
              f"{e['fixed_us']:9.2f} {e['gbps']:6.0f}{allowed}")
    if args.output:
        write_text_atomic(args.output, json.dumps(entries, indent=1) + "\n")


if __name__ == "__main__":
    main()
