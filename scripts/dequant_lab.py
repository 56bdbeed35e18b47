"""Time the fragment family's dequantization for prefill (dequantize + cuBLAS) on a GPU, kernel alone.

Per shape and option: the plain Triton kernel (fragments.fragment_dequant_kernel, the family's
before session 43) against the Gluon one (gluon_kernels.fragment_dequant_kernel) at several step
counts a program, each checked equal to the Triton kernel's weights; beside them a bf16 copy of
the same N x K (what writing the weights costs at the copy bandwidth) and bf16's matmul at
`--tokens`. Prints a line each and saves JSON. With --slabs, also a 4-bit gate+up prefill (dequantize + cuBLAS)
against the same in slabs of that many rows, each dequantized into one reused buffer (which may stay
in L2) and multiplied into its columns of the output.

    python3 -u scripts/dequant_lab.py -o dequant-lab.json
"""

from __future__ import annotations

import argparse

import torch

from tqc.kernels import gluon_kernels as gk
from tqc.kernels.bench import bench_spec, device_info, graph_seconds, save, streamed_modules
from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey
from tqc.layout import layer_bytes

SHAPES = {"gate_proj+up_proj": (28672, 4096), "q_proj+k_proj+v_proj": (6144, 4096), "down_proj": (4096, 14336)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=["4", "3", "2", "4+4", "4+2"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--slabs", nargs="*", type=int, default=[])
    parser.add_argument("-o", "--output", default="dequant-lab.json")
    args = parser.parse_args()
    rows = time_slabs(args.slabs, args.tokens) if args.slabs else []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        copy = torch.empty_like(w)
        base = {"shape": name, "n": n, "k": k}
        rows.append(base | {"kernel": "bf16 copy", "us": graph_seconds(lambda: copy.copy_(w)) * 1e6})
        rows.append(base | {"kernel": f"bf16 matmul M={args.tokens}", "us": graph_seconds(lambda: x @ w.T) * 1e6})
        del w, copy
        for option in args.options:
            rows += time_option(option, n, k, args.steps, base)
            torch.cuda.empty_cache()
        for row in rows:
            if row["shape"] == name:
                print(f"{name:22s} {row.get('option', ''):4s} {row['kernel']:26s} {row['us']:8.1f} us"
                      + (f"  {row['gb_s']:6.0f} GB/s  equal {row['equal']}" if "gb_s" in row else ""), flush=True)
    save({"device": device_info(), "rows": rows}, args.output)


def time_option(option: str, n: int, k: int, steps: list[int], base: dict) -> list[dict]:
    """The Triton kernel and the Gluon kernel at each step count for one option, cycling through
    enough layers that the codes stream from device memory."""
    spec = bench_spec(option, 128, k, n)
    key = KernelKey.of(spec, FRAGMENT_LAYOUT)
    kernel = FragmentLayerKernel(key, None)
    modules = streamed_modules(spec, kernel.layout)
    out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    nbytes = layer_bytes(spec) + out.numel() * 2  # codes and scales read, weights written

    def triton_kernel(module):
        return kernel.triton_weights(module, torch.bfloat16)

    def gluon_kernel(module, iters):
        gk.fragment_dequant_kernel[(n // 64, k // 64 // iters)](
            out, *kernel.weights(module), N=n, K=k, G=128, BLOCK_K=64, ITERS=iters, num_warps=4, BITS=key.bits,
            RES_BITS=key.residual_bits)
        return out

    reference = triton_kernel(modules[0])
    candidates = {"triton": triton_kernel} | {f"gluon {i} steps": (lambda m, i=i: gluon_kernel(m, i)) for i in steps}
    rows = []
    for label, fn in candidates.items():
        equal = torch.equal(fn(modules[0]), reference)
        seconds = graph_seconds(lambda fn=fn: [fn(m) for m in modules]) / len(modules)
        rows.append(base | {"option": option, "kernel": label, "us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9,
                            "equal": equal})
    return rows


def time_slabs(slabs: list[int], tokens: int) -> list[dict]:
    """4-bit gate+up at `tokens` tokens: dequantize the whole layer + one matmul, against slabs of rows."""
    n, k = SHAPES["gate_proj+up_proj"]
    spec = bench_spec("4", 128, k, n)
    kernel = FragmentLayerKernel(KernelKey.of(spec, FRAGMENT_LAYOUT), None)
    modules = streamed_modules(spec, kernel.layout)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16)

    def whole(module):
        torch.mm(x, kernel.dequantize(module, torch.bfloat16).T, out=out)

    def in_slabs(module, rows):
        codes, scales, table = kernel.weights(module)[:3]
        buffer = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16)
        for first in range(0, n, rows):
            words = codes.view(-1)[first * k // 8:(first + rows) * k // 8]
            gk.fragment_dequant_kernel[(rows // 64, k // 256)](buffer, words, scales[first:first + rows], table, words,
                                                               scales, table, N=rows, K=k, G=128, BLOCK_K=64, ITERS=4,
                                                               num_warps=4, BITS=4, RES_BITS=0)
            torch.mm(x, buffer.T, out=out[:, first:first + rows])

    whole(modules[0])
    reference = out.clone()
    rows = []
    for label, fn in ({"whole": whole} | {f"slabs of {s}": (lambda m, s=s: in_slabs(m, s)) for s in slabs}).items():
        fn(modules[0])
        same = torch.equal(out, reference)
        seconds = graph_seconds(lambda fn=fn: [fn(m) for m in modules]) / len(modules)
        rows.append({"shape": "gate_proj+up_proj", "option": "4", "kernel": f"prefill {label}", "us": seconds * 1e6,
                     "tokens": tokens, "equal": same})
        print(f"prefill M={tokens} {label:16s} {seconds * 1e6:8.1f} us  equal {same}", flush=True)
    return rows


if __name__ == "__main__":
    main()
