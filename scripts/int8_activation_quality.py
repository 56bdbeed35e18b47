"""What int8 activations cost in quality: a model scored with 16-bit and int8 activations (CPU, no asserts).

    python scripts/int8_activation_quality.py --options 4 3 2 --windows 10 -o int8-quality.json

A plan's `activations: int8` (tqc.activations) rounds the rotated input of every TurboQuant layer
without a residual stage to int8 per (token, group), and its codebook levels to int8. Here the
model, quantized uniformly at each option, is scored on the same WikiText windows twice, through
the torch reference path (which the GPU kernels match): as planned with 16-bit activations, and
with the same codes on int8 activations; each against the source model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tqc.activations import takes_int8
from tqc.evaluate import Windows, evaluate_many, token_windows
from tqc.linear import QuantizedLinear
from tqc.models import linear_shapes, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import quantize_model
from tqc.plan import ModelRef, write_text_atomic
from tqc.planning import uniform_plan

DATA = "../shared/data/wiki.test.txt"


def set_activations(model, activations: str) -> None:
    """Every quantized layer that can, on `activations` (the codes stay as they are)."""
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear) and takes_int8(layer.spec.option, "int8"):
            layer.spec = dataclasses.replace(layer.spec, activations=activations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--options", nargs="+", default=["4", "3", "2"])
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
        (fp16,) = evaluate_many([model], source, ids, progress=False)
        set_activations(model, "int8")
        (int8,) = evaluate_many([model], source, ids, progress=False)
        rows.append({"option": option, "fp16_activations": fp16.as_dict(), "int8_activations": int8.as_dict()})
        print(f"{args.model} {option:>4} (source perplexity {fp16.source_perplexity:.3f}): "
              + "; ".join(f"{name} perplexity {m.perplexity:.3f} KLD {m.kl_divergence:.4f} top-1 {m.top1_agreement:.3f}"
                          for name, m in (("fp16 activations", fp16), ("int8 activations", int8))), flush=True)
    write_text_atomic(Path(args.output),
                      json.dumps({"model": args.model, "windows": args.windows, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
