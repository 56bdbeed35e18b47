"""TurboQuant KV cache: keys at 3 bits, values at 2 bits (defaults), for transformers' generate.

Each cached key or value vector (one head, one token) is rotated by a seeded randomized Hadamard
transform over head_dim, given one fitted fp16 scale, and encoded with the Lloyd-Max codebook of
N(0, 1), the same quantizer as the weights (`turboquant.fit_stage`). Like transformers'
QuantizedCache (KIVI), the most recent `residual_length` tokens stay in full precision and are
flushed into the quantized store when that window fills.

    cache = TurboQuantCache(model.config)
    model.generate(input_ids, cache=cache, max_new_tokens=64)  # older transformers: past_key_values=
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, QuantizedLayer, StaticCache, StaticLayer

from .bitpack import pack, unpack
from .rotation import random_signs, rotate, unrotate
from .turboquant import decode_stage, fit_stage

KV_SEED = 0x7A5C


@dataclass
class QuantizedStates:
    """Packed codes [..., T, D*bits/32] and one fp16 scale per vector [..., T]."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    head_dim: int
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.codes.numel() * 4 + self.scales.numel() * 2


def quantize_states(states: torch.Tensor, bits: int, signs: torch.Tensor) -> QuantizedStates:
    """Quantize [..., T, D] vectors along D (D a power of two)."""
    head_dim = states.shape[-1]
    rotated = rotate(states.float(), signs.to(states.device), head_dim)
    codes, scales = fit_stage(rotated.reshape(-1, 1, head_dim), bits)
    lead = states.shape[:-1]
    return QuantizedStates(pack(codes.reshape(*lead, head_dim), bits), scales.reshape(lead), bits, head_dim, states.dtype)


def dequantize_states(q: QuantizedStates, signs: torch.Tensor) -> torch.Tensor:
    lead = q.scales.shape
    codes = unpack(q.codes, q.bits, q.head_dim).reshape(-1, 1, q.head_dim)
    rotated = decode_stage(codes, q.scales.reshape(-1, 1), q.bits).reshape(*lead, q.head_dim)
    return unrotate(rotated, signs.to(rotated.device), q.head_dim).to(q.dtype)


class TurboQuantKVLayer(QuantizedLayer):
    """One attention layer's cache. transformers hands `axis_key` / `axis_value` to `_quantize`
    unchanged; this layer always quantizes along head_dim, so those slots carry the bit widths."""

    def __init__(self, key_bits: int = 3, value_bits: int = 2, residual_length: int = 128):
        super().__init__(nbits=key_bits, axis_key=key_bits, axis_value=value_bits, residual_length=residual_length)
        self._signs: torch.Tensor | None = None

    def _signs_for(self, head_dim: int) -> torch.Tensor:
        if self._signs is None or self._signs.numel() != head_dim:
            self._signs = random_signs(KV_SEED, head_dim)
        return self._signs

    def _quantize(self, tensor: torch.Tensor, axis: int) -> QuantizedStates:
        return quantize_states(tensor, bits=axis, signs=self._signs_for(tensor.shape[-1]))

    def _dequantize(self, q_tensor: QuantizedStates) -> torch.Tensor:
        return dequantize_states(q_tensor, self._signs_for(q_tensor.head_dim))


class TurboQuantCache(Cache):
    """A cache of TurboQuantKVLayer for every decoder layer (full-attention models)."""

    def __init__(self, config, key_bits: int = 3, value_bits: int = 2, residual_length: int = 128):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head_dim & (head_dim - 1) or head_dim % 32:
            raise ValueError(f"TurboQuant KV cache needs a power-of-two head_dim >= 32, got {head_dim}")
        layers = [TurboQuantKVLayer(key_bits, value_bits, residual_length) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)


def full_length_static_cache(config, max_length: int) -> StaticCache:
    """transformers' StaticCache of `max_length` positions whose sliding-window layers hold every
    position too, as full-attention layers do; the mask transformers makes for those layers keeps
    their window. A full StaticSlidingWindowLayer rolls its positions by a branch that the host
    takes on each call (its Python count), which a CUDA graph's replay would not take: the graph
    keeps writing past the window. Costs max_length positions a sliding layer instead of the window
    (no more where max_length is within it); tqc's memory model counts the window."""
    cache = StaticCache(config=config, max_cache_len=max_length)
    cache.layers = [StaticLayer(max_cache_len=max_length) if layer.is_sliding else layer for layer in cache.layers]
    return cache


def cache_argument(model, cache: Cache) -> dict[str, Cache]:
    """The keyword that passes `cache` to the model's forward and generate: `cache` where forward
    names it (transformers 5.25, which deprecates `past_key_values`), else `past_key_values`."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def chunked_logits(model, ids: torch.Tensor, cache: Cache, chunk: int) -> torch.Tensor:
    """Logits of `ids` fed `chunk` tokens at a time through `cache`, as decoding sees them."""
    parts = [model(input_ids=ids[:, s : s + chunk], use_cache=True, **cache_argument(model, cache)).logits
             for s in range(0, ids.shape[1], chunk)]
    return torch.cat(parts, dim=1)


def kv_divergence(model, ids: torch.Tensor, key_bits: int, value_bits: int, chunk: int = 32) -> dict[str, float]:
    """KL divergence and top-1 agreement of chunked decoding with a TurboQuant cache against an
    unquantized cache, over every token after the first chunk (which attends to exact states)."""
    from transformers import DynamicCache  # noqa: PLC0415

    reference = torch.log_softmax(chunked_logits(model, ids, DynamicCache(config=model.config), chunk)[:, chunk:].float(), -1)
    cache = TurboQuantCache(model.config, key_bits, value_bits, residual_length=chunk)
    quantized = torch.log_softmax(chunked_logits(model, ids, cache, chunk)[:, chunk:].float(), -1)
    kld = torch.nn.functional.kl_div(quantized, reference, log_target=True, reduction="none").sum(-1).mean()
    top1 = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"key_bits": key_bits, "value_bits": value_bits, "kl_divergence": kld.item(), "top1_agreement": top1.item()}


def main() -> None:
    """python -m tqc.kv_cache [MODEL]: KV-cache quality table on wiki.test.txt (4 windows of 256)."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from .evaluate import Windows, token_windows  # noqa: PLC0415
    from .models import load_model, load_tokenizer, resolve_model  # noqa: PLC0415

    source = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
    model = load_model(source)
    ids = token_windows(load_tokenizer(source), Windows("../shared/data/wiki.test.txt", 256, 4))
    for key_bits, value_bits in [(4, 4), (4, 2), (3, 2), (2, 2)]:
        rows = [kv_divergence(model, window[None], key_bits, value_bits) for window in ids]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("kl_divergence", "top1_agreement")}
        print(json.dumps({"model": source.name, "key_bits": key_bits, "value_bits": value_bits, **mean}))


if __name__ == "__main__":
    main()
