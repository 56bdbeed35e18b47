"""What int8 activations would cost in quality: a model scored with and without them (CPU, no asserts).

    python scripts/int8_activation_quality.py --options 4 3 4+4 --windows 10 -o int8-quality.json

The lab's faster kernels (scripts/int8_gemv_lab.py) multiply int8 codebook levels by activations
quantized to int8 per group of the rotation (absmax / 127). Here every TurboQuant layer of the
model, quantized uniformly at each option, runs the torch reference path twice on the same
WikiText windows three times: as tqc computes it, with its rotated input rounded to int8 per group,
and with its codebook levels rounded to int8 as well; each scored against the source model.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from tqc import turboquant
from tqc.evaluate import Windows, evaluate_many, token_windows
from tqc.kernels.lut_int8 import int8_levels
from tqc.linear import TurboQuantLinear
from tqc.models import linear_shapes, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import quantize_model
from tqc.plan import ModelRef, write_text_atomic
from tqc.planning import uniform_plan

DATA = "../shared/data/wiki.test.txt"


def int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded to int8 per group of its last dimension, scale absmax / 127, back in x's dtype."""
    groups = x.float().unflatten(-1, (-1, group))
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(groups / scale) * scale).flatten(-2).to(x.dtype)


@contextmanager
def int8_activations():
    """Every TurboQuantLinear rounds its rotated input to int8 per group while inside."""
    original = TurboQuantLinear.prepare_input

    def prepare_input(self, x):
        return int8_groups(turboquant.prepare_input(x, self.signs, self.spec), self.spec.group_size)

    TurboQuantLinear.prepare_input = prepare_input
    try:
        yield
    finally:
        TurboQuantLinear.prepare_input = original


@contextmanager
def int8_codebooks():
    """Every codebook rounded to its int8 levels (times their factor) while inside: what an int8
    lookup decodes from codes chosen with the exact codebook."""
    original = turboquant.gaussian_codebook

    def rounded(bits: int) -> torch.Tensor:
        levels, factor = int8_levels(bits)
        return torch.from_numpy(levels.astype(np.float64) * factor).float()

    turboquant.gaussian_codebook = rounded
    try:
        yield
    finally:
        turboquant.gaussian_codebook = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--options", nargs="+", default=["4", "3", "4+4"])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("-o", "--output", default="int8-quality.json")
    args = parser.parse_args()

    source_ref = resolve_model(args.model)
    source = load_model(source_ref)
    ids = token_windows(load_tokenizer(source_ref), Windows(DATA, 512, args.windows))
    rows = []
    for option in args.options:
        model = load_model(source_ref)
        plan = uniform_plan(ModelRef(name=args.model), linear_shapes(model), QuantOption.parse(option))
        quantize_model(model, plan, progress=False)
        (plain,) = evaluate_many([model], source, ids, progress=False)
        with int8_activations():
            (int8,) = evaluate_many([model], source, ids, progress=False)
            with int8_codebooks():
                (both,) = evaluate_many([model], source, ids, progress=False)
        row = {"option": option, "as_tqc": plain.as_dict(), "int8_activations": int8.as_dict(),
               "int8_activations_and_levels": both.as_dict()}
        rows.append(row)
        print(f"{args.model} {option:>4} (source perplexity {plain.source_perplexity:.3f}): "
              + "; ".join(f"{name} perplexity {m.perplexity:.3f} KLD {m.kl_divergence:.4f} top-1 {m.top1_agreement:.3f}"
                          for name, m in (("as tqc", plain), ("int8 activations", int8), ("+ int8 levels", both))),
              flush=True)
    write_text_atomic(Path(args.output),
                      json.dumps({"model": args.model, "windows": args.windows, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
