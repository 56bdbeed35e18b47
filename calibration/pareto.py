"""Pareto curves: KL divergence against size for allocated plans, uniform TurboQuant and uniform RTN.

Every point is a plan built with `tqc.packed.build` (the packed directory is written, its size
compared with the plan's prediction, then removed) and scored on the first `--windows` windows of
wiki.test.txt with the same KL definition as `tqc eval` (reference log-probs computed once).
Points are appended to the JSON as they finish, so an interrupted run resumes.

    python -m tqc.calibration.pareto --model smollm2 --windows 4 -o docs/pareto-smollm2.json
    python -m tqc.calibration.pareto --plot docs/pareto.png -o docs/pareto-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from tqc.evaluate import Windows, token_windows
from tqc.memory import Runtime, breakdown, fixed_bytes, model_geometry
from tqc.models import empty_model, linear_shapes, load_config, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import WEIGHTS_FILE, build
from tqc.plan import ModelRef, Plan, write_text_atomic
from tqc.planning import Rules, allocated_plan, plan_specs, uniform_plan

from .calibrate import cached_calibration
from .data import DEFAULT_DATA, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, data_ref

TEST_DATA = DEFAULT_DATA.with_name("wiki.test.txt")
UNIFORM = ("2", "3", "4")
RTN = ("rtn3", "rtn4")
TARGET_BITS = (2.5, 6.0)


class Curve:
    """The model's shapes, geometry and measurement, and the plans along the curve."""

    def __init__(self, model_name: str):
        self.name = model_name
        self.source = resolve_model(model_name)
        meta = empty_model(load_config(self.source))
        self.shapes, self.geometry = linear_shapes(meta), model_geometry(meta)
        self.ref = ModelRef(name=model_name, sha256=self.source.sha256())
        self.measurement, _ = cached_calibration(self.source, data_ref(DEFAULT_DATA, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, 0))
        self.block_weights = sum(
            s.in_features * s.out_features for n, s in self.shapes.items() if n != self.geometry.tied_head
        )

    def weight_bytes(self, plan: Plan) -> dict[str, int]:
        parts = breakdown(plan_specs(plan.layers, self.shapes), self.geometry, Runtime())
        linears = parts["quantized_linears"] + parts["fp16_linears"]
        return {"linear_bytes": linears, "predicted_bytes": linears + parts["other_weights"]}

    def bits_per_weight(self, plan: Plan) -> float:
        """Average stored bits per weight of the linear layers (a tied fp16 head is free: excluded)."""
        return 8 * self.weight_bytes(plan)["linear_bytes"] / self.block_weights

    def uniform(self, option: str) -> Plan:
        return uniform_plan(self.ref, self.shapes, QuantOption.parse(option), self.measurement.group_size, self.measurement.seed)

    def allocated(self, linear_bytes: int) -> Plan:
        budget = fixed_bytes(self.geometry, Runtime()) + linear_bytes
        return allocated_plan(self.ref, self.measurement, self.shapes, self.geometry, Runtime(), budget, Rules())


@torch.no_grad()
def kl_divergence(model, reference: list[torch.Tensor], ids: torch.Tensor) -> float:
    """Mean KL(source || model) over every predicted position, as `tqc eval` defines it."""
    total = count = 0.0
    for window, ref in zip(ids, reference):
        logp = F.log_softmax(model(input_ids=window[None]).logits[0, :-1].float(), dim=-1)
        total += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        count += ref.shape[0]
    return total / count


def reference_logprobs(curve: Curve, windows: int, seq_len: int = 512) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The source model's log-probs on the first `windows` test windows, and the windows' token ids."""
    ids = token_windows(load_tokenizer(curve.source), Windows(str(TEST_DATA), seq_len, windows))
    source = load_model(curve.source)
    reference = [F.log_softmax(source(input_ids=w[None]).logits[0, :-1].float(), dim=-1) for w in ids]
    return reference, ids


def run_point(curve: Curve, label: str, plan: Plan, reference, ids) -> dict:
    with tempfile.TemporaryDirectory(prefix="tqc-pareto-") as scratch:
        packed = Path(scratch) / "packed"
        model = build(plan, packed, progress=False, model=load_model(curve.source))
        actual = (packed / WEIGHTS_FILE).stat().st_size
        shutil.rmtree(packed)
        kld = kl_divergence(model, reference, ids)
    sizes = curve.weight_bytes(plan)
    options = sorted({layer.option for layer in plan.layers.values()})
    return {
        "label": label, "kind": label.split(" ")[0], "bits_per_weight": curve.bits_per_weight(plan), "kl_divergence": kld,
        "predicted_damage": plan.budget.predicted_damage if plan.budget else None, "packed_bytes": actual,
        "size_error": actual / sizes["predicted_bytes"] - 1, "options": options, **sizes,
    }  # fmt: skip


def points(curve: Curve) -> list[tuple[str, callable]]:
    """(label, plan maker) in the order to run them: each uniform plan, then allocation at its size."""
    todo = []
    for option in UNIFORM:
        todo.append((f"uniform {option}", lambda o=option: curve.uniform(o)))
        todo.append((f"allocated @uniform-{option}", lambda o=option: curve.allocated(curve.weight_bytes(curve.uniform(o))["linear_bytes"])))
    todo += [(f"rtn {option}", lambda o=option: curve.uniform(o)) for option in RTN]
    for bits in TARGET_BITS:
        todo.append((f"allocated {bits}bpw", lambda b=bits: curve.allocated(int(b * curve.block_weights / 8))))
    return todo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--plot", metavar="PNG", help="only draw the curves of the JSON files given with -o")
    parser.add_argument("--table", action="store_true", help="only print the JSON files given with -o as markdown tables")
    parser.add_argument("-o", "--output", required=True, nargs="+", help="results JSON (several with --plot)")
    args = parser.parse_args(argv)
    if args.plot or args.table:
        results = [json.loads(Path(path).read_text()) for path in args.output]
        if args.plot:
            plot(results, args.plot)
        for result in results if args.table else []:
            print(table(result))
        return
    curve = Curve(args.model)  # calibrates on first use: needs gradients, so before they are turned off
    torch.set_grad_enabled(False)
    output = Path(args.output[0])
    result = json.loads(output.read_text()) if output.is_file() else {"model": args.model, "points": []}
    result |= {"data": TEST_DATA.name, "windows": args.windows, "seq_len": args.seq_len}
    done = {point["label"] for point in result["points"]}
    reference, ids = reference_logprobs(curve, args.windows, args.seq_len)
    for label, make in points(curve):
        if label in done or (args.only and label not in args.only):
            continue
        point = run_point(curve, label, make(), reference, ids)
        result["points"].append(point)
        write_text_atomic(output, json.dumps(result, indent=1) + "\n")
        print(f"{label:<26} {point['bits_per_weight']:.3f} bpw  KL {point['kl_divergence']:.4f}  size error {point['size_error']:+.4%}", flush=True)



def plot(results: list[dict], path: str | Path) -> None:
    """KL divergence (log) against bits per weight, one series per kind of plan."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    styles = {"allocated": ("o-", "tab:red"), "uniform": ("s--", "tab:blue"), "rtn": ("^:", "tab:gray")}
    for ax, result in zip(axes[0], results):
        for kind, (style, color) in styles.items():
            series = sorted((p for p in result["points"] if p["kind"] == kind), key=lambda p: p["bits_per_weight"])
            if series:
                ax.plot([p["bits_per_weight"] for p in series], [p["kl_divergence"] for p in series], style, color=color, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (linear layers, scales included)")
        ax.set_ylabel(f"KL divergence on {result['data']} ({result['windows']} x {result['seq_len']} tokens)")
        ax.set_title(result["model"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict) -> str:
    """A markdown table of one model's points, by size."""
    lines = [
        f"{result['model']}: KL divergence on {result['data']}, {result['windows']} windows x {result['seq_len']} tokens",
        "",
        "| plan | bits/weight | weights MB (predicted) | packed MB (built) | size error | KL divergence | predicted damage |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in sorted(result["points"], key=lambda p: (p["bits_per_weight"], p["label"])):
        damage = f"{p['predicted_damage']:.3g}" if p["predicted_damage"] is not None else "-"
        lines.append(
            f"| {p['label']} | {p['bits_per_weight']:.3f} | {p['predicted_bytes'] / 1e6:.2f} | {p['packed_bytes'] / 1e6:.2f} "
            f"| {p['size_error']:+.3%} | {p['kl_divergence']:.4f} | {damage} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
