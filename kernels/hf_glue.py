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

The new modules keep the names and tensors of those they replace (the state dict is unchanged).
Where the fused path does not apply (no kernel, more than glue.MAX_TOKENS tokens, a layer not
tuned yet for the token count, under torch.compile: see _fused_path) they compute Hugging Face's
formulas op for op. Only classes known to compute exactly those formulas are replaced (NORMS,
MLPS, ACTIVATIONS; tests/test_fusion.py checks them against the installed transformers).
`TQC_FUSED_GLUE=0` (or ENABLED = False) keeps the formulas everywhere, to measure the difference.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tqc.fusion import FusedSiblings

from . import glue

ENABLED = os.environ.get("TQC_FUSED_GLUE", "1") != "0"
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward op for op (`gemma`: Gemma3RMSNorm's, with 1 + weight
    and one rounding)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


def _fused_path(x: torch.Tensor) -> bool:
    """Eagerly (a CUDA graph captures what runs); under torch.compile the formulas, which inductor
    fuses with the residual add before the norm: 2.85 ms a step of the 8B shape against 2.96 with
    the fused steps as custom ops (docs/performance.md, run 85)."""
    return ENABLED and x.is_contiguous() and not torch.compiler.is_compiling()


class RotatingRMSNorm(nn.Module):
    """An RMSNorm that also runs the fused layer reading its output (`consumer`), with the rotation
    in its own launch, and hands that layer's output to it; with `then` (the attention's o_proj) the
    launch also zeroes that layer's output (glue.fused_linear)."""

    def __init__(self, norm: nn.Module, consumer: FusedSiblings, then: nn.Module | None = None):
        super().__init__()
        self.gemma = NORMS[type(norm).__name__]
        self.weight = norm.weight
        self.eps = norm.eps if self.gemma else norm.variance_epsilon
        self._consumer = (consumer,)  # a tuple: the layer stays registered in its own parent only
        self._then = (then,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_fused_path(x) and x.dtype == self.weight.dtype):
            return rms_norm(x, self.weight, self.eps, self.gemma)
        normed, out = self.norm_linear(x)
        self._consumer[0].keep(normed, out)
        return normed

    def norm_linear(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised x, the consumer's output for it): the rotation in the norm's launch where
        glue.norm_linear runs, else Hugging Face's norm and the consumer's own call."""
        layer = self._consumer[0].layer
        fused = glue.norm_linear(layer, x.view(-1, x.shape[-1]), None, self.weight, self.eps, self.gemma,
                                 self._then[0])
        if fused is None:
            normed = rms_norm(x, self.weight, self.eps, self.gemma)
            return normed, layer(normed)
        return fused[0].view(x.shape), fused[1].view(*x.shape[:-1], fused[1].shape[-1])

    def extra_repr(self) -> str:
        gemma = ", gemma" if self.gemma else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{gemma}, rotates for {self._consumer[0].names}"


class SwiGLU(nn.Module):
    """down_proj(act(gate) * up) from the fused gate/up output, with down_proj's rotation inside
    the act x up launch; the replaced MLP's children under their own names."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.gelu = ACTIVATIONS[type(mlp.act_fn).__name__]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_fused.whole_output(x)
        return self.swiglu_linear(gate_up) if _fused_path(gate_up) else self.formula(gate_up)

    def swiglu_linear(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP's output, with the rotation in the act x up launch where glue.swiglu_linear runs."""
        out = glue.swiglu_linear(self.down_proj, gate_up.view(-1, gate_up.shape[-1]), self.gelu)
        return self.formula(gate_up) if out is None else out.view(*gate_up.shape[:-1], out.shape[-1])

    def formula(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _runs_kernels(fused: nn.Module | None) -> bool:
    return isinstance(fused, FusedSiblings) and getattr(fused.layer, "kernel", None) is not None


def _swiglu_fits(mlp: nn.Module) -> bool:
    """A known MLP and activation whose gate and up run fused, gate first, as swiglu_rotate_kernel
    reads them."""
    fused = getattr(mlp, "gate_up_fused", None)
    return (type(mlp).__name__ in MLPS and type(getattr(mlp, "act_fn", None)).__name__ in ACTIVATIONS
            and _runs_kernels(fused) and fused.names == ["gate_proj", "up_proj"])


def install(model: nn.Module) -> int:
    """Replace the norms and MLPs of the model's decoder layers where the fused path can run (see
    the module's docstring); return how many modules were replaced."""
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
    return replaced
