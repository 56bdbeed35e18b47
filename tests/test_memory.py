"""The memory model: size strings, KV cache, and a 70B / 8B breakdown checked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from tqc.memory import Runtime, kv_cache_bytes, model_geometry, parse_size
from tqc.models import empty_model, load_config, resolve_model

CONFIGS = Path(__file__).resolve().parents[1] / "plans" / "configs"


@pytest.mark.parametrize(
    ("text", "size"),
    [("24GB", 24 * 10**9), ("800MB", 800 * 10**6), ("3.5GiB", int(3.5 * 2**30)), ("1024", 1024), ("2 gib", 2 * 2**30), ("512kB", 512_000)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "24 parsecs", "GB", "-3GB", "1.2.3MB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.fixture(scope="module")
def llama8b():
    return model_geometry(empty_model(load_config(resolve_model(str(CONFIGS / "llama-3-8b" / "config.json")))))


def test_llama8b_geometry_by_hand(llama8b):
    hidden, vocab, layers = 4096, 128256, 32
    assert llama8b.other_weights == vocab * hidden + (2 * layers + 1) * hidden  # embedding + norms
    assert llama8b.tied_head is None
    assert (llama8b.kv_heads, llama8b.head_dim, len(llama8b.kv_layers)) == (8, 128, 32)


def test_kv_cache_by_hand(llama8b):
    # K and V, 32 layers, 8 kv heads x 128, 32k tokens, 2 bytes: exactly 4 GiB
    assert kv_cache_bytes(llama8b, Runtime(context=32768, batch=1, kv_bits=16)) == 2 * 32 * 8 * 128 * 32768 * 2 == 4 * 2**30
    assert kv_cache_bytes(llama8b, Runtime(context=1000, batch=3, kv_bits=4)) == 2 * 32 * 8 * 128 * 1000 * 3 // 2
    assert kv_cache_bytes(llama8b, Runtime(context=0)) == 0


def test_sliding_window_layers_hold_their_window(llama8b):
    from dataclasses import replace

    windowed = replace(llama8b, kv_layers=(0, 100) * 16)
    per_token_layer = 2 * 8 * 128 * 2
    assert kv_cache_bytes(windowed, Runtime(context=1000)) == per_token_layer * (16 * 1000 + 16 * 100)


def test_smollm2_tied_head_costs_nothing_in_fp16():
    from tqc.layout import LayerSpec
    from tqc.memory import linear_cost
    from tqc.options import QuantOption

    geometry = model_geometry(empty_model(load_config(resolve_model("smollm2"))))
    assert geometry.tied_head == "lm_head"
    assert geometry.other_weights == 49152 * 576 + (2 * 30 + 1) * 576  # embedding once, norms
    fp16, four = LayerSpec(QuantOption.parse("fp16"), 64, 576, 49152), LayerSpec(QuantOption.parse("4"), 64, 576, 49152)
    assert linear_cost(fp16, "lm_head", geometry) == 0
    assert linear_cost(four, "lm_head", geometry) == 49152 * 576 // 2 + 49152 * 9 * 2 + 8  # untied when quantized
