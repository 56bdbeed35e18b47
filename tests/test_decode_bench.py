"""The end-to-end decode benchmark's decoder, run on CPU through the reference path."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tqc.checkout import ROOT

from tqc.kernels.decode_bench import MIXED_PLAN, Decoder, bf16_factory, decoder_keys, plan_options, quantized_factory

TINY = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2, "head_dim": 32, "vocab": 64}


def logits(plan: dict[str, str], fuse: bool, tokens: int = 1) -> torch.Tensor:
    """The next token's logits after a decode step (one token at position 5) or a prefill."""
    torch.manual_seed(0)
    model = Decoder(quantized_factory(plan, device="cpu", fuse=fuse), TINY, layers=2, context=8, device="cpu")
    pos = torch.tensor([5]) if tokens == 1 else torch.arange(tokens)
    with torch.no_grad():
        return model(torch.arange(3, 3 + tokens), pos).float()


def test_fused_projections_compute_what_separate_ones_do():
    separate, fused = logits(MIXED_PLAN, fuse=False), logits(MIXED_PLAN, fuse=True)
    assert separate.shape == (1, TINY["vocab"])
    assert separate.std() > 0
    torch.testing.assert_close(fused, separate, rtol=1e-3, atol=1e-3)


def test_a_prefill_runs_fused_and_separate_projections_alike():
    prefill = logits(MIXED_PLAN, fuse=True, tokens=4)
    assert prefill.shape == (1, TINY["vocab"])
    torch.testing.assert_close(prefill, logits(MIXED_PLAN, fuse=False, tokens=4), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(prefill, logits(MIXED_PLAN, fuse=True, tokens=3))


def test_a_plan_with_different_sibling_options_keeps_them_separate():
    plan = {**MIXED_PLAN, "k_proj": "2"}
    torch.testing.assert_close(logits(plan, fuse=True), logits(plan, fuse=False), rtol=0, atol=0)
    rows = {key.n for key in decoder_keys(plan, fuse=True)}
    assert 4096 + 2 * 1024 not in rows and 2 * 14336 in rows


def test_bf16_decoder_runs_one_step():
    torch.manual_seed(0)
    model = Decoder(bf16_factory("cpu"), TINY, layers=1, context=8, device="cpu")
    with torch.no_grad():
        out = model(torch.tensor([3]), torch.tensor([5]))
    assert out.shape == (1, TINY["vocab"]) and torch.isfinite(out).all()


def test_int8_layers_choose_which_projections_take_int8_activations():
    assert plan_options("mixed") == MIXED_PLAN
    mlp = plan_options("mixed", "int8", ["gate_proj", "up_proj", "down_proj"])
    assert mlp == {**MIXED_PLAN, "gate_proj": "3@int8", "up_proj": "3@int8", "down_proj": "4@int8"}
    assert set(plan_options("2", "int8").values()) == {"2@int8"}
    assert set(plan_options("4+4", "int8").values()) == {"4+4"}  # a residual stage keeps 16-bit activations
    with pytest.raises(ValueError, match="no projection mlp"):
        plan_options("mixed", "int8", ["mlp"])


def test_hf_decode_check_runs_end_to_end_on_cpu(tmp_path):
    """scripts/check_hf_decode.py (a GPU benchmark) at tiny shapes: random model, tqc build,
    tqc.load, the timed steps through Hugging Face's static cache, `generate` and the eager steps
    by launch path and with the rotations in the glue or apart all run, and
    scripts/plot_performance.py draws the result."""
    output = tmp_path / "hf.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "check_hf_decode.py"), "--tiny", "--layers", "1",
                    "--context", "448", "--generate", "--launch-paths", "--glue-paths", "-o", str(output)],
                   cwd=tmp_path, check=True, capture_output=True)
    result = json.loads(output.read_text())
    assert result["device"] == "cpu" and result["plan"]["gate_proj"] == "3"
    for mode in ("eager", "generate", "generate_static", "static_decoder", "static_decoder_eager_prefill",
                 "static_decoder_uncompiled"):
        assert result[mode]["bf16_ms"] > 0 and result[mode]["tqc_ms"] > 0, mode
    assert [len(runs) for runs in result["launch_paths_ms"].values()] == [3, 3]
    assert set(result["glue_paths_ms"]) == {"separate", "fused"}  # graphs only on CUDA
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_performance.py"), "--loaded", str(output),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    assert all((tmp_path / name).stat().st_size > 0 for name in ("performance-loaded.png", "performance-layers-16.png",
                                                               "performance-families-other.png"))


def test_launch_overhead_script_times_every_line_on_cpu(tmp_path):
    """scripts/launch_overhead.py (launches stubbed) times a layer call, the fused q/k/v and the
    norm before it both ways; each line a positive number of microseconds."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_overhead.py"), "--calls", "20"],
                            cwd=tmp_path, check=True, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.endswith(" us")]
    assert len(lines) == 4, result.stdout
    assert all(float(line.split()[-2]) > 0 for line in lines)


def test_static_vs_tuning_reads_a_verbose_log_and_compiles_its_candidates(tmp_path):
    """scripts/static_vs_tuning.py: the tensor-core candidates timed for one key and bucket, fastest
    first, each compiled for sm_90 here (registers, warps an SM holds); other keys and strategies
    left out, and a key the log never tuned refused."""
    pytest.importorskip("triton")
    from tqc.kernels.tuning import LaunchConfig

    def line(us: float, **fields) -> str:
        return f"  {us:9.1f} us  {LaunchConfig(**fields).model_dump()}"

    log = tmp_path / "tune.log"
    log.write_text("\n".join([
        line(9.0, strategy="dot", block_n=64, slots=8),
        line(7.0, strategy="dot", block_n=32, slots=8, scale_first=True),
        line(5.0, strategy="dequant"),
        "tuned b4r0g128n1024k4096/m16: {} 5.0 us",
        line(1.0, strategy="dot", block_n=16, slots=8),
        "tuned b4r0g128n4096k4096/m16: {} 1.0 us"]) + "\n")
    script = str(ROOT / "scripts" / "static_vs_tuning.py")
    result = subprocess.run([sys.executable, script, str(log), "b4r0g128n1024k4096"], capture_output=True, text=True,
                            check=True)
    rows = result.stdout.splitlines()
    assert [row.split()[0] for row in rows] == ["7.0", "9.0"] and "scale_first" in rows[0]
    assert all(int(row.split("registers")[1].split()[0]) > 0 and "warps/SM" in row for row in rows)
    refused = subprocess.run([sys.executable, script, str(log), "b2r0g128n1024k4096"], capture_output=True, text=True)
    assert refused.returncode != 0 and "no tuning of b2r0g128n1024k4096/m16" in refused.stderr


def test_tuning_by_field_compares_a_knob_per_key(tmp_path):
    """scripts/tuning_by_field.py: per tuned key, the fastest candidate under each value of a field
    and the tuner's choice, from a verbose log; a log without tunings refused."""
    from tqc.kernels.tuning import LaunchConfig

    def line(us: float, **fields) -> str:
        return f"  {us:9.1f} us  {LaunchConfig(strategy='dot', **fields).model_dump()}"

    log = tmp_path / "tune.log"
    log.write_text("\n".join([
        line(9.0, slots=8), line(7.0, slots=8, scale_first=True), line(8.0, slots=8, scale_first=True, dot_pairs=4),
        "tuned b4r0g128n1024k4096/m16: {} 7.0 us",
        line(3.0, slots=8), line(2.0, slots=8, scale_first=True, dot_pairs=4),
        "tuned b4r0g128n4096k4096/m16: {} 2.0 us"]) + "\n")
    script = str(ROOT / "scripts" / "tuning_by_field.py")
    rows = subprocess.run([sys.executable, script, str(log), "dot_pairs"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert rows[0].split() == ["b4r0g128n1024k4096/m16", "dot_pairs=1:", "7.0", "us", "dot_pairs=4:", "8.0", "us",
                               "chose", "1"]
    assert rows[1].endswith("chose 4") and rows[2] == "chosen: 1 on 1 of 2, 4 on 1 of 2"
    (tmp_path / "empty.log").write_text("nothing here\n")
    refused = subprocess.run([sys.executable, script, str(tmp_path / "empty.log"), "dot_pairs"], capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "no tuning found" in refused.stderr


def test_qwen_decoder_shapes_give_its_fused_layers_and_grouped_attention():
    """`tqc bench decode --model qwen2.5-7b`: q/k/v fused as 3584 + 2 x 512 rows, gate/up as 2 x 18944,
    the 152064-row head (qwen3-4b: attention wider than the hidden size); and a decoder with
    Qwen2.5's 7 query heads a key/value head, its attention 7 times as wide as its hidden size, decodes."""
    from tqc.kernels.bench import DECODER_SHAPES

    shape, layers = DECODER_SHAPES["qwen2.5-7b"]
    keys = {(key.n, key.k, key.bits) for key in decoder_keys(MIXED_PLAN, True, shape)}
    assert keys == {(4608, 3584, 4), (3584, 3584, 4), (37888, 3584, 3), (3584, 18944, 4), (152064, 3584, 4)}
    assert layers == 28
    keys = {(key.n, key.k) for key in decoder_keys(MIXED_PLAN, True, DECODER_SHAPES["qwen3-4b"][0])}
    assert keys == {(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728), (151936, 2560)}  # o_proj 4096 wide
    torch.manual_seed(0)
    seven = {**TINY, "heads": 7, "kv_heads": 1, "head_dim": 128}  # o_proj: 7 groups of 128 inputs
    model = Decoder(quantized_factory(MIXED_PLAN, device="cpu"), seven, layers=1, context=8, device="cpu")
    with torch.no_grad():
        out = model(torch.tensor([3]), torch.tensor([5]))
    assert out.shape == (1, TINY["vocab"]) and torch.isfinite(out).all() and out.std() > 0


def test_benchmarks_run_the_family_tqc_load_runs(monkeypatch):
    """`tqc bench layers|decode` unset run what tqc.load runs: the fragment family's checked options
    where the GPU can run it, else the lookups; --lookups, --fragments [all] choose; asking for the
    family where it cannot run exits naming the command. (GPU and tuner stubbed: no CUDA here.)"""
    import argparse

    from tqc.kernels import bench, registry
    from tqc.kernels.tuning import Tuner

    monkeypatch.setattr(Tuner, "for_device", classmethod(lambda cls, **kwargs: Tuner("stub GPU", "0", None)))
    parser = argparse.ArgumentParser()
    bench.add_fragments_argument(parser)

    def family(argv: list[str]) -> tuple[str | None, bool, bool]:
        kernels, name = bench.bench_registry("tqc bench decode", fragments=parser.parse_args(argv).fragments)
        return name, kernels.fragments, kernels.unchecked_fragments

    monkeypatch.setattr(registry, "fragments_available", lambda device: None)  # a Hopper GPU
    assert family([]) == family(["--fragments"]) == ("checked", True, False)
    assert family(["--fragments", "all"]) == ("all", True, True)
    assert family(["--lookups"]) == (None, False, False)
    monkeypatch.setattr(registry, "fragments_available", lambda device: "it needs a Hopper GPU")
    assert family([]) == family(["--lookups"]) == (None, False, False)
    with pytest.raises(SystemExit, match="tqc bench decode --fragments: it needs a Hopper GPU"):
        family(["--fragments"])
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["--fragments", "--lookups"])


def test_fixed_time_script_splits_a_layer_into_fixed_time_and_streaming(tmp_path):
    """scripts/fixed_time.py: rows on a known line (5 us + bytes at 3000 GB/s) give that line back,
    and the fixed time the 3.2x target leaves beside bf16's 42 us."""
    def rows(weight_bytes: int, bf16_us: float) -> dict:
        return {"rows": [{"layer": "gate_proj/up_proj", "option": "4", "tokens": 1, "weight_bytes": weight_bytes,
                          "us": 5 + weight_bytes / 3000e3},
                         {"layer": "gate_proj/up_proj", "option": "bf16", "tokens": 1, "weight_bytes": 4 * weight_bytes,
                          "us": bf16_us}]}

    small, large, output = tmp_path / "small.json", tmp_path / "large.json", tmp_path / "fit.json"
    small.write_text(json.dumps(rows(30_000_000, 42.0)))
    large.write_text(json.dumps(rows(120_000_000, 168.0)))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fixed_time.py"), str(small), str(large), "-o", str(output)],
                   check=True, capture_output=True)
    four = next(e for e in json.loads(output.read_text()) if e["option"] == "4")
    assert four["fixed_us"] == pytest.approx(5.0) and four["gbps"] == pytest.approx(3000.0)
    assert four["target"] == 3.2 and four["fixed_us_allowed"] == pytest.approx(42.0 / 3.2 - 10.0)


def test_decode_config_sweep_changes_one_cached_entry_in_a_copy(tmp_path, monkeypatch):
    """scripts/decode_config_sweep.py: a variant KEY:FIELD=VALUE copies the tuning cache with that
    entry's field changed (typed as the field is) and every other entry, and the original, as they were;
    a key, field or value type the cache does not have stops it with one line."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from decode_config_sweep import with_override

    config = {"strategy": "fragment_gemv", "iters": 8, "sums": "rows"}
    cache = {"format": 13, "gpu": "H100", "entries": {"a/m1": {"config": config, "microseconds": 13.0},
                                                       "b/m1": {"config": dict(config), "microseconds": 9.0}}}
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "h100.json").write_text(json.dumps(cache))
    changed = json.loads((with_override(tuned, "a/m1:iters=4", tmp_path / "variant") / "h100.json").read_text())
    assert changed["entries"]["a/m1"]["config"] == config | {"iters": 4}
    assert changed["entries"]["b/m1"] == cache["entries"]["b/m1"]
    assert json.loads((tuned / "h100.json").read_text()) == cache
    for variant, message in [("c/m1:iters=4", "no tuned key 'c/m1'"), ("a/m1:steps=4", "no int field 'steps'"),
                             ("a/m1:iters=four", "no str field 'iters'")]:
        with pytest.raises(SystemExit, match=message):
            with_override(tuned, variant, tmp_path / variant.replace("/", "-"))


def test_every_script_with_options_answers_help_without_a_gpu():
    """scripts/*.py that parse options (argparse) import and print their usage on a machine without a
    GPU, as CI's: most of them run only on the device, so this is where an import they broke shows first."""
    scripts = sorted(path for path in (ROOT / "scripts").glob("*.py") if "argparse" in path.read_text())
    runs = {path.name: subprocess.Popen([sys.executable, str(path), "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for path in scripts}
    outputs = {name: run.communicate(timeout=300) for name, run in runs.items()}
    failed = {name: output[0][-300:] for (name, output), run in zip(outputs.items(), runs.values())
              if run.returncode != 0 or "usage:" not in output[0]}
    assert len(scripts) >= 20 and not failed


def test_results_name_the_switches_they_ran_under(monkeypatch):
    """Benchmark JSONs (bench.device_info) record the TQC_ variables that change what runs, so the two
    sides of an A/B tell themselves apart; the tuning cache's place is not one of them."""
    from tqc.kernels.bench import switches

    for name in [name for name in os.environ if name.startswith("TQC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TQC_PRELOAD", "1")
    monkeypatch.setenv("TQC_PDL", "0")
    monkeypatch.setenv("TQC_KERNEL_CACHE", "/tmp/cache")
    assert switches() == {"TQC_PDL": "0", "TQC_PRELOAD": "1"}
