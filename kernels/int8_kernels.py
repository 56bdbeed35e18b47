"""The int8 kernel family: layers on int8 activations (a plan's `activations: int8`, tqc.activations).

    rotate_int8_kernel  x' = rotate(x), rounded to int8 per (token, group): values [M, K] int8 in
                        input order and scales [M, K / G] float32 (absmax / 127); also zeroes the
                        output a split-K kernel adds into
    int8_dot_kernel     out (+)= factor * sum over groups of ws[n, g] xs[m, g] (q_w . q_x), the
                        codes decoded to int8 in registers (lut_int8: PRMT tables, input-order
                        code words) and the dot on int8 tensor cores, exact in int32 per group;
                        split over K with atomics for few tokens, or tiles over M and N for many
    int8_gemv_kernel    one token on CUDA cores: the codes decoded to int8 and multiplied 4 at a
                        time with `dp4a` against activations stored in planes (llama.cpp's MMVQ way)
    int8_dequant_kernel the same weights in 16 bits, for dequantize + cuBLAS on many tokens (with
                        the rotated input rounded to int8 and multiplied back: the same numbers
                        up to 16-bit rounding)

Under the interpreter (and as a plain fallback) the decode reads every code's word and looks its
level up in a 2**bits int8 table in memory; compiled, inline PTX decodes 4 codes a register.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _accumulate_rows, clear_output, input_tile, pdl_start, rotate_tile


ROUNDING = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + it - it rounds |x| < 2**22 to an integer in float32


@triton.jit(do_not_specialize=["M", "CLEAR"])
def rotate_int8_kernel(x_ptr, signs_ptr, q_ptr, scales_ptr, clear_ptr, M, CLEAR, K: tl.constexpr, LOG_G: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDED: tl.constexpr = False,
                       PER_WORD: tl.constexpr = 0, PDL: tl.constexpr = False):
    """grid (cdiv(M, BLOCK_M), K / BLOCK_K): rotate a tile of whole groups, then round it
    (store_int8). The norm and SwiGLU steps of a decoder do the same in their own launch (glue.py)."""
    pdl_start(PDL)
    clear_output(clear_ptr, CLEAR, BLOCK_K)
    tokens, cols, _, x = input_tile(x_ptr, M, K, BLOCK_M, BLOCK_K)
    x = rotate_tile(x, signs_ptr, cols, K, LOG_G, BLOCK_M, BLOCK_K)
    store_int8(x, q_ptr, scales_ptr, tokens, tokens < M, tl.program_id(1), K, LOG_G, BLOCK_M, BLOCK_K, ROUNDED,
               PER_WORD)


@triton.jit
def store_int8(x, q_ptr, scales_ptr, tokens, token_mask, block, K: tl.constexpr, LOG_G: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROUNDED: tl.constexpr, PER_WORD: tl.constexpr):
    """Round a rotated float32 tile (rows `tokens`, column block `block` of BLOCK_K, whole groups)
    to int8 per (token, group) as tqc.activations.quantize_groups does, and store values and
    scales (absmax / 127). ROUNDED: store the rounded values multiplied back
    (tqc.activations.round_to_int8) in q_ptr's dtype, for dequantize + cuBLAS, and no scales.
    PER_WORD > 0 (one token, for int8_gemv_kernel): the int8 values in planes, plane j holding the
    j-th 4 inputs of every code word of PER_WORD inputs, so that each is one int32 load."""
    G: tl.constexpr = 1 << LOG_G
    cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = token_mask[:, None] & (cols < K)[None, :]
    groups = tl.reshape(x, (BLOCK_M, BLOCK_K // G, G))
    scale = tl.max(tl.abs(groups), axis=2) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    q = (groups / scale[:, :, None] + ROUNDING) - ROUNDING  # to the nearest integer, ties to even, as torch.round
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    if ROUNDED:
        q = q * scale[:, :, None]
    q = tl.reshape(q, (BLOCK_M, BLOCK_K)).to(q_ptr.dtype.element_ty)
    targets = cols
    if PER_WORD > 0:
        position = cols % PER_WORD
        targets = (position // 4 * (K // PER_WORD) + cols // PER_WORD) * 4 + position % 4
    tl.store(q_ptr + tokens[:, None] * K + targets[None, :], q, mask=mask)
    if not ROUNDED:
        group = block * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
        tl.store(scales_ptr + tokens[:, None] * (K // G) + group[None, :], scale,
                 mask=token_mask[:, None] & (group < K // G)[None, :])


# 4 codes to 4 int8 levels in one register (pack=4: operands $1-$4 the same code word, $5-$8 the
# quad's shift, then the table words). lut_int8 documents the tables and the bit positions.
# 4 bits: two PRMTs and an xor, the second on the selector with its nibbles' bit 3 flipped.
DECODE_4 = tl.constexpr("{ .reg .b32 s, f, a, b; shr.u32 s, $1, $5; xor.b32 f, s, 0x8888; prmt.b32 a, $9, $13, s; "
                        "prmt.b32 b, $17, $21, f; xor.b32 $0, a, b; }")
# 2 bits: the quad's crumbs, a nibble apart, masked into the selector of one PRMT.
DECODE_2 = tl.constexpr("{ .reg .b32 s; shr.u32 s, $1, $5; and.b32 s, s, 0x3333; prmt.b32 $0, $9, $9, s; }")
# 3 bits: the crumb word $1 as for 2 bits, the high word $9 shifted right by $13 and left by $17 so
# that the quad's third bits land at the nibbles' bit 2; 8 levels in $21, $25.
DECODE_3 = tl.constexpr("{ .reg .b32 s, h; shr.u32 s, $1, $5; and.b32 s, s, 0x3333; shr.u32 h, $9, $13; "
                        "shl.b32 h, h, $17; and.b32 h, h, 0x4444; or.b32 s, s, h; prmt.b32 $0, $21, $25, s; }")


def dp4a_asm(bits: int) -> str:
    """PTX for one thread's 4 consecutive code words of a group (pack=4; for 3 bits, crumb words
    with their high words beside): acc += scale * the sum of their int8 dot products with the
    activation planes (dp4a, 4 products an instruction). Only the first of the 4 accumulators
    takes the sum; the other three pass through."""
    planes = 2 if bits == 4 else 4
    operands = iter(range(4, 100))

    def take(count: int) -> list[str]:
        return [f"${next(operands)}" for _ in range(count)]
    w = take(4)
    high = take(4) if bits == 3 else None
    x = [take(4) for _ in range(planes)]
    scale, acc = take(4), take(4)
    t = [take(4)[0] for _ in range({4: 4, 3: 2, 2: 1}[bits])]
    body = []
    for e in range(4):
        if bits == 4:
            for j, shift in enumerate((0, 16)):
                body.append(f"shr.u32 s, {w[e]}, {shift}; xor.b32 f, s, 0x88888888; prmt.b32 a, {t[0]}, {t[1]}, s; "
                            f"prmt.b32 b, {t[2]}, {t[3]}, f; xor.b32 a, a, b; dp4a.s32.s32 d, a, {x[j][e]}, d;")
            continue
        for q, shift in enumerate((0, 2, 16, 18)):
            body.append(f"shr.u32 s, {w[e]}, {shift}; and.b32 s, s, 0x3333;")
            if bits == 3:  # lut_int8.high_bit: this quad's third bits from 16 * half + q to the nibbles' bit 2
                base = 16 * (e % 2) + q
                move = f"shr.u32 h, {high[e]}, {base - 2};" if base >= 2 else f"shl.b32 h, {high[e]}, {2 - base};"
                body.append(f"{move} and.b32 h, h, 0x4444; or.b32 s, s, h;")
            body.append(f"prmt.b32 a, {t[0]}, {t[-1]}, s; dp4a.s32.s32 d, a, {x[q][e]}, d;")
    return ("{ .reg .b32 a, b, f, h, s; .reg .s32 d; .reg .f32 v; mov.s32 d, 0; " + " ".join(body)
            + f" cvt.rn.f32.s32 v, d; fma.rn.f32 $0, v, {scale[0]}, {acc[0]}; mov.f32 $1, {acc[1]};"
            f" mov.f32 $2, {acc[2]}; mov.f32 $3, {acc[3]}; }}")


DP4A_2, DP4A_3, DP4A_4 = (tl.constexpr(dp4a_asm(bits)) for bits in (2, 3, 4))


@triton.jit
def _copies(tile, LOG_COPIES: tl.constexpr):
    """[R, C] -> [R, C * 2**LOG_COPIES], every element repeated in a row, the copies in one thread
    (the packed operands of a pack=4 asm)."""
    x = tile
    for _ in tl.static_range(LOG_COPIES):
        x = tl.join(x, x)
    return tl.reshape(x, (tile.shape[0], tile.shape[1] << LOG_COPIES))


@triton.jit
def _lane_table(table_ptr):
    """The 4 table words of this lane's copy (LayerKernel.table: one copy a lane, so that every
    thread holds the words in its own registers), as [1, 1] tensors."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.zeros((1, 1), dtype=tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)
    base = table_ptr + lane * 4
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)


@triton.jit
def _decode_asm(codes_ptr, rows, group, table_ptr, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """The int8 levels [BLOCK_N, G] of one group of `rows`, decoded by PRMT in registers."""
    t0, t1, t2, t3 = _lane_table(table_ptr)
    ROW_WORDS: tl.constexpr = K * BITS // 32
    if BITS == 4:
        w = tl.load(codes_ptr + rows[:, None] * ROW_WORDS + group * (G // 8) + tl.arange(0, G // 8)[None, :],
                    eviction_policy="evict_first")
        words = _copies(w, 3)
        shift = (tl.arange(0, G) % 8 // 4 * 16)[None, :] + words * 0
        zero = words * 0
        q = tl.inline_asm_elementwise(DECODE_4, "=r" + ",r" * 24, [words, shift, t0 + zero, t1 + zero, t2 + zero,
                                                                    t3 + zero], dtype=tl.int8, is_pure=True, pack=4)
    elif BITS == 2:
        w = tl.load(codes_ptr + rows[:, None] * ROW_WORDS + group * (G // 16) + tl.arange(0, G // 16)[None, :],
                    eviction_policy="evict_first")
        words = _copies(w, 4)
        zero = words * 0
        shift = _crumb_shift(G)[None, :] + zero
        q = tl.inline_asm_elementwise(DECODE_2, "=r" + ",r" * 12, [words, shift, t0 + zero], dtype=tl.int8,
                                      is_pure=True, pack=4)
    else:
        crumbs = tl.load(codes_ptr + rows[:, None] * ROW_WORDS + group * (G // 16) + tl.arange(0, G // 16)[None, :],
                         eviction_policy="evict_first")
        highs = tl.load(codes_ptr + rows[:, None] * ROW_WORDS + K // 16 + group * (G // 32)
                        + tl.arange(0, G // 32)[None, :], eviction_policy="evict_first")
        words, high_words = _copies(crumbs, 4), _copies(highs, 5)
        zero = words * 0
        base = _high_base(G)
        right = tl.maximum(base - 2, 0)[None, :] + zero
        left = tl.maximum(2 - base, 0)[None, :] + zero
        q = tl.inline_asm_elementwise(DECODE_3, "=r" + ",r" * 28, [words, _crumb_shift(G)[None, :] + zero, high_words,
                                                                    right, left, t0 + zero, t1 + zero],
                                      dtype=tl.int8, is_pure=True, pack=4)
    return q


@triton.jit
def _crumb_shift(G: tl.constexpr):
    """2-bit words (and 3 bits' crumb plane): the shift of each input's quad, (0, 2, 16, 18)[quad]."""
    quad = tl.arange(0, G) % 16 // 4
    return quad // 2 * 16 + quad % 2 * 2


@triton.jit
def _high_base(G: tl.constexpr):
    """3 bits: the high-plane bit of each input's quad's first code (lut_int8.high_bit)."""
    position = tl.arange(0, G)
    return position % 32 // 16 * 16 + position % 16 // 4


@triton.jit
def _decode_generic(codes_ptr, rows, group, levels_ptr, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """The same levels as _decode_asm, from every code's word and an int8 table in memory
    (`levels_ptr`, indexed by stored code)."""
    ROW_WORDS: tl.constexpr = K * BITS // 32
    inputs = group * G + tl.arange(0, G)
    row_base = codes_ptr + rows[:, None] * ROW_WORDS
    if BITS == 4:
        position = inputs % 8
        word = tl.load(row_base + (inputs // 8)[None, :])
        stored = word >> (position // 4 * 16 + position % 4 * 4)[None, :] & 15
    else:
        position = inputs % 16
        word = tl.load(row_base + (inputs // 16)[None, :])
        stored = word >> (_crumb_shift(G) + position % 4 * 4)[None, :] & 3
        if BITS == 3:
            high = tl.load(row_base + (K // 16 + inputs // 32)[None, :])
            stored |= (high >> (_high_base(G) + position % 4 * 4)[None, :] & 1) << 2
    return tl.load(levels_ptr + stored)


@triton.jit(do_not_specialize=["M"])
def int8_dot_kernel(q_ptr, xs_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, levels_ptr, factor, M,
                    N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, STEPS: tl.constexpr, ASM: tl.constexpr, THREADS: tl.constexpr,
                    PDL: tl.constexpr = False):
    """out[M, N] (+)= the layer on int8 activations (module docstring). Grid (cdiv(N, BLOCK_N),
    K / (G * STEPS), cdiv(M, BLOCK_M)); each program takes STEPS groups of its rows and tokens;
    with more than one program over K they add into out, zeroed by rotate_int8_kernel: neighbouring
    rows as one packed 16-bit reduction where N is even (triton_kernels._accumulate_rows; a scalar
    16-bit atomic is a compare-and-swap loop on sm_90, and took a third of the time at 16 tokens)."""
    pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    tokens = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = tokens < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(STEPS):
        group = tl.program_id(1) * STEPS + step
        if ASM:
            w = _decode_asm(codes_ptr, rows, group, table_ptr, K, G, BITS)
        else:
            w = _decode_generic(codes_ptr, rows, group, levels_ptr, K, G, BITS)
        x = tl.load(q_ptr + tokens[:, None] * K + group * G + tl.arange(0, G)[None, :], mask=token_mask[:, None],
                    other=0)
        dots = tl.dot(w, tl.trans(x), out_dtype=tl.int32)
        ws = tl.load(scales_ptr + rows * (K // G) + group).to(tl.float32)
        xs = tl.load(xs_ptr + tokens * (K // G) + group, mask=token_mask, other=0.0)
        acc += dots.to(tl.float32) * ws[:, None] * xs[None, :]
    SIZE: tl.constexpr = BLOCK_M * BLOCK_N  # token-major, so that neighbouring rows pair up
    offsets = tl.reshape(tokens[:, None] * N + rows[None, :], (SIZE,))
    mask = tl.reshape(token_mask[:, None] & row_mask[None, :], (SIZE,))
    _accumulate_rows(out_ptr, offsets, tl.reshape(tl.trans(acc * factor), (SIZE,)), mask, K > G * STEPS, N % 2 == 0,
                     THREADS, ASM)


@triton.jit
def int8_dequant_kernel(out_ptr, codes_ptr, scales_ptr, table_ptr, levels_ptr, factor, N: tl.constexpr,
                        K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                        ASM: tl.constexpr):
    """out[N, K] = the weight the int8 dot multiplies (level * factor * scale), in out's dtype, for
    dequantize + cuBLAS on many tokens. Grid (cdiv(N, BLOCK_N), K / G)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    group = tl.program_id(1)
    if ASM:
        w = _decode_asm(codes_ptr, rows, group, table_ptr, K, G, BITS)
    else:
        w = _decode_generic(codes_ptr, rows, group, levels_ptr, K, G, BITS)
    scale = tl.load(scales_ptr + rows * (K // G) + group).to(tl.float32) * factor
    values = w.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rows[:, None] * K + group * G + tl.arange(0, G)[None, :], values.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None])


@triton.jit
def _gemv_loads(q_ptr, xs_ptr, codes_ptr, scales_ptr, rows, group, K: tl.constexpr, G: tl.constexpr,
                BITS: tl.constexpr):
    """One group's operands for int8_gemv_kernel, each [BLOCK_N, W] (W code words a group; for 3
    bits crumb words): the code words, their high words (3 bits; else the code words again), the
    activation planes as int32 (planes 2 and 3 repeat 0 and 1 for 4 bits), the combined scale.
    Contiguous words, so Triton loads 4 a thread as one 16-byte vector: the 4 operands of a pack=4
    dp4a_asm call (Int8LayerKernel.fits: enough words for every thread to hold 4). Faster than a
    [BLOCK_N, W / 4, 4] tile of the same loads (run 58)."""
    PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
    W: tl.constexpr = G // PER_WORD
    PLANE_WORDS: tl.constexpr = K // PER_WORD
    ROW_WORDS: tl.constexpr = K * BITS // 32
    word = group * W + tl.arange(0, W)[None, :]
    row_words = codes_ptr + rows[:, None] * ROW_WORDS
    w = tl.load(row_words + word, eviction_policy="evict_first")
    high = w
    if BITS == 3:  # crumb word 4a + e takes high word 2a + e // 2
        high = _copies(tl.load(row_words + PLANE_WORDS + group * (W // 2) + tl.arange(0, W // 2)[None, :],
                               eviction_policy="evict_first"), 1)
    zero_rows = (rows * 0)[:, None]
    x0 = tl.load(q_ptr + zero_rows + word)
    x1 = tl.load(q_ptr + zero_rows + PLANE_WORDS + word)
    x2, x3 = x0, x1
    if BITS < 4:
        x2 = tl.load(q_ptr + zero_rows + 2 * PLANE_WORDS + word)
        x3 = tl.load(q_ptr + zero_rows + 3 * PLANE_WORDS + word)
    scale = tl.load(scales_ptr + rows * (K // G) + group).to(tl.float32) * tl.load(xs_ptr + group)
    return w, high, x0, x1, x2, x3, scale[:, None] + (w * 0).to(tl.float32)


@triton.jit
def _gemv_dot(acc, w, high, x0, x1, x2, x3, scale, table_ptr, BITS: tl.constexpr):
    """acc plus one group's dot products (dp4a_asm)."""
    t0, t1, t2, t3 = _lane_table(table_ptr)
    zero = w * 0
    if BITS == 4:
        acc = tl.inline_asm_elementwise(DP4A_4, "=f,=f,=f,=f" + ",r" * 12 + ",f" * 8 + ",r" * 16,
                                        [w, x0, x1, scale, acc, t0 + zero, t1 + zero, t2 + zero, t3 + zero],
                                        dtype=tl.float32, is_pure=True, pack=4)
    elif BITS == 3:
        acc = tl.inline_asm_elementwise(DP4A_3, "=f,=f,=f,=f" + ",r" * 24 + ",f" * 8 + ",r" * 8,
                                        [w, high, x0, x1, x2, x3, scale, acc, t0 + zero, t1 + zero],
                                        dtype=tl.float32, is_pure=True, pack=4)
    else:
        acc = tl.inline_asm_elementwise(DP4A_2, "=f,=f,=f,=f" + ",r" * 20 + ",f" * 8 + ",r" * 4,
                                        [w, x0, x1, x2, x3, scale, acc, t0 + zero], dtype=tl.float32,
                                        is_pure=True, pack=4)
    return acc


@triton.jit
def int8_gemv_kernel(q_ptr, xs_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, levels_ptr, factor, N: tl.constexpr,
                     K: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
                     THREADS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False):
    """out[1, N] (+)= the layer on one token's int8 activations (int8 planes: rotate_int8_kernel's
    PER_WORD) on CUDA cores, `dp4a`. Grid (cdiv(N, BLOCK_N), K / (G * STEPS)); each program takes
    STEPS groups of its rows, the next group's loads issued before this one's dot products (in
    registers: Triton's cp.async pipelines were no faster, docs/performance-history.md run 50)."""
    pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    first = tl.program_id(1) * STEPS
    if ASM:
        planes = q_ptr.to(tl.pointer_type(tl.int32))
        w, high, x0, x1, x2, x3, scale = _gemv_loads(planes, xs_ptr, codes_ptr, scales_ptr, rows, first, K, G, BITS)
        acc = scale * 0.0
        for step in range(STEPS):
            following = first + tl.minimum(step + 1, STEPS - 1)  # the last step loads itself again
            nw, nhigh, nx0, nx1, nx2, nx3, nscale = _gemv_loads(planes, xs_ptr, codes_ptr, scales_ptr, rows, following,
                                                                K, G, BITS)
            acc = _gemv_dot(acc, w, high, x0, x1, x2, x3, scale, table_ptr, BITS)
            w, high, x0, x1, x2, x3, scale = nw, nhigh, nx0, nx1, nx2, nx3, nscale
        sums = tl.sum(acc, axis=1)
    else:  # the interpreter: levels from memory, the activations read back from their planes
        PER_WORD: tl.constexpr = 8 if BITS == 4 else 16
        sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for step in range(STEPS):
            group = first + step
            w = _decode_generic(codes_ptr, rows, group, levels_ptr, K, G, BITS).to(tl.float32)
            inputs = group * G + tl.arange(0, G)
            position = inputs % PER_WORD
            x = tl.load(q_ptr + (position // 4 * (K // PER_WORD) + inputs // PER_WORD) * 4 + position % 4)
            scale = tl.load(scales_ptr + rows * (K // G) + group).to(tl.float32) * tl.load(xs_ptr + group)
            sums += tl.sum(w * x.to(tl.float32)[None, :], axis=1) * scale
    _accumulate_rows(out_ptr, rows, sums * factor, row_mask, K > G * STEPS, N % 2 == 0, THREADS, ASM)
