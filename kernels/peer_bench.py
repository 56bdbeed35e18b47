"""`tqc bench gemlite`: the peer kernel (gemlite, Triton) at the same shapes, with bf16 and tqc in the same run.

gemlite's A16Wn layers take affine group quantization (w = (q - z) * s, 2/4 bits, group 128),
so they move the same number of bytes as tqc's plain 2/4-bit option: the comparison is of
kernels, not of quantizers. gemlite is installed separately (`pip install gemlite`); it picks
its launch configurations from the cache it ships for the GPU, or tunes them on first call.
tqc's layers run what tqc.load runs (the fragment family on Hopper; --lookups: the lookup kernels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .bench import SHAPES, add_fragments_argument, device_info, save, time_layers
from .tuning import stream_copies


def gemlite_layer(n: int, k: int, bits: int, group_size: int, seed: int):
    """A gemlite A16Wn layer with random codes, bf16 activations."""
    from gemlite.helper import A16Wn  # noqa: PLC0415

    generator = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=generator, device="cuda", dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=generator, device="cuda", dtype=torch.bfloat16) * 0.01
    zeros = torch.full_like(scales, 2 ** (bits - 1))
    return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(codes, scales, zeros, bits, group_size)


def cmd_gemlite(args: argparse.Namespace) -> None:
    import gemlite  # noqa: PLC0415

    from .bench import bench_registry, bench_shape, report, row  # noqa: PLC0415

    torch.manual_seed(0)
    registry, family = bench_registry("tqc bench gemlite", args.cache_dir, fragments=args.fragments)
    result = {"device": device_info() | {"gemlite": gemlite.__version__}, "group_size": args.group_size,
              "fragments": family, "rows": []}
    for model in args.models:
        for layer, (n, k) in SHAPES[model].items():
            if args.layers and layer not in args.layers:
                continue
            rows = bench_shape(n, k, args.tokens, [str(b) for b in args.bits], args.group_size, registry)
            bf16 = {r["tokens"]: r["us"] / 1e6 for r in rows if r["option"] == "bf16"}
            for bits in args.bits:
                nbytes = n * k * bits // 8 + n * k // args.group_size * 4  # codes, bf16 scales and zeros
                layers = [gemlite_layer(n, k, bits, args.group_size, seed) for seed in range(stream_copies(nbytes))]
                for m in args.tokens:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    layers[0](x)  # tune outside the graph
                    rows.append(row(f"gemlite{bits}", n, k, m, nbytes, time_layers(layers, x), bf16[m]))
                del layers
                torch.cuda.empty_cache()
            result["rows"] += report(rows, model, layer)
    save(result, args.output)


def add_parser(kinds, checked) -> None:
    peer = kinds.add_parser("gemlite", help="gemlite's kernels beside tqc's and bf16 at the same shapes")
    peer.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    peer.add_argument("--layers", nargs="+", help="only these layer names (e.g. q_proj/o_proj); default all")
    peer.add_argument("--bits", nargs="+", type=int, default=[4, 2], choices=[2, 4])
    peer.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 2048])
    peer.add_argument("--group-size", type=int, default=128)
    peer.add_argument("--cache-dir", type=Path, help="tqc kernel tuning cache (default ~/.cache/tqc/kernels)")
    peer.add_argument("-o", "--output", default="bench-gemlite.json")
    add_fragments_argument(peer)
    peer.set_defaults(run=checked(cmd_gemlite))
