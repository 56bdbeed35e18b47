"""Tiny random models of each supported family, and the plans and logits the tests compare
(the session fixture `tokenizer_dir` is in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tqc.models import empty_model, linear_shapes, load_config, resolve_model
from tqc.options import QuantOption
from tqc.plan import ModelRef
from tqc.planning import uniform_plan

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # per-head q/k norms
    "mistral": ("MistralConfig", {}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32}),
}


def make_tiny_model(directory: Path, family: str, tokenizer_dir: Path) -> Path:
    """A random model of `family` saved as a Hugging Face directory with safetensors."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, directory / path.name)
    return directory


def plan_for(model_name: str, option: str, keep=("lm_head",), **kwargs):
    source = resolve_model(model_name)
    shapes = linear_shapes(empty_model(load_config(source)))
    return uniform_plan(ModelRef(name=model_name), shapes, QuantOption.parse(option), keep=keep, **kwargs)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 500, 200, 31, 7, 900, 12, 1000]])
