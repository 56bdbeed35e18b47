"""The Triton kernel sources: one per strategy, every layer property a `tl.constexpr`.

Strategies (see registry.py for how one is chosen):
    fwht_kernel     rotate activations: x' = FWHT_G(x * signs) / sqrt(G), per group of G inputs
    gemv_kernel     1-16 tokens: decode a [BLOCK_N, BLOCK_K] weight tile and multiply, one pass
    gemm_kernel     prefill: tiled, the decoded tile feeds tensor-core `tl.dot`
    dequant_kernel  write the decoded weight in bf16/fp16 (for cuBLAS on very large token counts)

All four share `dequant_tile`, which reads the packed codes in the bit-plane layout of
tqc/bitpack.py directly (docs/kernel_layout.md): plane of width W holds W words per 32 codes,
so the words of one row are contiguous along K and a tile load is BLOCK_N runs of
BLOCK_K * W / 8 bytes. Code bits, residual bits, group size, N and K are constexpr, so each
distinct layer configuration compiles to its own specialised kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_plane(ptr, rows, row_mask, k0, plane_start, ROW_WORDS: tl.constexpr, K: tl.constexpr,
                  W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One bit plane of a tile: int32 [BLOCK_N, BLOCK_K // 32, 32], values in [0, 2**W)."""
    blocks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    word = tl.arange(0, W)
    offsets = rows[:, None, None] * ROW_WORDS + plane_start + blocks[None, :, None] * W + word[None, None, :]
    mask = row_mask[:, None, None] & (blocks < K // 32)[None, :, None]
    packed = tl.load(ptr + offsets, mask=mask, other=0)
    shifts = tl.arange(0, 32 // W) * W
    parts = (packed[:, :, :, None] >> shifts[None, None, None, :]) & ((1 << W) - 1)
    return tl.reshape(parts, (BLOCK_N, BLOCK_K // 32, 32))


@triton.jit
def _codes(ptr, rows, row_mask, k0, K: tl.constexpr, BITS: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """b-bit codes of a tile from its power-of-two planes (4 -> [4], 3 -> [2, 1], 2 -> [2])."""
    ROW_WORDS: tl.constexpr = K * BITS // 32
    HIGH: tl.constexpr = BITS - BITS % 2
    codes = _unpack_plane(ptr, rows, row_mask, k0, 0, ROW_WORDS, K, HIGH, BLOCK_N, BLOCK_K)
    if BITS % 2 == 1:
        low = _unpack_plane(ptr, rows, row_mask, k0, K * HIGH // 32, ROW_WORDS, K, 1, BLOCK_N, BLOCK_K)
        codes = (codes << 1) | low
    return codes


@triton.jit
def _stage(codes_ptr, scales_ptr, codebook_ptr, rows, row_mask, k0, K: tl.constexpr, G: tl.constexpr,
           BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """codebook[code] * scale of one stage, float32 [BLOCK_N, BLOCK_K]."""
    codes = _codes(codes_ptr, rows, row_mask, k0, K, BITS, BLOCK_N, BLOCK_K)
    values = tl.reshape(tl.load(codebook_ptr + codes), (BLOCK_N, BLOCK_K // G, G))
    groups = k0 // G + tl.arange(0, BLOCK_K // G)
    scale_mask = row_mask[:, None] & (groups < K // G)[None, :]
    scales = tl.load(scales_ptr + rows[:, None] * (K // G) + groups[None, :], mask=scale_mask, other=0.0)
    return tl.reshape(values * scales.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def dequant_tile(codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr, res_codebook_ptr,
                 rows, row_mask, k0, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                 RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decoded weight tile W'[rows, k0:k0+BLOCK_K] (rotated basis), float32: base plus residual."""
    w = _stage(codes_ptr, scales_ptr, codebook_ptr, rows, row_mask, k0, K, G, BITS, BLOCK_N, BLOCK_K)
    if RES_BITS > 0:
        w += _stage(res_codes_ptr, res_scales_ptr, res_codebook_ptr, rows, row_mask, k0, K, G, RES_BITS,
                    BLOCK_N, BLOCK_K)
    return w


@triton.jit
def fwht_tile(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, LOG_G: tl.constexpr):
    """Orthonormal Walsh-Hadamard transform of every group of G columns of a [BLOCK_M, BLOCK_K] tile.

    log2(G) butterfly stages in registers; each pairs columns h apart: (a, b) -> (a + b, a - b).
    """
    pair = tl.arange(0, 2)[None, :, None]
    for stage in tl.static_range(LOG_G):
        y = tl.reshape(x, (BLOCK_M * BLOCK_K // (2 << stage), 2, 1 << stage))
        a = tl.sum(tl.where(pair == 0, y, 0.0), axis=1)
        b = tl.sum(tl.where(pair == 1, y, 0.0), axis=1)
        y = a[:, None, :] + tl.where(pair == 0, 1.0, -1.0) * b[:, None, :]
        x = tl.reshape(y, (BLOCK_M, BLOCK_K))
    return x * (1.0 / tl.sqrt(G * 1.0))


@triton.jit
def _load_rotated(x_ptr, signs_ptr, tokens, token_mask, k0, K: tl.constexpr, G: tl.constexpr,
                  LOG_G: tl.constexpr, ROTATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] float32 activation tile, rotated here when ROTATE (else already rotated)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = token_mask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + tokens[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        signs = tl.load(signs_ptr + cols, mask=cols < K, other=0.0)
        x = fwht_tile(x * signs[None, :], BLOCK_M, BLOCK_K, G, LOG_G)
    return x


@triton.jit
def fwht_kernel(x_ptr, signs_ptr, out_ptr, M, K: tl.constexpr, G: tl.constexpr, LOG_G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = rotate(x): grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); BLOCK_K a multiple of G."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    x = _load_rotated(x_ptr, signs_ptr, tokens, tokens < M, k0, K, G, LOG_G, True, BLOCK_M, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (tokens < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + tokens[:, None] * K + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_kernel(x_ptr, signs_ptr, out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr,
                res_scales_ptr, res_codebook_ptr, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                LOG_G: tl.constexpr, BITS: tl.constexpr, RES_BITS: tl.constexpr, ROTATE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = x' @ W'^T for few tokens, one pass over the packed weight; grid (cdiv(N, BLOCK_N),).

    BLOCK_M == 1 multiplies on the CUDA cores; BLOCK_M >= 16 (2-16 tokens, padded) uses `tl.dot`.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tokens = tl.arange(0, BLOCK_M)
    token_mask = tokens < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_rotated(x_ptr, signs_ptr, tokens, token_mask, k0, K, G, LOG_G, ROTATE, BLOCK_M, BLOCK_K)
        w = dequant_tile(codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr, res_codebook_ptr,
                         rows, row_mask, k0, K, G, BITS, RES_BITS, BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
        else:
            dtype = out_ptr.dtype.element_ty
            acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc)
    mask = token_mask[:, None] & row_mask[None, :]
    tl.store(out_ptr + tokens[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemm_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr,
                res_codebook_ptr, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                RES_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """out[M, N] = x' @ W'^T for many tokens (x' already rotated); tiles visited in L2-friendly groups."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    tile_n = (pid % (GROUP_M * tiles_n)) // size_m
    tokens = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_rotated(x_ptr, x_ptr, tokens, tokens < M, k0, K, G, 0, False, BLOCK_M, BLOCK_K)
        w = dequant_tile(codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr, res_codebook_ptr,
                         rows, row_mask, k0, K, G, BITS, RES_BITS, BLOCK_N, BLOCK_K)
        acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc)
    mask = (tokens < M)[:, None] & row_mask[None, :]
    tl.store(out_ptr + tokens[:, None] * N + rows[None, :], acc.to(dtype), mask=mask)


@triton.jit
def dequant_kernel(out_ptr, codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr,
                   res_codebook_ptr, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                   RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = W' in out's dtype; grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = dequant_tile(codes_ptr, scales_ptr, codebook_ptr, res_codes_ptr, res_scales_ptr, res_codebook_ptr,
                     rows, rows < N, k0, K, G, BITS, RES_BITS, BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
