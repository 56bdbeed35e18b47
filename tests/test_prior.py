"""The role prior: fitted on the checked-in measurements, used for config-only plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from tqc.calibration.calibrate import prior_measurement
from tqc.calibration.measurement import read_measurement
from tqc.calibration.prior import DEFAULT_PRIOR, RolePrior, fit_prior, read_prior
from tqc.models import empty_model, linear_shapes, load_config, resolve_model
from tqc.plan import ModelRef

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = [REPO / "plans" / "measurements" / name for name in ("smollm2.json", "gemma3-270m.json")]
LLAMA_8B = REPO / "plans" / "configs" / "llama-3-8b" / "config.json"


def test_checked_in_prior_is_what_fitting_the_measurements_gives():
    assert fit_prior({path.name: read_measurement(path) for path in MEASUREMENTS}) == read_prior(DEFAULT_PRIOR)


def test_each_calibrated_model_alone_ranks_the_roles_alike():
    """The prior transfers only if the models agree: fitted on each alone, the same roles stand out."""
    for path in MEASUREMENTS:
        roles = fit_prior({path.name: read_measurement(path)}).roles
        assert max(roles, key=roles.get) == "v_proj" and roles["k_proj"] > 1 > roles["gate_proj"], (path.name, roles)


def damage_per_weight(measurement, name: str, option: str = "3") -> float:
    layer = measurement.layers[name]
    return layer.options[option].damage / (layer.in_features * layer.out_features)


def test_config_only_plans_weight_layers_by_the_prior():
    shapes = linear_shapes(empty_model(load_config(resolve_model(str(LLAMA_8B)))))
    prior = read_prior()
    flat = prior_measurement(ModelRef(name="llama"), shapes, prior=RolePrior(fitted_on=[], roles={}))
    weighted = prior_measurement(ModelRef(name="llama"), shapes)
    v, q = "model.layers.3.self_attn.v_proj", "model.layers.3.self_attn.q_proj"
    assert damage_per_weight(flat, v) == damage_per_weight(flat, q)
    ratio = damage_per_weight(weighted, v) / damage_per_weight(weighted, q)
    assert ratio == pytest.approx(prior.roles["v_proj"] / prior.roles["q_proj"]) and ratio > 1
    assert damage_per_weight(weighted, "lm_head") == damage_per_weight(flat, "lm_head")  # outside the blocks: factor 1
