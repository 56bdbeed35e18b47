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

Hugging Face's attention forward applies the rotary embedding and writes the cache in launches of
their own before it calls the attention function. In the attention modules of DECODE_FORWARDS,
`install` replaces the forward on the instance (`decode_forward`): one token through a static
cache, with the mask transformers makes for it, goes to one launch that applies the rotary
embedding, writes the token's key and value into the cache and attends (`tqc::write_and_attend`,
or with a quantized o_proj `tqc::write_attend_linear`, whose o_proj combines the attention's slices
in the launch that rotates its input where it can, as the benchmark's decoder does); anything else
to the class's own forward. `TQC_ATTENTION_WRITES=0` (WRITES False) keeps the
writes apart.
"""

from __future__ import annotations

import inspect
import os
import types
import weakref

import torch
from torch import nn

from . import glue
from .attention import NewToken, cached_attention, reserve_counts

NAME = "tqc_decode"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("TQC_HF_ATTENTION", "1") != "0"
WRITES = os.environ.get("TQC_ATTENTION_WRITES", "1") != "0"
# attention classes whose forward is Llama's: q/k/v projections (Qwen3 and Gemma 3: then per-head q/k
# norms), the rotary embedding, the cache write, the attention function, o_proj
DECODE_FORWARDS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma3Attention"}
_ATTENTIONS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()  # id -> decode_forward's module
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


def write_and_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """cached_attention that writes the token at `position` first (attention.NewToken)."""
    return cached_attention(query, keys, values, mask, scale, token=NewToken(key, value, cos, sin, position))


def write_attend_linear(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor, scale: float, attention_id: int) -> torch.Tensor:
    """o_proj(write_and_attend(...)) of the attention module registered under `attention_id`, for
    [batch, 1, heads, D] queries: [batch, out features]. For one sequence the attention's slices
    are combined in the launch that rotates o_proj's input (glue.slices_linear, where o_proj's
    kernel allows), else o_proj takes the attention's output."""
    o_proj = _ATTENTIONS[attention_id].o_proj
    batch, heads, _, dim = query.shape
    token = NewToken(key, value, cos, sin, position)
    fused = glue.slices_linear(o_proj, value, heads, dim, lambda: cached_attention(
        query, keys, values, mask, scale, token=token, combine=False))
    if fused is not None:
        return fused
    return o_proj(write_and_attend(query, key, value, cos, sin, position, keys, values, mask, scale).view(batch, -1))


@torch.library.custom_op("tqc::write_attend_linear", mutates_args=("keys", "values"))
def _write_attend_linear_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            mask: torch.Tensor, scale: float, attention_id: int) -> torch.Tensor:
    return write_attend_linear(query, key, value, cos, sin, position, keys, values, mask, scale, attention_id)


@_write_attend_linear_op.register_fake
def _(query, key, value, cos, sin, position, keys, values, mask, scale, attention_id):
    return query.new_empty(query.shape[0], _ATTENTIONS[attention_id].o_proj.out_features)


@torch.library.custom_op("tqc::write_and_attend", mutates_args=("keys", "values"))
def _write_and_attend_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor, scale: float) -> torch.Tensor:
    return write_and_attend(query, key, value, cos, sin, position, keys, values, mask, scale)


@_write_and_attend_op.register_fake
def _(query, key, value, cos, sin, position, keys, values, mask, scale):
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


def decode_forward(attn: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """A DECODE_FORWARDS attention's forward: one token through a static cache in one launch that
    applies the rotary embedding, writes the cache and attends (see the module's docstring);
    anything else through the class's forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer = _static_layer(cache, attn)
    if layer is None or hidden_states.shape[1] != 1 or not _writes_and_attends(attn, hidden_states, layer,
                                                                             position_embeddings, attention_mask):
        return type(attn).forward(attn, hidden_states=hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    batch, dim = hidden_states.shape[0], attn.head_dim
    query = attn.q_proj(hidden_states).view(batch, -1, dim)
    key = attn.k_proj(hidden_states).view(batch, -1, dim)
    value = attn.v_proj(hidden_states).view(batch, -1)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3, Gemma 3
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = (t.reshape(batch, dim) for t in position_embeddings)
    mask = attention_mask.expand(batch, -1, -1, -1)
    args = (query.unsqueeze(2), key.reshape(batch, -1), value, cos, sin, layer.cumulative_length, layer.keys,
            layer.values, mask, attn.scaling)
    compiling = torch.compiler.is_compiling()
    if getattr(attn.o_proj, "kernel", None) is not None:  # one op to o_proj's output (eagerly: no dispatch)
        out = (_write_attend_linear_op if compiling else write_attend_linear)(*args, id(attn))
    else:
        out = attn.o_proj((_write_and_attend_op if compiling else write_and_attend)(*args).view(batch, -1))
    layer.cumulative_length.add_(1)  # as StaticLayer.update counts what it holds
    return out.view(batch, 1, -1), None


def _static_layer(cache, attn: nn.Module):
    """The cache layer of `attn` where it is a full-length StaticLayer that counts the positions it
    holds itself (transformers 5.17 and 5.25), else None. A sliding-window attention's layer may be
    one (kv_cache.full_length_static_cache): the mask transformers makes for it keeps the window;
    a StaticSlidingWindowLayer, which rolls its positions once full, is not."""
    layers = getattr(cache, "layers", None)
    index = getattr(attn, "layer_idx", None)
    if layers is None or index is None or index >= len(layers):
        return None
    layer = layers[index]
    counted = isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
    return layer if type(layer).__name__ == "StaticLayer" and getattr(layer, "is_initialized", False) and counted else None


def _writes_and_attends(attn: nn.Module, hidden_states: torch.Tensor, layer, position_embeddings,
                        mask: torch.Tensor | None) -> bool:
    """Whether decode_forward's launch computes what the class's forward would, here."""
    batch, dim = hidden_states.shape[0], attn.head_dim
    keys = layer.keys
    return (ENABLED and WRITES and attn.config._attn_implementation == NAME and not attn.training
            and (hidden_states.is_cuda or INTERPRETED) and getattr(attn, "attn_logit_softcapping", None) is None
            and keys.dtype in (torch.float16, torch.bfloat16) and hidden_states.dtype == keys.dtype
            and dim >= 16 and dim & (dim - 1) == 0 and keys.shape[0] == batch and keys.shape[-1] == dim
            and layer.values.shape == keys.shape and keys.is_contiguous() and layer.values.is_contiguous()
            and position_embeddings is not None
            and all(t.shape == (batch, 1, dim) and t.dtype == keys.dtype for t in position_embeddings)
            and mask is not None and mask.dtype == torch.bool and mask.dim() == 4
            and tuple(mask.shape[1:]) == (1, 1, keys.shape[2]) and mask.shape[0] in (1, batch))


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
    for module in model.modules():
        if type(module).__name__ in DECODE_FORWARDS and "position_embeddings" in inspect.signature(
                type(module).forward).parameters:
            module.forward = types.MethodType(decode_forward, module)
            _ATTENTIONS[id(module)] = module
    return True
