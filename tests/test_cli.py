"""Every expected failure of the command line is one line on stderr and exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from cli_helpers import one_line_error
from tqc.checkout import ROOT
from tqc.cli import main


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    assert main(["plan", "--model", "smollm2", "--uniform", "3+2", "-o", str(path)]) == 0
    return str(path)


def edited(plan_file: str, tmp_path, edit) -> str:
    data = yaml.safe_load(open(plan_file))
    edit(data)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_uniform_plan_lists_every_layer_in_model_order(plan_file):
    layers = list(yaml.safe_load(open(plan_file))["layers"])
    assert len(layers) == 30 * 7 + 1
    assert layers[0] == "model.layers.0.self_attn.q_proj" and layers[-1] == "lm_head"


def test_missing_model(capsys, tmp_path):
    line = one_line_error(capsys, "plan", "--model", "no-such-model", "--uniform", "4", "-o", str(tmp_path / "p.yaml"))
    assert "no-such-model" in line
    assert not (tmp_path / "p.yaml").exists()


def test_wrong_option_names_the_layer_and_field(capsys, plan_file, tmp_path):
    path = edited(plan_file, tmp_path, lambda d: d["layers"]["model.layers.3.mlp.up_proj"].update(option="5+1"))
    line = one_line_error(capsys, "build", path, "-o", str(tmp_path / "packed"))
    assert "model.layers.3.mlp.up_proj" in line and "'option'" in line and "'5+1'" in line
    assert not (tmp_path / "packed").exists()


def test_unknown_key_is_refused(capsys, plan_file, tmp_path):
    path = edited(plan_file, tmp_path, lambda d: d["layers"]["lm_head"].update(bitz=4))
    line = one_line_error(capsys, "inspect", path)
    assert "lm_head" in line and "bitz" in line


def test_bad_group_size_names_the_layer(capsys, plan_file, tmp_path):
    path = edited(plan_file, tmp_path, lambda d: d["layers"]["model.layers.0.self_attn.k_proj"].update(group_size=128))
    line = one_line_error(capsys, "build", path, "-o", str(tmp_path / "packed"))
    assert "model.layers.0.self_attn.k_proj" in line and "group_size" in line


def test_layer_the_model_lacks(capsys, plan_file, tmp_path):
    def add_layer(data):
        data["layers"]["model.layers.99.mlp.up_proj"] = {"option": "4", "group_size": 64}

    line = one_line_error(capsys, "build", edited(plan_file, tmp_path, add_layer), "-o", str(tmp_path / "packed"))
    assert "model.layers.99.mlp.up_proj" in line


def test_malformed_yaml(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("layers: [unclosed\n")
    assert "not valid YAML" in one_line_error(capsys, "inspect", str(path))


def test_missing_packed_directory(capsys, tmp_path):
    assert "no such packed model" in one_line_error(capsys, "eval", str(tmp_path / "nothing"))


def test_not_a_packed_directory(capsys, tmp_path):
    assert "manifest.json is missing" in one_line_error(capsys, "eval", str(tmp_path))


def test_build_does_not_replace_what_is_not_a_packed_model(capsys, plan_file, tmp_path):
    before = open(plan_file).read()
    line = one_line_error(capsys, "build", plan_file, "-o", plan_file)  # a slip of the keyboard
    assert "not a packed model directory" in line and open(plan_file).read() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert "not replacing it" in one_line_error(capsys, "build", plan_file, "-o", str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_build_on_a_gpu_the_machine_lacks(capsys, plan_file, tmp_path):
    line = one_line_error(capsys, "build", plan_file, "-o", str(tmp_path / "packed"), "--device", "cuda")
    assert "--device cuda" in line and "no CUDA device" in line
    assert not (tmp_path / "packed").exists()


def test_checkout_root_does_not_shadow_the_kernels_package():
    """`python -m tqc.cli` in the checkout: kernels/ must not stand in for transformers' `kernels`."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = ("from tqc.checkout import hide_checkout_root; hide_checkout_root()\n"
              "try:\n    import kernels\nexcept ImportError:\n    print('absent')\nelse:\n    print(kernels.__file__)")
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert not found.stdout.strip().startswith(str(ROOT)), found.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_python_dash_m_reports_errors_raised_in_other_modules_in_one_line(tmp_path):
    """`python -m tqc.cli` runs the module as __main__, a second copy whose CommandError is not
    the one kernels/bench.py raises: the error must still be one line, not a traceback."""
    found = subprocess.run([sys.executable, "-m", "tqc.cli", "bench", "layers"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert found.returncode == 1
    assert found.stderr.strip().splitlines() == ["tqc: error: tqc bench needs a CUDA device"]
