"""build -> load round trips and the loader's refusals, on tiny random models of each family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import FAMILIES, IDS, logits, make_tiny_model, plan_for

from tqc.options import QuantOption
from tqc.packed import MANIFEST_FILE, WEIGHTS_FILE, PackedModelError, build, load_packed, sha256_file
from tqc.plan import PlanError

@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_gives_identical_logits(tmp_path, family, tokenizer_dir):
    source = make_tiny_model(tmp_path / "src", family, tokenizer_dir)
    plan = plan_for(str(source), "3+2")
    in_memory = build(plan, tmp_path / "packed", progress=False)
    loaded = load_packed(tmp_path / "packed")
    assert torch.equal(logits(loaded, IDS), logits(in_memory, IDS))
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "TurboQuantLinear"


def test_quantized_head_is_untied(tmp_path, tokenizer_dir):
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    plan = plan_for(str(source), "4", keep=(), overrides={"lm_head": QuantOption.parse("4+2")})
    in_memory = build(plan, tmp_path / "packed", progress=False)
    loaded = load_packed(tmp_path / "packed")
    assert type(loaded.lm_head).__name__ == "TurboQuantLinear"
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(logits(loaded, IDS), logits(in_memory, IDS))


def test_the_same_plan_builds_the_same_bytes(tmp_path, tokenizer_dir):
    """Every file of the packed directory, over several builds (safetensors 0.8 writes a header's
    metadata entries in a random order: one entry only)."""
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    plan = plan_for(str(source), "3+2")
    builds = []
    for i in range(4):
        build(plan, tmp_path / f"packed{i}", progress=False)
        builds.append({path.name: path.read_bytes() for path in sorted((tmp_path / f"packed{i}").iterdir())})
    assert all(files == builds[0] for files in builds[1:])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3 ties its head to the embedding
def test_a_bf16_checkpoint_builds_in_half_the_memory_to_the_same_bytes(tmp_path, family, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from tqc.models import load_model, resolve_model
    from tqc.packed import load_for_build

    fp32 = make_tiny_model(tmp_path / "fp32", family, tokenizer_dir)
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(source)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, source / path.name)
    plan = plan_for(str(source), "3", keep=(), overrides={"*.down_proj": QuantOption.parse("fp16")})
    model = load_for_build(resolve_model(str(source)), plan)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16  # quantized: widened layer by layer
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.float32  # kept: as a float32 load
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    build(plan, tmp_path / "half", progress=False)
    build(plan, tmp_path / "full", progress=False, model=load_model(resolve_model(str(source))))
    assert (tmp_path / "half" / WEIGHTS_FILE).read_bytes() == (tmp_path / "full" / WEIGHTS_FILE).read_bytes()


@pytest.fixture(scope="module")
def packed_llama(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("packed")
    source = make_tiny_model(root / "src", "llama", tokenizer_dir)
    build(plan_for(str(source), "2+2"), root / "packed", progress=False)
    return root / "packed"


def damaged_copy(packed: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    return copy


def test_corrupt_manifest_is_refused(packed_llama, tmp_path):
    copy = damaged_copy(packed_llama, tmp_path)
    (copy / MANIFEST_FILE).write_text('{"format_version": 1, "layers": 3')
    with pytest.raises(PackedModelError, match="corrupt manifest"):
        load_packed(copy)


def test_tampered_weights_are_refused(packed_llama, tmp_path):
    copy = damaged_copy(packed_llama, tmp_path)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(PackedModelError, match="sha256 does not match"):
        load_packed(copy)


def test_truncated_weights_are_refused(packed_llama, tmp_path):
    copy = damaged_copy(packed_llama, tmp_path)
    data = (copy / WEIGHTS_FILE).read_bytes()
    (copy / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedModelError, match="truncated"):
        load_packed(copy)


def test_missing_tensor_is_refused_even_with_a_consistent_manifest(packed_llama, tmp_path):
    copy = damaged_copy(packed_llama, tmp_path)
    state = load_file(copy / WEIGHTS_FILE)
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, copy / WEIGHTS_FILE)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = {"bytes": (copy / WEIGHTS_FILE).stat().st_size, "sha256": sha256_file(copy / WEIGHTS_FILE)}
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PackedModelError, match="'model.layers.1.mlp.up_proj.scales' is missing"):
        load_packed(copy)


def test_plan_naming_a_missing_layer_is_refused(tmp_path, tokenizer_dir):
    source = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    plan = plan_for(str(source), "4")
    layers = dict(plan.layers)
    layers["model.layers.7.mlp.up_proj"] = layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(PlanError, match="model.layers.7.mlp.up_proj"):
        build(plan.model_copy(update={"layers": layers}), tmp_path / "packed", progress=False)
    assert not (tmp_path / "packed").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # nothing half-written


def test_generate_through_a_static_cache_gives_the_dynamic_cache_tokens(packed_llama):
    """The fast decode path on a GPU (`cache_implementation="static"`: transformers compiles the
    step), here on the CPU's reference path with the fused siblings: greedy decoding through the
    static cache picks the tokens the default cache does."""
    model = load_packed(packed_llama)
    args = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(IDS, **args)
        static = model.generate(IDS, cache_implementation="static", **args)
    assert model.generation_config.cache_implementation is None  # a default tqc leaves alone
    assert torch.equal(static, dynamic)
