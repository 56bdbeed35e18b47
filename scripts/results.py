"""The results table of docs/results.md: plan, build and evaluate every row, then render it.

    nice python scripts/results.py run --model smollm2       # resumable: finished rows are skipped
    nice python scripts/results.py run --model gemma3-270m
    python scripts/results.py table                         # docs/results.md from docs/results/*.json

Every row is made by the `tqc` commands recorded with it (plan, build, eval), run from the
repository root; packed models go under build/results/ (not committed).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tqc.plan import write_text_atomic
from tqc.reporting import EvalResult

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("docs/results")
WORK = Path("build/results")
DATA = "../shared/data/wiki.test.txt"
MODELS = ("smollm2", "gemma3-270m")


@dataclass(frozen=True)
class Row:
    option: str  # "fp16" is the 16-bit source itself (tqc eval --model); "100MB" a budget plan
    group_size: int = 128
    quantizer: str = "plain"  # `tqc plan --quantizer` (docs/gptq.md)
    models: tuple[str, ...] = MODELS  # the models the row is made for

    @property
    def key(self) -> str:
        key = self.option if self.group_size == 128 else f"{self.option}-g{self.group_size}"
        return key if self.quantizer == "plain" else f"{key}-{self.quantizer}"

    @property
    def is_budget(self) -> bool:
        return self.option.endswith("B")


# Evaluated batch by batch (each batch shares one source forward), most telling rows first.
ROW_BATCHES: tuple[tuple[Row, ...], ...] = (
    (Row("fp16"),),
    tuple(Row(option) for option in ("rtn8", "rtn4", "rtn3", "rtn2", "3", "2")),
    tuple(Row(option) for option in ("4", "3+2", "2+2")),
    tuple(Row(option) for option in ("4+4", "4+2")),
    tuple(Row(option, quantizer="gptq") for option in ("3", "2", "4")),
    # Gemma-3-270M cannot fit 100 MB: its embedding and other unquantized parts alone take 337 MB
    (Row("100MB", models=("smollm2",)), Row("100MB", quantizer="gptq", models=("smollm2",))),
)
TABLE_ORDER = ("fp16", "rtn8", "rtn4", "rtn3", "rtn2", "4+4", "4+2", "4", "3+2", "3", "2+2", "2")
TUNED_ORDER = ("4-gptq", "3-gptq", "2-gptq", "100MB", "100MB-gptq")  # listed, not required (docs/gptq.md)


class ResultRow(BaseModel):
    """One table row: the eval result plus the option and the commands that made it."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    option: str
    group_size: int
    quantizer: str = "plain"
    commands: list[str]
    result: EvalResult
    # per-layer: measured when each layer drew its own rotation seed (rows recorded before siblings
    # reading one input shared it, docs/format.md); such rows are run again by `run`
    rotation_seeds: Literal["per-layer", "per-input"] = "per-layer"


def _run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def _commands(model: str, row: Row, windows: int, packed: Path) -> tuple[list[list[str]], list[str]]:
    """(plan and build commands, eval command) of one row."""
    common_eval = ["--data", DATA, "--windows", str(windows), "-q"]
    if row.option == "fp16":
        return [], ["tqc", "eval", "--model", model, *common_eval, "-o", str(RESULTS / f"{model}-fp16.json")]
    plan = packed.with_suffix(".yaml")
    choice = ["--budget", row.option] if row.is_budget else ["--uniform", row.option]
    quantizer = ["--quantizer", row.quantizer] if row.quantizer != "plain" else []
    return [
        ["tqc", "plan", "--model", model, *choice, "--group-size", str(row.group_size), *quantizer, "-o", str(plan)],
        ["tqc", "build", str(plan), "-o", str(packed), "-q"],
    ], ["tqc", "eval", str(packed), *common_eval]


def run(model: str, windows: int, only: list[str] | None = None) -> None:
    """Plan, build and evaluate the rows without a current result at `windows` (_done)."""
    for batch in ROW_BATCHES:
        pending = [row for row in batch
                   if model in row.models and not _done(model, row, windows) and (not only or row.key in only)]
        for row in pending:
            build_commands, _ = _commands(model, row, windows, WORK / model / row.key)
            for command in build_commands:  # always: a packed model left by an older build may be stale
                _run(command)
        if pending and pending[0].option == "fp16":
            _, eval_command = _commands(model, pending[0], windows, WORK / model / "fp16")
            _run(eval_command)
            _record(model, pending[0], [shlex.join(eval_command)], REPO / RESULTS / f"{model}-fp16.json")
        elif pending:
            _run(["tqc", "eval", *[str(WORK / model / row.key) for row in pending], "--data", DATA, "--windows", str(windows), "-q"])
            for row in pending:
                build_commands, eval_command = _commands(model, row, windows, WORK / model / row.key)
                commands = [shlex.join(c) for c in (*build_commands, eval_command)]
                _record(model, row, commands, REPO / WORK / model / row.key / "eval.json")


def _result_path(model: str, row: Row) -> Path:
    return REPO / RESULTS / f"{model}-{row.key}.json"


def _done(model: str, row: Row, windows: int) -> bool:
    path = _result_path(model, row)
    if not path.is_file():
        return False
    row = ResultRow.model_validate_json(path.read_text())
    return row.result.windows == windows and not _old_seeds(row)


def _record(model: str, row: Row, commands: list[str], eval_json: Path) -> None:
    result = EvalResult.model_validate_json(eval_json.read_text())
    entry = ResultRow(
        model_name=model, option=row.option, group_size=row.group_size, quantizer=row.quantizer, commands=commands,
        result=result, rotation_seeds="per-input",
    )
    write_text_atomic(_result_path(model, row), entry.model_dump_json(indent=2) + "\n")


class RoundTrip(BaseModel):
    """Logits of a loaded packed model against the in-memory quantized model it was built from."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    packed: str
    tokens: int
    max_abs_difference: float
    equal: bool
    command: str


def round_trip(model: str, option: str, tokens: int = 128) -> None:
    """Quantize the source again by the packed model's own plan and compare logits with tqc.load's."""
    import torch  # noqa: PLC0415

    import tqc  # noqa: PLC0415
    from tqc.evaluate import Windows, token_windows  # noqa: PLC0415
    from tqc.models import load_model, load_tokenizer, resolve_model  # noqa: PLC0415
    from tqc.packed import PLAN_FILE, quantize_model  # noqa: PLC0415
    from tqc.plan import read_plan  # noqa: PLC0415

    packed = REPO / WORK / model / Row(option).key
    source = resolve_model(model)
    in_memory = load_model(source)
    quantize_model(in_memory, read_plan(packed / PLAN_FILE), progress=False)
    ids = token_windows(load_tokenizer(source), Windows(str(REPO / DATA), tokens, 1))
    with torch.no_grad():
        expected = in_memory(input_ids=ids).logits
        del in_memory
        got = tqc.load(packed)(input_ids=ids).logits
    check = RoundTrip(
        model_name=model,
        packed=str(packed.relative_to(REPO)),
        tokens=tokens,
        max_abs_difference=(got - expected).abs().max().item(),
        equal=torch.equal(got, expected),
        command=f"python scripts/results.py roundtrip --model {model} --option {option}",
    )
    write_text_atomic(REPO / RESULTS / f"roundtrip-{model}-{option}.json", check.model_dump_json(indent=2) + "\n")
    print(f"{check.packed}: loaded logits {'equal' if check.equal else 'DIFFER'} (max |diff| {check.max_abs_difference:.3g})")


LABELS = {"fp16": "16-bit source", "rtn8": "RTN 8-bit", "rtn4": "RTN 4-bit", "rtn3": "RTN 3-bit", "rtn2": "RTN 2-bit"}
NOTES = """\
Notes
- PPL is the quantized model's perplexity on the windows; KLD is KL(P_source || P_quantized) of
  the next-token distributions in nats per token; top-1 is the share of positions where both models
  rank the same token first. The reference is the source model in float32 (the 16-bit row is the
  source with every weight rounded to fp16).
- MB is the size of the packed `model.safetensors` (10^6 bytes; embeddings and the fp16 `lm_head`
  included); bits/weight counts codes and scales (and RTN zero points) of the quantized linear
  layers only: TurboQuant at b bits costs b + 16/g (+ 16/g per residual stage), RTN b + 32/g.
- Group size: `--group-size 128` is a preference; a layer whose width 128 does not divide takes the
  largest allowed size that does (SmolLM2's 576-wide q/k/v/gate/up layers get 64). At the same group
  size TurboQuant stores one fp16 number per group and RTN two, so TurboQuant's rows carry fewer
  bits per weight than RTN's at the same code width: the comparison below favours RTN.
- Both sources are 4-bit GGUF files: SmolLM2-135M-Instruct is Q4_1 (every weight on a 4-bit grid
  of blocks of 32), Gemma-3-270M is Q4_K_M (mostly 4-bit blocks, some 6-bit). The "16-bit source"
  is that file dequantized. Rows at 4 bits and above therefore flatter both models (SmolLM2 most);
  judge them on the 3- and 2-bit and mixed rows.
- At the same size as 4+4 (8.25-8.44 bits/weight), 8-bit RTN has the lower KL divergence on both
  models (SmolLM2 0.0011 vs 0.0023, Gemma 0.0032 vs 0.0058), though 4+4 has the lower perplexity on
  Gemma: on weights that already sit on a 4-bit grid a fine uniform grid recovers them almost
  exactly, while the rotation spreads each grid value over the group. 4+4 is not the option to
  pick at 8 bits on these two sources.
- Rows marked GPTQ are built from the same plan plus `quantizer: gptq` (`tqc plan --quantizer
  gptq`): same format and size, codes and scales tuned block by block to 32 windows of 512 tokens
  of wiki.train.txt (docs/gptq.md, which also gives their build times).
- Uniform 2-bit collapses both models with either plain quantizer (no calibration, every layer at 2
  bits); it is in the table for the comparison, not as a usable setting. With GPTQ, SmolLM2's
  uniform 2-bit is about as good as its plain uniform 3-bit.
"""


def _key(row: ResultRow) -> str:
    return Row(row.option, row.group_size, row.quantizer).key


def _rows(results: Path, model: str) -> list[ResultRow]:
    order = {key: i for i, key in enumerate((*TABLE_ORDER, *TUNED_ORDER))}
    found = [ResultRow.model_validate_json(p.read_text()) for p in sorted(results.glob(f"{model}-*.json"))]
    found = [r for r in found if r.model_name == model]
    return sorted(found, key=lambda r: order.get(_key(r), len(order)))


def _label(row: ResultRow) -> str:
    label = LABELS.get(row.option, f"TurboQuant {row.option}")
    if Row(row.option).is_budget:
        label = f"TurboQuant allocated to {row.option}"
    label = label if row.quantizer == "plain" else f"{label}, {row.quantizer.upper()}"
    return label if row.group_size == 128 else f"{label} (g={row.group_size})"


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e4 else f"{value:.3g}"


def _missing(model: str, rows: list[ResultRow]) -> list[str]:
    have = {_key(r) for r in rows}
    missing = [key for key in TABLE_ORDER if key not in have]
    if not missing:
        return []
    return [f"Rows not run yet: {', '.join(missing)} (`nice python scripts/results.py run --model {model}` adds them).", ""]


def _old_seeds(row: ResultRow) -> bool:
    """A TurboQuant row measured when each layer drew its own rotation seed (RTN does not rotate)."""
    return row.rotation_seeds == "per-layer" and row.option != "fp16" and not row.option.startswith("rtn")


def _table(rows: list[ResultRow]) -> list[str]:
    lines = ["| row | PPL | KLD | top-1 | MB | bits/weight |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        r = row.result
        mark = " \u2020" if _old_seeds(row) else ""
        lines.append(
            f"| {_label(row)}{mark} | {_ppl(r.perplexity)} | {r.kl_divergence:.4f} | {r.top1_agreement:.3f} "
            f"| {r.size_mb:.1f} | {r.bits_per_weight:.3f} |"
        )
    if any(map(_old_seeds, rows)):
        lines += ["", "\u2020 Measured when each layer drew its own rotation seed. A build now draws one seed per "
                  "input (q/k/v and gate/up share it, docs/format.md), so a rerun quantizes with other random "
                  "signs; `run` remeasures these rows."]
    return lines


def _comparison(rows: list[ResultRow]) -> list[str]:
    """TurboQuant against RTN at 3 and 2 bits: KLD and bits per weight side by side."""
    by_key = {_key(r): r.result for r in rows}
    lines = []
    for bits in (3, 2):
        rtn, tq = by_key.get(f"rtn{bits}"), by_key.get(str(bits))
        if rtn is None or tq is None:
            continue
        verdict = "lower" if tq.kl_divergence < rtn.kl_divergence else "NOT lower"
        difference = tq.bits_per_weight - rtn.bits_per_weight
        bits_note = "fewer" if difference < 0 else "more" if difference > 0 else "as many"
        lines.append(
            f"- {bits}-bit: TurboQuant KLD {tq.kl_divergence:.4f} at {tq.bits_per_weight:.3f} bits/weight, "
            f"RTN KLD {rtn.kl_divergence:.4f} at {rtn.bits_per_weight:.3f} bits/weight: TurboQuant is {verdict}, "
            f"with {bits_note} bits per weight."
        )
    return lines


def _tuned_comparison(rows: list[ResultRow]) -> list[str]:
    """Each tuned row against the plain row of the same plan (docs/gptq.md)."""
    by_key = {_key(r): r.result for r in rows}
    lines = []
    for row in rows:
        plain = by_key.get(Row(row.option, row.group_size).key)
        if row.quantizer == "plain" or plain is None:
            continue
        tuned = row.result
        verdict = "lower" if tuned.kl_divergence < plain.kl_divergence else "HIGHER"
        lines.append(
            f"- {row.option} with {row.quantizer.upper()}: KLD {tuned.kl_divergence:.4f} against {plain.kl_divergence:.4f} "
            f"with the plain quantizer ({verdict}, x{plain.kl_divergence / tuned.kl_divergence:.2f}), same size."
        )
    return lines


def _commands_section(rows: list[ResultRow]) -> list[str]:
    lines = []
    for row in rows:
        lines.append(f"- {_label(row)}:")
        lines.extend(f"  `{command}`" + ("  " if i < len(row.commands) - 1 else "") for i, command in enumerate(row.commands))
    return lines


def render(results: Path, output: Path) -> None:
    """docs/results.md from the JSON rows (rerunnable: no number is typed by hand)."""
    parts = [
        "# Results: TurboQuant against round-to-nearest on two real models",
        "",
        "Generated by `python scripts/results.py table` from `docs/results/*.json`, which",
        "`nice python scripts/results.py run --model MODEL` writes (it runs the commands listed under",
        "each table, from the repository root).",
        "",
    ]
    for model in MODELS:
        rows = _rows(results, model)
        if not rows:
            continue
        first = rows[0].result
        parts += [
            f"## {model}",
            "",
            f"`{first.data}`: the first {first.windows} windows of {first.seq_len} tokens "
            f"({first.tokens} scored positions); source perplexity {first.source_perplexity:.3f}.",
            "",
            *_table(rows),
            "",
            *_missing(model, rows),
            *_comparison(rows),
            *_tuned_comparison(rows),
            "",
            "Commands that made each row:",
            "",
            *_commands_section(rows),
            "",
        ]
    trips = [RoundTrip.model_validate_json(p.read_text()) for p in sorted(results.glob("roundtrip-*.json"))]
    if trips:
        parts += ["## Round trip: `tqc.load` against the in-memory quantized model", ""]
        parts += [
            f"- `{t.packed}`: logits over {t.tokens} tokens {'equal' if t.equal else 'DIFFER'} "
            f"(max abs difference {t.max_abs_difference:.3g}); `{t.command}`"
            for t in trips
        ]
        parts.append("")
    parts.append(NOTES)
    write_text_atomic(output, "\n".join(parts))
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="plan, build and evaluate the rows of one model")
    run_cmd.add_argument("--model", choices=MODELS, required=True)
    run_cmd.add_argument("--windows", type=int, default=4, help="512-token windows of wiki.test.txt")
    run_cmd.add_argument("--rows", nargs="+", metavar="OPTION", help="only these rows (e.g. 3+2 rtn3 fp16)")
    trip = commands.add_parser("roundtrip", help="tqc.load(packed) logits against the in-memory quantized model")
    trip.add_argument("--model", choices=MODELS, required=True)
    trip.add_argument("--option", default="3+2", help="a row already built by `run`")
    commands.add_parser("table", help="write docs/results.md from docs/results/*.json")
    args = parser.parse_args()
    if args.command == "run":
        run(args.model, args.windows, args.rows)
    elif args.command == "roundtrip":
        round_trip(args.model, args.option)
    else:
        render(REPO / RESULTS, REPO / "docs" / "results.md")


if __name__ == "__main__":
    main()
