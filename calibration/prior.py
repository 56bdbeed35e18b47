"""A data-free prior that knows which layers matter: sensitivity factors per layer role.

The flat prior (`scores.prior_scores`) counts every weight alike. Calibration says otherwise, and
says it the same way on both calibrated models: per weight, v_proj is 5-9x the average, k_proj
1.5x, gate_proj 0.4x. A `RolePrior` stores such factors (geometric means over calibrated
measurements, taken at 3 bits, transformer blocks only), and `calibrate.prior_measurement`
multiplies the flat prior's damage by them when a model is planned from its config alone.
Layers outside the blocks (lm_head) and roles never seen keep factor 1.

Depth is left out on purpose: both models find the first blocks more sensitive than the last,
but by very different amounts (last fifth 0.71x on SmolLM2, 0.25x on Gemma), and a prior with
depth factors fitted on Gemma made SmolLM2 worse than uniform 3-bit (docs/prior.md).

    python -m tqc.calibration.prior fit plans/measurements/smollm2.json plans/measurements/gemma3-270m.json \\
        -o calibration/role_prior.json

`check` measures whether it pays, leave-one-out: the prior fitted on the *other* models plans this
one at the size of uniform 3-bit, beside the flat prior's plan, and both are scored like the
Pareto points (KL divergence on wiki.test.txt):

    python -m tqc.calibration.prior check --model smollm2 --fit-on plans/measurements/gemma3-270m.json \\
        -o docs/prior-check-smollm2.json
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tqc.plan import write_text_atomic

from .measurement import Measurement, read_measurement

DEFAULT_PRIOR = Path(__file__).with_name("role_prior.json")
FIT_OPTION = "3"
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


class RolePrior(BaseModel):
    """Relative sensitivity per weight by role (q_proj, v_proj, ...), 1 for the average block weight."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = 1
    fitted_on: list[str]
    option: str = FIT_OPTION
    roles: dict[str, float]

    def factor(self, name: str) -> float:
        """The multiplier for one layer (1 outside the transformer blocks and for unseen roles)."""
        return 1.0 if block_index(name) is None else self.roles.get(layer_role(name), 1.0)


def layer_role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block_index(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _relative_factors(measurement: Measurement, option: str) -> dict[str, float]:
    """One model's per-weight damage at `option` by role, over the model's geometric mean."""
    per_weight = {
        name: layer.options[option].damage / (layer.in_features * layer.out_features)
        for name, layer in measurement.layers.items()
        if option in layer.options and block_index(name) is not None and layer.options[option].damage > 0
    }
    overall = _geometric_mean(list(per_weight.values()))
    roles = defaultdict(list)
    for name, value in per_weight.items():
        roles[layer_role(name)].append(value / overall)
    return {r: _geometric_mean(v) for r, v in roles.items()}


def fit_prior(measurements: dict[str, Measurement], option: str = FIT_OPTION) -> RolePrior:
    """Geometric means over the measurements of their relative factors (a role seen in some of them: over those)."""
    fitted = [_relative_factors(m, option) for m in measurements.values()]
    roles = sorted({role for factors in fitted for role in factors})
    return RolePrior(
        fitted_on=sorted(measurements), option=option,
        roles={r: round(_geometric_mean([f[r] for f in fitted if r in f]), 4) for r in roles},
    )  # fmt: skip


def read_prior(path: str | Path = DEFAULT_PRIOR) -> RolePrior:
    return RolePrior.model_validate_json(Path(path).read_text())


def check(model: str, fit_on: list[Path], windows: int, output: Path) -> None:
    """KL of plans from the flat and the role prior (fitted on `fit_on`) at uniform 3-bit's size."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from tqc.memory import Runtime, fixed_bytes  # noqa: PLC0415
    from tqc.planning import Rules, allocated_plan  # noqa: PLC0415

    from .calibrate import prior_measurement  # noqa: PLC0415
    from .pareto import Curve, reference_logprobs, run_point  # noqa: PLC0415

    curve = Curve(model)
    torch.set_grad_enabled(False)
    reference, ids = reference_logprobs(curve, windows)
    flat = RolePrior(fitted_on=[], roles={})
    role = fit_prior({path.name: read_measurement(path) for path in fit_on})
    budget = fixed_bytes(curve.geometry, Runtime()) + curve.weight_bytes(curve.uniform("3"))["linear_bytes"]
    result = {"model": model, "windows": windows, "role_prior": role.model_dump(), "points": []}
    for label, prior in (("flat prior", flat), ("role prior", role)):
        measurement = prior_measurement(curve.ref, curve.shapes, curve.measurement.group_size, curve.measurement.seed, prior)
        plan = allocated_plan(curve.ref, measurement, curve.shapes, curve.geometry, Runtime(), budget, Rules())
        point = run_point(curve, f"{label} @uniform-3", plan, reference, ids)
        result["points"].append(point)
        print(f"{point['label']:<26} {point['bits_per_weight']:.3f} bpw  KL {point['kl_divergence']:.4f}", flush=True)
    write_text_atomic(output, json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fit the role-and-depth prior, or check what it buys")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit on calibrated measurement files")
    fit.add_argument("measurements", nargs="+", type=Path)
    fit.add_argument("-o", "--output", type=Path, default=DEFAULT_PRIOR)
    checking = commands.add_parser("check", help="leave-one-out: plan a model with a prior fitted on others")
    checking.add_argument("--model", required=True)
    checking.add_argument("--fit-on", nargs="+", type=Path, required=True)
    checking.add_argument("--windows", type=int, default=4)
    checking.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "check":
        check(args.model, args.fit_on, args.windows, args.output)
        return
    prior = fit_prior({path.name: read_measurement(path) for path in args.measurements})
    write_text_atomic(args.output, prior.model_dump_json(indent=1) + "\n")
    print(f"wrote {args.output}: {prior.roles}")


if __name__ == "__main__":
    main()
