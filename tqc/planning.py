"""Make plans: uniform plans from the command line, and budget plans from a measurement file.

Both use the same pieces: layer shapes from the model's config on the meta device,
`layout.layer_bytes` for exact sizes, `Plan` for the file. A budget plan is a pure function of the
measurement (per layer, per option: damage), the memory model and the budget (`allocated_plan`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .allocate import Choice, allocate
from .layout import LayerSpec, layer_bytes
from .memory import ModelGeometry, Runtime, breakdown, fixed_bytes, format_size, linear_cost
from .models import LinearShape
from .options import FP16, TURBOQUANT_OPTIONS, QuantOption, resolve_group_size
from .plan import Budget, CalibrationRef, LayerPlan, ModelRef, Plan, PlanError

if TYPE_CHECKING:
    from .calibration.measurement import Measurement

DEFAULT_KEEP = ("lm_head",)  # like llama.cpp and GPTQ, the output head stays 16-bit unless asked


def layer_spec(shape: LinearShape, option: QuantOption, group_size: int) -> LayerSpec:
    return LayerSpec(option, group_size, shape.in_features, shape.out_features, shape.has_bias)


def plan_layer(shape: LinearShape, option: QuantOption, preferred_group_size: int, **fields) -> LayerPlan:
    """One plan entry; a layer that no group size fits keeps 16 bits (fp16 ignores group_size)."""
    group_size = preferred_group_size
    if option.is_quantized:
        try:
            group_size = resolve_group_size(shape.in_features, preferred_group_size)
        except ValueError:
            option = FP16
    size = layer_bytes(layer_spec(shape, option, group_size))
    return LayerPlan(option=option.name, group_size=group_size, bytes=size, **fields)


def uniform_plan(
    model: ModelRef,
    shapes: dict[str, LinearShape],
    option: QuantOption,
    group_size: int = 128,
    seed: int = 0,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    overrides: dict[str, QuantOption] | None = None,
) -> Plan:
    """Every linear layer at `option`, except those matching a `keep` pattern (fp16).

    `overrides` maps layer-name patterns (fnmatch, e.g. "*.down_proj") to options; the first
    matching pattern wins.
    """
    overrides = overrides or {}
    layers = {}
    for name, shape in shapes.items():
        chosen = FP16 if any(fnmatch.fnmatchcase(name, p) for p in keep) else option
        for pattern, override in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen = override
                break
        layers[name] = plan_layer(shape, chosen, group_size)
    return Plan(model=model, seed=seed, group_size=group_size, layers=layers)


# ------------------------------------------------------------------------------- budget plans


@dataclass(frozen=True)
class Rules:
    """What a person may impose on the allocator.

    `options`: the allowed options (None: every TurboQuant option but 3g, plus `extra`, e.g. 3g: `--options
    default,3g`); the layers `fp16` matches (lm_head by default) may also stay fp16 whatever `options` lists, as
    llama.cpp and GPTQ keep the head 16-bit unless asked (a tied head then costs nothing beyond its embedding);
    `min_bits`: (pattern, bits) pairs, a matching layer takes an option of at least that many code
    bits (fp16 counts 16); `pinned`: layers whose option is fixed.
    """

    options: tuple[QuantOption, ...] | None = None
    extra: tuple[QuantOption, ...] = ()
    fp16: tuple[str, ...] = DEFAULT_KEEP
    min_bits: tuple[tuple[str, int], ...] = ()
    pinned: dict[str, QuantOption] = field(default_factory=dict)

    def allowed(self, name: str) -> list[QuantOption]:
        if name in self.pinned:
            return [self.pinned[name]]
        options = list(self.options) if self.options is not None else [*TURBOQUANT_OPTIONS, *self.extra]
        if FP16 not in options and any(fnmatch.fnmatchcase(name, p) for p in self.fp16):
            options.append(FP16)
        floor = max((bits for pattern, bits in self.min_bits if fnmatch.fnmatchcase(name, pattern)), default=0)
        return [o for o in options if (o.code_bits if o.is_quantized else 16) >= floor]


def option_bits(option: QuantOption) -> int:
    return option.code_bits if option.is_quantized else 16


def layer_candidates(
    measurement: Measurement, shapes: dict[str, LinearShape], geometry: ModelGeometry, rules: Rules
) -> dict[str, list[Choice]]:
    """Per layer, in model order: the allowed (option, bytes, damage) choices."""
    measured = {option for layer in measurement.layers.values() for option in layer.options}
    named = (*(rules.options or ()), *rules.extra)
    unmeasured = [o.name for o in named if o.scheme == "turboquant" and o.name not in measured]
    if unmeasured:
        raise PlanError(f"option {unmeasured[0]} was not scored by this measurement (made before tqc scored it: "
                        "calibrate again, or leave it out of --options)")
    candidates = {}
    for name, shape in shapes.items():
        score = measurement.layers.get(name)
        if score is None:
            raise PlanError(f"the measurement has no layer '{name}' (it was made for another model)")
        choices = []
        for option in rules.allowed(name):
            if option.is_quantized and option.name not in score.options:
                continue  # no group size fits this layer, or the option was not measured
            damage = score.options[option.name].damage if option.is_quantized else 0.0
            spec = layer_spec(shape, option, score.group_size)
            choices.append(Choice(option.name, linear_cost(spec, name, geometry), damage))
        if not choices:
            raise PlanError(f"layer '{name}': no allowed option fits it (check --options, --min-bits and pins)")
        candidates[name] = choices
    return candidates


def allocated_plan(
    model: ModelRef,
    measurement: Measurement,
    shapes: dict[str, LinearShape],
    geometry: ModelGeometry,
    runtime: Runtime,
    budget: int,
    rules: Rules = Rules(),
) -> Plan:
    """The plan of least predicted damage that fits `budget` bytes (memory model included)."""
    candidates = layer_candidates(measurement, shapes, geometry, rules)
    picked = allocate(candidates, budget, fixed_bytes(geometry, runtime))
    layers = {}
    for name, choice in picked.items():
        group_size = measurement.layers[name].group_size
        layers[name] = LayerPlan(
            option=choice.option, group_size=group_size, bytes=choice.bytes,
            sensitivity=_rounded(choice.damage), pinned=name in rules.pinned,
        )  # fmt: skip
    specs = plan_specs(layers, shapes)
    spent = breakdown(specs, geometry, runtime)
    plan_budget = Budget(
        total_bytes=budget, context=runtime.context, batch=runtime.batch, kv_bits=runtime.kv_bits,
        reserve=runtime.reserve, breakdown=spent, predicted_damage=_rounded(sum(c.damage for c in picked.values())),
        damage_unit="KL nats/token" if measurement.method == "fisher-proxy" else "prior (relative)",
    )  # fmt: skip
    return Plan(
        model=model, seed=measurement.seed, group_size=measurement.group_size, budget=plan_budget,
        calibration=calibration_ref(measurement), layers=layers,
    )  # fmt: skip


def _rounded(value: float) -> float:
    """Four significant digits: what a reviewer reads (the allocation used the full value)."""
    return float(f"{value:.4g}")


def plan_specs(layers: dict[str, LayerPlan], shapes: dict[str, LinearShape]) -> dict[str, LayerSpec]:
    """The LayerSpec of every plan entry (shapes from the model)."""
    missing = [name for name in layers if name not in shapes]
    if missing:
        raise PlanError(f"plan names layer '{missing[0]}', which the model does not have")
    return {name: layer_spec(shapes[name], layer.quant_option, layer.group_size) for name, layer in layers.items()}


def calibration_ref(measurement: Measurement) -> CalibrationRef:
    data = measurement.data
    return CalibrationRef(
        method=measurement.method, rows_per_layer=measurement.rows_per_layer,
        data=data.path if data else None, data_sha256=data.sha256 if data else None,
        samples=data.samples if data else None, seq_len=data.seq_len if data else None,
        seed=data.seed if data else None,
    )  # fmt: skip


def layer_notes(plan: Plan, candidates: dict[str, list[Choice]]) -> dict[str, str]:
    """One comment per layer: what the next smaller and next larger allowed option would trade."""
    notes = {}
    for name, layer in plan.layers.items():
        choices = sorted(candidates.get(name, []), key=lambda c: (c.bytes, c.damage))
        now = next((c for c in choices if c.option == layer.option), None)
        if now is None:
            continue
        smaller = [c for c in choices if c.bytes < now.bytes]
        larger = [c for c in choices if c.bytes > now.bytes and c.damage < now.damage]
        parts = ["pinned" if layer.pinned else ""]
        if smaller:
            best = min(smaller, key=lambda c: (c.damage, -c.bytes))
            parts.append(f"{best.option}: -{format_size(now.bytes - best.bytes)}, +{best.damage - now.damage:.2g} damage")
        if larger:
            best = min(larger, key=lambda c: (c.bytes, c.damage))
            parts.append(f"{best.option}: +{format_size(best.bytes - now.bytes)}, -{now.damage - best.damage:.2g} damage")
        if not smaller and not larger:
            parts.append("no extra bytes (shares the embedding)" if now.bytes == 0 else "the only sensible choice")
        notes[name] = "; ".join(p for p in parts if p)
    return notes
