"""What a quantized layer stores: its spec, the tensors it holds, and their exact byte count.

One function, `tensor_layout`, is the single source of truth for shapes and dtypes: the quantizer
produces exactly these tensors, the loader allocates them, and the memory model counts them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .activations import Activations, takes_int8
from .bitpack import packed_words
from .options import QuantOption

SEED_DTYPE = torch.int64


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild one quantized linear layer, besides its tensors."""

    option: QuantOption
    group_size: int
    in_features: int
    out_features: int
    has_bias: bool = False
    activations: Activations = "fp16"  # "int8": the rotated input rounded to int8 (tqc.activations)
    # The input arrives rotated: the rotation is folded into the weights of the layer that makes it
    # (o_proj's, into v_proj: tqc.folding), one group's signs serving every group.
    input_rotated: bool = False

    def __post_init__(self) -> None:
        if self.activations == "int8" and not takes_int8(self.option, "int8"):
            raise ValueError(f"option {self.option} cannot run on int8 activations (TurboQuant without a residual only)")
        if self.input_rotated and (self.option.scheme != "turboquant" or self.activations != "fp16"):
            raise ValueError(f"only a TurboQuant layer on fp16 activations takes a rotated input, not {self.option} "
                             f"on {self.activations}")

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def rotation_size(self) -> int:
        """The Hadamard size the layer rotates its input with at run time: 1 (none) where it arrives rotated."""
        return 1 if self.input_rotated else self.group_size


# Projections that read the same input, by their name in the parent module: they share one
# rotation, so that a loader can run them as one matmul (tqc.fusion).
SIBLING_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def layer_seed(plan_seed: int, name: str) -> int:
    """A seed derived from the plan seed and a name."""
    digest = hashlib.sha256(f"{plan_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def input_name(layer_name: str) -> str:
    """The name of a layer's input: shared by siblings (q/k/v_proj -> 'parent.qkv'), else the layer's own."""
    parent, _, child = layer_name.rpartition(".")
    if child not in SIBLING_GROUPS:
        return layer_name
    return f"{parent}.{SIBLING_GROUPS[child]}" if parent else SIBLING_GROUPS[child]


def rotation_seed(plan_seed: int, layer_name: str) -> int:
    """The seed of a layer's input rotation: one per input, so siblings reading it rotate it alike."""
    return layer_seed(plan_seed, input_name(layer_name))


def tensor_layout(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the layer stores."""
    n, k, g = spec.out_features, spec.in_features, spec.groups
    option = spec.option
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if option.scheme == "fp16":
        layout["weight"] = ((n, k), torch.float16)
    else:
        layout["codes"] = ((n, packed_words(k, option.base_bits)), torch.int32)
        layout["scales"] = ((n, g), torch.float16)
    if option.scheme == "turboquant":
        layout["seed"] = ((1,), SEED_DTYPE)
        if option.residual_bits:
            layout["residual_codes"] = ((n, packed_words(k, option.residual_bits)), torch.int32)
            layout["residual_scales"] = ((n, g), torch.float16)
    if option.scheme == "rtn":
        layout["zeros"] = ((n, g), torch.float16)
    if spec.has_bias:
        layout["bias"] = ((n,), torch.float16)
    return layout


def layer_bytes(spec: LayerSpec) -> int:
    """Exact bytes the layer's tensors take in the packed model."""
    total = 0
    for shape, dtype in tensor_layout(spec).values():
        count = 1
        for dim in shape:
            count *= dim
        total += count * dtype.itemsize
    return total
