"""The memory model: every byte a budget must hold, counted from the model's config.

    linear layers    exact packed bytes per layer and option (`layout.layer_bytes`)
    other weights    embeddings, norms, biases outside linears, an fp16 head tied to the embedding:
                     fp16, as the packed model stores them
    kv cache         2 (K and V) x layers x kv heads x head dim x context x batch x kv_bits / 8;
                     a sliding-window layer holds at most its window
    workspace        one decode step's fp32 logits per sequence (batch x vocab x 4); the Triton
                     kernels decode tiles in registers, so no layer is ever held decoded
    reserve          what the person asks to keep free (`--reserve`, 0 by default): CUDA context,
                     allocator slack, the CPU reference path's one decoded layer

Sizes are bytes; "24GB" means 24e9, "3.5GiB" 3.5 * 2**30 (`parse_size`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .layout import LayerSpec, layer_bytes
from .models import linear_layers

STORAGE_BYTES = 2  # fp16
LOGITS_BYTES = 4  # fp32 logits of one decode step
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[KMGT]I?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'24GB' -> 24_000_000_000, '800MB', '3.5GiB', '1024' (bytes); ValueError on anything else."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"'{text}' is not a size (write e.g. 24GB, 800MB, 3.5GiB or a number of bytes)")
    return int(float(m["number"]) * _UNITS[(m["unit"] or "").upper()])


def format_size(size: float) -> str:
    """Bytes as a short human string in decimal units (MB = 10^6 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class Runtime:
    """What the model must serve: `batch` sequences of `context` tokens, KV cache at `kv_bits`."""

    context: int = 0
    batch: int = 1
    kv_bits: int = 16
    reserve: int = 0


@dataclass(frozen=True)
class ModelGeometry:
    """The numbers of a model the memory model needs besides its linear layers (from the meta model)."""

    other_weights: int  # parameters outside the linear layers (tied head counted once)
    tied_head: str | None  # name of a linear layer that shares the embedding's storage, if any
    kv_layers: tuple[int, ...]  # per decoder layer: tokens of context it keeps (0 = the full context)
    kv_heads: int
    head_dim: int
    vocab_size: int


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_geometry(model: nn.Module) -> ModelGeometry:
    """Read the geometry from a (meta-device) model and its config."""
    linears = linear_layers(model)
    linear_params = {id(layer.weight) for layer in linears.values()} | {
        id(layer.bias) for layer in linears.values() if layer.bias is not None
    }
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    text = _text_config(model.config)
    # the config says whether the head shares the embedding (a meta-device model may not tie them yet)
    tied = head is not None and embedding is not None and bool(getattr(text, "tie_word_embeddings", False))
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_params)
    if head is not None and embedding is not None and head.weight is embedding.weight:
        other += embedding.weight.numel()  # one tensor: counted as the embedding; the fp16 head costs 0
    head_name = next((name for name, layer in linears.items() if layer is head), None) if tied else None
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    window = getattr(text, "sliding_window", None) or 0
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    kv_layers = tuple(window if kind == "sliding_attention" else 0 for kind in types)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelGeometry(other, head_name, kv_layers, kv_heads, head_dim, text.vocab_size)


def kv_cache_bytes(geometry: ModelGeometry, runtime: Runtime) -> int:
    """Bytes of the K and V cache for `runtime.batch` sequences of `runtime.context` tokens."""
    tokens = sum(min(window, runtime.context) if window else runtime.context for window in geometry.kv_layers)
    bits = 2 * tokens * geometry.kv_heads * geometry.head_dim * runtime.batch * runtime.kv_bits
    return (bits + 7) // 8


def linear_cost(spec: LayerSpec, name: str, geometry: ModelGeometry) -> int:
    """Bytes a linear layer adds: a tied head kept in fp16 shares the embedding and adds nothing."""
    if name == geometry.tied_head and not spec.option.is_quantized:
        return 0
    return layer_bytes(spec)


def workspace_bytes(geometry: ModelGeometry, runtime: Runtime) -> int:
    """Transient runtime buffers: one decode step's fp32 logits per sequence."""
    return max(runtime.batch, 1) * geometry.vocab_size * LOGITS_BYTES


def breakdown(specs: dict[str, LayerSpec], geometry: ModelGeometry, runtime: Runtime) -> dict[str, int]:
    """Bytes by category for a choice of layer specs; 'total' is their sum."""
    quantized = sum(linear_cost(s, n, geometry) for n, s in specs.items() if s.option.is_quantized)
    fp16_linears = sum(linear_cost(s, n, geometry) for n, s in specs.items() if not s.option.is_quantized)
    parts = {
        "quantized_linears": quantized,
        "fp16_linears": fp16_linears,
        "other_weights": geometry.other_weights * STORAGE_BYTES,
        "kv_cache": kv_cache_bytes(geometry, runtime),
        "workspace": workspace_bytes(geometry, runtime),
        "reserve": runtime.reserve,
    }
    parts["total"] = sum(parts.values())
    return parts


def fixed_bytes(geometry: ModelGeometry, runtime: Runtime) -> int:
    """Bytes that do not depend on the per-layer choice: everything but the linear layers."""
    return (
        geometry.other_weights * STORAGE_BYTES
        + kv_cache_bytes(geometry, runtime)
        + workspace_bytes(geometry, runtime)
        + runtime.reserve
    )
