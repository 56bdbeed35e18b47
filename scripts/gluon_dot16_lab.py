"""Lab: the 16-token 4-bit lookup matmul in Gluon, its codes stored in wgmma's operand order (CUDA, or sm_90 statically).

    python scripts/gluon_dot16_lab.py check            # on the GPU: the lab against a dequantized reference
    python scripts/gluon_dot16_lab.py bench --out F    # on the GPU: lab, tqc's tuned kernel and bf16 side by side
    python scripts/gluon_dot16_lab.py static           # anywhere: compile for sm_90, count SASS, no GPU

Why a lab: at 16 tokens tqc's kernel (Triton, `lut_dot_kernel`) holds 171-255 registers, and
Triton moves the decoded weights or code words through shared memory into wgmma's operand layout
in some configurations (docs/performance-history.md, runs 101-105). Gluon writes the layouts by hand, so
this kernel stores the codes **in the order of wgmma's register operand**: a thread loads the
words of its own fragment as 16-byte vectors, decodes them with tqc's PRMT lookups, and the
decoded weights are already where wgmma reads them (the layout conversion is asserted trivial at
compile time: no shared memory, no shuffles). 55-72 registers, no spills.

Tried and dropped: an asynchronous product (`warpgroup_mma(is_async=True)`, then
`warpgroup_mma_wait(1)`) so that the next step decodes while the tensor cores multiply. With the
weights in registers it computes wrong sums in Triton 3.6: the wait does not keep the operand's
registers alive in the PTX (its `deps` are not operands of the instruction), and ptxas gives them
to the next step's decode while the product still reads them (run 107).

4 bits only, no residual stage, group size a multiple of the step, tokens <= 16. tqc itself runs
the kernels as the fragment family (registry.FragmentLayerKernel, steps of 64 inputs; the default
on Hopper since session 27).

The code layout: kernels/fragments.py (docs/kernel_layout.md, "Fragment layout").
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple

import torch

from tqc.kernels.fragments import fragment_input_order, pack_fragments
from tqc.kernels.gluon_kernels import fragment_dot_kernel, fragment_gemv_kernel, x_layout
from tqc.kernels.lut import TABLE_COPIES, lookup_values, stored_code, table_words

def random_layer(n: int, k: int, group: int, device: str, seed: int = 0) -> dict:
    """Random 4-bit codes (stored form) and scales, and the dequantized fp32 weights they stand for."""
    generator = torch.Generator(device).manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator, device=device)
    scales = (torch.rand(n, k // group, generator=generator, device=device) * 0.02 + 0.01).half()
    magnitudes = torch.tensor(lookup_values(4), device=device)
    stored = stored_code(codes, 4)
    values = torch.where(stored >= 8, -1.0, 1.0) * magnitudes[stored & 7]
    return {"stored": stored, "scales": scales, "weights": values * scales.float().repeat_interleave(group, dim=1)}


def table_tensor(device: str) -> torch.Tensor:
    words = [w - 2**32 if w >= 2**31 else w for w in table_words(4)]
    return torch.tensor(words * TABLE_COPIES, dtype=torch.int32, device=device)


class Config(NamedTuple):
    """A lab launch: kernel 'dot' (fragment_dot_kernel, 1-16 tokens) or 'gemv' (fragment_gemv_kernel, one token); block_k at most the
    group size (one scale a row and step); 16 warps rows a program; words loaded lookahead steps ahead."""
    kernel: str
    block_k: int
    iters: int
    warps: int = 4
    lookahead: int = 1
    evict: int = 0  # 1: code words marked evict_first
    staged: int = 0  # 1: code words copied to shared memory asynchronously (cp.async), all steps at once
    summed: int = 0  # 1 (gemv): a group's steps sum their products before one scale (SUM_STEPS)
    rows: int = 0  # 1 (gemv): a thread sums a step's products along its rows before one scale (ROW_SUMS)
    after: int = 0  # 1 (dot): the tensor cores multiply unscaled weights, scaled a group at a time (SCALE_AFTER)
    ordered: int = 0  # 1 (gemv, with rows): x stored in fragment order, two 16-byte loads a thread and step (X_ORDERED)

    @classmethod
    def parse(cls, text: str) -> Config:
        """'dot:64,8,4,2' -> Config('dot', 64, 8, 4, 2); a fifth to tenth number set evict, staged,
        summed, rows, after and ordered."""
        kernel, _, numbers = text.partition(":")
        return cls(kernel, *(int(v) for v in numbers.split(",")))

    def __str__(self) -> str:
        return (f"{self.kernel}:{self.block_k},{self.iters},{self.warps},{self.lookahead},{self.evict},{self.staged},"
                f"{self.summed},{self.rows},{self.after},{self.ordered}")

    def knobs(self) -> dict:
        """The kernel's keyword constexprs of this config's knobs (SUM_STEPS, ROW_SUMS, X_ORDERED: gemv's alone, SCALE_AFTER:
        dot's alone, only where set)."""
        own = {"SUM_STEPS": bool(self.summed), "ROW_SUMS": bool(self.rows), "SCALE_AFTER": bool(self.after),
               "X_ORDERED": bool(self.ordered)}
        return {"EVICT": bool(self.evict), "STAGED": bool(self.staged)} | {k: v for k, v in own.items() if v}

    def fits(self, k: int, tokens: int) -> bool:
        return k % (self.block_k * self.iters) == 0 and (self.kernel == "dot" or tokens == 1)


KERNELS = {"dot": fragment_dot_kernel, "gemv": fragment_gemv_kernel}
CONFIGS = [Config.parse(c) for c in ("dot:64,8,4,2", "dot:128,4,4,2", "dot:64,8,8,2", "dot:128,2,4,2",
                                     "gemv:128,4,4,2", "gemv:128,8,4,2", "gemv:64,8,4,2", "gemv:128,4,8,2",
                                     "gemv:64,16,4,2", "gemv:128,2,4,2", "gemv:64,8,4,2,1,0,1",
                                     "gemv:64,16,4,2,1,0,1")]


def lab_input(x: torch.Tensor, config: Config) -> torch.Tensor:
    """x [M, K] in the order the config's kernel reads it: with `ordered` each step's inputs in fragment
    order (fragments.fragment_input_order, as a rotation that wrote that order would leave them)."""
    if not config.ordered:
        return x
    m, k = x.shape
    return x.reshape(m, k // config.block_k, config.block_k)[..., fragment_input_order(config.block_k)].reshape(m, k)


def run_lab(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, n: int, k: int,
            group: int, config: Config, out: torch.Tensor | None = None):
    """out (+)= x @ W^T in float32 (x in lab_input's order): a fresh zeroed output, or `out` as it is (timings:
    tqc's rotation zeroes it)."""
    m = x.shape[0]
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if out is None else out
    grid = (n // (16 * config.warps), k // (config.block_k * config.iters))
    KERNELS[config.kernel][grid](x, out, packed, scales, table, packed, scales, table, m, n, k, group, config.block_k,
                                 config.iters, x_layout(config.block_k), config.lookahead, num_warps=config.warps,
                                 **config.knobs())  # no residual stage
    return out


def check(args) -> None:
    """The lab against the dequantized weights in float32, for every configuration and odd token counts."""
    n, k, group = 256, 2048, 128
    layer = random_layer(n, k, group, "cuda")
    table = table_tensor("cuda")
    worst = 0.0
    for config in args.configs:
        packed = pack_fragments(layer["stored"], config.block_k, config.warps)
        for m in (1, 5, 16):
            if not config.fits(k, m):
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            want = x.float() @ layer["weights"].T
            out = run_lab(lab_input(x, config), packed, layer["scales"], table, n, k, group, config)
            error = float((out - want).norm() / want.norm())
            worst = max(worst, error)
            print(f"{config} tokens {m}: relative error {error:.1e}")
    print(f"worst {worst:.1e}")
    sys.exit(0 if worst < 1e-3 else 1)


def bench(args) -> None:
    """Per layer and token count: bf16, tqc's tuned 4-bit layer (rotation included) and its rotation alone, then
    every lab configuration (no rotation), each over enough weight copies to stream from device memory."""
    import torch.nn.functional as F  # noqa: PLC0415

    from tqc.kernels.bench import SHAPES, bench_spec, device_info, streamed_modules, time_layers  # noqa: PLC0415
    from tqc.kernels.registry import KernelRegistry, rotate  # noqa: PLC0415
    from tqc.kernels.tuning import Tuner, stream_copies  # noqa: PLC0415

    registry = KernelRegistry(Tuner.for_device())
    results = {"device": device_info(), "model": args.model, "rows": []}
    group = 128
    table = table_tensor("cuda")
    for name in args.layers:
        n, k = SHAPES[args.model][name]
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(stream_copies(n * k * 2))]
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in args.tokens}
        base = {m: {"bf16": time_layers([lambda x, w=w: F.linear(x, w) for w in weights], xs[m].bfloat16())}
                for m in args.tokens}
        del weights
        signs = torch.ones(k, device="cuda")
        spec = bench_spec("4", group, k, n)
        modules, kernel = (streamed_modules(spec), registry.kernel_for(spec)) if args.tqc else ([], None)
        for m, x in xs.items():
            base[m]["rotation"] = time_layers([lambda x: rotate(x, signs, group)], x.bfloat16())
            if args.tqc:
                kernel(x.bfloat16(), modules[0])  # tuned (or from the cache) outside the graph
                base[m]["tqc"] = time_layers([lambda x, mod=mod: kernel(x, mod) for mod in modules], x.bfloat16())
            results["rows"].append({"layer": name, "n": n, "k": k, "tokens": m,
                                    **{f"{key}_us": value * 1e6 for key, value in base[m].items()}})
            print(f"{name} {n}x{k}, {m} tokens: " + ", ".join(f"{key} {value * 1e6:.2f} us" for key, value in base[m].items()),
                  flush=True)
        del modules
        layer = random_layer(n, k, group, "cuda")
        copies = stream_copies(n * k // 2)
        scales = [layer["scales"]] + [layer["scales"].clone() for _ in range(copies - 1)]
        for config in args.configs:
            if not any(config.fits(k, m) for m in xs):
                continue
            packed = [pack_fragments(layer["stored"], config.block_k, config.warps)]
            packed += [packed[0].clone() for _ in range(copies - 1)]
            for m, x in xs.items():
                if not config.fits(k, m):
                    continue
                want = x.float() @ layer["weights"].T
                ordered = lab_input(x, config)
                error = float((run_lab(ordered, packed[0], scales[0], table, n, k, group, config) - want).norm()
                              / want.norm())
                out = torch.zeros(m, n, device="cuda")
                seconds = time_layers([lambda x, p=p, s=s: run_lab(x, p, s, table, n, k, group, config, out)
                                       for p, s in zip(packed, scales)], ordered)
                bf16, rotation = base[m]["bf16"], base[m]["rotation"]
                results["rows"].append({"layer": name, "n": n, "k": k, "tokens": m, "config": str(config),
                                        "us": seconds * 1e6, "speedup_vs_bf16": bf16 / seconds,
                                        "with_rotation_vs_bf16": bf16 / (seconds + rotation), "relative_error": error})
                print(f"  {config!s:16} tokens {m:2d}: {seconds * 1e6:7.2f} us x{bf16 / seconds:.2f} (with the "
                      f"rotation x{bf16 / (seconds + rotation):.2f})  error {error:.1e}", flush=True)
            del packed
        del layer, scales
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def static(args) -> None:
    """Compile the lab for sm_90 without a GPU: registers, spills and SASS counts (needs Triton's bundled ptxas)."""
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary  # noqa: PLC0415

    n, k = 14336, 4096
    for config in args.configs:
        constexprs = {"N": n, "K": k, "G": 128, "BLOCK_K": config.block_k, "ITERS": config.iters,
                      "X_LAYOUT": x_layout(config.block_k), "LOOKAHEAD": config.lookahead, "num_warps": config.warps,
                      **config.knobs()}
        kernel = compile_gluon_for_hopper(KERNELS[config.kernel], constexprs, config.warps)
        if args.asm:
            with open(f"/tmp/lab-{str(config).replace(':', '-').replace(',', '-')}.sass", "w") as f:
                f.write(kernel.asm["sass"])
        print(f"{config}: {json.dumps(sass_summary(kernel))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = argparse.ArgumentParser(add_help=False)
    configs.add_argument("--configs", nargs="+", type=Config.parse, default=CONFIGS,
                         help="kernel:block_k,iters,warps,lookahead[,evict[,staged[,summed]]] (kernel dot or gemv)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", parents=[configs]).set_defaults(run=check)
    bench_parser = sub.add_parser("bench", parents=[configs])
    bench_parser.add_argument("--model", default="llama3-8b")
    bench_parser.add_argument("--layers", nargs="+", default=["gate_proj/up_proj", "down_proj", "q_proj/o_proj"])
    bench_parser.add_argument("--tokens", type=int, nargs="+", default=[16, 1])
    bench_parser.add_argument("--no-tqc", dest="tqc", action="store_false", help="skip tqc's tuned layer")
    bench_parser.add_argument("--out")
    bench_parser.set_defaults(run=bench)
    static_parser = sub.add_parser("static", parents=[configs])
    static_parser.add_argument("--asm", action="store_true", help="write the SASS to /tmp/lab-*.sass")
    static_parser.set_defaults(run=static)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
