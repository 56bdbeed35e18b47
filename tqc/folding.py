"""o_proj's input rotation folded into v_proj's weights at build time (QuaRot's and SpinQuant's R2).

Attention's output for a head is a weighted sum of that head's values, so rotating v_proj's
outputs head by head (W_v <- R W_v, its bias <- R b) makes attention's output arrive rotated: what
o_proj would otherwise rotate in a launch of its own before its matmul (kernels/registry.py). o_proj's
weight takes the rotation's inverse at once (W_o <- W_o R^T), so the float model computes what it
did before the fold: GPTQ's calibration runs it forward (a model left half folded fed every MLP a
wrong H, and cost a GPTQ build a fifth of its KL divergence). For that, every head must be rotated
alike (query heads share a key/value head under grouped-query attention), so a fold draws the signs
of one group and repeats them (fold_signs), and o_proj's group size must divide the head size. The
layer's LayerSpec.input_rotated records the fold: its weight is quantized as it is
(turboquant.rotated_weight), and its run-time rotation is the identity.

Only attention modules whose values reach o_proj through nothing but the attention weights are
folded (FOLDABLE_ATTENTION: a gate or a norm on the output would not commute with the rotation).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layout import LayerSpec, rotation_seed
from .rotation import random_signs, rotate

# Hugging Face attention classes whose output is attention-weighted values, reshaped, into o_proj.
FOLDABLE_ATTENTION = frozenset({
    "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "Gemma2Attention", "Gemma3Attention",
    "SmolLM3Attention", "Olmo2Attention",
})


def foldable(attention: nn.Module, spec: LayerSpec | None) -> bool:
    """Whether o_proj's rotation (its planned `spec`; None: unquantized) can fold into v_proj's rows."""
    if type(attention).__name__ not in FOLDABLE_ATTENTION or spec is None:
        return False
    head_dim = getattr(attention, "head_dim", 0)
    return (spec.option.scheme == "turboquant" and spec.activations == "fp16" and head_dim > 0
            and head_dim % spec.group_size == 0)


def fold_signs(seed: int, spec: LayerSpec) -> torch.Tensor:
    """The signs of a folded rotation: one group's, drawn from o_proj's rotation seed and repeated."""
    return random_signs(seed, spec.group_size).repeat(spec.groups)


def fold_value_rotations(model: nn.Module, specs: dict[str, LayerSpec], plan_seed: int) -> dict[str, LayerSpec]:
    """Rotate v_proj's rows and o_proj's columns in place wherever o_proj's rotation can fold
    (foldable), before anything is quantized; return `specs` with those o_proj layers marked
    input_rotated. The model computes what it did, up to float rounding."""
    folded = dict(specs)
    for name, attention in model.named_modules():
        o_name = f"{name}.o_proj"
        if not foldable(attention, specs.get(o_name)) or not isinstance(getattr(attention, "v_proj", None), nn.Linear):
            continue
        spec = dataclasses.replace(specs[o_name], input_rotated=True)
        signs = fold_signs(rotation_seed(plan_seed, o_name), spec)
        rotate_rows(attention.v_proj, signs, spec.group_size)
        rotate_columns(attention.o_proj, signs, spec.group_size)
        folded[o_name] = spec
    return folded


@torch.no_grad()
def rotate_rows(linear: nn.Linear, signs: torch.Tensor, group_size: int) -> None:
    """W <- R W and b <- R b, R rotating each group of `group_size` outputs (rotation.rotate), in
    float32 (a bf16 weight loaded to be quantized is widened, not rounded again)."""
    signs = signs[:linear.out_features]  # every group's signs are alike (fold_signs)
    linear.weight.data = rotate(linear.weight.float().T, signs, group_size).T.contiguous()
    if linear.bias is not None:
        linear.bias.data = rotate(linear.bias.float(), signs, group_size)


@torch.no_grad()
def rotate_columns(linear: nn.Linear, signs: torch.Tensor, group_size: int) -> None:
    """W <- W R^T in float32: the layer reads R x as it read x."""
    linear.weight.data = rotate(linear.weight.float(), signs, group_size)
