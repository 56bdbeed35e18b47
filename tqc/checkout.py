"""Running from a source checkout: keep its root off sys.path.

`python -m pytest` or `python -m tqc.cli` started in the checkout's root put that root on sys.path,
where kernels/ (installed as tqc.kernels) would shadow the `kernels` package that transformers
(5.25+) imports when it loads a model. The root stays where PYTHONPATH names it (the benchmark
device imports tqc from the checkout that way, without installing it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hide_checkout_root() -> None:
    """Drop the checkout's root from sys.path unless PYTHONPATH names it."""
    named = {Path(entry).resolve() for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    if ROOT not in named:
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
