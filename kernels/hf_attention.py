"""The one-launch decode attention (attention.cached_attention_kernel) in a model from `tqc.load`.

Hugging Face's decoder layers write the token's key and value into the cache, then call the
attention function their config names. `install(model)` registers this module's `attention` under
NAME, with the same masks as "sdpa", and points the model's config at it. One token of a batch
whose mask is a bool [batch, 1, 1, length] (a static cache) or None (a dynamic one) runs the
kernel, which reads only the positions the mask lets through; anything else (a prompt of several
tokens, dropout, soft-capping, attention sinks, a head size that is no power of two, a CPU tensor
outside the interpreter) goes to Hugging Face's "sdpa" function, unchanged.
Under torch.compile the kernel is one opaque op (`tqc::cached_attention`); eagerly it is called
directly (a custom op's dispatch costs about 11 us of Python a call).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .attention import cached_attention, reserve_counts

NAME = "tqc_decode"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("TQC_HF_ATTENTION", "1") != "0"
# keyword arguments the kernel ignores safely; any other with a value set sends the call to sdpa
_IGNORED = {"cache_position", "position_ids", "use_cache", "is_causal", "sliding_window", "output_attentions"}


@torch.library.custom_op("tqc::cached_attention", mutates_args=())
def _cached_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    return cached_attention(query, key, value, mask, scale)


@_cached_attention_op.register_fake
def _(query, key, value, mask, scale):
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


def runs_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                dropout: float = 0.0, **kwargs) -> bool:
    """Whether cached_attention computes what sdpa_attention_forward would for these arguments."""
    batch, heads, tokens, dim = query.shape
    length = key.shape[2]
    return (ENABLED and tokens == 1 and (query.is_cuda or INTERPRETED) and dropout == 0.0
            and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == value.dtype == query.dtype
            and dim >= 16 and dim & (dim - 1) == 0 and heads % key.shape[1] == 0
            and value.shape == key.shape and key.shape[0] == batch
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4
                                  and tuple(mask.shape[1:]) == (1, 1, length) and mask.shape[0] in (1, batch)))
            and all(setting is None or setting is False or name in _IGNORED for name, setting in kwargs.items()))


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face's attention-function signature: (output [batch, tokens, heads, D], no weights)."""
    if runs_kernel(query, key, value, attention_mask, dropout, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask
        if mask is not None and mask.shape[0] != query.shape[0]:
            mask = mask.expand(query.shape[0], -1, -1, -1)
        run = _cached_attention_op if torch.compiler.is_compiling() else cached_attention  # eagerly: no dispatch
        return run(query, key, value, mask, scale), None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)


def register() -> None:
    """Make NAME an attention implementation transformers knows, masked as "sdpa" is."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model: nn.Module) -> bool:
    """Point a model that attends with "sdpa" at NAME; return whether it now does."""
    config = getattr(model, "config", None)
    if not ENABLED or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    device = next(model.parameters()).device
    reserve_counts(device, config.get_text_config().num_key_value_heads * 16)  # batches of up to 16 sequences
    return True
