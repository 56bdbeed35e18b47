"""Time the benchmark decoder with one tuned kernel's steps a program changed, side by side (CUDA only).

    python scripts/decode_config_sweep.py --cache $TQC_KERNEL_CACHE --out sweep.json \
        --variants b3r0g128n28672k4096fr/m1:iters=4 b4r0g128n4096k14336fr/m1:iters=14

The tuner picks each key's configuration by timing that kernel alone. This runs `tqc bench decode
--plan mixed --tokens 1` once on the tuned cache, then once a variant (a copy of the cache with one
entry's field changed), then on the tuned cache again, and saves every step time: whether a choice
made alone is also the best inside a decode step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqc.kernels.bench import save


def with_override(cache_dir: Path, variant: str, directory: Path) -> Path:
    """A copy of the cache's files in `directory` with `variant` (KEY:FIELD=VALUE, VALUE as JSON or a
    bare string) applied; a key no file holds, a field its config lacks or a value of another type
    is an error, not a run that changes nothing."""
    key, _, change = variant.rpartition(":")
    field, _, text = change.partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    directory.mkdir(parents=True)
    found = False
    for path in cache_dir.glob("*.json"):
        cache = json.loads(path.read_text())
        if key in cache["entries"]:
            config = cache["entries"][key]["config"]
            if field not in config or type(config[field]) is not type(value):
                raise SystemExit(f"{variant}: {key}'s config has no {type(value).__name__} field {field!r}")
            config[field], found = value, True
        (directory / path.name).write_text(json.dumps(cache))
    if not found:
        raise SystemExit(f"{variant}: no tuned key {key!r} in {cache_dir}")
    return directory


def decode_step_ms(cache_dir: Path, out: Path) -> dict:
    """The decoders' step times and their ratio, run with the tuning cache in `cache_dir`."""
    command = [sys.executable, "-m", "tqc.cli", "bench", "decode", "--plan", "mixed", "--tokens", "1", "-o", str(out)]
    subprocess.run(command, check=True, env={**os.environ, "TQC_KERNEL_CACHE": str(cache_dir)})
    result = json.loads(out.read_text())
    return {"tqc_ms": result["tqc"]["step_ms"], "bf16_ms": result["bf16"]["step_ms"], "speedup": result["speedup"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="the tuned cache directory")
    parser.add_argument("--variants", nargs="+", required=True, help="KEY:FIELD=VALUE, e.g. b4r0g128n4096k4096fr/m1:iters=8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = ["tuned"] + args.variants + ["tuned"]
        for i, variant in enumerate(runs):
            cache = args.cache if variant == "tuned" else with_override(args.cache, variant, Path(scratch) / str(i))
            row = {"variant": variant} | decode_step_ms(cache, Path(scratch) / f"{i}.json")
            print(json.dumps(row), flush=True)
            rows.append(row)
    save({"rows": rows}, str(args.out))


if __name__ == "__main__":
    main()
