"""Does the proxy rank damage like the real thing? Spearman correlation against measured KL.

For a seeded sample of (layer, option) pairs, quantize that layer alone with the real quantizer,
run held-out calibration windows (training text, a different seed than calibration), and measure
KL(source || quantized) per token. Compare with the measurement's predicted damage.

    python -m tqc.calibration.validate --pairs 40 -o docs/calibration_correlation.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from tqdm import tqdm

from tqc.layout import LayerSpec, rotation_seed
from tqc.linear import quantize_linear
from tqc.models import linear_layers, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.plan import write_text_atomic

from .data import DEFAULT_DATA, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, data_ref, sample_windows
from .measurement import Measurement

HELD_OUT = 1  # offset seed of the validation windows


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=windows).logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def layer_kl(model: nn.Module, reference: torch.Tensor, windows: torch.Tensor, name: str, spec: LayerSpec, seed: int) -> float:
    """KL(source || model with `name` alone quantized to spec), nats per predicted token."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, quantize_linear(original, spec, rotation_seed(seed, name)))
    try:
        logp = log_probs(model, windows)
    finally:
        setattr(parent, child, original)
    return float(F.kl_div(logp, reference, log_target=True, reduction="sum")) / (reference.shape[0] * reference.shape[1])


def sample_pairs(measurement: Measurement, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Seeded (layer, option) pairs over every scored layer and option."""
    pool = [(name, option) for name, layer in measurement.layers.items() for option in layer.options]
    return sorted(random.Random(seed).sample(pool, min(count, len(pool))))


def correlation(model: nn.Module, tokenizer, measurement: Measurement, pairs: list[tuple[str, str]], samples: int, seq_len: int) -> dict:
    """Predicted vs measured KL for each pair, and their Spearman rank correlation."""
    data = measurement.data
    held_out = sample_windows(tokenizer, data.model_copy(update={"samples": samples, "seq_len": seq_len}), HELD_OUT)
    reference = log_probs(model, held_out)
    linears = linear_layers(model)
    rows = []
    for name, option in tqdm(pairs, desc="measure KL", unit="pair"):
        layer = measurement.layers[name]
        spec = LayerSpec(QuantOption.parse(option), layer.group_size, layer.in_features, layer.out_features, linears[name].bias is not None)
        measured = layer_kl(model, reference, held_out, name, spec, measurement.seed)
        rows.append({"layer": name, "option": option, "predicted": layer.options[option].damage, "measured": measured})
    rho = spearmanr([r["predicted"] for r in rows], [r["measured"] for r in rows]).statistic
    return {"spearman": float(rho), "pairs": rows, "samples": samples, "seq_len": seq_len}


def main(argv: list[str] | None = None) -> None:
    from .calibrate import cached_calibration  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=2, help="held-out windows for the measured KL")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    source = resolve_model(args.model)
    measurement, path = cached_calibration(source, data_ref(DEFAULT_DATA, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, 0))
    model = load_model(source)
    result = correlation(model, load_tokenizer(source), measurement, sample_pairs(measurement, args.pairs, args.seed), args.samples, args.seq_len)
    result |= {"model": args.model, "measurement": path.name}
    write_text_atomic(args.output, json.dumps(result, indent=1) + "\n")
    print(f"Spearman rank correlation of predicted vs measured KL over {len(result['pairs'])} pairs: {result['spearman']:.3f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
