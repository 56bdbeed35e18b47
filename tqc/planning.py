"""Make plans that need no calibration: uniform plans from the command line.

The budget allocator (`tqc plan --budget`) builds on the same pieces: layer shapes from the model's
config on the meta device, `layout.layer_bytes` for exact sizes, `Plan` for the file.
"""

from __future__ import annotations

import fnmatch

from .layout import LayerSpec, layer_bytes
from .models import LinearShape
from .options import FP16, QuantOption, resolve_group_size
from .plan import LayerPlan, ModelRef, Plan

DEFAULT_KEEP = ("lm_head",)  # like llama.cpp and GPTQ, the output head stays 16-bit unless asked


def layer_spec(shape: LinearShape, option: QuantOption, group_size: int) -> LayerSpec:
    return LayerSpec(option, group_size, shape.in_features, shape.out_features, shape.has_bias)


def plan_layer(shape: LinearShape, option: QuantOption, preferred_group_size: int, **fields) -> LayerPlan:
    """One plan entry; a layer that no group size fits keeps 16 bits (fp16 ignores group_size)."""
    group_size = preferred_group_size
    if option.is_quantized:
        try:
            group_size = resolve_group_size(shape.in_features, preferred_group_size)
        except ValueError:
            option = FP16
    size = layer_bytes(layer_spec(shape, option, group_size))
    return LayerPlan(option=option.name, group_size=group_size, bytes=size, **fields)


def uniform_plan(
    model: ModelRef,
    shapes: dict[str, LinearShape],
    option: QuantOption,
    group_size: int = 128,
    seed: int = 0,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    overrides: dict[str, QuantOption] | None = None,
) -> Plan:
    """Every linear layer at `option`, except those matching a `keep` pattern (fp16).

    `overrides` maps layer-name patterns (fnmatch, e.g. "*.down_proj") to options; the first
    matching pattern wins.
    """
    overrides = overrides or {}
    layers = {}
    for name, shape in shapes.items():
        chosen = FP16 if any(fnmatch.fnmatchcase(name, p) for p in keep) else option
        for pattern, override in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen = override
                break
        layers[name] = plan_layer(shape, chosen, group_size)
    return Plan(model=model, seed=seed, group_size=group_size, layers=layers)
