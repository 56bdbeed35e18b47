"""`tqc bench generate`: how fast a packed model decodes with `generate`, against its source model.

    tqc bench generate packed/ [--device cuda] [--new-tokens 128] [--prompt-tokens 32] [--modes MODE ...] [-o FILE]

The source model (the one the manifest names) runs first, in bf16 on CUDA (float32 on the CPU,
where bf16 matmuls are slow), then the packed model as `tqc.load` gives it. Each decodes a
random prompt greedily, a fixed number of new tokens, several ways: `generate` with transformers'
default dynamic cache (eager) and with `cache_implementation="static"`, which transformers compiles
(torch.compile) and replays from CUDA graphs on a GPU, and tqc.generation.StaticDecoder, whose
whole step (the forward and the choice of the next token) is one CUDA graph replay on a GPU: its
step and prompt compiled (the default), its prompt eager, or neither compiled. Reported:
milliseconds per new token, the median of three calls after two warm-up calls (the first static
call compiles).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

Call = Callable[[], object]


def _through_generate(cache: str) -> Callable[[torch.nn.Module, torch.Tensor, int], Call]:
    """`model.generate` greedily through transformers' cache_implementation `cache`."""
    return lambda model, prompt, new_tokens: functools.partial(
        model.generate, input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, cache_implementation=cache)


def _through_decoder(compiled: bool, compiled_prefill: bool) -> Callable[[torch.nn.Module, torch.Tensor, int], Call]:
    """tqc.generation.StaticDecoder (one CUDA graph replay a token on a GPU), its step and its
    prefill compiled or not."""
    def make(model, prompt, new_tokens) -> Call:
        from tqc.generation import StaticDecoder  # noqa: PLC0415

        decoder = StaticDecoder(model, max_length=prompt.shape[1] + new_tokens, compiled=compiled,
                                compiled_prefill=compiled_prefill)
        return functools.partial(decoder.generate, prompt, new_tokens)

    return make


# result key -> (model, prompt, new tokens) -> a call that generates them
GENERATE_MODES = {"generate": _through_generate("dynamic"), "generate_static": _through_generate("static"),
                  "static_decoder": _through_decoder(compiled=True, compiled_prefill=True),
                  "static_decoder_eager_prefill": _through_decoder(compiled=True, compiled_prefill=False),
                  "static_decoder_uncompiled": _through_decoder(compiled=False, compiled_prefill=False)}


def generate_seconds(model, new_tokens: int = 128, prompt_tokens: int = 32, warmup: int = 2,
                     repeats: int = 3, modes: Iterable[str] = GENERATE_MODES) -> dict[str, float]:
    """Seconds per new token, greedy, one sequence, each way of GENERATE_MODES named in `modes`; a
    mode that fails is reported on stderr and left out."""
    prompt = torch.randint(model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(model.device)
    result = {}
    for name in modes:
        make = GENERATE_MODES[name]
        torch._dynamo.reset()  # each compiled forward starts afresh, far from the recompile limit
        call = make(model, prompt, new_tokens)

        def run(call=call) -> float:
            start = time.perf_counter()
            call()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / new_tokens

        try:
            for _ in range(warmup):
                run()
            result[name] = statistics.median(run() for _ in range(repeats))
        except Exception as err:  # a benchmark reports what failed and goes on
            print(f"{name}: {type(err).__name__}: {err}"[:400], file=sys.stderr)
    return result


def compare(source: dict[str, float], packed: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per mode measured for both: milliseconds per token of each and the packed model's speedup."""
    return {mode: {"source_ms": source[mode] * 1e3, "tqc_ms": packed[mode] * 1e3, "speedup": source[mode] / packed[mode]}
            for mode in GENERATE_MODES if mode in source and mode in packed}


def cmd_generate(args: argparse.Namespace) -> None:
    from tqc.cli import CommandError, require_device  # noqa: PLC0415
    from tqc.models import load_model, resolve_model  # noqa: PLC0415
    from tqc.packed import load_packed, read_manifest  # noqa: PLC0415

    from .bench import save  # noqa: PLC0415

    if args.new_tokens < 1 or args.prompt_tokens < 1:
        raise CommandError("--new-tokens and --prompt-tokens must be at least 1")
    require_device(args.device)
    manifest = read_manifest(Path(args.packed))
    source_dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    timing = dict(new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens)
    with torch.no_grad():
        model = load_model(resolve_model(manifest.source.name)).to(args.device, source_dtype)
        source = generate_seconds(model, modes=args.modes, **timing)
        model_attention = model.config._attn_implementation
        del model
        quantized = load_packed(args.packed, device=args.device, fragments=args.fragments)
        attention = {"source": model_attention, "tqc": quantized.config._attn_implementation}
        packed = generate_seconds(quantized, modes=args.modes, **timing)
    modes = compare(source, packed)
    if not modes:
        raise CommandError("generate failed for every cache on one of the models (the errors are above)")
    for mode, entry in modes.items():
        print(f"{mode:16} source ({str(source_dtype).removeprefix('torch.')}) {entry['source_ms']:8.2f} ms, "
              f"tqc {entry['tqc_ms']:8.2f} ms per token: x{entry['speedup']:.2f}")
    print(f"attention: source {attention['source']}, tqc {attention['tqc']}")
    save({"packed": str(args.packed), "source": manifest.source.name, "source_dtype": str(source_dtype),
          "device": args.device, "fragments": args.fragments, "attention": attention, **timing, "modes": modes},
         args.output)
