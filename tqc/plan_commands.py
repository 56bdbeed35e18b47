"""The plan commands behind `tqc plan`, `tqc plan --check`, `tqc inspect` and `tqc diff`.

Kept apart from cli.py so that the parser stays a table of commands; every expected failure is
raised as an error class that `cli.main` prints as one line.
"""

from __future__ import annotations

import argparse
from collections import Counter
from functools import lru_cache

from .memory import ModelGeometry, Runtime, breakdown, format_size, model_geometry, parse_size
from .models import LinearShape, SourceModel, empty_model, linear_shapes, load_config, resolve_model
from .options import TURBOQUANT_OPTIONS, QuantOption
from .plan import ModelRef, Plan, PlanError, QuantizerRef, read_plan, write_plan
from .planning import DEFAULT_KEEP, Rules, allocated_plan, layer_candidates, layer_notes, plan_specs, uniform_plan


class CommandError(ValueError):
    """An error worth one line to the user (`cli.main` prints ValueErrors as one line)."""


@lru_cache(maxsize=8)
def model_shapes(source: SourceModel) -> tuple[dict[str, LinearShape], ModelGeometry]:
    """Linear shapes and memory geometry from the config alone (meta device, no weights read).

    Cached per source within a process (callers must not mutate the returned dict)."""
    model = empty_model(load_config(source))
    return linear_shapes(model), model_geometry(model)


# ------------------------------------------------------------------------------------------ plan


def plan_uniform(args: argparse.Namespace) -> Plan:
    source = resolve_model(args.model)
    shapes, _ = model_shapes(source)
    keep = tuple(args.keep) if args.keep is not None else DEFAULT_KEEP
    overrides = dict(parse_assignment(text, "--override", QuantOption.parse) for text in args.override or [])
    return uniform_plan(
        ModelRef(name=args.model, sha256=source.sha256()),
        shapes,
        QuantOption.parse(args.uniform),
        group_size=args.group_size,
        seed=args.seed,
        keep=keep,
        overrides=overrides,
    )


def parse_assignment(text: str, flag: str, parse_value):
    """'PATTERN=VALUE' -> (pattern, parse_value(VALUE)); one-line error otherwise."""
    pattern, sep, value = text.partition("=")
    if not sep or not pattern:
        raise CommandError(f"{flag} '{text}': expected PATTERN=VALUE, e.g. 'lm_head=4' or '*.down_proj=4+2'")
    try:
        return pattern, parse_value(value)
    except ValueError as err:
        raise CommandError(f"{flag} '{text}': {err}") from None


def runtime_from(args: argparse.Namespace) -> Runtime:
    if args.context < 0 or args.batch < 1 or args.kv_bits not in (2, 3, 4, 8, 16):
        raise CommandError("--context must be >= 0, --batch >= 1 and --kv-bits one of 2, 3, 4, 8, 16")
    return Runtime(context=args.context, batch=args.batch, kv_bits=args.kv_bits, reserve=parse_size(args.reserve))


def options_from(text: str) -> tuple[tuple[QuantOption, ...] | None, tuple[QuantOption, ...]]:
    """Rules' (options, extra) from --options: a list, or 'default' (every TurboQuant option but 3g) with options
    to add and, each after a '-', options to take out (`default,-3,3g`: 3g in 3's place)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    removed = {name[1:] for name in names if name.startswith("-")}
    listed = tuple(QuantOption.parse(name) for name in names if name != "default" and not name.startswith("-"))
    if "default" not in names:
        if removed:
            raise CommandError(f"--options '{text}': '-' takes an option out of the default set: start the list "
                               "with 'default'")
        return listed, ()
    kept = tuple(option for option in TURBOQUANT_OPTIONS if option.name not in removed)
    missing = removed - {option.name for option in TURBOQUANT_OPTIONS}
    if missing:
        raise CommandError(f"--options '{text}': -{sorted(missing)[0]} is not in the default set "
                           f"({', '.join(option.name for option in TURBOQUANT_OPTIONS)})")
    return (None, listed) if not removed else ((*kept, *listed), ())


def rules_from(args: argparse.Namespace) -> Rules:
    options, extra = None, ()
    if args.options:
        options, extra = options_from(args.options)
    min_bits = tuple(parse_assignment(text, "--min-bits", int) for text in args.min_bits or [])
    pinned = {}
    if args.pinned_from:
        previous = read_plan(args.pinned_from)
        pinned = {name: layer.quant_option for name, layer in previous.layers.items() if layer.pinned}
    for pattern in args.keep or []:
        pinned |= {pattern: QuantOption.parse("fp16")} if "*" not in pattern else {}
    fp16 = tuple(args.keep) if args.keep else DEFAULT_KEEP
    return Rules(options=options, extra=extra, fp16=fp16, min_bits=min_bits, pinned=pinned)


def measurement_for(args: argparse.Namespace, source: SourceModel, model: ModelRef, shapes):
    """The measurement file to allocate from: given, cached calibration, or the data-free prior."""
    from .calibration.calibrate import cached_calibration, prior_measurement  # noqa: PLC0415
    from .calibration.data import data_ref  # noqa: PLC0415
    from .calibration.measurement import read_measurement  # noqa: PLC0415

    if args.measurement:
        return read_measurement(args.measurement)
    if args.prior or not source.weight_files:
        return prior_measurement(model, shapes, args.group_size, args.seed)
    data = data_ref(args.data, args.samples, args.seq_len, args.calib_seed)
    measurement, path = cached_calibration(source, data, args.group_size, args.seed, args.rows)
    print(f"sensitivities from {path}")
    return measurement


def plan_budget(args: argparse.Namespace) -> tuple[Plan, dict[str, str]]:
    budget, runtime, rules = parse_size(args.budget), runtime_from(args), rules_from(args)  # cheap checks first
    source = resolve_model(args.model)
    shapes, geometry = model_shapes(source)
    model = ModelRef(name=args.model, sha256=source.sha256())
    measurement = measurement_for(args, source, model, shapes)
    plan = allocated_plan(model, measurement, shapes, geometry, runtime, budget, rules)
    return plan, layer_notes(plan, layer_candidates(measurement, shapes, geometry, rules))


def cmd_plan(args: argparse.Namespace) -> None:
    if args.check:
        check_plan(args.check)
        return
    if (args.uniform is None) == (args.budget is None):
        raise CommandError("give one of --uniform OPTION or --budget SIZE (or --check PLAN)")
    if not args.output:
        raise CommandError("give -o/--output PLAN.yaml (or .json)")
    plan, notes = (plan_uniform(args), None) if args.uniform is not None else plan_budget(args)
    if args.quantizer != "plain":  # a plain plan keeps no entry, so its bytes are those of before
        plan = plan.model_copy(update={"quantizer": QuantizerRef(method=args.quantizer)})
    if args.activations != "fp16":  # likewise
        plan = plan.model_copy(update={"activations": args.activations})
    write_plan(plan, args.output, notes)
    print_summary(plan)
    if plan.budget is not None:
        print_breakdown(plan)
    print(f"wrote {args.output}")


# ----------------------------------------------------------------------------------------- check


def check_plan(path: str) -> None:
    """Re-validate a (hand-edited) plan against its model and report its new total against the budget."""
    plan = read_plan(path)
    source = resolve_model(plan.model.name)
    shapes, geometry = model_shapes(source)
    missing = [name for name in shapes if name not in plan.layers]
    if missing:
        raise PlanError(f"{path}: plan has no entry for layer '{missing[0]}' (write option: fp16 to keep it)")
    specs = plan_specs(plan.layers, shapes)
    for name, spec in specs.items():
        if spec.option.is_quantized and spec.in_features % spec.group_size:
            raise PlanError(f"{path}: layer '{name}', field 'group_size': {spec.group_size} does not divide {spec.in_features}")
    budget = plan.budget
    runtime = Runtime(budget.context, budget.batch, budget.kv_bits, budget.reserve) if budget else Runtime()
    spent = breakdown(specs, geometry, runtime)
    stale = _edited_layers(plan, specs, geometry)
    counts = Counter(layer.option for layer in plan.layers.values())
    print(f"{len(plan.layers)} linear layers ({', '.join(f'{o}: {n}' for o, n in sorted(counts.items()))})")
    _print_parts(spent)
    if stale:
        print(f"{len(stale)} layer(s) differ from their recorded bytes (edited by hand): {', '.join(stale[:5])}")
    if budget is None:
        print(f"{path}: valid; total {format_size(spent['total'])} (the plan states no budget)")
        return
    margin = budget.total_bytes - spent["total"]
    if margin < 0:
        raise CommandError(
            f"{path}: total {format_size(spent['total'])} ({spent['total']} bytes) exceeds the budget "
            f"{format_size(budget.total_bytes)} by {-margin} bytes"
        )
    print(f"{path}: valid; total {format_size(spent['total'])} fits the budget {format_size(budget.total_bytes)} ({margin} bytes to spare)")


def _edited_layers(plan: Plan, specs, geometry: ModelGeometry) -> list[str]:
    from .memory import linear_cost  # noqa: PLC0415

    return [
        name
        for name, layer in plan.layers.items()
        if layer.bytes is not None and layer.bytes != linear_cost(specs[name], name, geometry)
    ]


# ------------------------------------------------------------------------------- inspect / diff


def print_summary(plan: Plan) -> None:
    counts = Counter(layer.option for layer in plan.layers.values())
    total = sum(layer.bytes or 0 for layer in plan.layers.values())
    mix = ", ".join(f"{option}: {n}" for option, n in sorted(counts.items()))
    print(f"{len(plan.layers)} linear layers ({mix}); linear weights {total / 1e6:.2f} MB")
    if plan.activations == "int8":
        int8 = sum(plan.layer_activations(option) == "int8" for option in plan.layer_options().values())
        print(f"int8 activations: {int8} layers (TurboQuant without a residual stage)")


def _print_parts(parts: dict[str, int]) -> None:
    for key, value in parts.items():
        print(f"  {key:<18} {value:>16,d} bytes  {format_size(value):>10}")


def print_breakdown(plan: Plan) -> None:
    budget = plan.budget
    print(
        f"budget {format_size(budget.total_bytes)} ({budget.total_bytes:,d} bytes); context {budget.context} x batch "
        f"{budget.batch} at {budget.kv_bits}-bit KV; reserve {budget.reserve:,d} bytes"
    )
    _print_parts(budget.breakdown)
    if budget.predicted_damage is not None:
        print(f"  predicted damage {budget.predicted_damage:.4g} ({budget.damage_unit})")


def cmd_inspect(args: argparse.Namespace) -> None:
    plan = read_plan(args.plan)
    width = max(len(name) for name in plan.layers)
    print(f"{'layer':<{width}}  {'option':>6}  {'group':>5}  {'bytes':>10}  {'score':>10}  pinned")
    for name, layer in plan.layers.items():
        score = f"{layer.sensitivity:.3g}" if layer.sensitivity is not None else "-"
        print(f"{name:<{width}}  {layer.option:>6}  {layer.group_size:>5}  {layer.bytes or 0:>10}  {score:>10}  {'yes' if layer.pinned else ''}")
    print_summary(plan)
    if plan.budget is not None:
        print_breakdown(plan)


def cmd_diff(args: argparse.Namespace) -> None:
    """What changed between two plans of one model: per layer, and in size and predicted damage."""
    old, new = read_plan(args.old), read_plan(args.new)
    only = sorted(set(old.layers) ^ set(new.layers))
    if only:
        raise PlanError(f"the plans do not cover the same layers ('{only[0]}' is in one only)")
    changed = [name for name in old.layers if old.layers[name] != new.layers[name]]
    width = max((len(name) for name in changed), default=5)
    for name in changed:
        a, b = old.layers[name], new.layers[name]
        size = f"{(b.bytes or 0) - (a.bytes or 0):+,d} B"
        damage = f"{b.sensitivity - a.sensitivity:+.3g}" if None not in (a.sensitivity, b.sensitivity) else "?"
        pin = " (pinned)" if b.pinned and not a.pinned else ""
        print(f"{name:<{width}}  {a.option:>5} -> {b.option:<5}  {size:>14}  damage {damage}{pin}")
    size_old = sum(layer.bytes or 0 for layer in old.layers.values())
    size_new = sum(layer.bytes or 0 for layer in new.layers.values())
    print(f"{len(changed)} of {len(old.layers)} layers changed; linear weights {format_size(size_old)} -> {format_size(size_new)} ({size_new - size_old:+,d} bytes)")
    damage_old, damage_new = _damage(old), _damage(new)
    if damage_old is not None and damage_new is not None:
        print(f"predicted damage {damage_old:.4g} -> {damage_new:.4g} ({damage_new - damage_old:+.3g})")
    if old.budget and new.budget:
        print(f"budget {format_size(old.budget.total_bytes)} -> {format_size(new.budget.total_bytes)}")


def _damage(plan: Plan) -> float | None:
    scores = [layer.sensitivity for layer in plan.layers.values()]
    return None if any(s is None for s in scores) else sum(scores)
