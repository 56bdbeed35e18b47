"""The measurement file: per layer, per option, the bytes and the predicted damage.

Calibration writes it once; every plan at any budget is a pure function of it (exllamav2 style).
Damage is in the unit of the evaluation's KL divergence (nats per token): the predicted increase of
KL(source || quantized) when that layer alone takes that option. Files are JSON, strict, cached
under ~/.cache/tqc/calibration/ by a key of everything that changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tqc import __version__
from tqc.models import CACHE_DIR
from tqc.options import SCORED_OPTIONS
from tqc.plan import ModelRef, PlanError, write_text_atomic

MEASUREMENT_VERSION = 2  # 2: siblings reading one input share its rotation (layout.rotation_seed)
MEASUREMENT_DIR = CACHE_DIR / "calibration"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataRef(_Strict):
    """The calibration samples: seeded windows of a training text."""

    path: str = Field(description="the text's file name in ../shared/data, else its path (see data.find_data)")
    sha256: str
    samples: int
    seq_len: int
    seed: int


class OptionScore(_Strict):
    bytes: int = Field(description="packed bytes of the layer at this option")
    damage: float = Field(description="predicted KL divergence increase (nats/token), this layer alone")
    relative_error: float | None = Field(default=None, description="tr(dW H dW^T) / tr(W H W^T)")


class LayerScore(_Strict):
    in_features: int
    out_features: int
    group_size: int
    alpha: float | None = Field(default=None, description="KL per unit of output error (Fisher)")
    options: dict[str, OptionScore]


class Measurement(_Strict):
    measurement_version: Literal[2] = MEASUREMENT_VERSION
    tqc_version: str = __version__
    method: Literal["fisher-proxy", "prior"]
    model: ModelRef
    data: DataRef | None = None
    group_size: int
    seed: int = Field(description="plan seed: the rotations the errors were measured under")
    rows_per_layer: int | None = Field(default=None, description="rows sampled per layer for the errors")
    layers: dict[str, LayerScore]


def measurement_key(model_sha: str, data: DataRef | None, group_size: int, seed: int, rows: int | None) -> str:
    """A short stable key of everything that changes a measurement."""
    data_key = data.model_dump(exclude={"path"}) if data else "prior"  # the file's sha256 stands for it
    scored = [option.name for option in SCORED_OPTIONS]  # a file scored before an option was added lacks it
    parts = [model_sha, group_size, seed, rows, data_key, MEASUREMENT_VERSION, scored]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def cache_path(key: str) -> Path:
    return MEASUREMENT_DIR / f"{key}.json"


def read_measurement(path: str | Path) -> Measurement:
    path = Path(path)
    try:
        return _stable_data(Measurement.model_validate_json(path.read_text()))
    except OSError as err:
        raise PlanError(f"{path}: cannot read measurement ({err.strerror})") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise PlanError(f"{path}: invalid measurement: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _stable_data(measurement: Measurement) -> Measurement:
    """Older files record the data by absolute path: turn it into the reference `data_ref` writes now."""
    from .data import stable_ref  # noqa: PLC0415  (data.py imports this module)

    data = measurement.data
    if data is None or not Path(data.path).is_absolute():
        return measurement
    return measurement.model_copy(update={"data": data.model_copy(update={"path": stable_ref(Path(data.path), data.sha256)})})


def write_measurement(measurement: Measurement, path: str | Path) -> None:
    write_text_atomic(path, measurement.model_dump_json(indent=1) + "\n")
