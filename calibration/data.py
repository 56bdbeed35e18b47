"""Calibration samples: seeded windows of token ids cut from a training text (never the test file)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tqc.plan import PlanError

from .measurement import DataRef

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki.train.txt"
DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 128


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_ref(path: str | Path, samples: int, seq_len: int, seed: int) -> DataRef:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such calibration file")
    if "test" in path.name:
        raise PlanError(f"{path}: calibrating on an evaluation file is refused (use wiki.train.txt)")
    if samples < 1 or seq_len < 2:
        raise PlanError(f"calibration needs samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    return DataRef(path=str(path.resolve()), sha256=file_sha256(path), samples=samples, seq_len=seq_len, seed=seed)


def sample_windows(tokenizer, data: DataRef, offset_seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token ids: windows at seeded random, non-overlapping starts.

    `offset_seed` draws a different set from the same file (held-out samples for validation).
    """
    text = "\n".join(line.strip() for line in Path(data.path).read_text().splitlines() if line.strip())
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    slots = ids.numel() // data.seq_len
    if slots < data.samples:
        raise PlanError(f"{data.path}: {ids.numel()} tokens make {slots} windows of {data.seq_len}, {data.samples} asked")
    generator = torch.Generator().manual_seed(data.seed * 1_000_003 + offset_seed)
    starts = torch.randperm(slots, generator=generator)[: data.samples].sort().values * data.seq_len
    return torch.stack([ids[s : s + data.seq_len] for s in starts.tolist()])
