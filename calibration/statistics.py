"""One calibration pass: per linear layer, the input second moment H and the Fisher sensitivity.

Hooks on every nn.Linear collect
    H = mean over tokens of x x^T                                    (in_features x in_features)
    fisher = mean over sequences of ||sum_t g_t x_t^T||_F^2 / tokens  (g_t: gradient of the layer
             output at token t of sum_t log p(y_t), y_t drawn from the model itself)
For a weight error dW the layer's output error is e = tr(dW H dW^T), and for noise of that size the
Fisher quadratic form predicts KL(p || p') = alpha * e with alpha = fisher / (2 * out * tr(H)) (the
HIGGS linearity view: KL is a weighted sum of per-layer output errors). Calibration hooks collect
statistics only; scoring the options is a separate step (`calibration.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from tqc.models import linear_layers


@dataclass
class LayerStats:
    hessian: torch.Tensor  # H (float64; a running sum until `collect` divides it)
    out_features: int
    fisher: float = 0.0
    tokens: int = 0
    sequences: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        """KL divergence (nats/token) per unit of output error tr(dW H dW^T)."""
        trace = float(self.hessian.diagonal().sum())
        return 0.5 * self.fisher / (self.out_features * trace) if trace > 0 else 0.0


def _attach(model: nn.Module, stats: dict[str, LayerStats], outputs: dict[str, torch.Tensor]) -> list:
    handles = []
    for name, layer in linear_layers(model).items():

        def hook(module, args, output, name=name):
            x = args[0].detach()
            entry = stats[name]
            flat = x.reshape(-1, x.shape[-1]).double()
            entry.hessian += flat.T @ flat
            entry.tokens += flat.shape[0]
            entry.inputs.append(x.float())
            outputs[name] = output

        handles.append(layer.register_forward_hook(hook))
    return handles


def collect(model: nn.Module, windows: torch.Tensor, seed: int = 0, batch_size: int = 4, progress: bool = True) -> dict[str, LayerStats]:
    """Run the calibration windows [samples, seq_len] through the model and return per-layer stats."""
    layers = linear_layers(model)
    stats = {
        name: LayerStats(torch.zeros(l.in_features, l.in_features, dtype=torch.float64), l.out_features)
        for name, l in layers.items()
    }
    outputs: dict[str, torch.Tensor] = {}
    handles = _attach(model, stats, outputs)
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        for batch in tqdm(windows.split(batch_size), desc="calibrate", unit="batch", disable=not progress):
            _fisher_step(model, batch, stats, outputs, generator)
    finally:
        for handle in handles:
            handle.remove()
    for entry in stats.values():
        entry.hessian /= max(entry.tokens, 1)
        entry.fisher /= max(entry.sequences, 1)
    return stats


def _fisher_step(model, batch, stats, outputs, generator) -> None:
    """Forward with sampled labels, backward to every linear output, accumulate ||G||^2 per sequence."""
    embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        labels = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
    loss = logp.reshape(-1, logp.shape[-1]).gather(1, labels).sum()
    names = list(outputs)
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    tokens = batch.shape[1]
    for name, grad in zip(names, grads):
        entry = stats[name]
        x = entry.inputs.pop()
        per_sequence = torch.einsum("bto,bti->boi", grad.float(), x)  # G for each sequence
        entry.fisher += float(per_sequence.square().sum()) / tokens
        entry.sequences += batch.shape[0]
    outputs.clear()
