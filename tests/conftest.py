"""Shared fixtures: the real data files and small real models."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def train_text() -> Path:
    path = DATA / "wiki.train.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: CI expects ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def test_text() -> Path:
    path = DATA / "wiki.test.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: CI expects ../shared beside the checkout")
    return path
