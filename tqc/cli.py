"""The `tqc` command: plan, build, eval, inspect.

Every expected failure (bad plan, missing model, corrupt packed file, impossible budget) is printed
as one line `tqc: error: ...` with exit status 1; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plan import PlanError, read_plan, write_plan, write_text_atomic

DEFAULT_DATA = "../shared/data/wiki.test.txt"


class CommandError(Exception):
    """An error worth one line to the user."""


# ------------------------------------------------------------------------------------------ plan


def cmd_plan(args: argparse.Namespace) -> None:
    from .models import empty_model, linear_shapes, load_config, resolve_model  # noqa: PLC0415
    from .options import QuantOption  # noqa: PLC0415
    from .plan import ModelRef  # noqa: PLC0415
    from .planning import DEFAULT_KEEP, uniform_plan  # noqa: PLC0415

    if args.uniform is None:
        raise CommandError("give --uniform OPTION (the budget allocator is not built yet)")
    source = resolve_model(args.model)
    shapes = linear_shapes(empty_model(load_config(source)))
    keep = tuple(args.keep) if args.keep is not None else DEFAULT_KEEP
    overrides = dict(_parse_override(text) for text in args.override or [])
    plan = uniform_plan(
        ModelRef(name=args.model, sha256=source.sha256()),
        shapes,
        QuantOption.parse(args.uniform),
        group_size=args.group_size,
        seed=args.seed,
        keep=keep,
        overrides=overrides,
    )
    write_plan(plan, args.output)
    _print_summary(plan)
    print(f"wrote {args.output}")


def _parse_override(text: str):
    from .options import QuantOption  # noqa: PLC0415

    pattern, sep, option = text.partition("=")
    if not sep:
        raise CommandError(f"--override '{text}': expected PATTERN=OPTION, e.g. '*.down_proj=4+2'")
    return pattern, QuantOption.parse(option)


def _print_summary(plan) -> None:
    from collections import Counter  # noqa: PLC0415

    counts = Counter(layer.option for layer in plan.layers.values())
    total = sum(layer.bytes or 0 for layer in plan.layers.values())
    mix = ", ".join(f"{option}: {n}" for option, n in sorted(counts.items()))
    print(f"{len(plan.layers)} linear layers ({mix}); linear weights {total / 1e6:.2f} MB")


# ----------------------------------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> None:
    from .packed import build  # noqa: PLC0415

    plan = read_plan(args.plan)
    build(plan, args.output, progress=not args.quiet)
    print(f"wrote {args.output}")


# ------------------------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415

    from .evaluate import Windows, evaluate, token_windows  # noqa: PLC0415
    from .models import load_model, load_tokenizer, resolve_model  # noqa: PLC0415
    from .packed import WEIGHTS_FILE, load_packed, read_manifest  # noqa: PLC0415
    from .reporting import packed_size, source_size  # noqa: PLC0415

    torch.set_grad_enabled(False)
    if (args.packed is None) == (args.model is None):
        raise CommandError("give a packed directory, or --model NAME to evaluate the 16-bit source model")
    if not Path(args.data).is_file():
        raise CommandError(f"{args.data}: no such evaluation file")
    if args.packed is not None:
        directory = Path(args.packed)
        manifest = read_manifest(directory)
        source = resolve_model(manifest.source.name)
        model = load_packed(directory)
        size = packed_size(directory / WEIGHTS_FILE, manifest)
        label, default_output = str(directory), directory / "eval.json"
    else:
        source = resolve_model(args.model)
        model = load_model(source)
        for param in model.parameters():
            param.data = param.data.half().float()
        size = source_size(model)
        label, default_output = f"{args.model} (16-bit)", Path(f"eval-{args.model}-fp16.json")
    reference = load_model(source)
    windows = Windows(args.data, args.seq_len, args.windows)
    metrics = evaluate(model, reference, token_windows(load_tokenizer(source), windows), progress=not args.quiet)
    result = {"model": label, "data": str(args.data), "seq_len": args.seq_len, "windows": args.windows}
    result |= metrics.as_dict() | size
    output = Path(args.output) if args.output else default_output
    write_text_atomic(output, json.dumps(result, indent=2) + "\n")
    print(
        f"{label}: ppl {metrics.perplexity:.3f} (source {metrics.source_perplexity:.3f}), "
        f"KLD {metrics.kl_divergence:.4f}, top-1 {metrics.top1_agreement:.3f}, "
        f"{size['size_mb']:.1f} MB, {size['bits_per_weight']:.3f} bits/weight of quantized linears"
    )
    print(f"wrote {output}")


# --------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    plan = read_plan(args.plan)
    width = max(len(name) for name in plan.layers)
    print(f"{'layer':<{width}}  {'option':>6}  {'group':>5}  {'bytes':>10}  {'score':>10}  pinned")
    for name, layer in plan.layers.items():
        score = f"{layer.sensitivity:.3g}" if layer.sensitivity is not None else "-"
        print(f"{name:<{width}}  {layer.option:>6}  {layer.group_size:>5}  {layer.bytes or 0:>10}  {score:>10}  {'yes' if layer.pinned else ''}")
    _print_summary(plan)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="write a plan (per-layer quantization options)")
    plan.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a .gguf file or an HF directory")
    plan.add_argument("--uniform", metavar="OPTION", help="every layer at OPTION: 2, 3, 4, 2+2, 3+2, 4+2, 4+4, rtn4, ...")
    plan.add_argument("--group-size", type=int, default=128, help="preferred group size (smaller where it must divide)")
    plan.add_argument("--seed", type=int, default=0, help="rotation seed")
    plan.add_argument("--keep", nargs="*", metavar="PATTERN", help="layers kept in fp16 (default: lm_head)")
    plan.add_argument("--override", action="append", metavar="PATTERN=OPTION", help="e.g. '*.down_proj=4+2'")
    plan.add_argument("-o", "--output", required=True, help="plan file (.yaml or .json)")
    plan.set_defaults(run=cmd_plan)

    build_cmd = commands.add_parser("build", help="quantize a model by a plan into a packed directory")
    build_cmd.add_argument("plan")
    build_cmd.add_argument("-o", "--output", required=True, help="packed model directory")
    build_cmd.add_argument("-q", "--quiet", action="store_true")
    build_cmd.set_defaults(run=cmd_build)

    eval_cmd = commands.add_parser("eval", help="perplexity, KL divergence and top-1 agreement against the source")
    eval_cmd.add_argument("packed", nargs="?", help="packed model directory")
    eval_cmd.add_argument("--model", help="evaluate the 16-bit source model instead")
    eval_cmd.add_argument("--data", default=DEFAULT_DATA)
    eval_cmd.add_argument("--seq-len", type=int, default=512)
    eval_cmd.add_argument("--windows", type=int, default=40)
    eval_cmd.add_argument("-o", "--output", help="JSON results (default: PACKED/eval.json)")
    eval_cmd.add_argument("-q", "--quiet", action="store_true")
    eval_cmd.set_defaults(run=cmd_eval)

    inspect = commands.add_parser("inspect", help="print a plan's per-layer table")
    inspect.add_argument("plan")
    inspect.set_defaults(run=cmd_inspect)

    from .kernels.bench import add_parser as add_bench_parser  # noqa: PLC0415

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import ModelNotFoundError  # noqa: PLC0415
    from .packed import PackedModelError  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, PlanError, PackedModelError, ModelNotFoundError, ValueError) as err:
        print(f"tqc: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
