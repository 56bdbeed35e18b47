"""Loader fusion on the GPU kernels: a tiny random Llama loaded fused and separate agrees with the CPU reference.

    python scripts/check_load_fusion.py make [DIR]    # here (needs the smollm2 tokenizer): build two packed models
    python scripts/check_load_fusion.py check [DIR]   # on a CUDA machine, with DIR carried over

`make` builds one plan at 4 bits everywhere (q/k/v and gate/up fuse) and one at 3+2 with k_proj at 4
(q/v fuse, k stays apart). `check` loads each on CUDA with and without fusion, compares the logits of 8
tokens and of 1 token with the CPU reference path, and prints greedy continuations.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

PLANS = {"uniform4": ("4", {}), "mixed": ("3+2", {"*.k_proj": "4"})}
IDS = torch.tensor([[1, 500, 200, 31, 7, 900, 12, 1000]])


def make(root: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from tqc.models import empty_model, linear_shapes, load_config, load_tokenizer, resolve_model
    from tqc.options import QuantOption
    from tqc.packed import build
    from tqc.plan import ModelRef
    from tqc.planning import uniform_plan

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
                                      max_position_embeddings=256)
    torch.manual_seed(0)
    source = root / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    load_tokenizer(resolve_model("smollm2")).save_pretrained(source)
    shapes = linear_shapes(empty_model(load_config(resolve_model(str(source)))))
    for name, (option, overrides) in PLANS.items():
        plan = uniform_plan(ModelRef(name=str(source)), shapes, QuantOption.parse(option), keep=("lm_head",),
                            overrides={k: QuantOption.parse(v) for k, v in overrides.items()})
        build(plan, root / name, progress=False)
    shutil.rmtree(source)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double().cpu() - reference).norm() / reference.norm()).item()


def check(root: Path) -> None:
    import tqc
    import tqc.kernels.tuning as tuning
    from tqc.fusion import SiblingSlice

    tuning.STREAM_BYTES = 8 * 2**20  # a correctness check: tune quickly
    for name in PLANS:
        reference = tqc.load(root / name, device="cpu", fuse=False)
        with torch.no_grad():
            expected, expected_one = (reference(input_ids=ids).logits.double() for ids in (IDS, IDS[:, :1]))
        texts = {}
        for fuse in (True, False):
            model = tqc.load(root / name, device="cuda", fuse=fuse)
            kernels = sum(getattr(m, "kernel", None) is not None for m in model.modules())
            slices = sum(isinstance(m, SiblingSlice) for m in model.modules())
            with torch.no_grad():
                many, one = (model(input_ids=ids.cuda()).logits for ids in (IDS, IDS[:, :1]))
                texts[fuse] = model.generate(IDS.cuda(), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
            errors = relative_error(many, expected), relative_error(one, expected_one)
            print(f"{name:9} fuse={fuse!s:5} kernels={kernels} slices={slices} "
                  f"relative error 8 tokens {errors[0]:.2e}, 1 token {errors[1]:.2e}")
            if max(errors) > 2e-2:
                raise SystemExit(f"{name} fuse={fuse}: logits differ from the reference path")
        print(f"{name:9} greedy tokens, fused {texts[True]}\n{'':9}               separate {texts[False]}")
    print("check passed")


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "build/load-fusion")
    make(root) if command == "make" else check(root)
