"""The real default model: a mixed plan builds, loads, round-trips and generates."""

from __future__ import annotations

import pytest
import torch

import tqc
from tqc.models import load_tokenizer, resolve_model
from tqc.options import QuantOption
from tqc.packed import WEIGHTS_FILE, build, read_manifest
from safetensors.torch import load_file
from tqc.plan import ModelRef
from tqc.planning import uniform_plan
from tqc.models import empty_model, linear_shapes, load_config

# First two blocks get a mix of options (3-bit in a group of 64 where 576 is not a multiple of
# 128, 4+4 and RTN on the down projection); the rest stays fp16 to keep the test quick.
OVERRIDES = {
    "model.layers.0.self_attn.*": "3",
    "model.layers.0.mlp.*": "4+2",
    "model.layers.1.mlp.down_proj": "rtn4",
    "model.layers.1.*": "2+2",
}


@pytest.fixture(scope="module")
def smollm2_build(tmp_path_factory):
    source = resolve_model("smollm2")
    shapes = linear_shapes(empty_model(load_config(source)))
    overrides = {pattern: QuantOption.parse(option) for pattern, option in OVERRIDES.items()}
    plan = uniform_plan(ModelRef(name="smollm2", sha256=source.sha256()), shapes, QuantOption.parse("fp16"), overrides=overrides)
    directory = tmp_path_factory.mktemp("smollm2") / "packed"
    model = build(plan, directory, progress=False)
    return plan, model, directory


def test_round_trip_and_generate(smollm2_build):
    plan, in_memory, directory = smollm2_build
    loaded = tqc.load(directory)
    tokenizer = load_tokenizer(resolve_model("smollm2"))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    out = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == "RTNLinear"
    assert loaded.model.layers[1].self_attn.q_proj.spec.group_size == 64


def test_packed_size_matches_the_plan(smollm2_build):
    plan, _, directory = smollm2_build
    manifest = read_manifest(directory)
    state = load_file(directory / WEIGHTS_FILE)
    for name in manifest.layers:
        stored = sum(t.numel() * t.element_size() for key, t in state.items() if key.rpartition(".")[0] == name)
        assert stored == plan.layers[name].bytes, name


def test_eval_command_scores_the_packed_model_against_its_source(smollm2_build, test_text, tmp_path, capsys):
    from cli_helpers import one_line_error

    from tqc.cli import main
    from tqc.reporting import EvalResult

    _, _, directory = smollm2_build
    output = tmp_path / "eval.json"
    args = ["eval", str(directory), "--data", str(test_text), "--windows", "2", "--seq-len", "64", "-o", str(output), "-q"]
    assert main(args + ["--device", "cpu"]) == 0
    result = EvalResult.model_validate_json(output.read_text())
    assert result.device == "cpu" and result.tokens == 2 * 63
    assert 0 < result.kl_divergence < 1 and 0.5 < result.top1_agreement <= 1  # two blocks quantized, the rest fp16
    assert result.perplexity > 1 and result.source_perplexity > 1
    if not torch.cuda.is_available():
        assert "no CUDA device" in one_line_error(capsys, *args, "--device", "cuda")


def test_bench_generate_times_the_packed_model_against_its_source(smollm2_build, tmp_path, capsys):
    """`tqc bench generate` on the CPU: both models decode each way (GENERATE_MODES), or the ways
    `--modes` names; its errors are one line."""
    import json

    from cli_helpers import one_line_error

    from tqc.cli import main
    from tqc.kernels.generate_bench import GENERATE_MODES

    _, _, directory = smollm2_build
    output = tmp_path / "generate.json"
    args = ["bench", "generate", str(directory), "--new-tokens", "4", "--prompt-tokens", "8", "-o", str(output)]
    assert main(args + ["--device", "cpu"]) == 0
    result = json.loads(output.read_text())
    assert result["source"] == "smollm2" and result["source_dtype"] == "torch.float32"
    assert result["attention"] == {"source": "sdpa", "tqc": "sdpa"}  # on a GPU tqc's is "tqc_decode"
    assert set(result["modes"]) == set(GENERATE_MODES)  # each way ran: a failing one is left out
    for entry in result["modes"].values():
        assert entry["source_ms"] > 0 and entry["tqc_ms"] > 0
        assert entry["speedup"] == pytest.approx(entry["source_ms"] / entry["tqc_ms"])
    assert "generate_static" in capsys.readouterr().out
    assert main(args + ["--device", "cpu", "--modes", "static_decoder", "generate"]) == 0
    assert set(json.loads(output.read_text())["modes"]) == {"static_decoder", "generate"}
    assert "at least 1" in one_line_error(capsys, *args[:3], "--new-tokens", "0", "--device", "cpu")
    assert "not a tqc packed model" in one_line_error(capsys, "bench", "generate", str(tmp_path), "--device", "cpu")
    if not torch.cuda.is_available():
        assert "no CUDA device" in one_line_error(capsys, *args)


def test_generate_command_prints_the_greedy_continuation(smollm2_build, tmp_path, capsys):
    """`tqc generate` continues a prompt with the packed model and its saved tokenizer: the text of
    transformers' greedy `generate`; bad arguments are one line."""
    from cli_helpers import one_line_error, run

    _, _, directory = smollm2_build
    prompt = "The capital of France is"
    tokenizer = load_tokenizer(resolve_model("smollm2"))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = tqc.load(directory).generate(ids, max_new_tokens=8, do_sample=False,
                                                eos_token_id=tokenizer.eos_token_id)
    code, out, _ = run(capsys, "generate", str(directory), "-p", prompt, "-n", "8")
    assert code == 0
    assert out == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert out.strip()
    assert "at least 1" in one_line_error(capsys, "generate", str(directory), "-p", prompt, "-n", "0")
    assert "not a tqc packed model" in one_line_error(capsys, "generate", str(tmp_path), "-p", prompt)
