"""The Triton kernel sources: one per strategy, every layer property a `tl.constexpr`.

Strategies (registry.py chooses one by the number of tokens):
    fwht_kernel     rotate activations: x' = FWHT_G(x * signs) / sqrt(G), per group of G inputs
                    (and zero the output the split-K kernels add into)
    gemv_kernel     one token: split-K, decoded in registers, CUDA cores, one pass over the weight
    skinny_kernel   2-16 tokens: split-K, each decoded slot tile feeds a tensor-core `tl.dot`
    gemm_kernel     many tokens: tiled over M and N, each program walks all of K
    dequant_kernel  write the decoded weight in bf16/fp16 (then cuBLAS, for very many tokens)

The codes are in the kernel layout of repack.py (docs/kernel_layout.md): per row, chunks of
32 * B codes, code k = chunk * 32B + t * B + kw. For every slot t a [BLOCK_N, B] tile of codes is
a shift and a mask of one contiguous [BLOCK_N, B] word tile, so decoding is elementwise, and the
activations it multiplies are the contiguous x[k0 : k0 + B]. The words of slots t0..t0+7 are
loaded once (`_octet_words`) and decoded eight times (GEMV, where decoding is the bottleneck,
two codes per codebook gather; the tiled kernel loops over slots at run time, keeping its code
and compile time small). Code bits, residual bits, group size, N, K
and B are constexpr: each distinct layer configuration compiles to its own specialised kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _octet_words(ptr, rows, row_mask, chunk, t0, K: tl.constexpr, BITS: tl.constexpr, B: tl.constexpr):
    """The [BLOCK_N, B] words holding slots t0..t0+7 of a chunk: the high plane and (odd bits) the 1-bit plane."""
    HIGH: tl.constexpr = BITS - BITS % 2
    base = rows[:, None] * (K * BITS // 32) + tl.arange(0, B)[None, :]
    high = tl.load(ptr + base + (chunk * HIGH + t0 // (32 // HIGH)) * B, mask=row_mask[:, None], other=0)
    low = high
    if BITS % 2 == 1:
        low = tl.load(ptr + base + K * HIGH // 32 + chunk * B, mask=row_mask[:, None], other=0)
    return high, low


@triton.jit
def _slot_codes(high, low, t, BITS: tl.constexpr):
    """The b-bit codes of slot t from its words."""
    HIGH: tl.constexpr = BITS - BITS % 2
    codes = (high >> ((t % (32 // HIGH)) * HIGH)) & ((1 << HIGH) - 1)
    if BITS % 2 == 1:
        codes = (codes << 1) | ((low >> t) & 1)
    return codes


@triton.jit
def _slot_scales(scales_ptr, rows, row_mask, k0, K: tl.constexpr, G: tl.constexpr):
    """float32 [BLOCK_N]: the scale of the group holding columns k0 .. k0 + B (B divides G)."""
    return tl.load(scales_ptr + rows * (K // G) + k0 // G, mask=row_mask, other=0.0).to(tl.float32)


@triton.jit
def slot_weights(words, res_words, codebook_ptr, scales_ptr, res_codebook_ptr, res_scales_ptr, rows, row_mask,
                 k0, t, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, RES_BITS: tl.constexpr):
    """The shared dequantize step: W'[rows, k0 : k0 + B] of slot t, float32, base stage plus residual."""
    codes = _slot_codes(words[0], words[1], t, BITS)
    w = tl.load(codebook_ptr + codes) * _slot_scales(scales_ptr, rows, row_mask, k0, K, G)[:, None]
    if RES_BITS > 0:
        res_codes = _slot_codes(res_words[0], res_words[1], t, RES_BITS)
        res_scales = _slot_scales(res_scales_ptr, rows, row_mask, k0, K, G)
        w += tl.load(res_codebook_ptr + res_codes) * res_scales[:, None]
    return w


@triton.jit
def _octet(codes_ptr, res_codes_ptr, rows, row_mask, chunk, t0, K: tl.constexpr, BITS: tl.constexpr,
           RES_BITS: tl.constexpr, B: tl.constexpr):
    """Words of slots t0..t0+7 for both stages (the residual's equal the base's when there is none)."""
    words = _octet_words(codes_ptr, rows, row_mask, chunk, t0, K, BITS, B)
    res_words = words
    if RES_BITS > 0:
        res_words = _octet_words(res_codes_ptr, rows, row_mask, chunk, t0, K, RES_BITS, B)
    return words, res_words


@triton.jit
def fwht_tile(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LOG_G: tl.constexpr):
    """Orthonormal Walsh-Hadamard transform of every group of 2**LOG_G columns of a [BLOCK_M, BLOCK_K] tile.

    log2(G) butterfly stages in registers; each pairs columns h apart: (a, b) -> (a + b, a - b) / sqrt(2).
    """
    pair = tl.arange(0, 2)[None, :, None]
    for stage in tl.static_range(LOG_G):
        y = tl.reshape(x, (BLOCK_M * BLOCK_K // (2 << stage), 2, 1 << stage))
        a = tl.sum(tl.where(pair == 0, y, 0.0), axis=1)
        b = tl.sum(tl.where(pair == 1, y, 0.0), axis=1)
        y = (a[:, None, :] + tl.where(pair == 0, 1.0, -1.0) * b[:, None, :]) * 0.7071067811865476
        x = tl.reshape(y, (BLOCK_M, BLOCK_K))
    return x


@triton.jit(do_not_specialize=["M", "CLEAR"])
def fwht_kernel(x_ptr, signs_ptr, out_ptr, clear_ptr, M, CLEAR, K: tl.constexpr, LOG_G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = rotate(x): grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); BLOCK_K a multiple of the group size.

    Also zeroes clear_ptr[:CLEAR] (the output a split-K kernel adds into), saving a launch.
    """
    programs = tl.num_programs(0) * tl.num_programs(1)
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    for start in range(program * BLOCK_K, CLEAR, programs * BLOCK_K):
        offsets = start + tl.arange(0, BLOCK_K)
        tl.store(clear_ptr + offsets, tl.zeros((BLOCK_K,), dtype=clear_ptr.dtype.element_ty), mask=offsets < CLEAR)
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (tokens < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + tokens[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    signs = tl.load(signs_ptr + cols, mask=cols < K, other=0.0)
    x = fwht_tile(x * signs[None, :], BLOCK_M, BLOCK_K, LOG_G)
    tl.store(out_ptr + tokens[:, None] * K + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_values(high, low, table_ptr, t, BITS: tl.constexpr):
    """Codebook values of slots t and t + 1 (t even) with one 8-byte gather from the pair table."""
    HIGH: tl.constexpr = BITS - BITS % 2
    index = (high >> ((t % (32 // HIGH)) * HIGH)) & ((1 << (2 * HIGH)) - 1)
    if BITS % 2 == 1:
        index = (index << 2) | ((low >> t) & 3)
    pair = tl.load(table_ptr + index)  # int64: slot t's float32 bits low, slot t + 1's high
    first = pair.to(tl.int32).to(tl.float32, bitcast=True)
    second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return first, second


@triton.jit
def _pair_dot(words, table_ptr, scales_ptr, rows, row_mask, k0, t, x0, x1, K: tl.constexpr, G: tl.constexpr,
              BITS: tl.constexpr):
    """scale * (w_t * x_t + w_t+1 * x_t+1) for one stage (slots t, t + 1 lie in one group: 2B divides G)."""
    first, second = _pair_values(words[0], words[1], table_ptr, t, BITS)
    return (first * x0[None, :] + second * x1[None, :]) * _slot_scales(scales_ptr, rows, row_mask, k0, K, G)[:, None]


@triton.jit
def _accumulate(out_ptr, offsets, values, mask, SPLIT: tl.constexpr):
    """Store a program's partial result, or add it atomically when K is split over several programs."""
    if SPLIT:
        tl.atomic_add(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr):
    """out[N] (+)= W' x' for one token (x' rotated); grid (cdiv(N, BLOCK_N), K // (SLOTS * B)).

    Split-K: a program takes BLOCK_N rows and SLOTS consecutive slots (SLOTS * B contiguous
    columns; SLOTS a multiple of 8 and of every plane's slots per word, so the shifts stay
    constants) and, when K is split, adds its partial sums atomically into `out`, which the
    rotation kernel has zeroed. The small programs keep every SM busy even for N = 1024. Codes
    are looked up two at a time in the pair table (repack.pair_table: one 8-byte gather for two
    weights), scaled once per pair of slots; products accumulate in a [BLOCK_N, B] tile reduced
    at the end.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    first_slot = tl.program_id(1) * SLOTS
    chunk, t_first = first_slot // 32, first_slot % 32
    cols = tl.arange(0, B)
    acc = tl.zeros((BLOCK_N, B), dtype=tl.float32)
    for t0 in tl.static_range(0, SLOTS, 8):
        words, res_words = _octet(codes_ptr, res_codes_ptr, rows, row_mask, chunk, t_first + t0, K, BITS, RES_BITS, B)
        for j in tl.static_range(0, 8, 2):
            k0 = (first_slot + t0 + j) * B
            x0 = tl.load(x_ptr + k0 + cols).to(tl.float32)
            x1 = tl.load(x_ptr + k0 + B + cols).to(tl.float32)
            acc += _pair_dot(words, table_ptr, scales_ptr, rows, row_mask, k0, t0 + j, x0, x1, K, G, BITS)
            if RES_BITS > 0:
                acc += _pair_dot(res_words, res_table_ptr, res_scales_ptr, rows, row_mask, k0, t0 + j, x0, x1,
                                 K, G, RES_BITS)
    _accumulate(out_ptr, rows, tl.sum(acc, axis=1), row_mask, SLOTS * B < K)


@triton.jit
def skinny_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr,
                  res_codebook_ptr, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
                  BITS: tl.constexpr, RES_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SLOTS: tl.constexpr):
    """out[M, N] (+)= x' @ W'^T for 2-16 tokens on tensor cores; grid (cdiv(N, BLOCK_N), K // (SLOTS * B)).

    The GEMV's split-K decomposition, with each decoded [BLOCK_N, B] slot tile fed to `tl.dot`
    against the [BLOCK_M, B] activations: one pass over the weight, every SM busy.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    first_slot = tl.program_id(1) * SLOTS
    chunk, t_first = first_slot // 32, first_slot % 32
    tokens = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, B)
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in tl.static_range(0, SLOTS, 8):
        words, res_words = _octet(codes_ptr, res_codes_ptr, rows, row_mask, chunk, t_first + t0, K, BITS, RES_BITS, B)
        for j in tl.static_range(8):
            k0 = (first_slot + t0 + j) * B
            w = slot_weights(words, res_words, codebook_ptr, scales_ptr, res_codebook_ptr, res_scales_ptr,
                             rows, row_mask, k0, t0 + j, K, G, BITS, RES_BITS)
            x = tl.load(x_ptr + tokens[:, None] * K + k0 + cols[None, :], mask=(tokens < M)[:, None], other=0.0)
            acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc)
    mask = (tokens < M)[:, None] & row_mask[None, :]
    _accumulate(out_ptr, tokens[:, None] * N + rows[None, :], acc, mask, SLOTS * B < K)


@triton.jit(do_not_specialize=["M"])
def gemm_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr,
                res_codebook_ptr, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
                BITS: tl.constexpr, RES_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP_M: tl.constexpr):
    """out[M, N] = x' @ W'^T for 2 or more tokens (x' rotated), on tensor cores; tiles in L2-friendly groups.

    With BLOCK_M = 16 and M <= 16 (one row of tiles) this is a single pass over the weight.
    """
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    tile_n = (pid % (GROUP_M * tiles_n)) // size_m
    tokens = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, B)
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for slot in range(0, K // B):  # not unrolled: decoding is shared by BLOCK_M tokens here
        chunk, t = slot // 32, slot % 32
        words, res_words = _octet(codes_ptr, res_codes_ptr, rows, row_mask, chunk, t, K, BITS, RES_BITS, B)
        w = slot_weights(words, res_words, codebook_ptr, scales_ptr, res_codebook_ptr, res_scales_ptr,
                         rows, row_mask, slot * B, t, K, G, BITS, RES_BITS)
        x = tl.load(x_ptr + tokens[:, None] * K + slot * B + cols[None, :], mask=(tokens < M)[:, None], other=0.0)
        acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc)
    mask = (tokens < M)[:, None] & row_mask[None, :]
    tl.store(out_ptr + tokens[:, None] * N + rows[None, :], acc.to(dtype), mask=mask)


@triton.jit
def dequant_kernel(out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr, res_codebook_ptr,
                   N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                   RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[N, K] = W' in out's dtype; grid (cdiv(N, BLOCK_N), K // (32 * B)): one chunk per program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    chunk = tl.program_id(1)
    cols = tl.arange(0, B)
    for t0 in tl.static_range(0, 32, 8):
        words, res_words = _octet(codes_ptr, res_codes_ptr, rows, row_mask, chunk, t0, K, BITS, RES_BITS, B)
        for j in tl.static_range(8):
            k0 = chunk * 32 * B + (t0 + j) * B
            w = slot_weights(words, res_words, codebook_ptr, scales_ptr, res_codebook_ptr, res_scales_ptr,
                             rows, row_mask, k0, t0 + j, K, G, BITS, RES_BITS)
            tl.store(out_ptr + rows[:, None] * K + k0 + cols[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None])
