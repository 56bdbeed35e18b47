"""int8 activations (a plan's `activations: int8`): rounding, the reference path's numbers, the plan
and packed-model plumbing, and the quality on SmolLM2 next to 16-bit activations."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tqc
from tqc.activations import quantize_groups, round_to_int8, takes_int8
from tqc.bitpack import unpack
from tqc.codebook import int8_codebook
from tqc.evaluate import Windows, evaluate_many, token_windows
from tqc.layout import LayerSpec
from tqc.linear import QuantizedLinear, quantize_linear
from tqc.models import linear_shapes, load_model, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import PackedModelError, build, quantize_model, read_manifest
from tqc.plan import ModelRef, PlanError, parse_plan, plan_to_text, read_plan
from tqc.planning import uniform_plan
from tqc.rotation import rotate

from cli_helpers import one_line_error, run


def test_groups_round_to_127_steps_of_their_largest_value():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    x[1, :64] = 0  # an all-zero group
    values, scales = quantize_groups(x, 64)
    assert values.dtype == torch.int8 and scales.shape == (3, 4)
    assert (values.abs().amax(-1) == 127).any() and values.abs().max() == 127
    assert scales[1, 0] == 1 and (values[1, :64] == 0).all()
    error = (round_to_int8(x, 64) - x).abs().reshape(3, 4, 64)
    assert (error <= scales[..., None] / 2 * (1 + 1e-6)).all()


def test_only_turboquant_layers_without_a_residual_take_int8():
    assert takes_int8(QuantOption.parse("3"), "int8") and not takes_int8(QuantOption.parse("3"), "fp16")
    assert not takes_int8(QuantOption.parse("4+4"), "int8") and not takes_int8(QuantOption.parse("rtn4"), "int8")
    with pytest.raises(ValueError, match="4\\+2 cannot run on int8"):
        LayerSpec(QuantOption.parse("4+2"), 64, 256, 8, activations="int8")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_path_computes_the_int8_products(bits):
    """The layer's forward equals sum over groups of ws * xs * factor * (integer dot of int8 levels
    and int8 activations), computed here in integers."""
    k, n, g = 256, 24, 64
    linear = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(bits))
    spec = LayerSpec(QuantOption("turboquant", bits), g, k, n, activations="int8")
    layer = quantize_linear(linear, spec, seed=5)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q_x, s_x = quantize_groups(rotate(x, layer.signs.double(), g), g)
    levels, factor = int8_codebook(bits)
    q_w = levels[unpack(layer.codes, bits, k)]  # [n, k] int64
    dots = torch.einsum("ngk,mgk->mng", q_w.view(n, -1, g), q_x.long().view(5, -1, g))
    expected = (dots.double() * layer.scales.double() * s_x.double()[:, None] * factor).sum(-1)
    out = layer.double().forward(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)  # the levels and scales are float32
    fp16_activations = dataclasses.replace(spec, activations="fp16")
    layer.spec = fp16_activations  # the same codes on 16-bit activations give other numbers
    assert not torch.allclose(layer.forward(x), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_4bit():
    """SmolLM2 at 4 bits everywhere but the head (its codes are those of either activation mode)."""
    source = resolve_model("smollm2")
    model = load_model(source)
    plan = uniform_plan(ModelRef(name="smollm2"), linear_shapes(model), QuantOption.parse("4"))
    quantize_model(model, plan, progress=False)
    return source, model


def test_int8_activations_keep_smollm2_quality(smollm2_4bit, test_text):
    """On real text the int8 rounding moves 4-bit SmolLM2's perplexity by well under 1% (and does move it)."""
    source_ref, model = smollm2_4bit
    ids = token_windows(load_tokenizer(source_ref), Windows(str(test_text), 256, 4))
    (fp16,) = evaluate_many([model], load_model(source_ref), ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.spec = dataclasses.replace(layer.spec, activations="int8")
    (int8,) = evaluate_many([model], load_model(source_ref), ids, progress=False)
    assert fp16.perplexity != int8.perplexity
    assert abs(int8.perplexity / fp16.perplexity - 1) < 0.01, (fp16.perplexity, int8.perplexity)
    assert abs(int8.kl_divergence - fp16.kl_divergence) < 0.25 * fp16.kl_divergence


def test_plan_field_reaches_the_packed_model(tmp_path, capsys):
    """`tqc plan --activations int8` writes the field; build gives plain layers int8, 4+4 stays fp16."""
    plan_path = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "plan", "--model", "smollm2", "--uniform", "fp16", "--activations", "int8",
                         "--override", "model.layers.0.mlp.*=3", "--override", "model.layers.0.self_attn.q_proj=4+4",
                         "-o", str(plan_path))
    assert code == 0, err
    text = plan_path.read_text()
    assert "activations: int8" in text
    plan = read_plan(plan_path)
    packed = tmp_path / "packed"
    build(plan, packed, progress=False)
    layers = read_manifest(packed).layers
    assert layers["model.layers.0.mlp.down_proj"].activations == "int8"
    assert layers["model.layers.0.self_attn.q_proj"].activations == "fp16"
    loaded = tqc.load(packed)
    assert loaded.model.layers[0].mlp.down_proj.spec.activations == "int8"
    manifest = packed / "manifest.json"  # a hand edit that gives a 4+4 layer int8 activations
    data = json.loads(manifest.read_text())
    data["layers"]["model.layers.0.self_attn.q_proj"]["activations"] = "int8"
    manifest.write_text(json.dumps(data))
    with pytest.raises(PackedModelError, match="self_attn.q_proj: .*4\\+4 cannot run on int8"):
        tqc.load(packed)


def test_plans_without_the_field_are_unchanged_and_bad_values_name_it(tmp_path, capsys):
    shapes = {"layer": linear_shapes(torch.nn.Sequential(torch.nn.Linear(64, 8)))["0"]}
    plan = uniform_plan(ModelRef(name="m"), shapes, QuantOption.parse("4"))
    assert "activations" not in plan_to_text(plan)
    with pytest.raises(PlanError, match="activations"):
        parse_plan(plan.model_dump(mode="json") | {"activations": "int4"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(plan_to_text(plan).replace("layers:", "activations: int4\nlayers:"))
    assert "activations" in one_line_error(capsys, "plan", "--check", str(bad))
