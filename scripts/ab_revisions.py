"""Time the working tree against an earlier revision side by side, on the device, in alternating runs.

    python scripts/ab_revisions.py pack c608dfd                 # here: .whl/before.tar (git archive)
    python3 scripts/ab_revisions.py run --rounds 2 -- layers --models llama3-8b --options 4 --tokens 1
    python3 scripts/ab_revisions.py run --rounds 3 -- decode --plan mixed

`run` goes on the device after `source scripts/device_setup.sh` (carry .whl): it unpacks the
earlier revision into /tmp/before and runs `tqc bench ARGS` in each tree in turn, ROUNDS times,
with the one tuning cache of $TQC_KERNEL_CACHE (so both run the same launch configurations where
their tuning formats agree), saves every JSON under $OUT/ab/ and prints the medians side by side.
Clock drift between runs hits both trees alike; a gain is only a gain when it holds in every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".whl" / "before.tar"
BEFORE = Path("/tmp/before")


def pack(revision: str) -> None:
    ARCHIVE.parent.mkdir(exist_ok=True)
    subprocess.run(["git", "archive", "-o", str(ARCHIVE), revision], cwd=REPO, check=True)
    print(f"wrote {ARCHIVE} ({revision})")


def unpack() -> None:
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(BEFORE, filter="data")
    for package in ("kernels", "calibration"):  # as device_setup.sh maps them for the working tree
        link = BEFORE / "tqc" / package
        if not link.exists():
            link.symlink_to(Path("..") / package)


def bench(tree: Path, args: list[str], output: Path) -> dict:
    path = os.pathsep.join(p for p in (*os.environ.get("PYTHONPATH", "").split(os.pathsep), str(tree))
                           if p and Path(p).resolve() not in (REPO, BEFORE))
    env = os.environ | {"PYTHONPATH": f"{tree}{os.pathsep}{path}"}
    subprocess.run([sys.executable, "-m", "tqc.cli", "bench", *args, "-o", str(output)], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(output.read_text())


def timings(result: dict) -> dict[str, float]:
    """'what' -> microseconds (layers) or ms per step (decode) of one bench JSON."""
    if "rows" in result:
        return {f"{r.get('model', '')} {r.get('layer', '')} {r['option']} M={r['tokens']}": r["us"]
                for r in result["rows"] if r["option"] != "rotate"}
    return {"decode bf16 ms": result["bf16"]["step_ms"], "decode tqc ms": result["tqc"]["step_ms"]}


def run(rounds: int, args: list[str]) -> None:
    unpack()
    out = Path(os.environ.get("OUT", "/tmp/out")) / "ab"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for round_ in range(rounds):
        for name, tree in (("before", BEFORE), ("after", REPO)):
            for what, value in timings(bench(tree, args, out / f"{name}-{round_}.json")).items():
                times[name].setdefault(what, []).append(value)
    print(f"{'':<48} {'before':>9} {'after':>9}  change (every round)")
    for what, before in times["before"].items():
        after = times["after"].get(what)
        if after:
            b, a = statistics.median(before), statistics.median(after)
            rounds_text = " ".join(f"{(x / y - 1) * 100:+.1f}" for x, y in zip(before, after))
            print(f"{what:<48} {b:9.2f} {a:9.2f}  {(b / a - 1) * 100:+5.1f}% ({rounds_text})")
    (out / "summary.json").write_text(json.dumps(times, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pack").add_argument("revision")
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--rounds", type=int, default=2)
    run_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then `tqc bench` arguments")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.revision)
    else:
        run(args.rounds, [a for a in args.bench_args if a != "--"])


if __name__ == "__main__":
    main()
