"""How fast the GPU streams code words in the pattern the one-token kernel reads them, with no decode (CUDA only).

    python scripts/read_pattern.py -o read-pattern.json

A 4-bit 14336 x 4096 layer's codes (29.4 MB, as [N, K / 8] int32 words) are read by a kernel
that only loads them: each program a tile of BLOCK_N rows x W words, the programs laid out over
rows and K splits as the lookup kernel's are (`split`), or each program's tile contiguous in
memory (`contiguous`). Beside it, bf16's matmul at the same shape and a device copy. If the
split pattern alone streams well below bf16, the access pattern limits the lookup kernels; if
not, their decode does.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tqc.kernels.bench import copy_bandwidth, device_info, save, time_layers
from tqc.kernels.tuning import stream_copies

MAGIC = tl.constexpr(0x5EED1234)  # a word value the random codes (almost) never hold: the store that keeps the loads alive


@triton.jit
def read_tiles_kernel(codes_ptr, sink_ptr, ROW_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                      CONTIGUOUS: tl.constexpr):
    """Load one [BLOCK_N, W] tile of words per program; store only words equal to MAGIC (never)."""
    row_block, split = tl.program_id(0), tl.program_id(1)
    rows, cols = tl.arange(0, BLOCK_N)[:, None], tl.arange(0, W)[None, :]
    if CONTIGUOUS:
        offsets = (row_block * tl.num_programs(1) + split) * BLOCK_N * W + rows * W + cols
    else:
        offsets = (row_block * BLOCK_N + rows) * ROW_WORDS + split * W + cols
    words = tl.load(codes_ptr + offsets)
    tl.store(sink_ptr + offsets, words, mask=words == MAGIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="read-pattern.json")
    args = parser.parse_args()
    n, k = 14336, 4096
    row_words = k * 4 // 32
    nbytes = n * row_words * 4
    buffers = [torch.randint(-2**31, 2**31 - 1, (n, row_words), device="cuda", dtype=torch.int32)
               for _ in range(stream_copies(nbytes))]
    sink = torch.empty_like(buffers[0])
    result = {"device": device_info(), "copy_gbps": copy_bandwidth(), "n": n, "k": k, "code_bytes": nbytes, "rows": []}
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(stream_copies(n * k * 2))]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    seconds = time_layers([lambda x, w=w: F.linear(x, w) for w in weights], x)
    result["bf16_gbps"] = n * k * 2 / seconds / 1e9
    print(f"copy {result['copy_gbps']:.0f} GB/s, bf16 gemv {result['bf16_gbps']:.0f} GB/s ({seconds * 1e6:.1f} us)")
    del weights
    for block_n, width, warps in ((16, 128, 4), (8, 256, 4), (16, 256, 4), (32, 128, 4), (4, 512, 4), (16, 512, 8)):
        for contiguous in (False, True):
            grid = (n // block_n, row_words // width)

            def read(x, codes):
                read_tiles_kernel[grid](codes, sink, row_words, block_n, width, contiguous, num_warps=warps)

            seconds = time_layers([lambda x, c=c: read(x, c) for c in buffers], x)
            row = {"block_n": block_n, "words": width, "warps": warps, "contiguous": contiguous,
                   "us": seconds * 1e6, "gbps": nbytes / seconds / 1e9}
            result["rows"].append(row)
            print(f"BLOCK_N {block_n:>2} x {width:>3} words, {warps} warps, {'contiguous' if contiguous else 'split     '}"
                  f" {row['us']:6.2f} us {row['gbps']:5.0f} GB/s", flush=True)
    save(result, args.output)


if __name__ == "__main__":
    main()
