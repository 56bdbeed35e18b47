"""Where did the one-token GEMV's time go? The experiment of docs/performance-history.md, run 3 (CUDA only).

Times one GEMV loop (4-bit words of the old kernel layout, B = 64, G = 128) with four ways of
turning a code into a weight, inside CUDA graphs over enough weight copies to stream from HBM,
beside bf16 F.linear, and prints JSON lines (docs/bench/h100-run3-decode-cost.jsonl):

    MODE 0  8-byte gather from the 256-entry pair table (the kernel of runs 1-2)
    MODE 1  4-byte gather from the 16-entry codebook
    MODE 2  arithmetic, no memory access (wrong values, right instruction count)
    MODE 3  no decode at all: the floor of the loop structure

    python scripts/decode_cost_lab.py > decode-cost.jsonl
    python scripts/decode_cost_lab.py N,K,MODE,BLOCK_N,WARPS,SLOTS,ITERS   # one config, e.g. under ncu
"""

import json
import math
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def lab_gemv(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
             B: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, MODE: tl.constexpr, ITERS: tl.constexpr):
    """MODE 0: pair-table gather (HEAD); 1: 16-entry table gather; 2: arithmetic decode (no gather);
    3: no decode (words bit-cast, floor of the loop structure). ITERS: chunks-of-SLOTS per program (K loop)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, B)
    acc = tl.zeros((BLOCK_N, B), dtype=tl.float32)
    base = rows[:, None] * (K // 8) + cols[None, :]
    for it in range(ITERS):
        first_slot = (tl.program_id(1) * ITERS + it) * SLOTS
        chunk, t_first = first_slot // 32, first_slot % 32
        for t0 in tl.static_range(0, SLOTS, 8):
            words = tl.load(codes_ptr + base + (chunk * 4 + (t_first + t0) // 8) * B)
            for j in tl.static_range(0, 8, 2):
                k0 = (first_slot + t0 + j) * B
                x0 = tl.load(x_ptr + k0 + cols).to(tl.float32)
                x1 = tl.load(x_ptr + k0 + B + cols).to(tl.float32)
                s = tl.load(scales_ptr + rows * (K // G) + k0 // G).to(tl.float32)
                if MODE == 0:
                    index = (words >> (j * 4)) & 255
                    pair = tl.load(table_ptr + index)
                    a = pair.to(tl.int32).to(tl.float32, bitcast=True)
                    b = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                elif MODE == 1:
                    a = tl.load(table_ptr + ((words >> (j * 4)) & 15))
                    b = tl.load(table_ptr + ((words >> (j * 4 + 4)) & 15))
                elif MODE == 2:
                    a = (((words >> (j * 4)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    b = (((words >> (j * 4 + 4)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                else:
                    a = words.to(tl.float32, bitcast=True)
                    b = a
                acc += (a * x0[None, :] + b * x1[None, :]) * s[:, None]
    if tl.num_programs(1) > 1:
        tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), sem="relaxed")
    else:
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


def graph_us(fn):
    fn()
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def main():
    torch.manual_seed(0)
    shapes = [(4096, 4096), (14336, 4096)]
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}))
    B, G = 64, 128
    pair = torch.randn(256, 2, device="cuda").view(torch.int64).squeeze(-1)
    single = torch.randn(16, device="cuda")
    only = sys.argv[1:]  # optional: "N,K,MODE,BLOCK_N,warps,SLOTS,ITERS" to run one config (for ncu)
    if only:
        n, k, mode, bn, w, s, it = map(int, only[0].split(","))
        codes = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32)
        scales = torch.rand(n, k // G, device="cuda").half()
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            lab_gemv[(n // bn, k // (s * B * it))](x, out, codes, scales, pair if mode == 0 else single, N=n, K=k, G=G, B=B,
                                                BLOCK_N=bn, SLOTS=s, MODE=mode, ITERS=it, num_warps=w)
        torch.cuda.synchronize()
        return
    for n, k in shapes:
        nbytes = n * k // 2
        copies = max(1, math.ceil(256 * 2**20 / nbytes))
        codes = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32) for _ in range(copies)]
        scales = [torch.rand(n, k // G, device="cuda").half() for _ in range(copies)]
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, math.ceil(256 * 2**20 / (2 * n * k))))]
        def bf16():
            for w in wb:
                torch.nn.functional.linear(x, w)
        bf16_us = graph_us(bf16) / len(wb)
        print(json.dumps({"shape": [n, k], "bf16_us": round(bf16_us, 2)}), flush=True)
        for mode in (0, 1, 2, 3):
            for bn, w, s, it in ((16, 4, 8, 1), (32, 4, 8, 1), (16, 4, 8, 4), (32, 8, 8, 2), (64, 8, 8, 1), (8, 2, 8, 4),
                                 (16, 8, 32, 1)):
                if k // (s * B * it) < 1 or (k // B) % (s * it):
                    continue
                grid = (n // bn, k // (s * B * it))
                table = pair if mode == 0 else single
                def run():
                    for c, sc in zip(codes, scales):
                        lab_gemv[grid](x, out, c, sc, table, N=n, K=k, G=G, B=B, BLOCK_N=bn, SLOTS=s, MODE=mode,
                                       ITERS=it, num_warps=w)
                try:
                    us = graph_us(run) / copies
                except Exception as err:  # noqa: BLE001
                    print(json.dumps({"shape": [n, k], "mode": mode, "cfg": [bn, w, s, it], "error": str(err)[:200]}))
                    continue
                print(json.dumps({"shape": [n, k], "mode": mode, "cfg": [bn, w, s, it], "us": round(us, 2),
                                  "x_bf16": round(bf16_us / us, 2), "GBps": round(nbytes * 1.0316 / us / 1e3)}), flush=True)


if __name__ == "__main__":
    main()
