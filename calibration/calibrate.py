"""Measure once, allocate many times: build (or fetch from the cache) a model's measurement file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tqc.models import LinearShape, SourceModel, linear_layers, load_model, load_tokenizer
from tqc.options import resolve_group_size
from tqc.plan import ModelRef

from .data import sample_windows
from .measurement import DataRef, LayerScore, Measurement, cache_path, measurement_key, read_measurement, write_measurement
from .prior import RolePrior, read_prior
from .scores import DEFAULT_ROWS, prior_scores, score_layers
from .statistics import collect


def group_size_for(in_features: int, preferred: int) -> int | None:
    try:
        return resolve_group_size(in_features, preferred)
    except ValueError:
        return None  # no group size divides: the layer can only stay fp16


def calibrate(
    source: SourceModel,
    data: DataRef,
    group_size: int = 128,
    seed: int = 0,
    rows: int = DEFAULT_ROWS,
    model: nn.Module | None = None,
    progress: bool = True,
) -> Measurement:
    """One pass for H and Fisher sensitivities, then every TurboQuant option scored per layer."""
    model = model if model is not None else load_model(source)
    windows = sample_windows(load_tokenizer(source), data)
    stats = collect(model, windows, seed=data.seed, progress=progress)
    linears = linear_layers(model)
    sizes = {name: group_size_for(linear.in_features, group_size) for name, linear in linears.items()}
    with torch.no_grad():
        todo = {name: (linears[name].weight, stats[name].hessian, stats[name].alpha, size) for name, size in sizes.items() if size}
        scores = score_layers(todo, seed, rows)
    layers = {
        name: LayerScore(
            in_features=linear.in_features, out_features=linear.out_features, group_size=sizes[name] or group_size,
            alpha=stats[name].alpha, options=scores.get(name, {}),
        )  # fmt: skip
        for name, linear in linears.items()
    }
    model_ref = ModelRef(name=source.name, sha256=source.sha256())
    return Measurement(
        method="fisher-proxy", model=model_ref, data=data, group_size=group_size, seed=seed, rows_per_layer=rows, layers=layers
    )


def prior_measurement(
    model: ModelRef, shapes: dict[str, LinearShape], group_size: int = 128, seed: int = 0,
    prior: RolePrior | None = None,
) -> Measurement:
    """Data-free scores from shapes alone (a config on the meta device is enough).

    Each layer's damage is weighted by the role prior (prior.py; by default the checked-in one,
    fitted on the calibrated models), so that v_proj and k_proj get more bits than q_proj.
    """
    prior = prior or read_prior()
    layers = {}
    for name, shape in shapes.items():
        size = group_size_for(shape.in_features, group_size)
        factor = prior.factor(name)
        options = prior_scores(shape.in_features, shape.out_features, size, factor) if size else {}
        layers[name] = LayerScore(
            in_features=shape.in_features, out_features=shape.out_features, group_size=size or group_size, options=options
        )
    return Measurement(method="prior", model=model, group_size=group_size, seed=seed, layers=layers)


def cached_calibration(
    source: SourceModel,
    data: DataRef,
    group_size: int = 128,
    seed: int = 0,
    rows: int = DEFAULT_ROWS,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> tuple[Measurement, Path]:
    """The measurement for these settings, from the cache if present, else calibrated and cached."""
    key = measurement_key(source.sha256(), data, group_size, seed, rows)
    path = (cache_dir / f"{key}.json") if cache_dir else cache_path(key)
    if path.is_file():
        return read_measurement(path), path
    measurement = calibrate(source, data, group_size, seed, rows, progress=progress)
    write_measurement(measurement, path)
    return measurement, path
