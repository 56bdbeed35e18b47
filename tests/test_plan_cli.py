"""`tqc plan --budget / --check`, `tqc inspect`, `tqc diff`: real shapes, the checked-in SmolLM2
measurement, Llama-3 configs planned from shapes alone and checked against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_helpers import one_line_error, run
from tqc.cli import main
from tqc.plan import read_plan

REPO = Path(__file__).resolve().parents[1]
MEASUREMENT = REPO / "plans" / "measurements" / "smollm2.json"
LLAMA_70B = str(REPO / "plans" / "configs" / "llama-3-70b" / "config.json")
LLAMA_8B = str(REPO / "plans" / "configs" / "llama-3-8b" / "config.json")


def budget_plan(path: Path, budget: str = "150MB", *extra: str) -> Path:
    assert main(["plan", "--budget", budget, "--measurement", str(MEASUREMENT), *extra, "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def plan_150mb(tmp_path_factory) -> Path:
    return budget_plan(tmp_path_factory.mktemp("plans") / "p.yaml")


def test_budget_plan_fits_and_explains_itself(plan_150mb):
    plan = read_plan(plan_150mb)
    assert plan.budget.total_bytes == 150 * 10**6
    assert plan.budget.breakdown["total"] <= plan.budget.total_bytes
    assert plan.budget.breakdown["total"] == sum(v for k, v in plan.budget.breakdown.items() if k != "total")
    assert sum(layer.bytes for layer in plan.layers.values()) == (
        plan.budget.breakdown["quantized_linears"] + plan.budget.breakdown["fp16_linears"]
    )
    assert plan.budget.predicted_damage == pytest.approx(sum(layer.sensitivity for layer in plan.layers.values()), rel=1e-3)
    assert len({layer.option for layer in plan.layers.values()}) > 1  # mixed precision
    layer_lines = [line for line in plan_150mb.read_text().splitlines() if line.startswith("  model.") or line.startswith("  lm_head")]
    assert len(layer_lines) == 211 and all("  # " in line for line in layer_lines)  # each says what it trades


def test_same_inputs_give_byte_identical_plans(plan_150mb, tmp_path):
    assert budget_plan(tmp_path / "again.yaml").read_bytes() == plan_150mb.read_bytes()


def test_json_plan_by_extension(tmp_path, plan_150mb):
    assert read_plan(budget_plan(tmp_path / "p.json")) == read_plan(plan_150mb)


def test_larger_budget_less_damage(tmp_path, plan_150mb):
    bigger = read_plan(budget_plan(tmp_path / "big.yaml", "0.2GB"))
    assert bigger.budget.predicted_damage < read_plan(plan_150mb).budget.predicted_damage


def test_impossible_budget_states_the_smallest(capsys, tmp_path):
    line = one_line_error(capsys, "plan", "--budget", "50MB", "--measurement", str(MEASUREMENT), "-o", str(tmp_path / "x.yaml"))
    assert "cannot be met: the smallest plan needs" in line
    smallest = int(line.split("(")[2].split(" bytes")[0])
    budget_plan(tmp_path / "exact.yaml", str(smallest))  # exactly the stated smallest budget works
    line = one_line_error(capsys, "plan", "--budget", str(smallest - 1), "--measurement", str(MEASUREMENT), "-o", str(tmp_path / "y.yaml"))
    assert f"({smallest} bytes" in line
    assert not (tmp_path / "x.yaml").exists()


def test_rules_are_honoured(tmp_path):
    plan = read_plan(
        budget_plan(tmp_path / "r.yaml", "120MB", "--min-bits", "model.layers.0.*=4", "--min-bits", "lm_head=16", "--options", "2,3,4,4+2,fp16")
    )
    for name, layer in plan.layers.items():
        assert layer.option in {"2", "3", "4", "4+2", "fp16"}
        if name.startswith("model.layers.0."):
            assert layer.option in {"4", "4+2", "fp16"}
    assert plan.layers["lm_head"].option == "fp16"


def test_an_option_list_leaves_the_head_its_fp16_choice(tmp_path):
    """--options lists the quantization options; lm_head (--keep's default) may still stay fp16, so a list does not
    quantize SmolLM2's head, tied to the embedding (free in fp16, its own bytes quantized), and starve the others."""
    listed = read_plan(budget_plan(tmp_path / "l.yaml", "100MB", "--options", "2,3g,4"))
    assert listed.layers["lm_head"].option == "fp16"
    assert {layer.option for name, layer in listed.layers.items() if name != "lm_head"} <= {"2", "3g", "4"}
    default = read_plan(budget_plan(tmp_path / "d.yaml", "100MB"))
    assert default.budget.predicted_damage <= listed.budget.predicted_damage < 1.5 * default.budget.predicted_damage


def test_options_take_an_option_out_of_the_default_set(capsys, tmp_path):
    """'default,-3,3g' puts 3g in 3's place: the plan the full list without 3 and with 3g gives, byte for byte;
    a '-' without 'default', or of an option the default set lacks, is a one-line error that writes nothing."""
    swapped = budget_plan(tmp_path / "s.yaml", "100MB", "--options", "default,-3,3g").read_text()
    listed = budget_plan(tmp_path / "l.yaml", "100MB", "--options", "2,2+2,2+4,3g,3+2,3+4,4,4+2,4+4").read_text()
    assert swapped == listed
    options = {layer.option for layer in read_plan(tmp_path / "s.yaml").layers.values()}
    assert "3g" in options and "3" not in options
    for text, said in (("-3,3g", "start the list with 'default'"), ("default,-3g", "-3g is not in the default set")):
        line = one_line_error(capsys, "plan", "--budget", "100MB", "--measurement", str(MEASUREMENT),
                              f"--options={text}", "-o", str(tmp_path / "x.yaml"))
        assert said in line
    assert not (tmp_path / "x.yaml").exists()


def test_option_3g_is_allocated_where_asked_and_refused_where_never_scored(capsys, tmp_path):
    """3g costs what 3 costs: offered beside it, the exact allocator's damage can only drop, and it takes 3g
    where 3g scores lower; the default set leaves it out. A measurement without 3g's scores refuses it."""
    without = read_plan(budget_plan(tmp_path / "a.yaml", "100MB", "--options", "2,3,4"))
    offered = read_plan(budget_plan(tmp_path / "b.yaml", "100MB", "--options", "2,3,3g,4"))
    assert "3g" in {layer.option for layer in offered.layers.values()}
    assert offered.budget.predicted_damage < without.budget.predicted_damage
    default = read_plan(budget_plan(tmp_path / "c.yaml", "100MB"))
    extended = read_plan(budget_plan(tmp_path / "e.yaml", "100MB", "--options", "default,3g"))  # the default set + 3g
    assert "3g" not in {layer.option for layer in default.layers.values()}
    assert {layer.option for layer in extended.layers.values()} - {layer.option for layer in default.layers.values()} == {"3g"}
    assert extended.budget.predicted_damage < default.budget.predicted_damage
    data = json.loads(MEASUREMENT.read_text())
    for layer in data["layers"].values():
        del layer["options"]["3g"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    line = one_line_error(capsys, "plan", "--budget", "100MB", "--measurement", str(tmp_path / "old.json"),
                          "--options", "2,3g,4", "-o", str(tmp_path / "d.yaml"))
    assert "option 3g was not scored by this measurement" in line and not (tmp_path / "d.yaml").exists()


def test_pinned_layers_survive_a_replan(tmp_path, plan_150mb):
    data = yaml.safe_load(plan_150mb.read_text())
    data["layers"]["model.layers.5.mlp.up_proj"].update(option="2", pinned=True)
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = read_plan(budget_plan(tmp_path / "re.yaml", "150MB", "--pinned-from", str(edited)))
    assert plan.layers["model.layers.5.mlp.up_proj"].option == "2"
    assert plan.layers["model.layers.5.mlp.up_proj"].pinned


def edit_plan(source: Path, path: Path, **layers: dict) -> str:
    data = yaml.safe_load(source.read_text())
    for name, fields in layers.items():
        data["layers"][name.replace("__", ".")].update(fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_check_reports_the_new_total(capsys, tmp_path, plan_150mb):
    small = edit_plan(plan_150mb, tmp_path / "a.yaml", **{"model__layers__3__mlp__down_proj": {"option": "2"}})
    code, out, _ = run(capsys, "plan", "--check", small)
    assert code == 0 and "fits the budget" in out and "edited by hand" in out
    big = {f"model__layers__{i}__mlp__gate_proj": {"option": "4+4"} for i in range(30)}
    line = one_line_error(capsys, "plan", "--check", edit_plan(plan_150mb, tmp_path / "b.yaml", **big))
    assert "exceeds the budget" in line


def test_check_errors_name_the_layer_and_field(capsys, tmp_path, plan_150mb):
    bad = edit_plan(plan_150mb, tmp_path / "c.yaml", **{"model__layers__2__self_attn__v_proj": {"option": "5+1"}})
    line = one_line_error(capsys, "plan", "--check", bad)
    assert "layer 'model.layers.2.self_attn.v_proj', field 'option'" in line
    bad = edit_plan(plan_150mb, tmp_path / "d.yaml", **{"model__layers__2__self_attn__v_proj": {"group_size": 128}})
    assert "layer 'model.layers.2.self_attn.v_proj', field 'group_size'" in one_line_error(capsys, "plan", "--check", bad)


def test_inspect_and_diff(capsys, tmp_path, plan_150mb):
    code, out, _ = run(capsys, "inspect", str(plan_150mb))
    assert code == 0 and "kv_cache" in out and "predicted damage" in out and "model.layers.29.mlp.down_proj" in out
    other = budget_plan(tmp_path / "o.yaml", "0.2GB")
    code, out, _ = run(capsys, "diff", str(plan_150mb), str(other))
    assert code == 0 and "predicted damage" in out and " -> " in out and "150.00 MB -> 200.00 MB" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "24 parsecs"], "is not a size"),
        (["--budget", "1GB", "--min-bits", "lm_head"], "expected PATTERN=VALUE"),
        (["--budget", "1GB", "--options", "2,5"], "is not a quantization option"),
        (["--budget", "1GB", "--uniform", "3"], "give one of --uniform OPTION or --budget SIZE"),
        (["--budget", "1GB", "--kv-bits", "7"], "--kv-bits"),
    ],
)
def test_bad_arguments_are_one_line(capsys, tmp_path, argv, message):
    assert message in one_line_error(capsys, "plan", *argv, "--measurement", str(MEASUREMENT), "-o", str(tmp_path / "p.yaml"))


# --------------------------------------------------------------------------- big models, by hand


def hand_layer_bytes(out_features: int, in_features: int, option: str, group: int = 128) -> int:
    """codes (bits/8 per weight), one fp16 scale per (row, group) per stage, an 8-byte seed."""
    base, _, residual = option.partition("+")
    bits = int(base) + int(residual or 0)
    stages = 2 if residual else 1
    return out_features * in_features * bits // 8 + stages * out_features * (in_features // group) * 2 + 8


def hand_cost(shape: tuple[int, int], option: str) -> int:
    return 2 * shape[0] * shape[1] if option == "fp16" else hand_layer_bytes(*shape, option)


def llama_shapes(hidden: int, inter: int, layers: int, kv: int = 1024, vocab: int = 128256) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        block = f"model.layers.{i}."
        shapes |= {block + "self_attn.q_proj": (hidden, hidden), block + "self_attn.k_proj": (kv, hidden)}
        shapes |= {block + "self_attn.v_proj": (kv, hidden), block + "self_attn.o_proj": (hidden, hidden)}
        shapes |= {block + "mlp.gate_proj": (inter, hidden), block + "mlp.up_proj": (inter, hidden)}
        shapes |= {block + "mlp.down_proj": (hidden, inter)}
    return shapes | {"lm_head": (vocab, hidden)}


@pytest.mark.parametrize("budget", ["35GB", "27GB"])
def test_llama70b_breakdown_by_hand(tmp_path, budget):
    plan = read_plan(budget_plan_from_config(tmp_path, LLAMA_70B, budget))
    shapes = llama_shapes(8192, 28672, 80)
    assert list(plan.layers) == list(shapes)
    parts = plan.budget.breakdown
    linears = sum(hand_cost(shapes[n], layer.option) for n, layer in plan.layers.items())
    assert parts["quantized_linears"] + parts["fp16_linears"] == linears
    assert parts["other_weights"] == 2 * (128256 * 8192 + (2 * 80 + 1) * 8192)
    assert parts["workspace"] == 128256 * 4 and parts["kv_cache"] == 0
    assert linears + parts["other_weights"] + parts["workspace"] == parts["total"] <= int(budget[:2]) * 10**9
    assert parts["total"] > 0.99 * int(budget[:2]) * 10**9  # the allocator spends the budget


def budget_plan_from_config(tmp_path: Path, config: str, budget: str, *extra: str) -> Path:
    path = tmp_path / "big.yaml"
    assert main(["plan", "--model", config, "--budget", budget, *extra, "-o", str(path)]) == 0
    return path


def test_llama8b_6gb_32k_context_by_hand(capsys, tmp_path):
    shapes = llama_shapes(4096, 14336, 32)
    kv16 = 2 * 32 * 8 * 128 * 32768 * 2
    fixed = 2 * (128256 * 4096 + 65 * 4096) + 128256 * 4
    smallest = fixed + kv16 + sum(hand_layer_bytes(o, i, "2") for o, i in shapes.values())
    line = one_line_error(capsys, "plan", "--model", LLAMA_8B, "--budget", "6GB", "--context", "32768", "-o", str(tmp_path / "x.yaml"))
    assert f"needs {smallest / 1e9:.2f} GB ({smallest} bytes" in line  # 16-bit KV cache at 32k does not fit in 6 GB
    plan = read_plan(budget_plan_from_config(tmp_path, LLAMA_8B, "6GB", "--context", "32768", "--kv-bits", "4"))
    parts = plan.budget.breakdown
    assert parts["kv_cache"] == kv16 // 4
    linears = sum(hand_cost(shapes[n], layer.option) for n, layer in plan.layers.items())
    assert parts["total"] == fixed + kv16 // 4 + linears <= 6 * 10**9


def test_every_checked_in_plan_loads():
    plans = sorted((REPO / "plans").glob("*.yaml")) + sorted((REPO / "plans").glob("*.json"))
    for path in plans:
        plan = read_plan(path)
        assert plan.layers
