"""Projections that read the same input run as one matmul in a loaded model (q/k/v, gate/up).

`tqc build` gives siblings that read one input one rotation seed (layout.rotation_seed), so their
packed tensors concatenate along the output dimension (tqc.linear.concatenate). `fuse_siblings`
replaces them in each parent module by one concatenated layer, registered as `<group>_fused`
(`qkv_fused`, `gate_up_fused`), and puts a `SiblingSlice` in each sibling's place that returns its
part of the fused output. Hugging Face modules call `q_proj(x)`, `k_proj(x)`, `v_proj(x)` on one
tensor, so the fused layer runs once per input: it keeps its last input and output until every
sibling has read its slice, and reuses them only for the same tensor object at the same version
(an in-place change of the input bumps it). Anything else recomputes, so a result is never stale.

Siblings that cannot concatenate (different options, or seeds drawn per layer by a build before
this rule) stay as they are.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .layout import SIBLING_GROUPS, tensor_layout
from .linear import QuantizedLinear, concatenate


@dataclasses.dataclass
class _LastCall:
    """The fused layer's last input and output, until every sibling has read its slice. A plain
    object: setting an nn.Module's attributes goes through its slow __setattr__, several times a
    call of an eager decode step."""

    input: torch.Tensor | None = None
    version: int = -1
    output: torch.Tensor | None = None
    unread: set[str] = dataclasses.field(default_factory=set)


class FusedSiblings(nn.Module):
    """One concatenated layer serving several siblings; computes once per input."""

    def __init__(self, layer: QuantizedLinear, names: list[str]):
        super().__init__()
        self.layer, self.names = layer, names
        self._last = _LastCall()

    def output_for(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The fused output for input x, as sibling `name` reads it."""
        last = self._last
        if x is not last.input or self._version_of(x) != last.version:
            self.keep(x, self.layer(x))
        output = last.output
        last.unread.discard(name)
        if not last.unread:  # every sibling has its slice: hold nothing longer
            last.input = last.output = None
        return output

    def whole_output(self, x: torch.Tensor) -> torch.Tensor:
        """The fused output for input x, read by all siblings at once (a module that replaces their
        parent's forward, kernels/hf_glue.py)."""
        for name in self.names[:-1]:
            self.output_for(x, name)
        return self.output_for(x, self.names[-1])

    def keep(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Hold `output` as the fused output for input x until every sibling has read it (also for
        an output computed elsewhere: the step that made x, with the rotation in its launch)."""
        last = self._last
        last.input, last.version, last.output, last.unread = x, self._version_of(x), output, set(self.names)

    @staticmethod
    def _version_of(x: torch.Tensor) -> int:
        """x's in-place version; 0 while torch.compile traces (a traced graph changes no input
        between the siblings' calls, and the counter is no value it can trace)."""
        return 0 if torch.compiler.is_compiling() else x._version

    def extra_repr(self) -> str:
        return f"siblings={self.names}"


class SiblingSlice(nn.Module):
    """A fused sibling's place in its parent: columns [start, end) of the fused output."""

    def __init__(self, fused: FusedSiblings, name: str, start: int, end: int):
        super().__init__()
        self._fused = (fused,)  # a tuple, so the fused layer is not registered twice
        self.name, self.start, self.end = name, start, end
        self.spec = dataclasses.replace(fused.layer.spec, out_features=end - start)  # as the layer's own
        self.in_features, self.out_features = self.spec.in_features, self.spec.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].output_for(x, self.name)[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"{self.name}: outputs {self.start}:{self.end} of the fused layer"


def _fusible_sets(parent: nn.Module) -> list[tuple[str, list[str]]]:
    """(group, sibling names) of each set of the parent's quantized children that can concatenate."""
    sets: dict[tuple, list[str]] = {}
    for name, child in parent.named_children():
        if name in SIBLING_GROUPS and isinstance(child, QuantizedLinear) and getattr(child, "codes_layout", None) is None:
            spec = dataclasses.replace(child.spec, out_features=0)
            seed = int(child.seed.item()) if "seed" in tensor_layout(child.spec) else None
            sets.setdefault((SIBLING_GROUPS[name], spec, seed), []).append(name)
    return [(key[0], names) for key, names in sets.items() if len(names) > 1]


def fuse_siblings(model: nn.Module) -> int:
    """Replace every set of fusible siblings by one concatenated layer; return how many sets."""
    fused_sets = 0
    for parent in list(model.modules()):
        taken = set()
        for group, names in _fusible_sets(parent):
            attribute = f"{group}_fused"
            if attribute in taken or hasattr(parent, attribute):
                continue  # two incompatible sets of one group: the first one fuses
            taken.add(attribute)
            layers = [getattr(parent, name) for name in names]
            fused = FusedSiblings(concatenate(layers), names)
            parent.add_module(attribute, fused)
            start = 0
            for name, layer in zip(names, layers):
                setattr(parent, name, SiblingSlice(fused, name, start, start + layer.out_features))
                start += layer.out_features
            fused_sets += 1
    return fused_sets
