"""`tqc bench static`: compile the generated kernels for sm_90 on any machine (no GPU) and read the SASS.

For a memory-bound kernel that turns out instruction-bound, the number of SASS instructions each
thread issues per weight is the quantity to drive down; registers and stack (spills) say whether a
configuration can run at all. This compiles ahead of time with Triton's bundled ptxas and counts
the instructions of cuobjdump's disassembly. The time estimates divide work by the H100's issue
rate (132 SMs x 4 schedulers x 32 lanes x 1.755 GHz) and by a stated memory bandwidth; they are
estimates, printed as such, never measurements.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import fragments, int8_kernels
from . import triton_kernels as tk
from .registry import KernelKey, LayerKernel
from .repack import slot_words
from .tuning import LaunchConfig

H100_ISSUE_PER_S = 132 * 4 * 32 * 1.755e9  # thread-instructions per second
ARGUMENT_TYPES = {"x_ptr": "*fp16", "out_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*fp16", "table_ptr": "*i32",
                  "res_codes_ptr": "*i32", "res_scales_ptr": "*fp16", "res_table_ptr": "*i32", "M": "i32",
                  "q_ptr": "*i8", "xs_ptr": "*fp32", "levels_ptr": "*i8", "factor": "fp32"}


def compile_for_hopper(key: KernelKey, config: LaunchConfig):
    """The compiled lookup kernel (dot, fma or int8 strategy) of a key and launch configuration, for sm_90."""
    fn = {"fma": tk.lut_fma_kernel, "int8": int8_kernels.int8_dot_kernel,
          "dp4a": int8_kernels.int8_gemv_kernel}.get(config.strategy, tk.lut_dot_kernel)
    if config.strategy in ("int8", "dp4a"):
        constexprs = {"N": key.n, "K": key.k, "G": key.group_size, "BITS": key.bits, "BLOCK_N": config.block_n,
                      "STEPS": config.iters, "ASM": True, "PDL": True, "THREADS": 32 * config.num_warps}
        if config.strategy == "int8":
            constexprs["BLOCK_M"] = config.block_m
    else:
        constexprs = LayerKernel(key, None).specialise(config)[1] | {"ASM": True, "PDL": True}
    return compile_jit_for_hopper(fn, constexprs, config.num_warps, config.num_stages)


def compile_jit_for_hopper(fn, constexprs: dict, num_warps: int, num_stages: int = 3, types: dict | None = None):
    """A @triton.jit kernel compiled for sm_90 with these constexprs; `types`: the Triton types of
    arguments ARGUMENT_TYPES does not name (a pointer's are 16-byte aligned)."""
    types = ARGUMENT_TYPES | (types or {})
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names} | dict.fromkeys(constexprs, "constexpr")
    names = list(signature)
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(c),): v for c, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def compile_gluon_for_hopper(fn, constexprs: dict, num_warps: int, out_type: str = "*fp32", x_type: str = "*fp16"):
    """A Gluon kernel (gluon_kernels.py) compiled for sm_90 with these constexprs (num_warps among them;
    the kernel's defaults for the others: left unset, one would shift the values after it)."""
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415

    types = ARGUMENT_TYPES | {"out_ptr": out_type, "x_ptr": x_type}
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    names = list(signature)
    defaults = {p.name: p.default for p in fn.params if p.default is not inspect.Parameter.empty}
    constexprs = {name: defaults[name] for name, kind in signature.items() if kind == "constexpr" and name in defaults} | constexprs
    source = GluonASTSource(fn, signature, {(names.index(c),): v for c, v in constexprs.items()},
                            {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sass_summary(kernel) -> dict:
    """Registers, stack bytes and SASS instruction counts of a compiled kernel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(kernel.asm["cubin"])
        handle.flush()
        usage = _run(f"{tools}/cuobjdump", "--dump-resource-usage", handle.name)
        sass = _run(f"{tools}/cuobjdump", "--dump-sass", handle.name)
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    loads = collections.Counter(re.findall(r"\b(LDG\S*)", sass))
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "instructions": sum(ops.values()), "top": dict(ops.most_common(8)), "ops": dict(ops), "loads": dict(loads)}


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def step_estimate(key: KernelKey, config: LaunchConfig, summary: dict, bandwidth_gbps: float) -> dict:
    """Instructions per weight of a lookup kernel, and the issue- and memory-bound times it implies."""
    b = slot_words(key.k, key.group_size)
    # The listing holds the step loop's body once (Triton does not unroll `range(ITERS)`), so its
    # count is per step: a program issues about ITERS times the body. Lookahead unrolls the steps.
    steps = config.iters if config.lookahead else 1
    weights_per_thread = config.block_n * config.slots * b * steps / (32 * config.num_warps)
    return time_estimates(key, summary["instructions"] / weights_per_thread, bandwidth_gbps)


def time_estimates(key: KernelKey, per_weight: float, bandwidth_gbps: float) -> dict:
    """Instructions per weight, and the issue-bound and memory-bound times of a layer's kernel."""
    weight_bytes = key.n * key.k * (key.bits + key.residual_bits) / 8 + key.n * key.k // key.group_size * 2 * (1 + (key.residual_bits > 0))
    return {"instructions_per_weight": per_weight, "issue_bound_us": key.n * key.k * per_weight / H100_ISSUE_PER_S * 1e6,
            "memory_bound_us": weight_bytes / (bandwidth_gbps * 1e9) * 1e6}


def fragment_rows(models: list[str], options: list[str], bandwidth_gbps: float, tokens: int = 16) -> list[dict]:
    """The fragment family's candidates (Gluon, registry.FragmentLayerKernel) for every shape and option
    its kernels take at this token count (whether a GPU has checked them or not: takes_fragments'
    `unchecked`), beside static_rows' lookups: resources, instructions per weight (its steps are
    unrolled: the listing is a whole program) and the same time estimates."""
    from .bench import SHAPES, bench_spec  # noqa: PLC0415
    from .registry import FRAGMENT_LAYOUT, FragmentLayerKernel, takes_fragments  # noqa: PLC0415
    from .tuning import token_bucket  # noqa: PLC0415

    rows = []
    for model in models:
        for layer, (n, k) in SHAPES[model].items():
            for option in options:
                spec = bench_spec(option, 128, k, n)
                if not takes_fragments(spec, unchecked=True):
                    continue
                family = FragmentLayerKernel(KernelKey.of(spec, FRAGMENT_LAYOUT), None)
                for config in family.candidates(token_bucket(tokens)):
                    if config.strategy == "dequant":
                        continue
                    summary = sass_summary(compile_gluon_for_hopper(family.gluon_kernel(config), family.specialise(config)[1],
                                                                    config.num_warps, "*bf16"))
                    per_weight = summary["instructions"] / (16 * fragments.BLOCK_K * config.iters / 32)  # a warp's 16 rows
                    row = {"model": model, "layer": layer, "option": option, "n": n, "k": k} | config.model_dump()
                    row |= summary | time_estimates(family.key, per_weight, bandwidth_gbps)
                    rows.append(row)
                    print(f"{model:<10} {layer:<17} {option:>4} {config.strategy:<13} iters={config.iters:<2} "
                          f"warps={config.num_warps:<2} "
                          f"regs {row['registers']:>3} stack {row['stack']:>5}  {per_weight:5.2f} instr/weight  "
                          f"issue-bound {row['issue_bound_us']:7.1f} us  memory-bound {row['memory_bound_us']:7.1f} us",
                          flush=True)
    return rows


def static_rows(models: list[str], options: list[str], bandwidth_gbps: float, tokens: int = 1) -> list[dict]:
    """One row per (shape, option, lookup-kernel candidate at this token count): resources,
    instructions per weight, time estimates; for the tensor-core kernel also its barriers,
    ldmatrix loads and mma instructions (where the decoded weights go through shared memory)."""
    from .bench import SHAPES, layer_key  # noqa: PLC0415
    from .tuning import token_bucket  # noqa: PLC0415

    rows = []
    for model in models:
        for layer, (n, k) in SHAPES[model].items():
            for option in options:
                key = layer_key(option, n, k, 128)
                for config in LayerKernel(key, None).candidates(token_bucket(tokens)):
                    if config.strategy == "dequant":
                        continue
                    summary = sass_summary(compile_for_hopper(key, config))
                    ops = summary["ops"]
                    row = {"model": model, "layer": layer, "option": option, "n": n, "k": k} | config.model_dump()
                    row |= summary | step_estimate(key, config, summary, bandwidth_gbps)
                    row |= {"barriers": ops.get("BAR", 0), "ldmatrix": ops.get("LDSM", 0),
                            "mma": ops.get("HMMA", 0) + ops.get("HGMMA", 0)}
                    rows.append(row)
                    shared = (f"  bar {row['barriers']:>2} ldsm {row['ldmatrix']:>2} mma {row['mma']:>3}"
                              f"{' weights-left' if config.weights_left else ''}"
                              f"{' scale-first' if config.scale_first else ''}") if config.strategy == "dot" else ""
                    print(f"{model:<10} {layer:<17} {option:>4} {config.strategy:<3} BN={config.block_n:<3} "
                          f"warps={config.num_warps} regs {row['registers']:>3} stack {row['stack']:>5}  "
                          f"{row['instructions_per_weight']:5.2f} instr/weight  issue-bound {row['issue_bound_us']:7.1f} us  "
                          f"memory-bound {row['memory_bound_us']:7.1f} us{shared}", flush=True)
    return rows


def cmd_static(args) -> None:
    from .bench import save  # noqa: PLC0415

    rows = static_rows(args.models, args.options, args.bandwidth, args.tokens)
    if args.fragments:
        rows += fragment_rows(args.models, args.options, args.bandwidth, args.tokens)
    save({"triton": triton.__version__, "target": "sm_90", "tokens": args.tokens, "bandwidth_gbps_assumed": args.bandwidth,
          "rows": rows}, args.output)
