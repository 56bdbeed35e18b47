"""Time `tqc eval`'s inner loop and `tqc build`'s quantizer; print and save JSON (no asserts).

    nice python scripts/bench_eval.py build/results/smollm2/3 build/results/smollm2/rtn3 --windows 4

Compares one model at a time with a window per forward (2 forwards per window per model, as
`tqc eval` did first) against batched windows with the source forward shared by all models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tqc
from tqc.evaluate import Windows, batch_size_for, evaluate, evaluate_many, token_windows
from tqc.layout import LayerSpec
from tqc.models import linear_layers, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import read_manifest
from tqc.plan import write_text_atomic
from tqc import turboquant

DATA = "../shared/data/wiki.test.txt"


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def bench_eval(packed: list[Path], windows: int) -> dict:
    source = resolve_model(read_manifest(packed[0]).source.name)
    reference = load_model(source)
    models = [tqc.load(p) for p in packed]
    ids = token_windows(load_tokenizer(source), Windows(DATA, 512, windows))
    batch = batch_size_for(reference.config.get_text_config().vocab_size, 512)
    one_by_one = _seconds(lambda: [evaluate(m, reference, ids, progress=False, batch_size=1) for m in models])
    shared = _seconds(lambda: evaluate_many(models, reference, ids, batch_size=batch, progress=False))
    return {"models": [str(p) for p in packed], "windows": windows, "batch_size": batch,
            "one_model_one_window_s": one_by_one, "batched_shared_source_s": shared,
            "speedup": one_by_one / shared}


def bench_quantize(model_name: str, option: str) -> dict:
    linears = linear_layers(load_model(resolve_model(model_name)))
    name, linear = next((n, l) for n, l in linears.items() if l.in_features % 128 == 0)
    spec = LayerSpec(QuantOption.parse(option), 128, linear.in_features, linear.out_features)
    seconds = _seconds(lambda: turboquant.quantize(linear.weight, spec, seed=0))
    dequant = _seconds(lambda: turboquant.dequantize(turboquant.quantize(linear.weight, spec, 0), spec)) - seconds
    return {"layer": name, "shape": list(linear.weight.shape), "option": option, "quantize_s": seconds,
            "dequantize_s": dequant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", nargs="+", type=Path, help="packed models of one source")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("-o", "--output", default="docs/results/bench-eval.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = {"threads": torch.get_num_threads(), "eval": bench_eval(args.packed, args.windows),
              "quantize": bench_quantize(read_manifest(args.packed[0]).source.name, "3+2")}
    text = json.dumps(result, indent=2)
    print(text)
    write_text_atomic(args.output, text + "\n")


if __name__ == "__main__":
    main()
