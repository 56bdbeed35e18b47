"""Shared fixtures: the real data files and small real models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tqc.checkout import hide_checkout_root

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

hide_checkout_root()  # kernels/ would shadow the `kernels` package transformers imports (tqc.checkout)


def _data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: CI expects ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def train_text() -> Path:
    return _data_file("wiki.train.txt")


@pytest.fixture(scope="session")
def test_text() -> Path:
    return _data_file("wiki.test.txt")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer saved once, for the tiny models (tests/tiny_models.py)."""
    from tqc.models import load_tokenizer, resolve_model

    directory = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(resolve_model("smollm2")).save_pretrained(directory)
    return directory
