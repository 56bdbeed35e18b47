"""Time a decode step's attention alone (CUDA): torch's index_copy_ + scaled_dot_product_attention
against kernels/attention.py's one launch at several slice lengths and warp counts, on Llama-3-8B's
and Qwen2.5-7B's heads, each a CUDA-graph replay over enough layers' caches to leave L2.

    python scripts/attention_bench.py --context 1024 -o attention-bench.json
"""

import argparse
import json

import torch
from triton.testing import do_bench_cudagraph

from tqc.kernels.attention import DecodeAttention
from tqc.kernels.bench import DECODER_SHAPES
from tqc.kernels.decode_bench import sdpa_attention

LAYERS = 32  # caches a replay walks through, as a decode step does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("-o", "--output", default="attention-bench.json")
    args = parser.parse_args()
    results = {"context": args.context, "gpu": torch.cuda.get_device_name(), "rows": []}
    for model in ("llama3-8b", "qwen2.5-7b"):
        shape = DECODER_SHAPES[model][0]
        heads, kv_heads, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
        caches = torch.randn(LAYERS, 2, 1, kv_heads, args.context, d, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(1, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor([7], device="cuda")
        variants = {"sdpa": lambda: [sdpa_attention(qkv, c, pos, heads, kv_heads, d) for c in caches]}
        for split in args.splits:
            for warps in args.warps:
                attention = DecodeAttention(heads, kv_heads, d, args.context, "cuda", split=split, num_warps=warps)
                variants[f"one launch, split {split}, {warps} warps"] = \
                    lambda attention=attention: [attention(qkv, c, pos) for c in caches]
        for name, step in variants.items():
            step()
            torch.cuda.synchronize()
            us = do_bench_cudagraph(step, rep=200, return_mode="median") * 1e3 / LAYERS
            results["rows"].append({"model": model, "variant": name, "us_per_layer": us})
            print(f"{model:>11} {name:<34} {us:6.2f} us a layer", flush=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
