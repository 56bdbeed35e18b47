"""build -> load round trips and the loader's refusals, on tiny random models of each family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tqc.models import empty_model, linear_shapes, load_config, load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import MANIFEST_FILE, WEIGHTS_FILE, PackedModelError, build, load_packed, sha256_file
from tqc.plan import ModelRef, PlanError
from tqc.planning import uniform_plan

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(resolve_model("smollm2")).save_pretrained(directory)
    return directory


def make_tiny_model(directory: Path, family: str, tokenizer_dir: Path) -> Path:
    """A random model of `family` saved as a Hugging Face directory with safetensors."""
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, directory / path.name)
    return directory


def plan_for(model_name: str, option: str, keep=("lm_head",), **kwargs):
    source = resolve_model(model_name)
    shapes = linear_shapes(empty_model(load_config(source)))
    return uniform_plan(ModelRef(name=model_name), shapes, QuantOption.parse(option), keep=keep, **kwargs)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 500, 200, 31, 7, 900, 12, 1000]])


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
