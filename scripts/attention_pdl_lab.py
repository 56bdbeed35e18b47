"""Lab: the one-launch attention with and without programmatic dependent launch, in the decoder (CUDA only).

    python scripts/attention_pdl_lab.py [--model llama3-8b] [--rounds 2] [--splits 32 128] [--preload-rounds 2]
                                        [--combine-rounds 2] [--combine-widths 128 256] -o attention-pdl.json

Under PDL (kernels/attention.py) the attention's programs start while the q/k/v matmul drains and
read their first block of the KV cache before waiting for it. Both models of `tqc bench decode`
(the mixed plan, `--attention triton`) are built once and timed with PDL on and off in turn, on
first and last, in one process; then, under PDL, with each of `--splits` positions a program
(DecodeAttention's split; the default's again last); then, --preload-rounds times, the norms'
first weights and signs loaded after their PDL wait and before it (glue.PRELOAD); then,
--combine-rounds times, the attention's slices combined by its last program and in o_proj's
rotation launch (glue.COMBINE_IN_ROTATION; bf16's o_proj has no rotation and always takes the first);
then with each of --combine-widths columns a program of that launch (glue.COMBINE_WIDTH; the
default's again last).
"""

from __future__ import annotations

import argparse

import torch

from tqc.kernels import glue
from tqc.kernels.attention import DecodeAttention
from tqc.kernels.bench import (DECODER_SHAPES, add_decoder_lab_arguments, bench_registry, compile_and_report,
                               device_info, save)
from tqc.kernels.decode_bench import Decoder, bf16_factory, decoder_keys, plan_options, quantized_factory, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(DECODER_SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--splits", type=int, nargs="*", default=[])
    parser.add_argument("--preload-rounds", type=int, default=0)
    parser.add_argument("--combine-rounds", type=int, default=0)
    parser.add_argument("--combine-widths", type=int, nargs="*", default=[])
    parser.add_argument("-o", "--output", default="attention-pdl.json")
    add_decoder_lab_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = DECODER_SHAPES[args.model][0]
    options = plan_options("mixed")
    registry, family = bench_registry("attention_pdl_lab.py", args.cache_dir, fragments=args.fragments)
    compile_and_report(decoder_keys(options, True, shape, registry), [1])
    models = {label: Decoder(linear, shape, args.layers, args.context, compile_glue=True, rotate_in_glue=True,
                             attention="triton")
              for label, linear in (("bf16", bf16_factory()), ("tqc", quantized_factory(options, registry)))}
    default_split = models["tqc"].blocks[0].decode_attention.split
    rows = []
    variants = [(pdl, None, True, True, None) for pdl in [True, False] * args.rounds + [True]]
    variants += [(True, split, True, True, None) for split in args.splits + [None] * bool(args.splits)]
    variants += [(True, None, preload, True, None) for preload in [False, True] * args.preload_rounds]
    variants += [(True, None, True, combine, None) for combine in [False, True] * args.combine_rounds]
    variants += [(True, None, True, True, width) for width in args.combine_widths + [None] * bool(args.combine_widths)]
    for pdl, split, preload, combine, width in variants:
        row = {"pdl": pdl, "split": split or default_split, "norm_preload": preload, "combine_in_rotation": combine,
               "combine_width": width}
        glue.PRELOAD, glue.COMBINE_IN_ROTATION, glue.COMBINE_WIDTH = preload, combine, width
        for label, model in models.items():
            attention = DecodeAttention(shape["heads"], shape["kv_heads"], shape["head_dim"], args.context, "cuda",
                                        split=row["split"], pdl=pdl)
            for block in model.blocks:  # one DecodeAttention serves every block
                block.decode_attention = attention
            row[f"{label}_ms"] = step_seconds(model) * 1e3
        row["speedup"] = row["bf16_ms"] / row["tqc_ms"]
        rows.append(row)
        on = {True: "on ", False: "off"}
        print(f"PDL {on[pdl]}, split {row['split']:>3}, norm preload {on[preload]}, combine in rotation "
              f"{on[combine]} ({width or 'default'} columns a program): bf16 {row['bf16_ms']:.3f} ms, "
              f"tqc {row['tqc_ms']:.3f} ms, x{row['speedup']:.3f}", flush=True)
    save({"device": device_info(), "family": family, "model": args.model, "rows": rows}, args.output)


if __name__ == "__main__":
    main()
