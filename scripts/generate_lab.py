"""Where `generate(cache_implementation="static")` spends a token, bf16 against a model from `tqc.load`.

    python3 -u scripts/generate_lab.py [--layers 8] [--new-tokens 64] [-o generate_lab.json]

transformers compiles the forward of a static-cache `generate` (mode "reduce-overhead": CUDA graph
trees). For each model this times the call per new token and profiles one call: the GPU's kernel
time per token, the launches the CPU made (kernels one by one, or CUDA graph replays), and the
compiler's graph breaks, recompiles and cudagraph skips (logged by torch as perf hints).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from check_hf_decode import build_packed, log, random_model  # noqa: E402

from tqc.kernels.decode_bench import LLAMA3_8B  # noqa: E402
from tqc.kernels.generate_bench import generate_seconds  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch", "cudaLaunchKernelExC")


def profile_generate(model, new_tokens: int) -> dict:
    """One static-cache generate call under torch.profiler: per new token, the GPU kernel time and
    each kind of launch the CPU made."""
    prompt = torch.randint(model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=prompt.to(model.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0, cache_implementation="static")
    model.generate(**kwargs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.generate(**kwargs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = {e.key: e.count / new_tokens for e in events if e.key in LAUNCHES}
    kernel_us = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    cpu_top = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: -e.self_cpu_time_total)[:15]
    return {"launches_per_token": launches, "gpu_us_per_token": kernel_us / new_tokens,
            "cpu_self_us_per_token": {e.key[:80]: e.self_cpu_time_total / new_tokens for e in cpu_top}}


def compiler_report() -> dict:
    from torch._dynamo.utils import counters
    return {group: dict(values) for group, values in counters.items() if values}


def main() -> None:
    import tqc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--plan", default="mixed")
    parser.add_argument("-o", "--output", default="generate_lab.json")
    args = parser.parse_args()
    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True, cudagraphs=True)
    result = collections.defaultdict(dict)
    with tempfile.TemporaryDirectory() as tmp:
        source, packed = Path(tmp) / "source", Path(tmp) / "packed"
        model = random_model(LLAMA3_8B, args.layers, source, "cuda")
        for name in ("bf16", "tqc"):
            if name == "tqc":
                build_packed(source, model, args.plan, packed)
                del model
                model = tqc.load(packed, device="cuda")
            torch._dynamo.utils.counters.clear()
            result[name]["seconds"] = generate_seconds(model, new_tokens=args.new_tokens)
            result[name]["profile"] = profile_generate(model, args.new_tokens)
            result[name]["compiler"] = compiler_report()
            log(f"{name}: {json.dumps(result[name], indent=1)}")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
