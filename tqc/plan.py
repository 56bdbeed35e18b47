"""The plan: which option each linear layer takes. Strict, versioned, YAML or JSON by extension.

A plan is what a person reviews, diffs and edits by hand; `tqc build` honours every edit. Layers
are written in model order, one line each in YAML, so a diff shows one line per changed layer.
Validation errors come back as one line naming the layer and the field.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .activations import Activations, takes_int8
from .options import GROUP_SIZES, QuantOption

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be read or does not validate; the message is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Strict):
    name: str = Field(description="embedded model name, .gguf path, or HF directory")
    sha256: str | None = Field(default=None, description="checksum of the source weights")


class Budget(Strict):
    """The memory budget a plan was allocated for and how it is spent (bytes; see tqc.memory)."""

    total_bytes: int
    context: int = 0
    batch: int = 1
    kv_bits: int = 16
    reserve: int = Field(default=0, description="bytes kept free on purpose (--reserve)")
    breakdown: dict[str, int] = Field(default_factory=dict)
    predicted_damage: float | None = Field(default=None, description="sum of the layers' sensitivity")
    damage_unit: str | None = None


class CalibrationRef(Strict):
    """Where the sensitivity scores came from: a calibration pass or the data-free prior."""

    method: Literal["fisher-proxy", "prior"]
    rows_per_layer: int | None = None
    data: str | None = None
    data_sha256: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None


class QuantizerRef(Strict):
    """How `tqc build` fits codes and scales: the plain quantizer, or tuned to calibration inputs
    (`gptq`: error feedback across columns in the rotated space; `scales`: H-weighted scales only;
    docs/gptq.md). A plan without this entry builds with the plain quantizer."""

    method: Literal["plain", "gptq", "scales"] = "plain"
    samples: int = Field(default=32, ge=1, description="calibration windows of the training text")
    seq_len: int = Field(default=512, ge=2, description="tokens per calibration window")
    seed: int = Field(default=0, description="seed of the calibration windows")
    damp: float = Field(default=0.01, gt=0, le=1, description="dampening, a fraction of H's mean diagonal")
    data: str | None = Field(default=None, description="calibration text (default ../shared/data/wiki.train.txt)")


class LayerPlan(Strict):
    option: str = Field(description="quantization option: 2, 3, 3g, 4, 4+2, 4+4, rtn4, fp16, ...")
    group_size: int = Field(description="input columns per scale and per rotation block")
    bytes: int | None = Field(default=None, description="predicted packed bytes")
    sensitivity: float | None = Field(default=None, description="predicted damage (calibration score)")
    pinned: bool = Field(default=False, description="set by a person: the allocator keeps this layer")

    @field_validator("option", mode="before")
    @classmethod
    def _known_option(cls, value: object) -> str:
        return QuantOption.parse(value).name  # type: ignore[arg-type]

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"group_size {value} is not one of {GROUP_SIZES}")
        return value

    @property
    def quant_option(self) -> QuantOption:
        return QuantOption.parse(self.option)


class Plan(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    tqc_version: str = __version__
    model: ModelRef
    seed: int = 0
    group_size: int = 128
    budget: Budget | None = None
    calibration: CalibrationRef | None = None
    quantizer: QuantizerRef | None = Field(default=None, description="absent: the plain quantizer")
    activations: Activations | None = Field(
        default=None, description="int8: TurboQuant layers without a residual multiply int8 activations "
        "(tqc.activations); absent: fp16")
    layers: dict[str, LayerPlan]

    def layer_options(self) -> dict[str, QuantOption]:
        return {name: layer.quant_option for name, layer in self.layers.items()}

    def layer_activations(self, option: QuantOption) -> Activations:
        """What a layer of `option` multiplies: int8 where the plan asks for it and the option allows."""
        return "int8" if takes_int8(option, self.activations or "fp16") else "fp16"


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if len(loc) >= 3 and loc[0] == "layers":
        where = f"layer '{loc[1]}', field '{'.'.join(loc[2:])}'"
    else:
        where = f"field '{'.'.join(loc)}'"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def parse_plan(data: object, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan is a mapping with 'model' and 'layers', got {type(data).__name__}")
    try:
        return Plan.model_validate(data)
    except ValidationError as err:
        raise PlanError(_format_error(err, source)) from None


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PlanError(f"{path}: cannot read plan ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(err).splitlines()[0]}") from None
    return parse_plan(data, str(path))


class _PlanDumper(yaml.SafeDumper):
    """Block style for the plan, one flow-style line per layer."""


def _represent_layer(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)


class _LayerDict(dict):
    pass


_PlanDumper.add_representer(_LayerDict, _represent_layer)


def plan_to_text(plan: Plan, fmt: str = "yaml", notes: dict[str, str] | None = None) -> str:
    """Deterministic text of a plan: the same plan gives the same bytes.

    `notes` (YAML only) are end-of-line comments per layer, e.g. why the allocator chose its option.
    """
    data = plan.model_dump(mode="json", exclude_none=True)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    data["layers"] = {name: _LayerDict(layer) for name, layer in data["layers"].items()}
    header = (
        "# tqc plan: one line per linear layer, in model order. Edit 'option' (2, 3, 4, 2+2, 3+2,\n"
        "# 4+2, 4+4, 3g: 3 bits on the grid codebook, rtn2..rtn8, fp16) or 'group_size' by hand; set\n"
        "# 'pinned: true' so that a re-plan keeps your choice. `tqc plan --check` re-validates,\n"
        "# `tqc build` honours every edit.\n"
    )
    text = yaml.dump(data, Dumper=_PlanDumper, sort_keys=False, width=200)
    return header + (_annotate(text, notes) if notes else text)


def _annotate(text: str, notes: dict[str, str]) -> str:
    """Append `# note` to each layer's line (layers are the two-space-indented keys under 'layers')."""
    lines, in_layers = [], False
    for line in text.splitlines():
        if not line.startswith(" "):
            in_layers = line.startswith("layers:")
        elif in_layers and line.startswith("  ") and not line.startswith("   "):
            name = line.strip().split(":", 1)[0].strip("'\"")
            if notes.get(name):
                line = f"{line}  # {notes[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file under a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plan(plan: Plan, path: str | Path, notes: dict[str, str] | None = None) -> None:
    path = Path(path)
    write_text_atomic(path, plan_to_text(plan, "json" if path.suffix == ".json" else "yaml", notes))
