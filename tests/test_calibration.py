"""Calibration: second moments and Fisher from hooks, option scores through the real quantizer,
measurement files, the data-free prior, and (slow) the proxy's rank correlation with measured KL."""

from __future__ import annotations

import pytest
import torch

from tqc import turboquant
from tqc.calibration.calibrate import prior_measurement
from tqc.calibration.data import data_ref
from tqc.calibration.measurement import measurement_key, read_measurement, write_measurement
from tqc.calibration.scores import score_layers, theory_error
from tqc.calibration.statistics import collect
from tqc.layout import LayerSpec, layer_seed
from tqc.models import linear_layers, linear_shapes
from tqc.options import SCORED_OPTIONS, QuantOption
from tqc.plan import ModelRef, PlanError
from tqc.rotation import random_signs, unrotate


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_hooks_collect_second_moments_and_fisher(tiny_model):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    seen = {}
    layer = linear_layers(tiny_model)["model.layers.1.mlp.down_proj"]
    handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", []).append(args[0].detach()))
    stats = collect(tiny_model, windows, seed=0, batch_size=2, progress=False)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]]).double()
    entry = stats["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(entry.hessian, x.T @ x / x.shape[0])
    assert set(stats) == set(linear_layers(tiny_model))
    assert all(s.fisher > 0 and s.alpha > 0 and s.tokens == 64 for s in stats.values())


def test_scores_equal_the_real_quantizers_output_error():
    torch.manual_seed(0)
    weight = torch.randn(48, 256)
    x = torch.randn(400, 256) * torch.linspace(0.2, 2.0, 256)
    hessian = (x.T @ x / 400).double()
    scores = score_layers({"layer": (weight, hessian, 3.0, 64)}, seed=5, rows=1000)["layer"]
    seed = layer_seed(5, "layer")
    for option in SCORED_OPTIONS:
        spec = LayerSpec(option, 64, 256, 48)
        rotated = turboquant.dequantize(turboquant.quantize(weight, spec, seed), spec)
        delta = weight - unrotate(rotated, random_signs(seed, 256), 64)
        error = float(((delta @ hessian.float()) * delta).sum())
        assert scores[option.name].damage == pytest.approx(3.0 * error, rel=1e-3)


def test_more_bits_less_damage():
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    scores = score_layers({"w": (weight, torch.eye(128, dtype=torch.float64), 1.0, 64)}, seed=0, rows=64)["w"]
    damage = {name: s.damage for name, s in scores.items()}
    assert damage["2"] > damage["3"] > damage["4"] > damage["4+2"] > damage["4+4"]
    assert damage["2"] > damage["2+2"] > damage["2+4"]
    assert scores["3"].relative_error == pytest.approx(theory_error(QuantOption.parse("3")), rel=0.3)


def test_prior_measurement_roundtrip(tiny_model, tmp_path):
    measurement = prior_measurement(ModelRef(name="tiny"), linear_shapes(tiny_model), group_size=128)
    path = tmp_path / "m.json"
    write_measurement(measurement, path)
    assert read_measurement(path) == measurement
    assert set(measurement.layers["lm_head"].options) == {o.name for o in SCORED_OPTIONS}
    path.write_text(path.read_text().replace('"method"', '"methd"'))
    with pytest.raises(PlanError, match="invalid measurement"):
        read_measurement(path)


def test_measurement_key_ignores_where_the_data_lies(train_text, tmp_path):
    copy = tmp_path / "wiki.train.txt"
    copy.write_bytes(train_text.read_bytes())
    a, b = data_ref(train_text, 8, 128, 0), data_ref(copy, 8, 128, 0)
    assert measurement_key("m", a, 128, 0, 128) == measurement_key("m", b, 128, 0, 128)
    assert measurement_key("m", a, 128, 0, 128) != measurement_key("m", data_ref(copy, 8, 128, 1), 128, 0, 128)


def test_calibrating_on_the_test_file_is_refused(test_text):
    with pytest.raises(PlanError, match="evaluation file"):
        data_ref(test_text, 8, 128, 0)


@pytest.mark.slow
def test_proxy_ranks_like_measured_kl_on_smollm2(train_text):
    """A small calibration of SmolLM2 and 8 (layer, option) pairs measured by real KL."""
    from tqc.calibration.calibrate import calibrate
    from tqc.calibration.validate import correlation, sample_pairs
    from tqc.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2")
    model = load_model(source)
    measurement = calibrate(source, data_ref(train_text, 2, 64, 0), rows=32, model=model, progress=False)
    pairs = [p for p in sample_pairs(measurement, 60, seed=3) if p[1] in ("2", "3", "2+2", "4") and p[0] != "lm_head"][:8]
    result = correlation(model, load_tokenizer(source), measurement, pairs, samples=2, seq_len=64)
    assert result["spearman"] > 0.5, result


def test_cached_measurement_is_reused_without_calibrating(tiny_model, train_text, tmp_path, monkeypatch):
    import tqc.calibration.calibrate as calibrate_module
    from tqc.models import resolve_model

    source = resolve_model("smollm2")
    data = data_ref(train_text, 8, 128, 0)
    key = measurement_key(source.sha256(), data, 128, 0, 128)
    stored = prior_measurement(ModelRef(name="smollm2"), linear_shapes(tiny_model))
    write_measurement(stored, tmp_path / f"{key}.json")

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated although the measurement was cached")

    monkeypatch.setattr(calibrate_module, "calibrate", refuse)
    measurement, path = calibrate_module.cached_calibration(source, data, cache_dir=tmp_path)
    assert measurement == stored and path == tmp_path / f"{key}.json"
