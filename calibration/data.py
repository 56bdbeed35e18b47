"""Calibration samples: seeded windows of token ids cut from a training text (never the test file).

Measurements and plans name the text by a reference that does not depend on where the checkout lies
(its file name when it is in the repository's ../shared/data, else its path relative to the current
directory) plus its sha256; `find_data` turns the reference back into a file whose sha256 matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tqc.plan import PlanError

from .measurement import DataRef

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "wiki.train.txt"
DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 128


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def candidates(ref: str | Path) -> list[Path]:
    """Where a reference may lie: as written (relative to the current directory), then in ../shared/data."""
    ref = Path(ref)
    found = [ref, SHARED_DATA / ref, SHARED_DATA / ref.name]
    return [path for i, path in enumerate(found) if path.is_file() and path not in found[:i]]


def find_data(ref: str | Path, sha256: str | None = None) -> Path:
    """The file a reference names (the first candidate with this sha256, when one is given)."""
    for path in candidates(ref):
        if sha256 is None or file_sha256(path) == sha256:
            return path
    wanted = f" with sha256 {sha256[:12]}..." if sha256 else ""
    raise PlanError(f"{ref}: no such calibration file{wanted} (looked in {Path.cwd()} and {SHARED_DATA})")


def stable_ref(path: Path, sha256: str) -> str:
    """The reference a plan records: the file name when ../shared/data holds this file, else the path."""
    shared = SHARED_DATA / path.name
    if shared.is_file() and (shared.resolve() == path.resolve() or file_sha256(shared) == sha256):
        return path.name
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved.is_relative_to(here):
        return resolved.relative_to(here).as_posix()
    return str(path)  # outside both: only an absolute path finds it again


def data_ref(path: str | Path, samples: int, seq_len: int, seed: int) -> DataRef:
    """Check the calibration settings; `path` is a file or a recorded reference (e.g. "wiki.train.txt")."""
    path = find_data(path)
    if "test" in path.name:
        raise PlanError(f"{path}: calibrating on an evaluation file is refused (use wiki.train.txt)")
    if samples < 1 or seq_len < 2:
        raise PlanError(f"calibration needs samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    sha256 = file_sha256(path)
    return DataRef(path=stable_ref(path, sha256), sha256=sha256, samples=samples, seq_len=seq_len, seed=seed)


def sample_windows(tokenizer, data: DataRef, offset_seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token ids: windows at seeded random, non-overlapping starts.

    `offset_seed` draws a different set from the same file (held-out samples for validation).
    """
    path = find_data(data.path, data.sha256)
    text = "\n".join(line.strip() for line in path.read_text().splitlines() if line.strip())
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    slots = ids.numel() // data.seq_len
    if slots < data.samples:
        raise PlanError(f"{data.path}: {ids.numel()} tokens make {slots} windows of {data.seq_len}, {data.samples} asked")
    generator = torch.Generator().manual_seed(data.seed * 1_000_003 + offset_seed)
    starts = torch.randperm(slots, generator=generator)[: data.samples].sort().values * data.seq_len
    return torch.stack([ids[s : s + data.seq_len] for s in starts.tolist()])
