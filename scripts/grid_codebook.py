"""What a 3-bit codebook on fp16's high-byte grid would cost: on a Gaussian, and on SmolLM2 at a uniform plan.

    python scripts/grid_codebook.py --options 3 --quantizer gptq --plans plans/smollm2-100MB.yaml \
        -o docs/bench/grid-codebook-smollm2.json
    python scripts/grid_codebook.py --static -o docs/bench/grid-codebook-static.json   # no model, no GPU
    python scripts/grid_codebook.py --options --quantizer gptq --plans P --seeds 0 1 2 --windows 40   # seed spread

The one-token kernel looks 2-bit codes up by their high bytes alone (lut.HIGH_BYTE_LEVELS: 3 PRMTs a
quad instead of 4, 5-12% off 2-bit layers on the H100), because the 2-bit Lloyd-Max values lie
0.04% from fp16 numbers whose low byte is zero. The 3-bit magnitudes lie 4.5% away at best
(scripts/lookup_grid.py), so 3 bits could take that path only with a codebook of its own: the
4 magnitudes chosen among fp16 numbers with a zero low byte (2 mantissa bits: 1, 1.25, 1.5, 1.75
times a power of 2) under one common factor (which a kernel undoes on its sums), the choice
that gives a standard normal the least squared error (tqc.codebook.high_byte_codebook). This
prints that codebook and its error against Lloyd-Max's, then builds each plan (uniform, or a
file) as it is and with its 3-bit layers on that codebook (option 3g; nothing else changes) and scores
both against the source on wiki.test.txt windows; with --seeds, once at each plan seed (the random signs of
the rotations and GPTQ's sample change with it), and prints each variant's mean and range over them, since one
seed's difference between the codebooks can be smaller than the seeds' spread. With --static it compiles the one-token fragment kernel
of Llama-3-8B's gate/up and down at options 3 and 3g for sm_90 instead (no GPU needed; 3g's codes looked
up by their high bytes), and counts the SASS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tqc import codebook
from tqc.codebook import high_byte_codebook, symmetric_distortion
from tqc.evaluate import Windows, evaluate, token_windows
from tqc.models import load_model, load_tokenizer, resolve_model
from tqc.packed import build
from tqc.plan import Plan, read_plan, write_text_atomic


def on_grid(plan: Plan) -> Plan:
    """The plan with its 3-bit layers (option 3) on the grid codebook (option 3g)."""
    layers = {name: layer.model_copy(update={"option": "3g"}) if layer.option == "3" else layer
              for name, layer in plan.layers.items()}
    return plan.model_copy(update={"layers": layers})


def at_seeds(plan: Plan, seeds: list[int]) -> list[Plan]:
    """The plan at each of `seeds` (its own seed where none are given)."""
    return [plan.model_copy(update={"seed": seed}) for seed in seeds] if seeds else [plan]


def spread(rows: list[dict]) -> list[dict]:
    """Each (plan, codebook)'s KLD, perplexity and top-1 over its seeds: mean, min, max; printed."""
    summary = []
    for key in dict.fromkeys((row["plan"], row["codebook"]) for row in rows):
        runs = [row for row in rows if (row["plan"], row["codebook"]) == key]
        entry = {"plan": key[0], "codebook": key[1], "seeds": [row["seed"] for row in runs]}
        for metric in ("kl_divergence", "perplexity", "top1_agreement"):
            values = [row[metric] for row in runs]
            entry[metric] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}
        kld = entry["kl_divergence"]
        print(f"{key[0]}, {key[1]:<9}: KLD mean {kld['mean']:.4f} ({kld['min']:.4f}-{kld['max']:.4f}) over "
              f"{len(runs)} seeds, ppl mean {entry['perplexity']['mean']:.3f}, top-1 mean "
              f"{entry['top1_agreement']['mean']:.3f}")
        summary.append(entry)
    return summary


def score(plan: Plan, reference, ids: torch.Tensor) -> dict:
    """Build the plan (in a temporary directory) and score it against the source."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build(plan, Path(tmp) / "packed", progress=False)
        with torch.no_grad():
            return evaluate(model, reference, ids, progress=False).as_dict()


def static_counts() -> list[dict]:
    """SASS counts of the one-token fragment kernel's candidates (row sums) at 8B's gate/up and down, options 3
    and 3g (its codes looked up by high bytes), printed side by side."""
    from tqc.kernels.bench import bench_spec  # noqa: PLC0415
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey  # noqa: PLC0415
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary  # noqa: PLC0415

    rows = []
    for n, k in ((14336, 4096), (4096, 14336)):
        for lookup, option in (("both bytes", "3"), ("high bytes", "3g")):
            family = FragmentLayerKernel(KernelKey.of(bench_spec(option, 128, k, n), FRAGMENT_LAYOUT), None)
            for config in family.candidates(1):
                if not family.row_sums_gemv(config) or config.iters not in (4, 8, 16):
                    continue
                constexprs = family.specialise(config)[1]
                summary = sass_summary(compile_gluon_for_hopper(family.gluon_kernel(config), constexprs,
                                                                config.num_warps, "*bf16"))
                rows.append({"lookup": lookup, "n": n, "k": k, "steps": config.iters, "sums": config.sums,
                             "high_bytes": constexprs.get("HIGH_BYTES", False),
                             "instructions": summary["instructions"], "registers": summary["registers"],
                             "prmt": summary["ops"].get("PRMT", 0)})
    both = {(r["n"], r["k"], r["steps"], r["sums"]): r for r in rows if r["lookup"] == "both bytes"}
    for r in (r for r in rows if r["lookup"] == "high bytes"):
        was = both[r["n"], r["k"], r["steps"], r["sums"]]
        print(f"{r['n']}x{r['k']} {r['steps']:>2} steps, {r['sums']:<10}: {was['instructions']:>5} -> "
              f"{r['instructions']:>5} instructions ({100 * (r['instructions'] / was['instructions'] - 1):+.1f}%), PRMT "
              f"{was['prmt']} -> {r['prmt']}, registers {was['registers']} -> {r['registers']}")
    return rows


def quality(args: argparse.Namespace) -> dict:
    """The grid codebook against Lloyd-Max's: on N(0, 1), then each uniform plan built with either, scored."""
    levels, factor = high_byte_codebook(3)
    magnitudes = levels.double().numpy()[4:]
    lloyd = codebook.gaussian_codebook(3).double().numpy()[4:]
    gaussian = {"lloyd_max": lloyd.tolist(), "lloyd_max_mse": float(symmetric_distortion(lloyd)),
                "grid": magnitudes.tolist(), "grid_factor": factor, "grid_mse": float(symmetric_distortion(magnitudes))}
    print(f"3-bit magnitudes, Lloyd-Max {np.round(lloyd, 4)}: N(0, 1) MSE {gaussian['lloyd_max_mse']:.5f}")
    print(f"on the high-byte grid {np.round(magnitudes, 4)} (x {factor:.5f}: {np.round(magnitudes * factor, 4)}): MSE "
          f"{gaussian['grid_mse']:.5f}, {100 * (gaussian['grid_mse'] / gaussian['lloyd_max_mse'] - 1):+.2f}%")

    torch.set_grad_enabled(False)
    source = resolve_model(args.model)
    reference = load_model(source)
    ids = token_windows(load_tokenizer(source), Windows(args.data, args.seq_len, args.windows))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = {f"uniform {option} ({args.quantizer})": Path(tmp) / f"plan-{option}.yaml" for option in args.options}
        for option, plan in zip(args.options, plans.values()):
            subprocess.run([sys.executable, "-m", "tqc.cli", "plan", "--model", args.model, "--uniform", option,
                            "--quantizer", args.quantizer, "-o", str(plan)], check=True, stdout=subprocess.DEVNULL)
        plans |= {str(plan): Path(plan) for plan in args.plans}
        for label, plan in plans.items():
            for seeded in at_seeds(read_plan(plan), args.seeds):
                for name, variant in (("lloyd_max", seeded), ("grid", on_grid(seeded))):
                    metrics = score(variant, reference, ids)
                    rows.append({"plan": label, "codebook": name, "seed": seeded.seed} | metrics)
                    print(f"{label}, {name:<9}, seed {seeded.seed}: ppl {metrics['perplexity']:.3f} "
                          f"(source {metrics['source_perplexity']:.3f}), KLD {metrics['kl_divergence']:.4f}, "
                          f"top-1 {metrics['top1_agreement']:.3f}", flush=True)
    return {"model": args.model, "data": args.data, "windows": args.windows, "seq_len": args.seq_len,
            "gaussian": gaussian, "rows": rows, "over_seeds": spread(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--options", nargs="*", default=["3"], help="uniform plans to build (tqc plan --uniform)")
    parser.add_argument("--quantizer", default="plain", choices=["plain", "gptq"], help="the uniform plans'")
    parser.add_argument("--plans", nargs="*", default=[], help="plan files to build as well (their model's)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], help="plan seeds to build each variant at "
                        "(default: the plan's own)")
    parser.add_argument("--data", default="../shared/data/wiki.test.txt")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--static", action="store_true", help="count the kernel's SASS instead (no model)")
    parser.add_argument("-o", "--output", help="JSON to write")
    args = parser.parse_args()
    result = {"target": "sm_90", "rows": static_counts()} if args.static else quality(args)
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
