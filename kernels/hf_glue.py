"""The rotation fused into the norm and SwiGLU steps (glue.py) of a model from `tqc.load`.

In Hugging Face's decoder layers each quantized layer rotates its input in a launch of its own,
after an RMSNorm (seven torch ops eagerly) or SiLU x up made that input. `install(model)` replaces,
in each decoder layer whose fused siblings (tqc.fusion) run generated kernels:

- `input_layernorm` and `post_attention_layernorm` by a `RotatingRMSNorm`: one launch writes the
  normalised input and its rotation for q/k/v (gate/up), the fused matmul runs, and its output is
  kept for the siblings (FusedSiblings.keep), which then read it instead of computing it;
- `mlp` by a `SwiGLU`: SiLU x up and down_proj's rotation in one launch.

The new modules keep the names and tensors of those they replace (the state dict is unchanged).
Where the fused path does not apply (no kernel, more than glue.MAX_TOKENS tokens, a layer not
tuned yet for the token count, under torch.compile: see _fused_path) they compute Hugging Face's
formulas op for op. Only architectures whose norm and MLP
compute exactly those formulas are touched (NORMS, MLPS), and MLPs only with SiLU.
`TQC_FUSED_GLUE=0` (or ENABLED = False) keeps the formulas everywhere, to measure the difference.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tqc.fusion import FusedSiblings

from . import glue

ENABLED = os.environ.get("TQC_FUSED_GLUE", "1") != "0"
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # forward = rms_norm below
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}  # forward = down(act(gate(x)) * up(x))
SILU = {"SiLU", "SiLUActivation"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, op for op."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(variance + eps)).to(x.dtype)


def _fused_path(x: torch.Tensor) -> bool:
    """Eagerly (a CUDA graph captures what runs); under torch.compile the formulas, which inductor
    fuses with the residual add before the norm: 2.85 ms a step of the 8B shape against 2.96 with
    the fused steps as custom ops (docs/performance.md, run 85)."""
    return ENABLED and x.is_contiguous() and not torch.compiler.is_compiling()


class RotatingRMSNorm(nn.Module):
    """An RMSNorm that also runs the fused layer reading its output (`consumer`), with the rotation
    in its own launch, and hands that layer's output to it."""

    def __init__(self, norm: nn.Module, consumer: FusedSiblings):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon
        self._consumer = (consumer,)  # a tuple: the layer stays registered in its own parent only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_fused_path(x) and x.dtype == self.weight.dtype):
            return rms_norm(x, self.weight, self.variance_epsilon)
        normed, out = self.norm_linear(x)
        self._consumer[0].keep(normed, out)
        return normed

    def norm_linear(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised x, the consumer's output for it): the rotation in the norm's launch where
        glue.norm_linear runs, else Hugging Face's norm and the consumer's own call."""
        layer = self._consumer[0].layer
        fused = glue.norm_linear(layer, x.view(-1, x.shape[-1]), None, self.weight, self.variance_epsilon)
        if fused is None:
            normed = rms_norm(x, self.weight, self.variance_epsilon)
            return normed, layer(normed)
        return fused[0].view(x.shape), fused[1].view(*x.shape[:-1], fused[1].shape[-1])

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, rotates for {self._consumer[0].names}"


class SwiGLU(nn.Module):
    """down_proj(act(gate) * up) from the fused gate/up output, with down_proj's rotation inside
    the SiLU x up launch; the replaced MLP's children under their own names."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_fused.whole_output(x)
        return self.swiglu_linear(gate_up) if _fused_path(gate_up) else self.formula(gate_up)

    def swiglu_linear(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP's output, with the rotation in the SwiGLU launch where glue.swiglu_linear runs."""
        out = glue.swiglu_linear(self.down_proj, gate_up.view(-1, gate_up.shape[-1]))
        return self.formula(gate_up) if out is None else out.view(*gate_up.shape[:-1], out.shape[-1])

    def formula(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _runs_kernels(fused: nn.Module | None) -> bool:
    return isinstance(fused, FusedSiblings) and getattr(fused.layer, "kernel", None) is not None


def _swiglu_fits(mlp: nn.Module) -> bool:
    """A known MLP with SiLU whose gate and up run fused, gate first, as swiglu_rotate_kernel reads them."""
    fused = getattr(mlp, "gate_up_fused", None)
    return (type(mlp).__name__ in MLPS and type(getattr(mlp, "act_fn", None)).__name__ in SILU
            and _runs_kernels(fused) and fused.names == ["gate_proj", "up_proj"])


def install(model: nn.Module) -> int:
    """Replace the norms and MLPs of the model's decoder layers where the fused path can run (see
    the module's docstring); return how many modules were replaced."""
    replaced = 0
    for layer in list(model.modules()):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        consumers = {"input_layernorm": getattr(attention, "qkv_fused", None),
                     "post_attention_layernorm": getattr(mlp, "gate_up_fused", None)}
        for name, consumer in consumers.items():
            norm = getattr(layer, name, None)
            if type(norm).__name__ in NORMS and _runs_kernels(consumer):
                setattr(layer, name, RotatingRMSNorm(norm, consumer))
                replaced += 1
        if mlp is not None and _swiglu_fits(mlp):
            layer.mlp = SwiGLU(mlp)
            replaced += 1
    return replaced
