"""Each timed tensor-core candidate of a tuning log beside its static sm_90 resources (no GPU).

    python scripts/static_vs_tuning.py docs/bench/h200-run95-llama-16-tuning.log b4r0g128n14336k4096 [--bucket 16]

Reads the candidates' times that `tqc bench layers -v` printed for one kernel key and token
bucket, compiles each configuration here for sm_90 (kernels/static_report.py), and prints them
fastest first with registers, spills, warps an SM can hold by registers alone, and SASS
instructions a weight: whether a kernel's time follows its instruction count or its occupancy.
"""

from __future__ import annotations

import argparse
import re

from tqc.kernels.registry import KernelKey
from tqc.kernels.static_report import compile_for_hopper, sass_summary, step_estimate
from tqc.kernels.tuning import LaunchConfig, read_verbose_log

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def timed_candidates(log: str, entry: str) -> list[tuple[float, LaunchConfig]]:
    """(microseconds, configuration) of every candidate timed for ENTRY in a verbose log, fastest first."""
    runs = read_verbose_log(log)
    if entry not in runs:
        raise SystemExit(f"{log} has no tuning of {entry}")
    return sorted(runs[entry], key=lambda run: run[0])


def warps_per_sm(registers: int, num_warps: int) -> int:
    """Warps an SM holds by registers alone (allocated 8 at a time per thread)."""
    per_program = -(-registers // 8) * 8 * 32 * num_warps
    return min(REGISTERS_PER_SM // per_program, MAX_WARPS_PER_SM // num_warps) * num_warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="stderr of `tqc bench layers -v`")
    parser.add_argument("key", help="a kernel key, e.g. b4r0g128n14336k4096")
    parser.add_argument("--bucket", type=int, default=16)
    args = parser.parse_args()
    bits, residual, group, n, k = map(int, re.fullmatch(r"b(\d)r(\d)g(\d+)n(\d+)k(\d+)", args.key).groups())
    key = KernelKey(bits, residual, group, n, k)
    for microseconds, config in timed_candidates(args.log, f"{args.key}/m{args.bucket}"):
        if config.strategy != "dot":
            continue
        summary = sass_summary(compile_for_hopper(key, config))
        per_weight = step_estimate(key, config, summary, 1.0)["instructions_per_weight"]
        flags = " ".join(name for name in ("weights_left", "scale_first", "prefetch", "lookahead") if getattr(config, name))
        flags += f" dot_pairs={config.dot_pairs}" if config.dot_pairs > 1 else ""
        print(f"{microseconds:6.1f} us  registers {summary['registers']:3d}  stack {summary['stack']:3d}  "
              f"warps/SM {warps_per_sm(summary['registers'], config.num_warps):2d}  {per_weight:4.2f} instr/weight  "
              f"rows {config.block_n} warps {config.num_warps} slots {config.slots}x{config.iters} "
              f"stages {config.num_stages} {flags}", flush=True)


if __name__ == "__main__":
    main()
