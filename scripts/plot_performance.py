"""Draw the GPU results that people compare, from the JSON the benchmarks saved (docs/bench/).

    python scripts/plot_performance.py [--layers docs/bench/h100-run214-layers1-pass2.json]
        [--profile docs/bench/h100-run153-profile-decode-mixed-nopdl.json]
        [--loaded docs/bench/h100-run175-hf-generate.json]
        [--qwen docs/bench/h200-run89-qwen-layers.json] [--sixteen docs/bench/h100-run216-layers16.json]
        [--families docs/bench/h100-run126-layers-lookups.json docs/bench/h100-run126-layers-family.json]
        [--other-families LOOKUPS FAMILY [LOOKUPS FAMILY ...]] (default: run 128's 70B and Qwen2.5-7B pairs)
        [--before-tiles docs/bench/h100-run183-layers-fused-all.json]
        [--tiles docs/bench/h100-run184-layers-tiles.json docs/bench/h100-run186-layers-tiles-32.json]
        [--prefill docs/bench/h200-run190-layers-2048-triton-dequant.json
                   docs/bench/h200-run190-layers-2048-gluon-dequant.json]
        [--out docs]

Writes performance-layers.png (one-token speedup over bf16 for each Llama-3-8B layer and option,
with the issue's targets; performance-qwen-layers.png the same for Qwen shapes;
performance-layers-16.png Llama-3-8B's layers at 16 tokens, --sixteen), performance-decode-step.png
(a decode step's kernel time by what runs, bf16 against tqc, with a third of bf16's kernel time:
what 3x allows) and
performance-loaded.png (a model from tqc.load against bf16, ms a token, each way of running it:
scripts/check_hf_decode.py); performance-families.png (each layer and option on the lookup kernels
beside the fragment family, x bf16 at one and 16 tokens, --families; performance-families-other.png
the same for other models' shapes, --other-families); performance-tokens.png (the concatenated
gate/up of Llama-3-8B, x bf16 by token count, before and with the fragment family's token tiles, and
at 4 bits with session 44's wider programs, ring and rotation: --before-tiles, --tiles, --wide);
performance-prefill.png (Llama-3-8B's layers at 2048 tokens, x bf16, with prefill's dequantization in
plain Triton beside the Gluon one: --prefill).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"
TARGETS = {1: {"4": 3.2, "3": 4.0, "2": 5.0, "4+4": 1.7, "4+2": 2.2}, 16: {"4": 2.5}}  # issue 5, by tokens: x bf16
PREFILL_TARGET = 1 / 1.25  # issue 5: a 2048-token prefill within 1.25x bf16's time
# A kernel's name (and grid) -> what it is in the decode step; first match wins.
STEP_PARTS = (("matmuls", ("fragment_", "lut_fma", "int8_gemv", "int8_dot", "nvjet", "splitKreduce", "gemm")),
              ("norm (+ rotation)", ("norm",)),
              ("attention", ("decode_attention", "sdpa", "lean_reduction", "flash")),
              ("SwiGLU (+ rotation)", ("silu", "swiglu")),
              ("KV-cache write", ("index_elementwise", "index_copy")),
              ("o_proj's rotation (+ attention's combining)", ("fwht", "combine_rotate")))


def plot_layers(rows: list[dict], path: Path, tokens: int = 1) -> None:
    """Grouped bars: x bf16 per layer (columns) and option (bars) at one token count."""
    rows = [row for row in rows if row["tokens"] == tokens and row["option"] not in ("bf16", "rotate")]
    models = list(dict.fromkeys(row["model"] for row in rows))
    column = (lambda row: row["layer"]) if len(models) == 1 else (lambda row: f"{row['model']}\n{row['layer']}")
    layers = list(dict.fromkeys(map(column, rows)))
    options = list(dict.fromkeys(row["option"] for row in rows))
    width = 0.8 / len(options)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, option in enumerate(options):
        speedups = {column(row): row["speedup_vs_bf16"] for row in rows if row["option"] == option}
        ax.bar([j + i * width for j in range(len(layers))], [speedups.get(layer, 0) for layer in layers], width,
               label=option)
    for option, target in TARGETS.get(tokens, {}).items():
        if option in options:
            ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
            ax.text(len(layers) - 0.2, target, f"{option} target x{target}", va="bottom", ha="right", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, fontsize=8 if len(models) > 1 else None)
    count = "one token" if tokens == 1 else f"{tokens} tokens"
    ax.set_ylabel(f"x bf16 ({count})")
    ax.set_title(f"{', '.join(models)} layer shapes, {count}: speedup over bf16 (same run)")
    ax.legend(ncol=len(options), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_families(families: dict[str, list[dict]], path: Path,
                  title: str = "layers with their rotation: lookup kernels beside the fragment family") -> None:
    """Paired bars, one panel a token count: x bf16 per (layer, option), one bar a kernel family (or way)."""
    token_counts = sorted({row["tokens"] for rows in families.values() for row in rows})
    models = list(dict.fromkeys(row["model"] for rows in families.values() for row in rows))
    fig, axes = plt.subplots(len(token_counts), 1, figsize=(10, 3.2 * len(token_counts)), squeeze=False)
    width = 0.8 / len(families)
    for ax, tokens in zip(axes[:, 0], token_counts):
        columns = list(dict.fromkeys((row["model"], row["layer"], row["option"]) for rows in families.values()
                                     for row in rows if row["tokens"] == tokens and row["option"] not in ("bf16", "rotate")))
        for i, (name, rows) in enumerate(families.items()):
            speedups = {(row["model"], row["layer"], row["option"]): row["speedup_vs_bf16"] for row in rows
                        if row["tokens"] == tokens}
            ax.bar([j + i * width for j in range(len(columns))], [speedups.get(c, 0) for c in columns], width, label=name)
        labels = ["\n".join(([model] if len(models) > 1 else []) + [layer.split("_")[0], option])
                  for model, layer, option in columns]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], labels, fontsize=7 if len(models) > 1 else 8)
        ax.set_ylabel(f"x bf16, {'one token' if tokens == 1 else f'{tokens} tokens'}")
        for bits, target in TARGETS.get(tokens, {}).items():
            ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
            ax.text(len(columns) - 0.2, target, f"{bits}-bit target x{target}", va="bottom", ha="right", fontsize=8)
        if tokens == 2048:
            ax.axhline(PREFILL_TARGET, linestyle="--", linewidth=0.8, color="grey")
            ax.text(len(columns) - 0.2, PREFILL_TARGET, "target: 1.25x bf16's time", va="bottom", ha="right", fontsize=8)
        ax.legend(fontsize=8, loc="upper left", ncol=len(families))
        ax.set_ylim(0, 1.15 * max(ax.get_ylim()[1], max(TARGETS.get(tokens, {0: 0}).values())))  # room for the legend
    axes[0, 0].set_title(f"{', '.join(models)} {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_parts(kernels: dict[str, dict]) -> dict[str, float]:
    """Milliseconds of kernel time per step by STEP_PARTS (the rest as 'other')."""
    parts = dict.fromkeys([name for name, _ in STEP_PARTS] + ["other"], 0.0)
    for kernel, entry in kernels.items():
        part = next((name for name, keys in STEP_PARTS if any(key in kernel for key in keys)), "other")
        parts[part] += entry["us"] / 1e3
    return parts


def plot_step(profile: dict, path: Path) -> None:
    """Stacked horizontal bars of a decode step's kernel time, bf16 and tqc, and the 3x line."""
    models = ("bf16", "tqc")
    parts = {model: step_parts(profile[model]) for model in models}
    fig, ax = plt.subplots(figsize=(9, 2.8))
    left = [0.0, 0.0]
    for name in parts["bf16"]:
        widths = [parts[model][name] for model in models]
        ax.barh(models, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    budget = left[0] / 3
    ax.axvline(budget, color="black", linestyle="--", linewidth=0.8)
    ax.text(budget, 0.5, f" bf16 / 3: {budget:.2f} ms", fontsize=8, va="center")
    ax.set_xlabel("kernel time per decode step, ms (no programmatic dependent launch: no overlap)")
    plan = ", ".join(f"{name.removesuffix('_proj')} {option}" for name, option in profile["plan"].items())
    gpu = f"{profile['gpu']}, " if "gpu" in profile else ""
    ax.set_title(f"{gpu}8B-shaped decoder, one token; tqc plan: {plan}", fontsize=9)
    ax.legend(ncol=4, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOADED_MODES = {"eager": "eager step", "generate": "generate,\ndynamic cache", "graph": "step,\nCUDA graph",
                "generate_static": "generate,\nstatic cache", "static_decoder_uncompiled": "StaticDecoder,\nnot compiled",
                "static_decoder_eager_prefill": "StaticDecoder,\nprompt eager",
                "static_decoder": "StaticDecoder\n(tqc.generation)",
                "compiled_graph": "step, compiled\n+ CUDA graph"}


def plot_loaded(result: dict, path: Path) -> None:
    """Bars: ms a token of bf16 and tqc for each way of running a loaded model, with tqc's speedup;
    where the run also timed tqc on Hugging Face's attention (`--attention-paths`), that as well."""
    modes = [mode for mode in LOADED_MODES if mode in result]
    other = result.get("tqc_on_the_other_attention_ms", {})
    bars = [("bf16", [result[mode]["bf16_ms"] for mode in modes])]
    if all(mode in other for mode in modes):
        bars.append(("tqc, Hugging Face's sdpa attention", [other[mode] for mode in modes]))
    bars.append(("tqc" if not other else f"tqc, {result['tqc_attention']} attention",
                 [result[mode]["tqc_ms"] for mode in modes]))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for n, (label, values) in enumerate(bars):
        ax.bar([i + (n - (len(bars) - 1) / 2) * width for i in range(len(modes))], values, width, label=label)
    for i, mode in enumerate(modes):
        top = max(values[i] for _, values in bars)
        ax.text(i, top, f"x{result[mode]['speedup']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(modes)), [LOADED_MODES[mode] for mode in modes], fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_title(f"tqc.load model in Hugging Face's layers, 8B shape ({result['layers']} layers), "
                 f"context {result['context']}; x: tqc against bf16", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tokens(series: dict[str, list[dict]], path: Path, layer: str = "gate_proj+up_proj") -> None:
    """Lines: x bf16 against the token count for each series (label -> benchmark rows, a later row of
    the same option and token count replacing an earlier one) and option of one layer."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, rows in series.items():
        for option in dict.fromkeys(r["option"] for r in rows if r["option"] not in ("bf16", "rotate")):
            points = dict(sorted((r["tokens"], r["speedup_vs_bf16"]) for r in rows
                                 if r["layer"] == layer and r["option"] == option))
            ax.plot(list(points), list(points.values()), marker="o", label=f"{option} bits, {label}")
    ax.axhline(1.0, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("x bf16 (same run)")
    ax.set_title(f"Llama-3-8B's {layer} (28672 x 4096) on the fragment family, H100", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=Path, default=BENCH / "h100-run214-layers1-pass2.json")
    parser.add_argument("--profile", type=Path, default=BENCH / "h100-run153-profile-decode-mixed-nopdl.json")
    parser.add_argument("--loaded", type=Path, default=BENCH / "h100-run175-hf-generate.json")
    parser.add_argument("--qwen", type=Path, default=BENCH / "h200-run89-qwen-layers.json")
    parser.add_argument("--sixteen", type=Path, default=BENCH / "h100-run216-layers16.json")
    parser.add_argument("--families", type=Path, nargs=2, metavar=("LOOKUPS", "FAMILY"),
                        default=[BENCH / "h100-run126-layers-lookups.json", BENCH / "h100-run126-layers-family.json"])
    parser.add_argument("--other-families", type=Path, nargs="+", metavar="LOOKUPS FAMILY",
                        default=[BENCH / f"h100-run128-layers{model}-{family}.json"
                                 for model in ("70b", "qwen") for family in ("lookups", "family")])
    parser.add_argument("--before-tiles", type=Path, default=BENCH / "h100-run183-layers-fused-all.json")
    parser.add_argument("--tiles", type=Path, nargs="+",
                        default=[BENCH / "h100-run184-layers-tiles.json", BENCH / "h100-run186-layers-tiles-32.json"])
    parser.add_argument("--wide", type=Path, nargs="+",  # session 44's: its 4-bit rows, a later file's replacing
                        default=[BENCH / name for name in ("h100-run192-fused-2048-gluon-dequant.json",
                                                           "h100-run191-tiles-fused.json", "h100-run194-wide16.json",
                                                           "h100-run196-one-token-split1.json")])
    parser.add_argument("--prefill", type=Path, nargs=2, metavar=("TRITON", "GLUON"),
                        default=[BENCH / f"h200-run190-layers-2048-{way}-dequant.json" for way in ("triton", "gluon")])
    parser.add_argument("--out", type=Path, default=BENCH.parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plot_layers(json.loads(args.layers.read_text())["rows"], args.out / "performance-layers.png")
    plot_layers(json.loads(args.qwen.read_text())["rows"], args.out / "performance-qwen-layers.png")
    plot_layers(json.loads(args.sixteen.read_text())["rows"], args.out / "performance-layers-16.png", tokens=16)
    plot_step(json.loads(args.profile.read_text()), args.out / "performance-decode-step.png")
    plot_loaded(json.loads(args.loaded.read_text()), args.out / "performance-loaded.png")
    lookups, family = (json.loads(path.read_text())["rows"] for path in args.families)
    plot_families({"lookups": lookups, "fragment family": family}, args.out / "performance-families.png")
    if len(args.other_families) % 2:
        parser.error("--other-families takes pairs: LOOKUPS FAMILY")
    rows = [json.loads(path.read_text())["rows"] for path in args.other_families]
    plot_families({"lookups": sum(rows[0::2], []), "fragment family": sum(rows[1::2], [])},
                  args.out / "performance-families-other.png")
    before = [r for r in json.loads(args.before_tiles.read_text())["rows"] if r["option"] in ("3", "4")]
    tiles = sum((json.loads(path.read_text())["rows"] for path in args.tiles), [])
    wide = [r for r in sum((json.loads(path.read_text())["rows"] for path in args.wide), []) if r["option"] == "4"]
    plot_tokens({"dequantize + cuBLAS above 16 tokens": before, "token tiles above 16": tiles,
                 "8-16 warps, a ring, split butterflies (session 44)": wide}, args.out / "performance-tokens.png")
    triton, gluon = (json.loads(path.read_text())["rows"] for path in args.prefill)
    plot_families({"dequantize in Triton (before)": triton, "dequantize on the PRMT lookups (Gluon)": gluon},
                  args.out / "performance-prefill.png", "layers at 2048 tokens (H200, same machine): prefill's dequantization")
    print(f"wrote performance-layers.png, performance-qwen-layers.png, performance-layers-16.png, "
          f"performance-decode-step.png, performance-loaded.png, performance-families.png, "
          f"performance-families-other.png, performance-tokens.png and performance-prefill.png in {args.out}")


if __name__ == "__main__":
    main()
