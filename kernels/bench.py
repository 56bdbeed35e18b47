"""`tqc bench`: layer-level and end-to-end kernel benchmarks on a CUDA device, printed and saved as JSON.

    tqc bench layers   every linear shape of Llama-3-8B / 70B (or Qwen) at several token counts, each option
                       against a bf16 torch.nn.functional.linear measured in the same run, plus the
                       device's copy bandwidth
    tqc bench decode   tokens/s of an 8B-shaped Llama decoder (random weights; --model qwen2.5-7b) at a mixed
                       plan vs bf16
    tqc bench gemlite  the peer kernel (gemlite) beside tqc and bf16 at the same shapes
    tqc bench static   no GPU needed: compile the one-token kernels for sm_90, count SASS instructions per weight

`layers` and `decode` run the kernels tqc.load runs: on Hopper the fragment family (`--lookups`: the
lookup kernels; `--fragments all`: the family on every option its kernels take).

Every timing is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph), over enough
copies of the weights that they do not fit in L2, so each replay streams them from device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from .generate_bench import GENERATE_MODES
from .tuning import stream_copies

SHAPES = {  # name -> (out_features N, in_features K)
    "llama3-8b": {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096),
                  "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)},
    "llama3-70b": {"q_proj/o_proj": (8192, 8192), "k_proj/v_proj": (1024, 8192),
                   "gate_proj/up_proj": (28672, 8192), "down_proj": (8192, 28672)},
    # widths that are not multiples of 2048 inputs: code chunks of B = 16 words (repack.slot_words)
    "qwen2.5-7b": {"q_proj/o_proj": (3584, 3584), "k_proj/v_proj": (512, 3584),
                   "gate_proj/up_proj": (18944, 3584), "down_proj": (3584, 18944)},
    "qwen3-4b": {"q_proj": (4096, 2560), "o_proj": (2560, 4096), "k_proj/v_proj": (1024, 2560),
                 "gate_proj/up_proj": (9728, 2560), "down_proj": (2560, 9728)},
}
LLAMA = ["llama3-8b", "llama3-70b"]  # the shapes: `tqc bench layers` by default


def fused_shapes(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The concatenated layers tqc.load runs where a Llama's siblings share an option (tqc/fusion.py):
    q/k/v as one, gate/up as one. `tqc bench layers --models llama3-8b-fused` times them against bf16
    as one matmul of the same shape."""
    (q, k), (kv, _), (gate, hidden) = shapes["q_proj/o_proj"], shapes["k_proj/v_proj"], shapes["gate_proj/up_proj"]
    return {"q_proj+k_proj+v_proj": (q + 2 * kv, k), "gate_proj+up_proj": (2 * gate, hidden)}


SHAPES |= {f"{model}-fused": fused_shapes(SHAPES[model]) for model in LLAMA}
# `tqc bench decode --model`: name -> (decoder shape, layers); biases and q/k norms left out, shapes only
DECODER_SHAPES = {
    "llama3-8b": ({"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128,
                   "vocab": 128256}, 32),
    "qwen2.5-7b": ({"hidden": 3584, "intermediate": 18944, "heads": 28, "kv_heads": 4, "head_dim": 128,
                    "vocab": 152064}, 28),
    "qwen3-4b": ({"hidden": 2560, "intermediate": 9728, "heads": 32, "kv_heads": 8, "head_dim": 128,
                  "vocab": 151936}, 36),  # q/k/v 4096 + 2 x 1024 wide: attention wider than the residual stream
}


def device_info() -> dict:
    """The GPU and versions a result was measured with, and the TQC_ switches it ran under (switches)."""
    import triton  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "switches": switches()}


def switches() -> dict[str, str]:
    """The TQC_ environment variables that change what runs (TQC_PDL, TQC_PRELOAD, ...; not where the
    tuning cache lives), so that a result from an A/B says which side it is."""
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith("TQC_") and name != "TQC_KERNEL_CACHE"}


def graph_seconds(fn, rep_ms: int = 100) -> float:
    """Median seconds of one call of fn, replayed in a CUDA graph."""
    from triton.testing import do_bench_cudagraph  # noqa: PLC0415

    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") / 1e3


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    src = torch.randn(int(gigabytes * 1e9 / 4), device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_seconds(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / 1e9


def time_layers(layers, x: torch.Tensor) -> float:
    """Seconds per layer call, cycling through `layers` (callables of x) inside one graph."""
    def run():
        for layer in layers:
            layer(x)
    return graph_seconds(run) / len(layers)


def bench_shape(n: int, k: int, tokens: list[int], options: list[str], group_size: int, registry) -> list[dict]:
    """Rows for one (N, K): bf16 and every option at every token count."""
    import torch.nn.functional as F  # noqa: PLC0415

    from tqc.layout import layer_bytes  # noqa: PLC0415

    from .registry import rotate  # noqa: PLC0415

    rows = []
    bf16_bytes = n * k * 2
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(stream_copies(bf16_bytes))]
    bf16_layers = [lambda x, w=w: F.linear(x, w) for w in weights]
    bf16_times = {}
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16_times[m] = time_layers(bf16_layers, x)
        rows.append(row("bf16", n, k, m, bf16_bytes, bf16_times[m], bf16_times[m]))
    del weights, bf16_layers
    signs = torch.ones(k, device="cuda")
    for m in tokens:  # the activation rotation alone: part of every quantized time below
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        rows.append(row("rotate", n, k, m, 0, time_layers([lambda x: rotate(x, signs, group_size)], x), bf16_times[m]))
    for name in options:
        spec = bench_spec(name, group_size, k, n)
        nbytes = layer_bytes(spec)
        kernel = registry.kernel_for(spec)
        modules = streamed_modules(spec, kernel.layout)
        layers = [lambda x, mod=mod: kernel(x, mod) for mod in modules]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kernel(x, modules[0])  # tune this bucket outside the graph
            rows.append(row(name, n, k, m, nbytes, time_layers(layers, x), bf16_times[m]))
        del modules, layers
        torch.cuda.empty_cache()
    return rows


def streamed_modules(spec, layout: str | None = None) -> list:
    """Random layers of `spec` on CUDA, their codes in `layout` (default: registry.layout_of): enough
    copies that cycling through them streams the weights from device memory (stream_copies), as a
    model's step does."""
    from tqc.layout import layer_bytes  # noqa: PLC0415

    from .registry import prepare  # noqa: PLC0415
    from .synthetic import random_turboquant_linear  # noqa: PLC0415

    modules = [random_turboquant_linear(spec, "cuda", seed=i) for i in range(stream_copies(layer_bytes(spec)))]
    for module in modules:
        prepare(module, layout)
    return modules


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a||: two launch configurations must compute the same layer up to rounding."""
    return float((a.float() - b.float()).norm() / a.float().norm())


def row(option: str, n: int, k: int, m: int, nbytes: int, seconds: float, bf16_seconds: float) -> dict:
    return {"option": option, "n": n, "k": k, "tokens": m, "weight_bytes": nbytes, "us": seconds * 1e6,
            "weight_gbps": nbytes / seconds / 1e9, "speedup_vs_bf16": bf16_seconds / seconds}


def bench_registry(command: str, cache_dir=None, verbose: bool = False, fragments: str | None = None):
    """(the KernelRegistry a benchmark runs on this GPU, the family it runs): `fragments` "checked" for
    the fragment family on the options a GPU has checked on it (registry.CHECKED_FRAGMENT_OPTIONS),
    "all" for every option its kernels take (else exit naming `command` where it cannot run),
    "lookups" for the lookup kernels, None as tqc.load does: "checked" where the GPU can run the
    family, else the lookups. The family comes back as "checked", "all" or None (the lookups)."""
    from .registry import KernelRegistry, fragments_available  # noqa: PLC0415
    from .tuning import Tuner  # noqa: PLC0415

    missing = fragments != "lookups" and fragments_available(torch.device("cuda"))
    if missing and fragments is not None:
        raise SystemExit(f"{command} --fragments: {missing}")
    family = None if fragments == "lookups" or missing else fragments or "checked"
    registry = KernelRegistry(Tuner.for_device(cache_dir=cache_dir, verbose=verbose), fragments=family is not None,
                              unchecked_fragments=family == "all")
    return registry, family


def add_load_family_arguments(parser: argparse.ArgumentParser) -> None:
    """--fragments / --lookups: tqc.load's `fragments` True / False (default None: the family where
    the GPU can run it)."""
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--fragments", action="store_const", const=True,
                        help="load with fragments=True: the layers of the options a GPU has checked on the Gluon "
                             "fragment family run it (Hopper; tqc.load's default where the GPU can)")
    family.add_argument("--lookups", dest="fragments", action="store_const", const=False,
                        help="load with fragments=False: every layer on the lookup kernels")


def add_fragments_argument(parser: argparse.ArgumentParser) -> None:
    """--fragments [checked|all] / --lookups: the kernel family a benchmark's layers run (bench_registry;
    unset, tqc.load's default: the fragment family where the GPU can run it)."""
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--fragments", nargs="?", const="checked", choices=["checked", "all"],
                        help="layers on the Gluon fragment family (Hopper): those of the options a GPU has checked "
                             "on it (registry.CHECKED_FRAGMENT_OPTIONS, as tqc.load runs them), or with 'all' of "
                             "every option its kernels take (default: 'checked' where the GPU can run the family)")
    family.add_argument("--lookups", dest="fragments", action="store_const", const="lookups",
                        help="every layer on the lookup kernels (tqc.load(..., fragments=False))")


def add_decoder_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """What a lab script timing `tqc bench decode`'s decoders takes besides its own options: --layers,
    --context, --cache-dir and the kernel family (add_fragments_argument)."""
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--cache-dir")
    add_fragments_argument(parser)


def bench_layers(args: argparse.Namespace) -> None:
    """`tqc bench layers`: every shape and option at every token count against bf16, printed and saved."""
    from .registry import KERNEL_LAYOUT  # noqa: PLC0415

    torch.manual_seed(0)
    registry, family = bench_registry("tqc bench layers", args.cache_dir, args.verbose, args.fragments)
    result = {"device": device_info(), "copy_gbps": copy_bandwidth(), "group_size": args.group_size,
              "fragments": family, "rows": []}
    print(f"{result['device']['gpu']}: copy bandwidth {result['copy_gbps']:.0f} GB/s (read + write)")
    shapes = [(model, layer, n, k) for model in args.models for layer, (n, k) in SHAPES[model].items()
              if not args.layers or layer in args.layers]
    # the lookup kernels, compiled in parallel before any timing (the fragment family's compile as they tune)
    keys = [registry.kernel_for(bench_spec(option, args.group_size, k, n)).key for *_, n, k in shapes
            for option in args.options]
    compile_and_report([key for key in keys if key.codes == KERNEL_LAYOUT], args.tokens)
    for model, layer, n, k in shapes:
        result["rows"] += report(bench_shape(n, k, args.tokens, args.options, args.group_size, registry), model, layer)
    save(result, args.output)


def report(rows: list[dict], model: str, layer: str) -> list[dict]:
    """Label the rows of one shape with the model and layer, and print them."""
    for r in rows:
        r |= {"model": model, "layer": layer}
        print(f"{model:<10} {layer:<17} {r['n']:>5}x{r['k']:<5} M={r['tokens']:<5} {r['option']:>9} {r['us']:9.1f} us "
              f"{r['weight_gbps']:7.0f} GB/s  x{r['speedup_vs_bf16']:.2f}", flush=True)
    return rows


def bench_spec(option: str, group_size: int, k: int, n: int):
    """The LayerSpec of a benchmark's option name: a plan's option, '@int8' after it for int8 activations."""
    from tqc.layout import LayerSpec  # noqa: PLC0415
    from tqc.options import QuantOption  # noqa: PLC0415

    name, _, activations = option.partition("@")
    return LayerSpec(QuantOption.parse(name), group_size, k, n, activations=activations or "fp16")


def layer_key(option: str, n: int, k: int, group_size: int):
    from .registry import KernelKey  # noqa: PLC0415

    return KernelKey.of(bench_spec(option, group_size, k, n))


def compile_and_report(keys, tokens: list[int]) -> None:
    """Fill Triton's cache with every candidate kernel, in parallel, before anything is timed."""
    import time  # noqa: PLC0415

    from .precompile import precompile  # noqa: PLC0415

    start = time.perf_counter()
    failures = precompile(sorted(set(keys)), tokens)
    print(f"compiled {len(set(keys))} kernel keys in {time.perf_counter() - start:.0f} s; {len(failures)} failed")
    for failure in failures:
        print(f"  failed: {failure}")


def save(result: dict, output: str) -> None:
    from tqc.plan import write_text_atomic  # noqa: PLC0415

    write_text_atomic(Path(output), json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


def cmd_decode(args: argparse.Namespace) -> None:
    from .decode_bench import run_decode_bench  # noqa: PLC0415

    shape, layers = DECODER_SHAPES[args.model]
    result = run_decode_bench(args.plan, args.context, args.layers or layers, args.cache_dir, args.verbose,
                              args.activations, fuse=not args.separate, compile_glue=not args.eager_glue,
                              rotate_in_glue=not args.separate_rotation, tokens=args.tokens,
                              int8_layers=args.int8_layers, shape=shape, fragments=args.fragments,
                              fold=args.fold, attention=args.attention)
    result |= {"model": args.model}
    result["device"] = device_info()
    save(result, args.output)


def add_parser(subparsers) -> None:
    """Register `tqc bench layers`, `decode`, `generate`, `static` and the peer benchmarks."""
    bench = subparsers.add_parser("bench", help="benchmark the generated kernels against bf16 (CUDA)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    layers = kinds.add_parser("layers", help="Llama-3 (or Qwen) linear shapes at several token counts")
    layers.add_argument("--models", nargs="+", default=LLAMA, choices=list(SHAPES))
    layers.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 128, 2048])
    layers.add_argument("--options", nargs="+", default=["2", "3", "4", "4+2", "4+4"],
                        help="plan options; '@int8' after one for int8 activations (4@int8)")
    layers.add_argument("--layers", nargs="+", help="only these layer names (e.g. q_proj/o_proj); default all")
    layers.add_argument("--group-size", type=int, default=128)
    layers.add_argument("-o", "--output", default="bench-layers.json")
    decode = kinds.add_parser("decode", help="end-to-end decode of an 8B-shaped Llama (or Qwen), random weights")
    decode.add_argument("--model", choices=list(DECODER_SHAPES), default="llama3-8b",
                        help="whose shapes the decoder takes (random weights; default Llama-3-8B)")
    decode.add_argument("--plan", default="mixed", help="'mixed' (about 3.5 bits), 'mixed-3g' (its 3-bit layers on "
                        "the grid codebook) or one option for every layer (3g: 3 bits on the grid codebook)")
    decode.add_argument("--activations", choices=["fp16", "int8"], default="fp16",
                        help="int8: the plan's layers without a residual on int8 activations")
    decode.add_argument("--int8-layers", nargs="+", metavar="NAME",
                        help="with --activations int8: only these projections on int8, of q_proj k_proj v_proj "
                             "o_proj gate_proj up_proj down_proj lm_head (default: all)")
    decode.add_argument("--context", type=int, default=1024, help="KV-cache positions attended")
    decode.add_argument("--layers", type=int, help="decoder layers (default: the model's)")
    decode.add_argument("--separate", action="store_true",
                        help="run q/k/v and gate/up as separate matmuls (default: fused where the plan allows)")
    decode.add_argument("--attention", choices=["sdpa", "triton"], default="triton",
                        help="a decode step's attention, for both models: torch's scaled_dot_product_attention after "
                             "the cache write, or one Triton launch that does both (kernels/attention.py; the default: "
                             "H100 run 136, the mixed decoder x2.97 -> x3.04)")
    decode.add_argument("--fold", action="store_true",
                        help="o_proj takes its input rotated, as `tqc build --fold` makes it (default: it rotates it)")
    decode.add_argument("--eager-glue", action="store_true",
                        help="leave the elementwise steps eager (default: torch.compile them, for both models)")
    decode.add_argument("--tokens", type=int, default=1,
                        help="tokens per forward: 1 times decode steps, more a prefill from an empty cache")
    decode.add_argument("--separate-rotation", action="store_true",
                        help="rotate each quantized layer's input in its own launch (default: inside the norm or "
                             "SwiGLU step that makes it)")
    decode.add_argument("-o", "--output", default="bench-decode.json")
    generate = kinds.add_parser("generate", help="a packed model's `generate` speed against its source model")
    generate.add_argument("packed", help="a packed model directory (tqc build)")
    generate.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    generate.add_argument("--new-tokens", type=int, default=128)
    generate.add_argument("--prompt-tokens", type=int, default=32)
    generate.add_argument("--modes", nargs="+", choices=GENERATE_MODES, default=list(GENERATE_MODES), metavar="MODE",
                          help=f"the ways to generate that are timed (default all: {', '.join(GENERATE_MODES)})")
    add_load_family_arguments(generate)
    generate.add_argument("-o", "--output", default="bench-generate.json")
    generate.set_defaults(run=_generate)
    static = kinds.add_parser("static", help="compile the lookup kernels for sm_90 here (no GPU) and count their SASS")
    static.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    static.add_argument("--options", nargs="+", default=["2", "3", "4", "4+2", "4+4"])
    static.add_argument("--bandwidth", type=float, default=2700.0, help="GB/s assumed for the memory-bound estimate")
    static.add_argument("--tokens", type=int, default=1, help="the candidates of this token count's bucket (1 or 16)")
    static.add_argument("--fragments", action="store_true",
                        help="also the fragment family's candidates for the options (GPU-checked or not)")
    static.add_argument("-o", "--output", default="bench-static.json")
    static.set_defaults(run=_static)
    for parser in (layers, decode):
        add_fragments_argument(parser)
        parser.add_argument("--cache-dir", type=Path, help="kernel tuning cache (default ~/.cache/tqc/kernels)")
        parser.add_argument("-v", "--verbose", action="store_true", help="print each tuning result")
    layers.set_defaults(run=_checked(bench_layers))
    decode.set_defaults(run=_checked(cmd_decode))
    from .peer_bench import add_parser as add_peer_parser  # noqa: PLC0415 (it imports this module)

    add_peer_parser(kinds, _checked)


def _generate(args: argparse.Namespace) -> None:
    from .generate_bench import cmd_generate  # noqa: PLC0415

    cmd_generate(args)


def _static(args: argparse.Namespace) -> None:
    from .static_report import cmd_static  # noqa: PLC0415

    cmd_static(args)


def _checked(command):
    def run(args: argparse.Namespace) -> None:
        if not torch.cuda.is_available():
            from tqc.cli import CommandError  # noqa: PLC0415

            raise CommandError("tqc bench needs a CUDA device")
        command(args)
    return run
