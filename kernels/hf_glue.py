"""The rotation fused into the norm and SwiGLU steps (glue.py) of a model from `tqc.load`.

In Hugging Face's decoder layers each quantized layer rotates its input in a launch of its own,
after an RMSNorm (seven torch ops eagerly) or act(gate) x up made that input. `install(model)`
replaces, in each decoder layer of a known architecture (DECODER_LAYERS) whose fused siblings
(tqc.fusion) run generated kernels:

- the norm before attention and the norm before the MLP by a `RotatingRMSNorm`: one launch writes
  the normalised input and its rotation for q/k/v (gate/up), the fused matmul runs, and its output
  is kept for the siblings (FusedSiblings.keep), which then read it instead of computing it;
- `mlp` by a `SwiGLU`: act(gate) x up and down_proj's rotation in one launch (SiLU, or Gemma's
  tanh-approximated GELU).

Where a decoder layer's norm before the MLP and its MLP are replaced, the layer's forward is
replaced too, on the instance, by its class's in RESIDUAL_FORWARDS: the residual add after the
attention runs in the launch of that norm, and the MLP goes on from gate/up's output; in a Llama
(not Gemma 3, which norms the MLP's output first) the add after the MLP is down_proj's own: the
SwiGLU launch primes down_proj's output with the residual, and the kernel adds onto it.

The new modules keep the names and tensors of those they replace (the state dict is unchanged).
Under torch.compile each fused step is one custom op (`tqc::norm_linear`, `tqc::swiglu_linear`),
as the layers' kernels are (`tqc::kernel_linear`). Where the fused path does not apply (no kernel,
more than glue.MAX_TOKENS tokens, a layer not tuned yet for the token count) they compute Hugging
Face's formulas op for op. Only classes known to compute exactly those formulas are replaced (NORMS,
MLPS, ACTIVATIONS, RESIDUAL_FORWARDS; tests/test_fusion.py checks them against the installed transformers).
`TQC_FUSED_GLUE=0` (or ENABLED = False) keeps the formulas everywhere, to measure the difference;
`TQC_FUSED_GLUE=eager` (COMPILED = False) keeps them under torch.compile only, where inductor fuses
them with the residual adds.
"""

from __future__ import annotations

import inspect
import os
import types
import weakref

import torch
from torch import nn

from tqc.fusion import FusedSiblings

from . import glue

ENABLED = os.environ.get("TQC_FUSED_GLUE", "1") != "0"
COMPILED = os.environ.get("TQC_FUSED_GLUE", "1") != "eager"  # the fused steps as custom ops under torch.compile
PRIME_RESIDUAL = True  # llama_forward: down_proj adds onto the residual (SwiGLU.from_gate_up's onto), no add after
_LLAMA_NORMS = {"input_layernorm": ("self_attn", "qkv_fused"), "post_attention_layernorm": ("mlp", "gate_up_fused")}
# decoder layer class -> {its norm: (the module reading the norm's output, that module's fused layer)}
DECODER_LAYERS = {
    "LlamaDecoderLayer": _LLAMA_NORMS, "MistralDecoderLayer": _LLAMA_NORMS, "Qwen2DecoderLayer": _LLAMA_NORMS,
    "Qwen3DecoderLayer": _LLAMA_NORMS,
    # Gemma 3 norms the attention's output before the residual add (post_attention_layernorm)
    "Gemma3DecoderLayer": {"input_layernorm": ("self_attn", "qkv_fused"),
                           "pre_feedforward_layernorm": ("mlp", "gate_up_fused")},
}
NORMS = {"LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False, "Qwen3RMSNorm": False,
         "Gemma3RMSNorm": True}  # class -> Gemma's form (rms_norm below)
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP"}  # forward: down(act(gate(x)) * up(x))
ACTIVATIONS = {"SiLU": False, "SiLUActivation": False, "GELUTanh": True, "PytorchGELUTanh": True}  # -> GELU
# the modules of this file, by id, for the custom ops (weakly: a model that is dropped leaves nothing here)
_MODULES: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward op for op (`gemma`: Gemma3RMSNorm's, with 1 + weight
    and one rounding)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


def _fuses(x: torch.Tensor) -> bool:
    """Whether a fused step may run on x: ENABLED, at most glue.MAX_TOKENS tokens (a prefill's
    norm is faster apart), and eagerly or as a custom op under torch.compile (COMPILED)."""
    return ENABLED and x.numel() <= glue.MAX_TOKENS * x.shape[-1] and (COMPILED or not torch.compiler.is_compiling())


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.view(-1, x.shape[-1])


@torch.library.custom_op("tqc::norm_linear", mutates_args=())
def norm_linear_op(h: torch.Tensor, delta: torch.Tensor | None, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RotatingRMSNorm `norm` (its id)'s norm_linear as one op that torch.compile keeps whole."""
    return _MODULES[norm].norm_linear(h, delta)


@norm_linear_op.register_fake
def _norm_linear_shapes(h: torch.Tensor, delta: torch.Tensor | None, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], _MODULES[norm].consumer.layer.out_features))


@torch.library.custom_op("tqc::swiglu_linear", mutates_args=())
def swiglu_linear_op(gate_up: torch.Tensor, onto: torch.Tensor | None, mlp: int) -> torch.Tensor:
    """SwiGLU `mlp` (its id)'s swiglu_linear as one op that torch.compile keeps whole."""
    return _MODULES[mlp].swiglu_linear(gate_up, onto)


@swiglu_linear_op.register_fake
def _swiglu_linear_shape(gate_up: torch.Tensor, onto: torch.Tensor | None, mlp: int) -> torch.Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], _MODULES[mlp].down_proj.out_features))


class RotatingRMSNorm(nn.Module):
    """An RMSNorm that also runs the fused layer reading its output (`consumer`), with the rotation
    in its own launch, and hands that layer's output to it; with `then` (the attention's o_proj) the
    launch also zeroes that layer's output eagerly (glue.fused_linear)."""

    def __init__(self, norm: nn.Module, consumer: FusedSiblings, then: nn.Module | None = None):
        super().__init__()
        self.gemma = NORMS[type(norm).__name__]
        self.weight = norm.weight
        self.eps = norm.eps if self.gemma else norm.variance_epsilon
        self._consumer = (consumer,)  # a tuple: the layer stays registered in its own parent only
        self._then = (then,)
        _MODULES[id(self)] = self

    @property
    def consumer(self) -> FusedSiblings:
        return self._consumer[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_fuses(x) and x.dtype == self.weight.dtype):
            return rms_norm(x, self.weight, self.eps, self.gemma)
        normed, out = self._norm_linear(x, None)
        self.consumer.keep(normed, out)
        return normed

    def add_norm_linear(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, the consumer's output for the norm of it), the add in the norm's launch
        (RESIDUAL_FORWARDS)."""
        if not (_fuses(h) and h.dtype == delta.dtype == self.weight.dtype):
            h = h + delta
            return h, self.consumer.layer(rms_norm(h, self.weight, self.eps, self.gemma))
        return self._norm_linear(h, delta)

    def _norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # o_proj's output not zeroed: no buffer passes from one op to the next
            return torch.ops.tqc.norm_linear(h, delta, id(self))
        return self.norm_linear(h, delta, self._then[0])

    def norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None,
                    then: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, or with delta None the normalised h; the consumer's output for the norm of
        h + delta): the add and the rotation in the norm's launch where glue.norm_linear runs, else
        Hugging Face's formulas and the consumer's own call. `then`: glue.fused_linear's."""
        layer, contiguous = self.consumer.layer, h.is_contiguous() and (delta is None or delta.is_contiguous())
        form = "gemma" if self.gemma else "llama"
        fused = glue.norm_linear(layer, _flat(h), _flat(delta), self.weight, self.eps, form, then) if contiguous else None
        if fused is None:
            summed = h if delta is None else h + delta
            normed = rms_norm(summed, self.weight, self.eps, self.gemma).contiguous()
            return (normed if delta is None else summed.contiguous()), layer(normed)
        return fused[0].view(h.shape), fused[1].view(*h.shape[:-1], fused[1].shape[-1])

    def extra_repr(self) -> str:
        gemma = ", gemma" if self.gemma else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{gemma}, rotates for {self.consumer.names}"


class SwiGLU(nn.Module):
    """down_proj(act(gate) * up) from the fused gate/up output, with down_proj's rotation inside
    the act x up launch; the replaced MLP's children under their own names."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.gelu = ACTIVATIONS[type(mlp.act_fn).__name__]
        _MODULES[id(self)] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_gate_up(self.gate_up_fused.whole_output(x))

    def from_gate_up(self, gate_up: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output from the fused gate/up output, added to `onto` (the residual) if given."""
        if not _fuses(gate_up):
            return self.formula(gate_up, onto)
        if torch.compiler.is_compiling():
            return torch.ops.tqc.swiglu_linear(gate_up, onto, id(self))
        return self.swiglu_linear(gate_up, onto)

    def swiglu_linear(self, gate_up: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor:
        """from_gate_up's result, with the rotation in the act x up launch where glue.swiglu_linear
        runs, which primes down_proj's output with `onto` where the kernel adds into it."""
        out = None
        if gate_up.is_contiguous():
            flat_onto = None if onto is None else onto.reshape(-1, onto.shape[-1])  # a view where it can be
            out = glue.swiglu_linear(self.down_proj, _flat(gate_up), self.gelu, flat_onto)
        return self.formula(gate_up, onto) if out is None else out.view(*gate_up.shape[:-1], out.shape[-1])

    def formula(self, gate_up: torch.Tensor, onto: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        out = self.down_proj(self.act_fn(gate) * up)
        return out if onto is None else onto + out


def llama_forward(layer: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """LlamaDecoderLayer.forward (attention, residual add, norm, MLP, residual add) with the add
    after the attention in the launch of the norm after it (RotatingRMSNorm.add_norm_linear), and
    the MLP from gate/up's output on, down_proj adding onto the residual (SwiGLU.from_gate_up).
    The layer's own arguments go to the attention, as there."""
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    hidden_states, gate_up = layer.post_attention_layernorm.add_norm_linear(hidden_states, attended)
    if PRIME_RESIDUAL:
        return layer.mlp.from_gate_up(gate_up, onto=hidden_states)
    return hidden_states + layer.mlp.from_gate_up(gate_up)


def gemma3_forward(layer: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Gemma3DecoderLayer.forward (attention and its norm, residual add, norm, MLP and its norm,
    residual add) with the add after the attention in the launch of the norm before the MLP, as
    llama_forward."""
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    hidden_states, gate_up = layer.pre_feedforward_layernorm.add_norm_linear(
        hidden_states, layer.post_attention_layernorm(attended))
    return hidden_states + layer.post_feedforward_layernorm(layer.mlp.from_gate_up(gate_up))


# decoder layer class -> its forward with the residual add in the norm before the MLP
RESIDUAL_FORWARDS = {"LlamaDecoderLayer": llama_forward, "MistralDecoderLayer": llama_forward,
                     "Qwen2DecoderLayer": llama_forward, "Qwen3DecoderLayer": llama_forward,
                     "Gemma3DecoderLayer": gemma3_forward}


def _replaces_forward(layer: nn.Module) -> bool:
    """Whether the layer's norm before the MLP and its MLP are tqc's, and its forward hands its
    arguments to the attention as they come: one that takes no `position_embeddings` (Gemma 3's
    took a global and a local pair before transformers 5) chooses, and keeps its forward."""
    norm_before_mlp = next(norm for norm, (reader, _) in DECODER_LAYERS[type(layer).__name__].items() if reader == "mlp")
    return (isinstance(getattr(layer, norm_before_mlp), RotatingRMSNorm) and isinstance(layer.mlp, SwiGLU)
            and "position_embeddings" in inspect.signature(type(layer).forward).parameters)


def _runs_kernels(fused: nn.Module | None) -> bool:
    return isinstance(fused, FusedSiblings) and getattr(fused.layer, "kernel", None) is not None


def _swiglu_fits(mlp: nn.Module) -> bool:
    """A known MLP and activation whose gate and up run fused, gate first, as swiglu_rotate_kernel
    reads them."""
    fused = getattr(mlp, "gate_up_fused", None)
    return (type(mlp).__name__ in MLPS and type(getattr(mlp, "act_fn", None)).__name__ in ACTIVATIONS
            and _runs_kernels(fused) and fused.names == ["gate_proj", "up_proj"])


def install(model: nn.Module) -> int:
    """Replace the norms and MLPs of the model's decoder layers where the fused path can run, and
    the forward of layers where both were (see the module's docstring); return how many modules and
    forwards were replaced."""
    replaced = 0
    for layer in list(model.modules()):
        for norm_name, (reader, fused_name) in DECODER_LAYERS.get(type(layer).__name__, {}).items():
            norm, consumer = getattr(layer, norm_name, None), getattr(getattr(layer, reader, None), fused_name, None)
            if type(norm).__name__ in NORMS and _runs_kernels(consumer):
                then = getattr(getattr(layer, reader), "o_proj", None) if fused_name == "qkv_fused" else None
                setattr(layer, norm_name, RotatingRMSNorm(norm, consumer, then))
                replaced += 1
        mlp = getattr(layer, "mlp", None)
        if type(layer).__name__ in DECODER_LAYERS and _swiglu_fits(mlp):
            layer.mlp = SwiGLU(mlp)
            replaced += 1
        if type(layer).__name__ in RESIDUAL_FORWARDS and _replaces_forward(layer):
            layer.forward = types.MethodType(RESIDUAL_FORWARDS[type(layer).__name__], layer)
            replaced += 1
    return replaced
