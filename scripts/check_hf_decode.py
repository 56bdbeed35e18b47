"""Decode speed of a model that `tqc.load` returns, against the same Hugging Face model in bf16.

    python3 -u scripts/check_hf_decode.py [--layers 4] [--family llama] [--shape llama3-8b] [--plan mixed]
                                          [--context 1024] [--generate [--generate-modes MODE ...]]
                                          [--eager-only] [--profile] [--launch-paths] [--glue-paths]
                                          [--compiled-glue-paths] [--attention-writes-paths]
                                          [--attention-combine-paths] [--mlp-residual-paths]
                                          [--attention-paths] [--kernel-profile]
                                          [--keep DIR] [--fragments]
                                          [-o hf_decode.json]

What a user gets: an 8B-shaped Llama (Llama-3-8B's sizes, `--layers` decoder layers, random weights;
`--family gemma3`: Gemma 3's architecture at those sizes; `--shape`: SmolLM2-135M's or Gemma-3-270M's
sizes instead, with `--layers 30` or `--family gemma3 --layers 18`) is built by `tqc build` (codes fitted on
the GPU) at one of the benchmark decoder's plans (kernels/decode_bench.py, head quantized too),
loaded with `tqc.load`, and run by Hugging Face's own decoder layers, whose norms and MLPs tqc
replaced so that they rotate the next layer's input (kernels/hf_glue.py; o_proj and the head rotate
in a launch of their own). Both models decode one token through a static KV cache of `--context`
positions, eagerly and, on CUDA, replayed from a CUDA graph, then compiled (torch.compile) and
replayed from a CUDA graph (median of 100 steps each). `--generate` also times `model.generate` with
the default dynamic cache (eager) and with a static one (which transformers compiles), and
tqc.generation.StaticDecoder (one CUDA graph replay a token: kernels/generate_bench.py); `--profile`
logs a CPU profile of the eager steps of both models. `--launch-paths` times tqc's eager step
through Triton's launcher and through the compiled kernels directly (kernels/launch.py, the
default), `--glue-paths` its eager and graphed step with the rotations in the norms and SwiGLU (the
default) and apart, alternated three times. `--compiled-glue-paths` its compiled step with hf_glue's
fused steps as custom ops (the default) and with Hugging Face's formulas, alternated twice;
`--attention-writes-paths` its compiled step with the rotary embedding and cache write in the
attention's launch (hf_attention.decode_forward, the default) and apart, alternated twice;
`--attention-combine-paths` its compiled step with the attention's slices combined in the launch
that rotates o_proj's input (glue.slices_linear, the default) and in the attention's own launch,
alternated twice; `--mlp-residual-paths` its compiled step with the residual after the MLP added by
down_proj's kernel onto an output the SwiGLU launch primed with it (hf_glue.PRIME_RESIDUAL, the
default) and in a launch after it, alternated twice. `--attention-paths` also times each model's
steps on the attention it does not run by default: bf16 on tqc's one-launch decode attention
(kernels/hf_attention.py; `--profile` profiles its eager steps), tqc on Hugging Face's "sdpa" (with
`--generate`, its `generate` too). `--kernel-profile` sums the GPU kernels of each model's compiled
step by name and grid. `--keep DIR` leaves the random source model and the packed one in DIR/source
and DIR/packed (for `tqc bench generate DIR/packed`). On the CPU, with `--tiny` shapes, it is a
smoke test of the plumbing. Compare with `tqc bench decode --layers 4` in the same run
(docs/performance-history.md, runs 71-77).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tqc.kernels.bench import add_load_family_arguments
from tqc.kernels.decode_bench import LLAMA3_8B, plan_options
from tqc.kernels import hf_attention
from tqc.kernels.generate_bench import GENERATE_MODES, generate_seconds
from tqc.kernels.profiling import print_kernel_table, replay_kernel_table
from tqc.kernels.registry import FragmentLayerKernel
from tqc.kv_cache import cache_argument, full_length_static_cache

# Timed steps of each kind. transformers 5.25's static cache writes each call at its own running
# position, whatever `cache_position` says, a graph replay included: the prompt leaves room.
REPLAYS = 100
STEPS = 4 * REPLAYS + 16  # eager, profiled eager, graph, compiled graph
START = time.perf_counter()
TINY = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "head_dim": 64, "vocab": 1024}
# --shape -> the sizes of a model (its layer count is --layers); the two small ones are the real models
# tqc is checked on (SmolLM2-135M: 30 layers, Llama's architecture; Gemma-3-270M: 18, --family gemma3)
SHAPES = {"llama3-8b": LLAMA3_8B,
          "smollm2-135m": {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64,
                           "vocab": 49152},
          "gemma3-270m": {"hidden": 640, "intermediate": 2048, "heads": 4, "kv_heads": 1, "head_dim": 256,
                          "vocab": 262144, "sliding_window": 512}}


# --family -> (transformers config class, what it adds to the shape's sizes)
FAMILIES = {"llama": ("LlamaConfig", lambda shape: {"rms_norm_eps": 1e-5}),
            # Gemma 3's own architecture at the shape's sizes: five sliding-window layers to a global one
            "gemma3": ("Gemma3TextConfig", lambda shape: {"query_pre_attn_scalar": shape["head_dim"],
                                                          "sliding_window": shape.get("sliding_window", GEMMA3_WINDOW)})}
GEMMA3_WINDOW = 1024  # Gemma 3 4B-27B's


def random_model(shape: dict, layers: int, directory: Path, device: str, family: str = "llama"):
    """A random-weight model of `family` (FAMILIES) and `shape` on `device`; its config and a
    one-word tokenizer (timing needs no text) saved in `directory`, which `tqc build` reads besides
    the model it is given."""
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
        num_hidden_layers=layers, tie_word_embeddings=False, **extra(shape))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(directory)
    return model


def build_packed(source: Path, model, plan_name: str, output: Path) -> dict[str, str]:
    """`tqc build` of `model` (quantized in place, codes fitted where its weights lie) at the
    benchmark plan `plan_name`; returns the option per projection."""
    from tqc.models import empty_model, linear_shapes, load_config, resolve_model
    from tqc.options import QuantOption
    from tqc.packed import build
    from tqc.plan import ModelRef
    from tqc.planning import uniform_plan

    options = plan_options(plan_name)
    shapes = linear_shapes(empty_model(load_config(resolve_model(str(source)))))
    overrides = {f"*{name}": QuantOption.parse(option) for name, option in options.items()}
    plan = uniform_plan(ModelRef(name=str(source)), shapes, QuantOption.parse("4"), keep=(), overrides=overrides)
    device = model.device  # where the codes are fitted; the packed model is assembled on the CPU
    build(plan, output, progress=False, model=model.cpu(), device=device)
    return options


def step_seconds(model, context: int, profile: bool = False, eager_only: bool = False,
                 with_compile: bool = True, kernels: dict | None = None) -> dict[str, float]:
    """Median seconds of a decode step through a static cache of `context` positions, all attended
    (Hugging Face masks the unused ones; sliding-window layers hold every position, as
    tqc.generation.StaticDecoder's do): run eagerly, and on CUDA replayed from a CUDA graph.
    `profile`: log where the eager steps spend their time on the CPU (Python's cProfile).
    `eager_only`: no CUDA graph, no torch.compile; `with_compile`: False, no torch.compile.
    `kernels`: receives the compiled step's GPU kernels per step under "compiled_graph" (kernels/profiling.py)."""
    device = model.device
    cache = full_length_static_cache(model.config, context)
    kwargs = dict(use_cache=True, **cache_argument(model, cache))
    prompt = torch.randint(model.config.vocab_size, (1, context - STEPS), generator=torch.Generator().manual_seed(0))
    token = prompt[:, -1:].to(device)
    position = torch.tensor([prompt.shape[1]], device=device)

    def step(forward=model):
        return forward(input_ids=token, cache_position=position, **kwargs).logits

    def timed(run) -> float:
        times = []
        for _ in range(REPLAYS):
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def graph_of(run):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph.replay

    with torch.no_grad():
        model(input_ids=prompt.to(device), cache_position=torch.arange(prompt.shape[1], device=device), **kwargs)
        step()  # tune every kernel
        result = {"eager": timed(step)}
        if profile:
            log_profile(lambda: timed(step))
        if device.type == "cuda" and not eager_only:
            result["graph"] = timed(graph_of(step))
        if device.type == "cuda" and not eager_only and with_compile:
            try:  # torch.compile fuses Hugging Face's elementwise steps; tqc's kernels are one op each
                torch._dynamo.reset()
                compiled = functools.partial(step, torch.compile(model))
                compiled(), compiled()
                replay = graph_of(compiled)
                result["compiled_graph"] = timed(replay)
                if kernels is not None:
                    kernels["compiled_graph"] = replay_kernel_table(replay, steps=20)
            except Exception as err:  # a benchmark reports what failed and goes on
                log(f"torch.compile: {type(err).__name__}: {err}"[:400])
    return result


# What --launch-paths, --glue-paths, --compiled-glue-paths, --attention-writes-paths and
# --attention-combine-paths switch: a module's flag, by the name of each setting, and the steps timed
# (eager; graphed too; compiled too).
PATH_SWITCHES = {"launch": ("tqc.kernels.launch", "ENABLED", {"triton": False, "direct": True}, "eager"),
                 "glue": ("tqc.kernels.hf_glue", "ENABLED", {"separate": False, "fused": True}, "graph"),
                 "compiled_glue": ("tqc.kernels.hf_glue", "COMPILED", {"formulas": False, "custom_ops": True},
                                   "compiled"),
                 "attention_writes": ("tqc.kernels.hf_attention", "WRITES", {"separate": False, "in_attention": True},
                                      "compiled"),
                 "attention_combine": ("tqc.kernels.glue", "COMBINE_IN_ROTATION",
                                       {"in_attention": False, "in_o_proj_rotation": True}, "compiled"),
                 "mlp_residual": ("tqc.kernels.hf_glue", "PRIME_RESIDUAL", {"added_after": False, "in_down_proj": True},
                                  "compiled")}


def on_attention(model, implementation: str, run):
    """run() with the model attending through `implementation`, then its own attention again."""
    own = model.config._attn_implementation
    hf_attention.register()
    model.set_attn_implementation(implementation)
    try:
        return run()
    finally:
        model.set_attn_implementation(own)


def compare_paths(model, context: int, switch: str, rounds: int = 3) -> dict[str, list[dict[str, float]]]:
    """Median seconds of a decode step (the steps PATH_SWITCHES[switch] names) under each of its
    settings, alternated `rounds` times."""
    module_name, flag, settings, steps = PATH_SWITCHES[switch]
    module = importlib.import_module(module_name)
    own, times = getattr(module, flag), {name: [] for name in settings}
    for _ in range(rounds):
        for name, value in settings.items():
            setattr(module, flag, value)
            times[name].append(step_seconds(model, context, eager_only=steps == "eager",
                                            with_compile=steps == "compiled"))
    setattr(module, flag, own)
    return times


PROFILE_SOURCES = ("tqc", "triton", "transformers", "torch")  # a function's own time, by where it is defined


def log_profile(run, lines: int = 25) -> None:
    """Log the functions where `run` spends the most time of its own (cProfile's tottime), and
    that time summed by PROFILE_SOURCES (calls into C, such as a tensor method, count apart)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(lines)
    by_source: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():
        source = next((s for s in PROFILE_SOURCES if f"/{s}/" in filename), "C" if filename == "~" else "other")
        by_source[source] = by_source.get(source, 0.0) + own
    total = sum(by_source.values())
    shares = ", ".join(f"{source} {own / total:.0%}" for source, own in sorted(by_source.items(), key=lambda i: -i[1]))
    log(f"eager steps profiled ({total:.2f} s, own time by source: {shares}):\n" + text.getvalue())


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def main() -> None:
    import tqc
    from tqc.linear import QuantizedLinear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--plan", default="mixed", help="'mixed' (about 3.5 bits) or one option for every layer")
    parser.add_argument("--context", type=int, default=1024, help="KV-cache positions attended")
    parser.add_argument("--tiny", action="store_true", help="small shapes (for a CPU smoke test)")
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b",
                        help="whose sizes (default Llama-3-8B's); give the model's own --layers and --family")
    parser.add_argument("--family", choices=FAMILIES, default="llama",
                        help="the architecture at Llama-3-8B's sizes: Llama's, or Gemma 3's (sliding windows)")
    parser.add_argument("--generate", action="store_true",
                        help="also time model.generate, eager and static-cache, and tqc's StaticDecoder")
    parser.add_argument("--generate-modes", nargs="+", choices=GENERATE_MODES, default=list(GENERATE_MODES),
                        metavar="MODE", help=f"the ways --generate times (default all: {', '.join(GENERATE_MODES)})")
    parser.add_argument("--eager-only", action="store_true", help="time eager steps only (no graph, no compile)")
    parser.add_argument("--profile", action="store_true", help="log a CPU profile of both models' eager steps")
    parser.add_argument("--launch-paths", action="store_true", help="eager tqc steps, Triton's launcher against direct")
    parser.add_argument("--glue-paths", action="store_true",
                        help="tqc steps, eager and graphed, rotating in the norm and SwiGLU steps (hf_glue) or apart")
    parser.add_argument("--compiled-glue-paths", action="store_true",
                        help="tqc steps, compiled, with hf_glue's fused steps as custom ops or Hugging Face's formulas")
    parser.add_argument("--attention-writes-paths", action="store_true",
                        help="tqc steps, compiled, the rotary embedding and cache write in the attention's launch or apart")
    parser.add_argument("--attention-combine-paths", action="store_true",
                        help="tqc steps, compiled, the attention's slices combined in o_proj's rotation launch or apart")
    parser.add_argument("--mlp-residual-paths", action="store_true",
                        help="tqc steps, compiled, the residual after the MLP added by down_proj's kernel or after it")
    parser.add_argument("--attention-paths", action="store_true",
                        help="also time bf16 on tqc's decode attention and tqc on sdpa")
    parser.add_argument("--kernel-profile", action="store_true",
                        help="sum both models' GPU kernels per compiled step (torch.profiler)")
    parser.add_argument("--keep", metavar="DIR", help="keep the source and packed models in DIR")
    add_load_family_arguments(parser)
    parser.add_argument("-o", "--output", default="hf_decode.json")
    args = parser.parse_args()
    if args.context <= STEPS:
        parser.error(f"--context must exceed the {STEPS} positions the timed steps take")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else SHAPES[args.shape]
    keep = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()
    with keep as tmp:
        source, packed = Path(tmp) / "source", Path(tmp) / "packed"
        model = random_model(shape, args.layers, source, device, args.family)
        if args.keep:
            model.save_pretrained(source)  # the weights too: `tqc bench generate` loads the source model
        log("random model made")
        kernel_tables = {"bf16": {}, "tqc": {}} if args.kernel_profile else {"bf16": None, "tqc": None}
        bf16 = step_seconds(model, args.context, args.profile, args.eager_only, kernels=kernel_tables["bf16"])
        if args.generate:
            bf16 |= generate_seconds(model, modes=args.generate_modes)
        log(f"bf16 timed: {bf16}")
        other_attention = {}
        if args.attention_paths:
            other_attention["bf16"] = on_attention(model, hf_attention.NAME,
                                                   lambda: step_seconds(model, args.context, args.profile))
            log(f"bf16 on tqc's attention: {other_attention['bf16']}")
        options = build_packed(source, model, args.plan, packed)
        del model
        log("built")
        quantized = tqc.load(packed, device=device, fragments=args.fragments)
        kernels = sum(getattr(m, "kernel", None) is not None for m in quantized.modules())
        on_fragments = sum(isinstance(getattr(m, "kernel", None), FragmentLayerKernel) for m in quantized.modules())
        layers = [name for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)]
        if device == "cuda" and kernels < len(layers):
            raise SystemExit(f"only {kernels} of {len(layers)} quantized layers got a generated kernel")
        tq = step_seconds(quantized, args.context, args.profile, args.eager_only, kernels=kernel_tables["tqc"])
        if args.generate:
            tq |= generate_seconds(quantized, modes=args.generate_modes)
        log(f"tqc timed: {tq} on attention {quantized.config._attn_implementation}")
        if args.attention_paths:
            other_attention["tqc"] = on_attention(quantized, "sdpa", lambda: step_seconds(
                quantized, args.context) | (generate_seconds(quantized, modes=args.generate_modes)
                                            if args.generate else {}))
            log(f"tqc on sdpa: {other_attention['tqc']}")
        switches = [name for name in PATH_SWITCHES if getattr(args, f"{name}_paths")]
        paths = {switch: compare_paths(quantized, args.context, switch,
                                       rounds=2 if PATH_SWITCHES[switch][3] == "compiled" else 3)
                 for switch in switches}
    result = {"shape": shape, "family": args.family, "layers": args.layers, "plan": options, "context": args.context, "device": device,
              "quantized_layers_on_kernels": kernels, "fragments": args.fragments,
              "layers_on_the_fragment_family": on_fragments, "tqc_attention": quantized.config._attn_implementation}
    for mode in [mode for mode in bf16 if mode in tq]:
        result[mode] = {"bf16_ms": bf16[mode] * 1e3, "tqc_ms": tq[mode] * 1e3, "speedup": bf16[mode] / tq[mode]}
        print(f"{mode:6} bf16 {bf16[mode] * 1e3:.3f} ms, tqc {tq[mode] * 1e3:.3f} ms per token: "
              f"x{bf16[mode] / tq[mode]:.2f}")
    for name, tables in kernel_tables.items():
        if tables and "compiled_graph" in tables:
            result[f"{name}_compiled_step_kernels"] = tables["compiled_graph"]
            print_kernel_table(f"{name}, compiled step", tables["compiled_graph"])
    for name, times in other_attention.items():
        result[f"{name}_on_the_other_attention_ms"] = {mode: t * 1e3 for mode, t in times.items()}
        print(f"{name} on the other attention: {', '.join(f'{m} {t * 1e3:.3f}' for m, t in times.items())} ms")
    for switch, times in paths.items():
        result[f"{switch}_paths_ms"] = {name: [{mode: t * 1e3 for mode, t in run.items()} for run in runs]
                                        for name, runs in times.items()}
        for name, runs in result[f"{switch}_paths_ms"].items():
            for mode in runs[0]:
                print(f"{mode} tqc step, {switch} {name}: {', '.join(f'{run[mode]:.2f}' for run in runs)} ms")
    print(f"{kernels} quantized layers on generated kernels, {on_fragments} of them on the fragment family")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
