"""Lab: one-token lookup GEMV on int8 activations with dp4a, against bf16 and tqc's fp16 kernel.

The question: is the one-token kernel's speed limit (instructions per weight, docs/performance.md
"What would be next") lifted by decoding the codes to int8 instead of fp16 and multiplying with
`dp4a` (4 multiply-adds per instruction) against activations quantized to int8 per group, as
llama.cpp's MMVQ kernels do with q8_1? And, for a few tokens, by an int8 tensor-core dot? Not
wired into tqc: its own layout and kernels (docs/performance-history.md, runs 48-52).

- Codebook and lookups: tqc.kernels.lut_int8 (the levels rounded to int8, their factor folded
  into the weight scales; 4 bits in two PRMTs and an xor, 2 bits in one PRMT; code words in
  input order). Per 4-bit code word (8 codes): 1 xor, 2 shifts, 4 PRMT, 2 xor, 2 dp4a.
- Activations: int8 per group of G with a float32 scale (absmax / 127); for one token stored as
  planes (plane j: the j-th int32 of every code word's activations) so that every load is a
  contiguous 16-byte one, for several tokens in input order.

    python scripts/int8_gemv_lab.py check            # here: the PRMT tables against the codebook (numpy)
    python scripts/int8_gemv_lab.py static           # here, Triton 3.6 for sm_90: SASS per weight
    python scripts/int8_gemv_lab.py run -o lab.json  # on the device: correctness, time vs bf16 and tqc
    python scripts/int8_gemv_lab.py dot -o dot.json  # on the device: 16 tokens on int8 tensor cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
import torch
import triton
import triton.language as tl

from tqc.codebook import gaussian_codebook  # noqa: E402

from tqc.kernels.lut_int8 import emulate, int8_levels, int8_table_words, pack_words  # noqa: E402

LANES = 32  # table copies, one per lane (see triton_kernels.load_table)


# --- tables: tqc.kernels.lut_int8 (int8_levels, int8_table_words, emulate, pack_words) ---------------

def cmd_check(_args) -> None:
    for bits in (4, 2):
        levels, _ = int8_levels(bits)
        rng = np.random.default_rng(0)
        index = rng.integers(0, 2**bits, size=(64, 32 * 32 // bits))
        words = pack_words(torch.from_numpy(index), bits).numpy().view(np.uint32)
        decoded = emulate(words, bits, index.shape[1])
        assert (decoded == levels[index]).all(), f"{bits}-bit decode differs"
        print(f"{bits} bits: the emulated PTX decodes every code to its int8 level {levels.tolist()}")


# --- kernels ------------------------------------------------------------------------------------

@triton.jit
def quantize_kernel(x_ptr, xq_ptr, xs_ptr, out_ptr, N, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """int8 activations per group (planar layout) and their scales; also zeroes out[:N] (split-K adds into it)."""
    pid = tl.program_id(0)
    for start in range(pid * BLOCK, N, tl.num_programs(0) * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.zeros((BLOCK,), tl.float32), mask=offsets < N)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    groups = tl.reshape(x, (BLOCK // G, G))
    scale = tl.max(tl.abs(groups), axis=1) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    q = tl.extra.cuda.libdevice.rint(groups / scale[:, None]).to(tl.int8)
    PER_WORD: tl.constexpr = 32 // BITS
    PLANE_WORDS: tl.constexpr = K // PER_WORD
    k = tl.reshape(cols, (BLOCK // G, G))
    word, position = k // PER_WORD, k % PER_WORD
    byte = ((position // 4) * PLANE_WORDS + word) * 4 + position % 4
    tl.store(xq_ptr + byte, q, mask=k < K)
    group = pid * (BLOCK // G) + tl.arange(0, BLOCK // G)
    tl.store(xs_ptr + group, scale, mask=group < K // G)


def dp4a_asm(bits: int) -> str:
    """PTX of one thread's run of 4 code words (pack=4): acc[0] += scale * sum of the 4 words' dot products."""
    planes = 2 if bits == 4 else 4
    w = [f"${4 + e}" for e in range(4)]
    x = [[f"${8 + 4 * j + e}" for e in range(4)] for j in range(planes)]
    s0 = f"${8 + 4 * planes}"
    acc = [f"${12 + 4 * planes + e}" for e in range(4)]
    t = [f"${16 + 4 * planes + 4 * j}" for j in range(4 if bits == 4 else 1)]
    body = []
    for e in range(4):
        if bits == 4:
            body += [f"xor.b32 f, {w[e]}, 0x88888888;",
                     f"prmt.b32 a, {t[0]}, {t[1]}, {w[e]}; prmt.b32 b, {t[2]}, {t[3]}, f; xor.b32 a, a, b;",
                     f"dp4a.s32.s32 d, a, {x[0][e]}, d;",
                     f"shr.u32 h, {w[e]}, 16; shr.u32 f, f, 16;",
                     f"prmt.b32 a, {t[0]}, {t[1]}, h; prmt.b32 b, {t[2]}, {t[3]}, f; xor.b32 a, a, b;",
                     f"dp4a.s32.s32 d, a, {x[1][e]}, d;"]
        else:
            for j, shift in enumerate((0, 2, 16, 18)):
                sel = f"{w[e]}" if shift == 0 else "h"
                if shift:
                    body.append(f"shr.u32 h, {w[e]}, {shift};")
                body.append(f"and.b32 h, {sel}, 0x3333; prmt.b32 a, {t[0]}, {t[0]}, h; dp4a.s32.s32 d, a, {x[j][e]}, d;")
    return ("{ .reg .b32 a, b, f, h; .reg .s32 d; .reg .f32 v; mov.s32 d, 0; " + " ".join(body)
            + f" cvt.rn.f32.s32 v, d; fma.rn.f32 $0, v, {s0}, {acc[0]}; mov.f32 $1, {acc[1]}; mov.f32 $2, {acc[2]};"
            f" mov.f32 $3, {acc[3]}; }}")


NO_DOT, NO_ACTIVATIONS, NO_SCALES = tl.constexpr(1), tl.constexpr(2), tl.constexpr(4)  # ABLATE bits
X_ONCE = tl.constexpr(8)  # ABLATE bit of a variant that computes the same
DP4A_4 = tl.constexpr(dp4a_asm(4))
DP4A_2 = tl.constexpr(dp4a_asm(2))


@triton.jit
def _step_loads(xq_ptr, xs_ptr, codes_ptr, ws_ptr, rows, first_group, K: tl.constexpr, G: tl.constexpr,
                BITS: tl.constexpr, GROUPS: tl.constexpr, ABLATE: tl.constexpr):
    """One step's operands: code words [BLOCK_N, GROUPS, WPG], activation planes, combined scales.
    ABLATE (a diagnosis, wrong results): | NO_ACTIVATIONS the code words stand in for the
    activations, | NO_SCALES every scale is 1."""
    WPG: tl.constexpr = G * BITS // 32  # code words per group
    ROW_WORDS: tl.constexpr = K * BITS // 32
    word = (first_group + tl.arange(0, GROUPS))[None, :, None] * WPG + tl.arange(0, WPG)[None, None, :]
    w = tl.load(codes_ptr + rows[:, None, None] * ROW_WORDS + word, eviction_policy="evict_first")
    return (w,) + _operands(w, xq_ptr, xs_ptr, ws_ptr, rows, first_group, K, G, BITS, GROUPS, ABLATE)


@triton.jit
def _operands(w, xq_ptr, xs_ptr, ws_ptr, rows, first_group, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
              GROUPS: tl.constexpr, ABLATE: tl.constexpr):
    """The activation planes and combined scales of the step whose code words `w` are."""
    WPG: tl.constexpr = G * BITS // 32
    ROW_WORDS: tl.constexpr = K * BITS // 32
    group = first_group + tl.arange(0, GROUPS)
    word = group[None, :, None] * WPG + tl.arange(0, WPG)[None, None, :]
    zero_rows = (rows * 0)[:, None, None]
    if ABLATE & NO_ACTIVATIONS:
        x0, x1, x2, x3 = w, w >> 1, w >> 2, w >> 3
    elif ABLATE & X_ONCE:  # not an ablation: the activations loaded once per thread, broadcast over its rows
        x0 = tl.broadcast_to(tl.load(xq_ptr + word), w.shape)
        x1 = tl.broadcast_to(tl.load(xq_ptr + ROW_WORDS + word), w.shape)
        x2, x3 = x0, x1
        if BITS == 2:
            x2 = tl.broadcast_to(tl.load(xq_ptr + 2 * ROW_WORDS + word), w.shape)
            x3 = tl.broadcast_to(tl.load(xq_ptr + 3 * ROW_WORDS + word), w.shape)
    else:
        x0 = tl.load(xq_ptr + zero_rows + word)
        x1 = tl.load(xq_ptr + zero_rows + ROW_WORDS + word)
        x2, x3 = x0, x1
        if BITS == 2:
            x2 = tl.load(xq_ptr + zero_rows + 2 * ROW_WORDS + word)
            x3 = tl.load(xq_ptr + zero_rows + 3 * ROW_WORDS + word)
    if ABLATE & NO_SCALES:
        scale = tl.full((rows.shape[0], GROUPS, 1), 1.0, tl.float32)
    else:
        scale = tl.load(ws_ptr + rows[:, None, None] * (K // G) + group[None, :, None]).to(tl.float32)
        scale = scale * tl.load(xs_ptr + group)[None, :, None]
    return x0, x1, x2, x3, scale


@triton.jit
def _step_dot(acc, w, x0, x1, x2, x3, scale, t0, t1, t2, t3, BITS: tl.constexpr, ABLATE: tl.constexpr):
    """acc plus a step's dot products (dp4a_asm); ABLATE | NO_DOT: one xor and add per word instead."""
    zero = w * 0
    if ABLATE & NO_DOT:
        acc += (w ^ x0 ^ (x1 >> 1) ^ (x2 >> 2) ^ (x3 >> 3)).to(tl.float32) * scale
    elif BITS == 4:
        acc = tl.inline_asm_elementwise(DP4A_4, "=f,=f,=f,=f" + ",r" * 12 + ",f" * 8 + ",r" * 16,
                                        [w, x0, x1, scale + zero.to(tl.float32), acc, t0 + zero, t1 + zero,
                                         t2 + zero, t3 + zero], dtype=tl.float32, is_pure=True, pack=4)
    else:
        acc = tl.inline_asm_elementwise(DP4A_2, "=f,=f,=f,=f" + ",r" * 20 + ",f" * 8 + ",r" * 4,
                                        [w, x0, x1, x2, x3, scale + zero.to(tl.float32), acc, t0 + zero],
                                        dtype=tl.float32, is_pure=True, pack=4)
    return acc


@triton.jit
def _rows_and_table(table_ptr, N: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's rows (clamped in bounds, and their mask) and the 4 table words of this lane's copy."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.zeros((1, 1, 1), dtype=tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)
    base = table_ptr + lane * 4
    return rows, row_mask, tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)


@triton.jit
def int8_gemv_kernel(xq_ptr, xs_ptr, codes_ptr, ws_ptr, table_ptr, out_ptr, steps, N: tl.constexpr, K: tl.constexpr,
                     G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     ITERS: tl.constexpr, STREAM: tl.constexpr, ABLATE: tl.constexpr = 0):
    """out[N] += W' x for one token; grid (cdiv(N, BLOCK_N), splits), out zeroed first.

    A program takes ITERS steps of GROUPS groups (unrolled), or with STREAM `steps` steps in a
    run-time loop: STREAM = 1 issues the next step's loads before this step's dot products
    (registers double-buffered, so every warp keeps a step of code words in flight while it
    computes); STREAM = s > 1 lets Triton pipeline the loop over s stages (cp.async into shared
    memory, s - 1 steps ahead).
    """
    WPG: tl.constexpr = G * BITS // 32
    rows, row_mask, t0, t1, t2, t3 = _rows_and_table(table_ptr, N, BLOCK_N)
    acc = tl.zeros((BLOCK_N, GROUPS, WPG), dtype=tl.float32)
    if STREAM > 1:
        first = tl.program_id(1) * steps * GROUPS
        for step in tl.range(0, steps, num_stages=STREAM):
            w, x0, x1, x2, x3, scale = _step_loads(xq_ptr, xs_ptr, codes_ptr, ws_ptr, rows, first + step * GROUPS, K, G,
                                                   BITS, GROUPS, ABLATE)
            acc = _step_dot(acc, w, x0, x1, x2, x3, scale, t0, t1, t2, t3, BITS, ABLATE)
    elif STREAM == 1:
        first = tl.program_id(1) * steps * GROUPS
        w, x0, x1, x2, x3, scale = _step_loads(xq_ptr, xs_ptr, codes_ptr, ws_ptr, rows, first, K, G, BITS, GROUPS,
                                                  ABLATE)
        for step in range(steps):
            following = first + tl.minimum(step + 1, steps - 1) * GROUPS  # the last step reloads itself
            nw, nx0, nx1, nx2, nx3, nscale = _step_loads(xq_ptr, xs_ptr, codes_ptr, ws_ptr, rows, following, K, G,
                                                         BITS, GROUPS, ABLATE)
            acc = _step_dot(acc, w, x0, x1, x2, x3, scale, t0, t1, t2, t3, BITS, ABLATE)
            w, x0, x1, x2, x3, scale = nw, nx0, nx1, nx2, nx3, nscale
    else:
        for step in range(ITERS):
            w, x0, x1, x2, x3, scale = _step_loads(xq_ptr, xs_ptr, codes_ptr, ws_ptr, rows,
                                                   (tl.program_id(1) * ITERS + step) * GROUPS, K, G, BITS, GROUPS,
                                                   ABLATE)
            acc = _step_dot(acc, w, x0, x1, x2, x3, scale, t0, t1, t2, t3, BITS, ABLATE)
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.atomic_add(out_ptr + rows, total, mask=row_mask, sem="relaxed")


@triton.jit
def int8_gemv_tma_kernel(xq_ptr, xs_ptr, codes_desc, ws_ptr, table_ptr, out_ptr, steps, N: tl.constexpr,
                         K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUPS: tl.constexpr, STAGES: tl.constexpr, ABLATE: tl.constexpr = 0):
    """int8_gemv_kernel with the code words brought in by the tensor memory accelerator: the loop
    pipelined over STAGES, bulk copies into shared memory STAGES - 1 steps ahead, no registers held."""
    WPG: tl.constexpr = G * BITS // 32
    rows, row_mask, t0, t1, t2, t3 = _rows_and_table(table_ptr, N, BLOCK_N)
    acc = tl.zeros((BLOCK_N, GROUPS, WPG), dtype=tl.float32)
    first = tl.program_id(1) * steps * GROUPS
    for step in tl.range(0, steps, num_stages=STAGES):
        group = first + step * GROUPS
        w = tl.reshape(codes_desc.load([tl.program_id(0) * BLOCK_N, group * WPG]), (BLOCK_N, GROUPS, WPG))
        x0, x1, x2, x3, scale = _operands(w, xq_ptr, xs_ptr, ws_ptr, rows, group, K, G, BITS, GROUPS, ABLATE)
        acc = _step_dot(acc, w, x0, x1, x2, x3, scale, t0, t1, t2, t3, BITS, ABLATE)
    tl.atomic_add(out_ptr + rows, tl.sum(tl.sum(acc, axis=2), axis=1), mask=row_mask, sem="relaxed")


# --- several tokens: decode to int8 in registers, int8 tensor-core dot per group ----------------

@triton.jit
def quantize_tokens_kernel(x_ptr, xq_ptr, xs_ptr, out_ptr, M, N, K: tl.constexpr, G: tl.constexpr,
                           BLOCK: tl.constexpr):
    """int8 activations per (token, group) in input order, [M, K], and their scales [M, K / G];
    also zeroes out[:M * N]. Grid (M, cdiv(K, BLOCK))."""
    token, block = tl.program_id(0), tl.program_id(1)
    programs = tl.num_programs(0) * tl.num_programs(1)
    for start in range((token * tl.num_programs(1) + block) * 1024, M * N, programs * 1024):
        offsets = start + tl.arange(0, 1024)
        tl.store(out_ptr + offsets, tl.zeros((1024,), tl.float32), mask=offsets < M * N)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + token * K + cols, mask=cols < K, other=0.0).to(tl.float32)
    groups = tl.reshape(x, (BLOCK // G, G))
    scale = tl.max(tl.abs(groups), axis=1) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    q = tl.extra.cuda.libdevice.rint(groups / scale[:, None]).to(tl.int8)
    k = tl.reshape(cols, (BLOCK // G, G))
    tl.store(xq_ptr + token * K + k, q, mask=k < K)
    group = block * (BLOCK // G) + tl.arange(0, BLOCK // G)
    tl.store(xs_ptr + token * (K // G) + group, scale, mask=group < K // G)


# 4 int8 codebook values of a nibble word's quad (pack=4, int8 out: one register): the quad at
# bit $5 (0 or 16) of the word $1, tables $9 $13 $17 $21 (module docstring).
DECODE8_4 = tl.constexpr("{ .reg .b32 s, f, a, b; shr.u32 s, $1, $5; xor.b32 f, s, 0x8888; prmt.b32 a, $9, $13, s; "
                         "prmt.b32 b, $17, $21, f; xor.b32 $0, a, b; }")


@triton.jit
def _eight(tile):
    """[R, C] -> [R, C, 8], every element 8 times, the 8 copies in one thread (for a pack=4 asm)."""
    two = tl.join(tile, tile)
    four = tl.join(two, two)
    return tl.reshape(tl.join(four, four), (tile.shape[0], tile.shape[1], 8))


@triton.jit
def int8_dot_kernel(xq_ptr, xs_ptr, codes_ptr, ws_ptr, table_ptr, out_ptr, M, steps, N: tl.constexpr,
                    K: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[M, N] += x W'^T for a few tokens, 4 bits: per group, the codes decoded to int8 in registers
    and an int8 dot (int32) with the int8 activations, scaled by weight and activation scales.
    Grid (cdiv(N, BLOCK_N), K / (G * steps), cdiv(M, BLOCK_M)); out zeroed first."""
    WPG: tl.constexpr = G // 8
    ROW_WORDS: tl.constexpr = K // 8
    rows, row_mask, t0, t1, t2, t3 = _rows_and_table(table_ptr, N, BLOCK_N)
    tokens = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = tokens < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(steps):
        group = tl.program_id(1) * steps + step
        w = tl.load(codes_ptr + rows[:, None] * ROW_WORDS + group * WPG + tl.arange(0, WPG)[None, :],
                    eviction_policy="evict_first")
        words = _eight(w)
        zero = words * 0
        shift = (tl.arange(0, 8) // 4 * 16)[None, None, :] + zero
        q = tl.inline_asm_elementwise(DECODE8_4, "=r" + ",r" * 24, [words, shift, t0 + zero, t1 + zero, t2 + zero,
                                                                     t3 + zero], dtype=tl.int8, is_pure=True, pack=4)
        q = tl.reshape(q, (BLOCK_N, G))
        x = tl.load(xq_ptr + tokens[:, None] * K + group * G + tl.arange(0, G)[None, :], mask=token_mask[:, None],
                    other=0)
        dots = tl.dot(q, tl.trans(x), out_dtype=tl.int32)
        ws = tl.load(ws_ptr + rows * (K // G) + group).to(tl.float32)
        xs = tl.load(xs_ptr + tokens * (K // G) + group, mask=token_mask, other=0.0)
        acc += dots.to(tl.float32) * ws[:, None] * xs[None, :]
    tl.atomic_add(out_ptr + tokens[None, :] * N + rows[:, None], acc, mask=token_mask[None, :] & row_mask[:, None],
                  sem="relaxed")


# --- the lab layer ------------------------------------------------------------------------------

class LabLayer:
    """Random codes and scales of one (N, K) layer at `bits`, in the lab layout, with its reference."""

    def __init__(self, n: int, k: int, bits: int, group: int, seed: int, device: str):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.n, self.k, self.bits, self.group = n, k, bits, group
        self.index = torch.randint(0, 2**bits, (n, k), generator=g)
        self.codes = pack_words(self.index, bits).to(device)
        levels, factor = int8_levels(bits)
        self.levels = torch.tensor(levels, dtype=torch.float64)
        self.scales = ((torch.rand(n, k // group, generator=g) + 0.5) * 0.02).half()
        self.folded = (self.scales.double() * factor).half().to(device)  # what the kernel reads
        self.exact_levels = gaussian_codebook(bits).double()
        words = [w - 2**32 if w >= 2**31 else w for w in int8_table_words(bits)]
        self.table = torch.tensor((words + [0] * (4 - len(words))) * LANES, dtype=torch.int32, device=device)

    def copy(self) -> "LabLayer":
        """The same layer at other addresses (timing: enough copies that they stream from memory)."""
        other = object.__new__(LabLayer)
        other.__dict__ |= self.__dict__ | {"codes": self.codes.clone(), "folded": self.folded.clone()}
        return other

    def reference(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """What the kernel computes, in float64: int8 levels x int8 activations, scaled per group."""
        w = self.levels[self.index].reshape(self.n, -1, self.group)
        x = xq.double().cpu().reshape(-1, self.group)
        dots = (w * x[None]).sum(-1)  # [N, groups]
        return (dots * self.folded.double().cpu() * xs.double().cpu()[None]).sum(-1)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """The layer without any int8 rounding: the codebook levels, fp16 scales, x itself."""
        w = self.exact_levels[self.index].reshape(self.n, -1, self.group) * self.scales.double()[..., None]
        return w.reshape(self.n, self.k) @ x.double().cpu()


def quantize(x: torch.Tensor, k: int, group: int, bits: int, out: torch.Tensor):
    xq = torch.empty(k, dtype=torch.int8, device=x.device)
    xs = torch.empty(k // group, dtype=torch.float32, device=x.device)
    block = 1024
    quantize_kernel[(triton.cdiv(k, block),)](x, xq, xs, out, out.numel(), K=k, G=group, BITS=bits, BLOCK=block)
    return xq, xs


def unplanar(xq: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar int8 activations -> input order."""
    planes = 2 if bits == 4 else 4
    return xq.view(planes, -1, 4).transpose(0, 1).reshape(-1)


def gemv(layer: LabLayer, xq, xs, out, config, ablate: int = 0):
    """config: (BLOCK_N, GROUPS, steps, warps, stream: 0 unrolled, 1 double-buffered, s > 1 stages,
    -s: the code words by TMA over s stages)."""
    block_n, groups, iters, warps, stream = config
    grid = (triton.cdiv(layer.n, block_n), layer.k // (layer.group * groups * iters))
    if stream < 0:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

        desc = TensorDescriptor.from_tensor(layer.codes, [block_n, groups * layer.group * layer.bits // 32])
        int8_gemv_tma_kernel[grid](xq.view(torch.int32), xs, desc, layer.folded, layer.table, out, iters, N=layer.n,
                                   K=layer.k, G=layer.group, BITS=layer.bits, BLOCK_N=block_n, GROUPS=groups,
                                   STAGES=-stream, ABLATE=ablate, num_warps=warps)
        return
    int8_gemv_kernel[grid](xq.view(torch.int32), xs, layer.codes, layer.folded, layer.table, out, iters, N=layer.n,
                           K=layer.k, G=layer.group, BITS=layer.bits, BLOCK_N=block_n, GROUPS=groups,
                           ITERS=1 if stream else iters, STREAM=int(stream), ABLATE=ablate, num_warps=warps)


CONFIGS = ([(16, 4, 2, 4, False), (32, 2, 1, 4, False), (32, 1, 4, 4, False), (32, 4, 4, 4, False)]
           + list(itertools.product((8, 16, 32), (1, 2, 4), (2, 4, 7, 8, 14, 16), (4,), (True,)))
           + [(16, 2, 8, 8, True), (32, 2, 8, 8, True), (64, 1, 8, 8, True)])


def fits(config, k: int, bits: int) -> bool:
    block_n, groups, iters, warps, _ = config
    return k % (128 * groups * iters) == 0 and block_n * groups * 128 * bits // 32 >= 4 * 32 * warps


def cmd_run(args) -> None:
    from tqc.kernels.bench import bench_shape, copy_bandwidth, device_info, graph_seconds  # noqa: PLC0415
    from tqc.kernels.registry import KernelRegistry  # noqa: PLC0415
    from tqc.kernels.tuning import Tuner, stream_copies  # noqa: PLC0415

    torch.manual_seed(0)
    result = {"device": device_info(), "copy_gbps": copy_bandwidth(), "rows": []}
    print(f"{result['device']['gpu']}: copy {result['copy_gbps']:.0f} GB/s", flush=True)
    registry = KernelRegistry(Tuner.for_device())
    configs = [tuple(c) for c in json.loads(args.configs)] if args.configs else CONFIGS
    for n, k in args.shapes:
        for bits in args.bits:
            tqc_rows = bench_shape(n, k, [1], [str(bits)], 128, registry)
            for r in tqc_rows:
                print(f"{n}x{k} {r['option']:>6} {r['us']:8.2f} us x{r['speedup_vs_bf16']:.2f}", flush=True)
            bf16_us, tqc_us = tqc_rows[0]["us"], tqc_rows[-1]["us"]
            nbytes = n * k * bits // 8 + n * k // 128 * 2
            layer = LabLayer(n, k, bits, 128, 0, "cuda")
            layers = [layer] + [layer.copy() for _ in range(stream_copies(nbytes) - 1)]
            x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(n, device="cuda", dtype=torch.float32)
            xq, xs = quantize(x, k, 128, bits, out)
            reference = layers[0].reference(unplanar(xq, bits), xs)
            exact = layers[0].exact(x.float())
            best, exact_error = None, float("nan")
            for config, ablate in itertools.product([c for c in configs if fits(c, k, bits)], args.ablate):
                try:
                    xq, xs = quantize(x, k, 128, bits, out)
                    gemv(layers[0], xq, xs, out, config, ablate)
                    torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001 (a lab: report and go on)
                    print(f"  {config} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)
                    continue
                error = float((out.double().cpu() - reference).norm() / reference.norm())
                if ablate == 0:
                    exact_error = float((out.double().cpu() - exact).norm() / exact.norm())

                def with_quantize(config=config, ablate=ablate):
                    for one in layers:
                        gemv(one, *quantize(x, k, 128, bits, out), out, config, ablate)

                def alone(config=config, ablate=ablate):
                    for one in layers:
                        gemv(one, xq, xs, out, config, ablate)
                us = graph_seconds(with_quantize) / len(layers) * 1e6
                alone_us = graph_seconds(alone) / len(layers) * 1e6
                row = {"n": n, "k": k, "bits": bits, "config": config, "ablate": ablate, "us": us, "gemv_us": alone_us,
                       "bf16_us": bf16_us, "tqc_us": tqc_us, "error_vs_reference": error}
                result["rows"].append(row)
                if ablate == 0 and (best is None or us < best["us"]):
                    best = row
                print(f"  {config} ablate {ablate} {us:7.2f} us (gemv alone {alone_us:6.2f}) x{bf16_us / us:.2f}"
                      f"  err {error:.1e}", flush=True)

            def quant_only():
                for _ in layers:
                    quantize(x, k, 128, bits, out)
            q_us = graph_seconds(quant_only) / len(layers) * 1e6
            if best:
                print(f"{n}x{k} {bits}-bit lab best {best['config']} {best['us']:.2f} us, gemv alone {best['gemv_us']:.2f}"
                      f" (quantize alone {q_us:.2f}): x{bf16_us / best['us']:.2f} vs bf16 {bf16_us:.2f}, tqc {tqc_us:.2f} us;"
                      f" int8 rounding vs the exact layer {exact_error:.2e}", flush=True)
            result["rows"].append({"n": n, "k": k, "bits": bits, "best": best, "quantize_us": q_us,
                                   "int8_error_vs_exact": exact_error})
            layers.clear()  # free the copies before the next shape
            torch.cuda.empty_cache()
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


def cmd_dot(args) -> None:
    """Several tokens: int8_dot_kernel (with quantize_tokens_kernel) against bf16 and tqc, 4 bits."""
    from tqc.kernels.bench import bench_shape, device_info, graph_seconds  # noqa: PLC0415
    from tqc.kernels.registry import KernelRegistry  # noqa: PLC0415
    from tqc.kernels.tuning import Tuner, stream_copies  # noqa: PLC0415

    torch.manual_seed(0)
    result = {"device": device_info(), "tokens": args.tokens, "rows": []}
    registry = KernelRegistry(Tuner.for_device())
    m = args.tokens
    for n, k in args.shapes:
        tqc_rows = bench_shape(n, k, [m], ["4"], 128, registry)
        bf16_us, tqc_us = tqc_rows[0]["us"], tqc_rows[-1]["us"]
        print(f"{n}x{k} M={m}: bf16 {bf16_us:.2f} us, tqc 4-bit {tqc_us:.2f} us (x{bf16_us / tqc_us:.2f})", flush=True)
        layer = LabLayer(n, k, 4, 128, 0, "cuda")
        layers = [layer] + [layer.copy() for _ in range(stream_copies(n * k // 2) - 1)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq = torch.empty(m, k, dtype=torch.int8, device="cuda")
        xs = torch.empty(m, k // 128, dtype=torch.float32, device="cuda")
        out = torch.empty(m, n, dtype=torch.float32, device="cuda")

        def quantize_tokens():
            quantize_tokens_kernel[(m, k // 1024)](x, xq, xs, out, m, n, K=k, G=128, BLOCK=1024)

        quantize_tokens()
        w = layer.levels[layer.index].reshape(n, -1, 128)
        xg = xq.double().cpu().reshape(m, -1, 128)
        reference = torch.einsum("ngk,mgk->mng", w, xg) * layer.folded.double().cpu()[None] * xs.double().cpu()[:, None]
        reference = reference.sum(-1)
        for block_n, steps, warps in json.loads(args.configs):
            if k % (128 * steps):
                continue  # the steps must cover K exactly
            grid = (triton.cdiv(n, block_n), k // (128 * steps), triton.cdiv(m, 16))

            def run(one, block_n=block_n, steps=steps, warps=warps, grid=grid):
                int8_dot_kernel[grid](xq, xs, one.codes, one.folded, one.table, out, m, steps, N=n, K=k, G=128,
                                      BLOCK_N=block_n, BLOCK_M=16, num_warps=warps)
            try:
                quantize_tokens()
                run(layer)
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001 (a lab: report and go on)
                print(f"  {(block_n, steps, warps)} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            error = float((out.double().cpu() - reference).norm() / reference.norm())

            def all_layers(run=run):
                for one in layers:
                    quantize_tokens()
                    run(one)
            us = graph_seconds(all_layers) / len(layers) * 1e6
            row = {"n": n, "k": k, "tokens": m, "config": [block_n, steps, warps], "us": us, "bf16_us": bf16_us,
                   "tqc_us": tqc_us, "error_vs_reference": error}
            result["rows"].append(row)
            print(f"  {(block_n, steps, warps)} {us:7.2f} us x{bf16_us / us:.2f}  err {error:.1e}", flush=True)
        layers.clear()  # free the copies before the next shape
        torch.cuda.empty_cache()
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


def cmd_static(args) -> None:
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    from tqc.kernels.static_report import sass_summary  # noqa: PLC0415

    n, k = 14336, 4096
    for bits in (4, 2):
        for config in [(16, 4, 4, 4, False), (16, 4, 4, 4, True), (64, 1, 8, 8, True), (64, 1, 8, 8, 3), (32, 2, 8, 4, 3)]:
            block_n, groups, iters, warps, stream = config
            fn = int8_gemv_kernel
            const = {"N": n, "K": k, "G": 128, "BITS": bits, "BLOCK_N": block_n, "GROUPS": groups,
                     "ITERS": 1 if stream else iters, "STREAM": int(stream), "ABLATE": int(os.environ.get("ABLATE", 0))}
            signature = {"xq_ptr": "*i32", "xs_ptr": "*fp32", "codes_ptr": "*i32", "ws_ptr": "*fp16", "table_ptr": "*i32",
                         "out_ptr": "*fp32", "steps": "i32"} | dict.fromkeys(const, "constexpr")
            names = list(signature)
            source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(c),): v for c, v in const.items()},
                               attrs={(i,): [["tt.divisibility", 16]] for i in range(6)})
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            s = sass_summary(kernel)
            weights = block_n * groups * 128 * (1 if stream else iters) / (32 * warps)  # unrolled, or one loop body
            print(f"{bits}-bit {config}: regs {s['registers']} instr {s['instructions']} per weight "
                  f"{s['instructions'] / weights:.2f}  {s['top']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check").set_defaults(run=cmd_check)
    sub.add_parser("static").set_defaults(run=cmd_static)
    run = sub.add_parser("run")
    run.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                     default=[(14336, 4096), (4096, 14336)])
    run.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    run.add_argument("--configs", help="JSON list of [BLOCK_N, GROUPS, steps, warps, stream] (default: a sweep)")
    run.add_argument("--ablate", type=int, nargs="+", default=[0], help="ABLATE masks: 1 no dot, 2 no activations, 4 no scales, 8 activations loaded once per thread")
    run.add_argument("-o", "--output", default="int8-lab.json")
    run.set_defaults(run=cmd_run)
    dot = sub.add_parser("dot")
    dot.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                     default=[(14336, 4096), (4096, 14336)])
    dot.add_argument("--tokens", type=int, default=16)
    dot.add_argument("--configs", default="[[64, 4, 4], [64, 8, 4], [128, 4, 4], [128, 4, 8], [64, 2, 4], [128, 8, 8]]",
                     help="JSON list of [BLOCK_N, steps, warps]")
    dot.add_argument("-o", "--output", default="int8-dot-lab.json")
    dot.set_defaults(run=cmd_dot)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
