"""GPU kernel time per step of a replayed step (a CUDA graph), by kernel name and grid (CUDA only).

scripts/profile_decode.py profiles the benchmark decoder's step with it, scripts/check_hf_decode.py
`--kernel-profile` a loaded model's compiled step. Under programmatic dependent launch a kernel
starts before its predecessor ends, so kernel times overlap: their sum can exceed the step.
"""

from __future__ import annotations

import collections
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def replay_kernel_table(replay: Callable[[], object], steps: int) -> dict[str, dict[str, float]]:
    """{kernel name and grid: {launches, us}} per call of `replay`, most time first."""
    replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as scratch:  # the trace has each launch's grid, events() does not
        profiler.export_chrome_trace(f"{scratch}/trace.json")
        trace = json.loads(Path(f"{scratch}/trace.json").read_text())
    table: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"launches": 0.0, "us": 0.0})
    for event in trace["traceEvents"]:
        if event.get("cat") == "kernel":
            entry = table[f"{event['name'][:70]} grid {event['args'].get('grid')}"]
            entry["launches"] += 1 / steps
            entry["us"] += event["dur"] / steps
    return dict(sorted(table.items(), key=lambda item: -item[1]["us"]))


def print_kernel_table(label: str, table: dict[str, dict[str, float]], rows: int = 20) -> None:
    """The launches and kernel time per step, then the `rows` kernels that take the most."""
    print(f"{label}: {sum(e['launches'] for e in table.values()):.0f} launches, "
          f"{sum(e['us'] for e in table.values()) / 1e3:.2f} ms of kernel time per step")
    for name, entry in list(table.items())[:rows]:
        print(f"  {entry['launches']:6.0f} x {entry['us'] / max(entry['launches'], 1):7.2f} us = "
              f"{entry['us'] / 1e3:6.3f} ms  {name}")
