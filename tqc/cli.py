"""The `tqc` command: plan, build, eval, generate, inspect, diff.

Every expected failure (bad plan, missing model, corrupt packed file, impossible budget) is printed
as one line `tqc: error: ...` with exit status 1; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from .activations import Activations
from .checkout import hide_checkout_root
from .plan import PlanError, QuantizerRef, read_plan, write_text_atomic

DEFAULT_DATA = "../shared/data/wiki.test.txt"
DEFAULT_TRAIN = "../shared/data/wiki.train.txt"


class CommandError(Exception):
    """An error worth one line to the user."""


# ------------------------------------------------------------------------------------------ plan


def cmd_plan(args: argparse.Namespace) -> None:
    from .plan_commands import cmd_plan as run  # noqa: PLC0415  (keeps `tqc --help` light)

    run(args)


# ----------------------------------------------------------------------------------------- build


def require_device(device: str) -> None:
    """A one-line error for a CUDA device this machine lacks (before any slow loading)."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA device on this machine")


def cmd_build(args: argparse.Namespace) -> None:
    from .packed import build  # noqa: PLC0415

    require_device(args.device)
    plan = read_plan(args.plan)
    build(plan, args.output, progress=not args.quiet, device=args.device, fold=args.fold)
    print(f"wrote {args.output}")


# ------------------------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> None:
    """Score packed models (or the 16-bit source) against the source; one JSON file per model."""
    import torch  # noqa: PLC0415

    from .evaluate import Windows, batch_size_for, evaluate_many, token_windows  # noqa: PLC0415
    from .models import load_model, load_tokenizer  # noqa: PLC0415
    from .reporting import EvalResult  # noqa: PLC0415

    torch.set_grad_enabled(False)
    if bool(args.packed) == (args.model is not None):
        raise CommandError("give packed directories, or --model NAME to evaluate the 16-bit source model")
    if args.output and len(args.packed) > 1:
        raise CommandError("-o/--output names one file: give it with one packed directory only")
    if not Path(args.data).is_file():
        raise CommandError(f"{args.data}: no such evaluation file")
    require_device(args.device)
    source, candidates = _eval_candidates(args)
    reference = load_model(source).to(args.device)
    windows = Windows(args.data, args.seq_len, args.windows)
    ids = token_windows(load_tokenizer(source), windows)
    vocab = reference.config.get_text_config().vocab_size
    batch_size = args.batch_size or batch_size_for(vocab, args.seq_len)
    models = [model for _, model, _, _ in candidates]
    all_metrics = evaluate_many(models, reference, ids, batch_size, progress=not args.quiet)
    for (label, _, size, output), metrics in zip(candidates, all_metrics):
        result = EvalResult(
            model=label, source=source.name, data=str(args.data), seq_len=args.seq_len, windows=args.windows,
            batch_size=batch_size, device=args.device, **metrics.as_dict(), **size,
        )
        write_text_atomic(output, result.model_dump_json(indent=2) + "\n")
        print(
            f"{label}: ppl {metrics.perplexity:.3f} (source {metrics.source_perplexity:.3f}), "
            f"KLD {metrics.kl_divergence:.4f}, top-1 {metrics.top1_agreement:.3f}, "
            f"{size['size_mb']:.1f} MB, {size['bits_per_weight']:.3f} bits/weight of quantized linears"
        )
        print(f"wrote {output}")


def _eval_candidates(args: argparse.Namespace):
    """(source, [(label, model, size, output path)]) for `tqc eval`; packed models share one source."""
    from .models import load_model, resolve_model  # noqa: PLC0415
    from .packed import WEIGHTS_FILE, load_packed, read_manifest  # noqa: PLC0415
    from .reporting import packed_size, source_size  # noqa: PLC0415

    if args.model is not None:
        source = resolve_model(args.model)
        model = load_model(source)
        for param in model.parameters():
            param.data = param.data.half().float()
        model.to(args.device)
        output = Path(args.output or f"eval-{args.model}-fp16.json")
        return source, [(f"{args.model} (16-bit)", model, source_size(model), output)]
    directories = [Path(d) for d in args.packed]
    manifests = [read_manifest(d) for d in directories]
    names = {m.source.name for m in manifests}
    if len(names) > 1:
        raise CommandError(f"packed models of different sources ({', '.join(sorted(names))}): evaluate them separately")
    candidates = [
        (str(d), load_packed(d, device=args.device), packed_size(d / WEIGHTS_FILE, m), Path(args.output or d / "eval.json"))
        for d, m in zip(directories, manifests)
    ]
    return resolve_model(manifests[0].source.name), candidates


# -------------------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a packed model and print the new text (tqc.generation.StaticDecoder:
    one CUDA graph replay a token on a GPU)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from .generation import StaticDecoder  # noqa: PLC0415
    from .packed import load_packed  # noqa: PLC0415

    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    require_device(args.device)
    model = load_packed(args.packed, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.packed)  # tqc build saves the source's tokenizer
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    # one prompt: compiling its forward saves about 12 ms on 8B shapes (run 175), far less than the compile takes
    decoder = StaticDecoder(model, max_length=ids.shape[1] + args.max_new_tokens, compiled_prefill=False)
    tokens = decoder.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    print(tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True))


# --------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    from .plan_commands import cmd_inspect as run  # noqa: PLC0415

    run(args)


def cmd_diff(args: argparse.Namespace) -> None:
    from .plan_commands import cmd_diff as run  # noqa: PLC0415

    run(args)


# ------------------------------------------------------------------------------------------ main


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    """The options of `tqc plan` (uniform, budget and check modes)."""
    plan.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a .gguf file, an HF directory or a config.json")
    plan.add_argument("--uniform", metavar="OPTION", help="every layer at OPTION: 2, 3, 3g, 4, 2+2, 3+2, 4+2, 4+4, rtn4, ...")
    plan.add_argument("--budget", metavar="SIZE", help="allocate per-layer options to fit SIZE: 24GB, 800MB, 3.5GiB")
    plan.add_argument("--check", metavar="PLAN", help="re-validate an (edited) plan and report its total against its budget")
    plan.add_argument("--group-size", type=int, default=128, help="preferred group size (smaller where it must divide)")
    plan.add_argument("--seed", type=int, default=0, help="rotation seed")
    plan.add_argument("--keep", nargs="*", metavar="PATTERN", help="layers kept in fp16 (default: lm_head)")
    plan.add_argument("--override", action="append", metavar="PATTERN=OPTION", help="e.g. '*.down_proj=4+2' (uniform)")
    plan.add_argument(
        "--quantizer", choices=get_args(QuantizerRef.model_fields["method"].annotation), default="plain",
        help="how tqc build fits codes: plain, or tuned to calibration data (gptq, scales; docs/gptq.md)",
    )  # fmt: skip
    plan.add_argument("--activations", choices=get_args(Activations), default="fp16",
                      help="int8: layers without a residual multiply int8 activations (llama.cpp's q8_1 way; tqc.activations)")
    budget = plan.add_argument_group("budget plans")
    budget.add_argument("--context", type=int, default=0, help="tokens of KV cache per sequence")
    budget.add_argument("--batch", type=int, default=1, help="sequences served at once")
    budget.add_argument("--kv-bits", type=int, default=16, help="bits per KV-cache entry")
    budget.add_argument("--reserve", default="0", metavar="SIZE", help="memory to leave free (runtime overhead)")
    budget.add_argument("--options", metavar="LIST", help="allowed options, comma-separated (default: all TurboQuant "
                        "but 3g; 'default,3g' adds 3g to those, 'default,-3,3g' puts 3g in 3's place); the --keep "
                        "layers, lm_head by default, may also stay fp16")
    budget.add_argument("--min-bits", action="append", metavar="PATTERN=BITS", help="e.g. 'lm_head=4', 'model.layers.0.*=4'")
    budget.add_argument("--pinned-from", metavar="PLAN", help="keep the layers a person pinned in this plan")
    budget.add_argument("--measurement", metavar="FILE", help="allocate from this measurement file")
    budget.add_argument("--prior", action="store_true", help="data-free sensitivity prior (no calibration)")
    budget.add_argument("--data", default=DEFAULT_TRAIN, help="calibration text (never the test file)")
    budget.add_argument("--samples", type=int, default=8, help="calibration windows")
    budget.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    budget.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows and labels")
    budget.add_argument("--rows", type=int, default=128, help="rows sampled per layer to score options")
    plan.add_argument("-o", "--output", help="plan file (.yaml or .json)")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="write a plan (per-layer quantization options): uniform or to a budget")
    add_plan_arguments(plan)
    plan.set_defaults(run=cmd_plan)

    build_cmd = commands.add_parser("build", help="quantize a model by a plan into a packed directory")
    build_cmd.add_argument("plan")
    build_cmd.add_argument("-o", "--output", required=True, help="packed model directory")
    build_cmd.add_argument("--device", default="cpu",
                           help="where the codes are fitted: cpu (byte-identical builds) or cuda (fast, for large models)")
    build_cmd.add_argument("--fold", action="store_true",
                           help="fold o_proj's input rotation into v_proj where the attention allows (docs/format.md; "
                                "default: o_proj rotates its input at run time)")
    build_cmd.add_argument("-q", "--quiet", action="store_true")
    build_cmd.set_defaults(run=cmd_build)

    eval_cmd = commands.add_parser("eval", help="perplexity, KL divergence and top-1 agreement against the source")
    eval_cmd.add_argument("packed", nargs="*", help="packed model directories of one source (its forward is shared)")
    eval_cmd.add_argument("--model", help="evaluate the 16-bit source model instead")
    eval_cmd.add_argument("--data", default=DEFAULT_DATA)
    eval_cmd.add_argument("--seq-len", type=int, default=512)
    eval_cmd.add_argument("--windows", type=int, default=40)
    eval_cmd.add_argument("--batch-size", type=int, help="windows per forward (default: as many as 1 GiB of logits allows, at most 8)")
    eval_cmd.add_argument("--device", default="cpu", help="cpu, or cuda: packed models on the generated kernels in "
                          "bf16 (the source model stays float32 there too)")
    eval_cmd.add_argument("-o", "--output", help="JSON results (default: PACKED/eval.json)")
    eval_cmd.add_argument("-q", "--quiet", action="store_true")
    eval_cmd.set_defaults(run=cmd_eval)

    generate = commands.add_parser("generate", help="continue a prompt with a packed model")
    generate.add_argument("packed", help="packed model directory")
    generate.add_argument("-p", "--prompt", required=True)
    generate.add_argument("-n", "--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-k", type=int, help="sample from the K most likely tokens only")
    generate.add_argument("--seed", type=int, help="seed of the sampling")
    generate.add_argument("--device", default="cpu", help="cpu, or cuda: the generated kernels, one CUDA graph a token")
    generate.set_defaults(run=cmd_generate)

    inspect = commands.add_parser("inspect", help="print a plan's per-layer table and budget breakdown")
    inspect.add_argument("plan")
    inspect.set_defaults(run=cmd_inspect)

    diff = commands.add_parser("diff", help="what changed between two plans: layers, size, predicted damage")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.set_defaults(run=cmd_diff)

    from .kernels.bench import add_parser as add_bench_parser  # noqa: PLC0415

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    hide_checkout_root()  # `python -m tqc.cli` in the checkout: kernels/ would shadow transformers' `kernels`
    from .models import ModelNotFoundError  # noqa: PLC0415
    from .packed import PackedModelError  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, PlanError, PackedModelError, ModelNotFoundError, ValueError) as err:
        print(f"tqc: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m tqc.cli: run the imported module, whose error classes the
    from tqc.cli import main as package_main  # other modules raise (this copy's are not those)

    sys.exit(package_main())
