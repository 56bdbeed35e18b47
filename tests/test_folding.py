"""o_proj's rotation folded into v_proj (tqc.folding), on tiny random models of each family."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from tiny_models import FAMILIES, IDS, logits, make_tiny_model, plan_for

from tqc.folding import fold_signs, fold_value_rotations, foldable
from tqc.layout import LayerSpec, rotation_seed
from tqc.models import linear_layers, load_model, resolve_model
from tqc.options import QuantOption
from tqc.packed import MANIFEST_FILE, PackedModelError, build, load_packed
from tqc.rotation import rotate

GROUP = 32  # the tiny models' head size: o_proj's rotation can fold at this group size, not at 128
SEED = 0


def o_proj_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each o_proj's input on IDS."""
    inputs, handles = {}, []
    for name, layer in linear_layers(model).items():
        if name.endswith("o_proj"):
            handles.append(layer.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args[0])))
    logits(model, IDS)
    for handle in handles:
        handle.remove()
    return inputs


def o_proj_specs(model: nn.Module) -> dict[str, LayerSpec]:
    return {name: LayerSpec(QuantOption.parse("4"), GROUP, layer.in_features, layer.out_features)
            for name, layer in linear_layers(model).items() if name.endswith("o_proj")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_fold_rotates_o_proj_inputs_and_keeps_the_model(tmp_path, family, tokenizer_dir):
    """With v_proj's rows rotated, attention's output is the old one rotated, for every head and
    query head sharing a key/value head (2 of each here); o_proj's columns rotated with it, the float
    model computes what it did (GPTQ runs it forward before anything is quantized)."""
    model = load_model(resolve_model(str(make_tiny_model(tmp_path / "src", family, tokenizer_dir))))
    expected, before = logits(model, IDS), o_proj_inputs(model)
    specs = fold_value_rotations(model, o_proj_specs(model), SEED)
    assert all(spec.input_rotated for spec in specs.values()) and len(specs) == 2
    after = o_proj_inputs(model)
    for name, spec in specs.items():
        rotated = rotate(before[name], fold_signs(rotation_seed(SEED, name), spec), GROUP)
        assert (after[name] - before[name]).abs().max() > 1e-2  # the values do arrive changed
        torch.testing.assert_close(after[name], rotated, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model, IDS), expected, atol=1e-4, rtol=1e-4)


def test_only_attention_that_commutes_with_the_rotation_folds(tmp_path, tokenizer_dir):
    model = load_model(resolve_model(str(make_tiny_model(tmp_path / "src", "llama", tokenizer_dir))))
    attention = model.model.layers[0].self_attn
    spec = o_proj_specs(model)["model.layers.0.self_attn.o_proj"]
    assert foldable(attention, spec)
    assert not foldable(attention, dataclasses.replace(spec, group_size=64))  # wider than a head (32)
    assert not foldable(attention, dataclasses.replace(spec, option=QuantOption.parse("rtn4")))
    assert not foldable(attention, None)  # o_proj kept in fp16
    assert not foldable(nn.Module(), spec)  # an attention tqc does not know: its output may be gated


def test_a_folded_build_round_trips_and_keeps_its_quality(tmp_path, tokenizer_dir):
    """The manifest marks o_proj, the loaded model computes what the build did, and the folded
    build is as close to the source as the unfolded one (the shared signs cost nothing)."""
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    plan = plan_for(str(source), "4+2", group_size=GROUP)
    reference = logits(load_model(resolve_model(str(source))), IDS)
    folded = build(plan, tmp_path / "folded", progress=False, fold=True)
    unfolded = build(plan, tmp_path / "unfolded", progress=False)
    layers = json.loads((tmp_path / "folded" / MANIFEST_FILE).read_text())["layers"]
    assert {name for name, entry in layers.items() if entry["input_rotated"]} == {
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    loaded = load_packed(tmp_path / "folded")
    assert torch.equal(logits(loaded, IDS), logits(folded, IDS))
    assert torch.equal(loaded.model.layers[0].self_attn.o_proj.signs, torch.ones(128))
    folded_error = (logits(folded, IDS) - reference).norm()
    unfolded_error = (logits(unfolded, IDS) - reference).norm()
    assert folded_error < 1.5 * unfolded_error, (folded_error, unfolded_error)


def test_a_manifest_folding_a_layer_that_cannot_take_it_is_refused(tmp_path, tokenizer_dir):
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    build(plan_for(str(source), "4", group_size=GROUP), tmp_path / "packed", progress=False, fold=True)
    path = tmp_path / "packed" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["layers"]["model.layers.0.self_attn.o_proj"]["option"] = "rtn4"
    path.write_text(json.dumps(manifest))
    with pytest.raises(PackedModelError, match=r"layers\.model\.layers\.0\.self_attn\.o_proj.*rotated input"):
        load_packed(tmp_path / "packed", verify=False)


def test_a_manifest_from_before_the_fold_still_loads(tmp_path, tokenizer_dir):
    """Directories built before the field existed have no `input_rotated`: their layers rotate at run time."""
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    built = build(plan_for(str(source), "4", group_size=GROUP), tmp_path / "packed", progress=False, fold=False)
    path = tmp_path / "packed" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for entry in manifest["layers"].values():
        assert entry.pop("input_rotated") is False
    path.write_text(json.dumps(manifest))
    loaded = load_packed(tmp_path / "packed", verify=False)
    assert torch.equal(logits(loaded, IDS), logits(built, IDS))
