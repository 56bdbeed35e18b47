"""Drop-in replacements for nn.Linear that hold packed codes and dequantize inside the matmul.

`QuantizedLinear` keeps only the tensors of `layout.tensor_layout` (never a full-precision copy of
the weight). On CPU its forward is the pure torch reference path: rotate the activation, decode the
weight tile by tile into a transient buffer, multiply. On CUDA it calls the generated Triton kernel
when one is registered for its spec (`tqc.kernels`), and falls back to the reference otherwise;
under torch.compile the kernel is one custom op, `tqc::kernel_linear`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import rtn, turboquant
from .layout import LayerSpec, tensor_layout

SCHEMES: dict[str, ModuleType] = {"turboquant": turboquant, "rtn": rtn}
# The layers that run a generated kernel, by id(module), for the tqc::kernel_linear op (weakly:
# a model that is dropped leaves nothing here).
_KERNEL_LAYERS: weakref.WeakValueDictionary[int, QuantizedLinear] = weakref.WeakValueDictionary()


@torch.library.custom_op("tqc::kernel_linear", mutates_args=())
def kernel_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer`'s generated kernel (its id, see QuantizedLinear.use_kernel) as one op that
    torch.compile keeps whole: it cannot trace Triton's launcher and tqc's tuner, and needs not."""
    module = _KERNEL_LAYERS[layer]
    return module.kernel(x, module)


@kernel_linear.register_fake
def _kernel_linear_shape(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _KERNEL_LAYERS[layer].out_features))


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as packed codes of `spec.option`."""

    def __init__(self, spec: LayerSpec, device: torch.device | str | None = None):
        super().__init__()
        if not spec.option.is_quantized:
            raise ValueError("QuantizedLinear needs a quantized option, not fp16")
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        for name, (shape, dtype) in tensor_layout(spec).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.kernel = None  # set by tqc.kernels.attach on CUDA

    @property
    def scheme(self) -> ModuleType:
        return SCHEMES[self.spec.option.scheme]

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in tensor_layout(self.spec) if name != "bias"}

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the basis the prepared input lives in (transient; never cached)."""
        if getattr(self, "codes_layout", None) is not None:
            raise RuntimeError("codes are in the GPU kernel layout; call tqc.kernels.detach(model) for the reference path")
        return self.scheme.dequantize(self.packed_tensors(), self.spec).to(dtype)

    def use_kernel(self, kernel) -> None:
        """Run `kernel(x, self)` instead of the reference path (tqc.kernels.attach, on CUDA)."""
        self.kernel = kernel
        _KERNEL_LAYERS[id(self)] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            if torch.compiler.is_compiling():
                return torch.ops.tqc.kernel_linear(x, id(self))
            return self.kernel(x, self)
        bias = self.bias.to(x.dtype) if self.spec.has_bias else None
        return F.linear(self.prepare_input(x), self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.spec
        int8 = ", activations=int8" if s.activations == "int8" else ""
        return f"in={s.in_features}, out={s.out_features}, option={s.option}, group_size={s.group_size}{int8}"


class TurboQuantLinear(QuantizedLinear):
    """TurboQuant layer: the activation is rotated per group by the layer's seeded Hadamard."""

    def __init__(self, spec: LayerSpec, device: torch.device | str | None = None):
        super().__init__(spec, device)
        self.register_buffer("signs", torch.zeros(spec.in_features, device=device), persistent=False)

    @property
    def rotation_size(self) -> int:
        """The Hadamard size of the input rotation at run time (LayerSpec.rotation_size)."""
        return self.spec.rotation_size

    def refresh_signs(self) -> None:
        """Recompute the input rotation's signs from the stored seed (after loading tensors)."""
        self.signs = turboquant.activation_signs(int(self.seed.item()), self.spec).to(self.seed.device)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return turboquant.prepare_input(x, self.signs, self.spec)


class RTNLinear(QuantizedLinear):
    """Round-to-nearest baseline layer (no rotation)."""


MODULES: dict[str, type[QuantizedLinear]] = {"turboquant": TurboQuantLinear, "rtn": RTNLinear}


def empty_quantized_linear(spec: LayerSpec, device: torch.device | str | None = None) -> QuantizedLinear:
    """An uninitialised module of the right class and tensor shapes, to load packed tensors into."""
    return MODULES[spec.option.scheme](spec, device)


def quantize_linear(linear: nn.Linear, spec: LayerSpec, seed: int, device: torch.device | str | None = None) -> QuantizedLinear:
    """Quantize one nn.Linear into its runtime module (on the CPU), fitting the codes on `device`
    (default: where the weight lies)."""
    weight = linear.weight if device is None else linear.weight.to(device)
    tensors = SCHEMES[spec.option.scheme].quantize(weight, spec, seed)
    if spec.has_bias:
        tensors["bias"] = linear.bias.detach().to(torch.float16)
    module = empty_quantized_linear(spec, device="cpu")
    load_packed_tensors(module, tensors)
    return module


def load_packed_tensors(module: QuantizedLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Copy packed tensors into a module, checking names, shapes and dtypes against its layout."""
    layout = tensor_layout(module.spec)
    if set(tensors) != set(layout):
        missing, extra = set(layout) - set(tensors), set(tensors) - set(layout)
        raise ValueError(f"tensors do not match the layer's layout (missing {sorted(missing)}, unexpected {sorted(extra)})")
    for name, (shape, dtype) in layout.items():
        value = tensors[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(f"tensor '{name}' is {tuple(value.shape)} {value.dtype}, expected {shape} {dtype}")
        setattr(module, name, value.to(getattr(module, name).device))
    if isinstance(module, TurboQuantLinear):
        module.refresh_signs()


def concatenate(layers: Sequence[QuantizedLinear]) -> QuantizedLinear:
    """One layer whose output is the concatenation of `layers`' outputs (fused q/k/v, gate/up).

    Every scheme quantizes rows independently (per-row group scales; TurboQuant's rotation acts on
    the input), so the packed tensors concatenate along the output dimension. The layers must read
    the same input the same way: equal option, group size, input size, and rotation seed.
    """
    first = layers[0]
    for layer in layers[1:]:
        spec = layer.spec
        if dataclasses.replace(spec, out_features=first.out_features) != first.spec:
            raise ValueError(f"cannot concatenate {spec} with {first.spec}: option, group size and input must match")
        if "seed" in tensor_layout(spec) and not torch.equal(layer.seed, first.seed):
            raise ValueError("cannot concatenate layers with different rotation seeds")
        if getattr(layer, "codes_layout", None) is not None:
            raise ValueError("concatenate layers before tqc.kernels.prepare repacks their codes")
    spec = dataclasses.replace(first.spec, out_features=sum(layer.out_features for layer in layers))
    tensors = {name: first.seed if name == "seed" else torch.cat([getattr(layer, name) for layer in layers])
               for name in tensor_layout(spec)}
    module = empty_quantized_linear(spec, device=first.scales.device)
    load_packed_tensors(module, tensors)
    return module
