"""Gluon kernels on the fragment layout of 4-, 3- and 2-bit codes (kernels/fragments.py): the fragment family.

`fragment_dot_kernel` multiplies 16 tokens (or tiles of 64, 128) on tensor cores with the decoded weights as
wgmma's register operand: each thread loads its own fragment's code words (16-byte vectors),
decodes them with tqc's PRMT lookups (`lut.NIBBLE_ASM`) straight into the operand's registers (the
layout conversion is asserted trivial when it compiles: no shared memory, no shuffles), scales
them and multiplies; the activations of the program's steps are staged in shared memory once.
The family (registry.FragmentLayerKernel, `attach(model)` on Hopper) launches
fragment_dot_kernel, at one token also `fragment_gemv_kernel` (the same decode on CUDA cores)
where the tuner finds it faster, and for a prefill `fragment_dequant_kernel` (the same decode,
written out for cuBLAS); the other knobs (LOOKAHEAD, EVICT, STAGED) are the lab's
(scripts/gluon_dot16_lab.py, which checks and times them: docs/performance-history.md, runs 107-114).
Gluon kernels do not run under TRITON_INTERPRET: CI compiles them for sm_90 (tests/test_kernels.py),
the device runs tests/test_kernels_accuracy.py.

4-, 3- or 2-bit codes (BITS), a residual stage of 4 or 2 bits or none (RES_BITS: 4+4, 4+2, 2+2), fp16
activations; G a multiple of BLOCK_K (one scale a row and step).
"""

from __future__ import annotations

from functools import lru_cache

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from . import fragments
from . import triton_kernels as tk
from .lut import (CRUMB_ASM, CRUMB_MASKED, HIGH_BYTE_FACTOR, HIGH_BYTE_FACTOR3, HIGH_CRUMB_ASM, MASKED_CRUMB_ASM,
                  MASKED_HIGH_CRUMB_ASM, MASKED_SIGNED_CRUMB_ASM, NIBBLE_ASM, SELECTOR_SIGNS, SIGNED_CONSTRAINTS,
                  SIGNED_CRUMB_ASM, TABLE_COPIES, UNSIGNED_CONSTRAINTS)

BLOCK_WARPS = gl.constexpr(fragments.WARPS)  # warps of a 64-row block of the layout (a program may take several)
TOKENS = gl.constexpr(16)  # wgmma's n at up to 16 tokens: tokens padded to 16 (TOKEN_TILE beyond)
COPIES = gl.constexpr(TABLE_COPIES)
QUAD_ASM = gl.constexpr(NIBBLE_ASM)  # a quad of 4-bit codes -> two half2, by PRMT (lut.py)
QUAD_CONSTRAINTS = gl.constexpr(SIGNED_CONSTRAINTS)
CRUMB_QUAD_ASM = gl.constexpr(CRUMB_ASM)  # a quad of 2-bit codes
CRUMB_QUAD_CONSTRAINTS = gl.constexpr(UNSIGNED_CONSTRAINTS)
HIGH_CRUMB_QUAD_ASM = gl.constexpr(HIGH_CRUMB_ASM)  # a quad of 2-bit codes by their high bytes (HIGH_BYTES)
HIGH_BYTES_SCALE = gl.constexpr(HIGH_BYTE_FACTOR)  # what HIGH_BYTES' sums are multiplied by
HIGH_BYTES_SCALE3 = gl.constexpr(HIGH_BYTE_FACTOR3)  # the same at 3 bits (registry.GRID_CODEBOOK3)
SIGNED_CRUMB_QUAD_ASM = gl.constexpr(SIGNED_CRUMB_ASM)  # a quad of 3-bit codes: 2-bit magnitudes, signs apart
# the three crumb quads on selectors masked outside (WORD_MASKS): each word masked once, not each quad
MASKED_CRUMB_QUAD_ASM = gl.constexpr(MASKED_CRUMB_ASM)
MASKED_HIGH_CRUMB_QUAD_ASM = gl.constexpr(MASKED_HIGH_CRUMB_ASM)
MASKED_SIGNED_CRUMB_QUAD_ASM = gl.constexpr(MASKED_SIGNED_CRUMB_ASM)
WORD_MASK = gl.constexpr(CRUMB_MASKED)
SELECTOR_SIGN_MASK = gl.constexpr(SELECTOR_SIGNS)
SCALE_ASM = gl.constexpr("mul.rn.f16x2 $0, $1, $2;")
FMA_ASM = gl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")  # a x b + c on half2
HALF_FMA_ASM = gl.constexpr(tk.HALF_FMA_ASM.value)  # acc + w x scale on half2
BF16_PAIR_ADD_ASM = gl.constexpr(tk.BF16_PAIR_ADD_ASM.value)  # out[2 i], out[2 i + 1] += a half2, packed
F16_PAIR_ADD_ASM = gl.constexpr(tk.F16_PAIR_ADD_ASM.value)
# renamed after Triton 3.6 (the device's), as Triton 3.9 (CI's) calls them
barrier = getattr(gl, "thread_barrier", None) or gl.barrier
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _fragment(t, C: gl.constexpr, BITS: gl.constexpr, HIGH_HALF: gl.constexpr):
    """A thread's words [W, 32, words] (warp, lane, register) -> [W, 8, 4, C, 2] (warp, lane // 4,
    lane % 4, chunk, row half): a 4-bit word holds one row half; a 2-bit word both, row half 1's
    quads HIGH_HALF bits up (16; 0 for a table, the same for both)."""
    if BITS == 4:
        halves = gl.reshape(t, [t.shape[0], 8, 4, C, 2])
    else:
        words = gl.reshape(t, [t.shape[0], 8, 4, C])
        halves = gl.join(words, words >> HIGH_HALF)
    return halves


@gluon.jit
def _quad(words, tables, SHIFT: gl.constexpr, BITS: gl.constexpr, signs, HIGH_BYTES: gl.constexpr = False,
          MASKED: gl.constexpr = False):
    """The two half2 tiles (slots 0-1, 2-3 of the quad at bit SHIFT) of doubled words, by tqc's PRMT
    lookup; at 3 bits with their signs from `signs` (_sign_fragment's), shifted by the quad's a; at 2
    bits with HIGH_BYTES by the high bytes alone (lut.HIGH_CRUMB_ASM, its table lut.table_words(2, True)).
    MASKED (2 and 3 bits): the words are the quad's selectors already (_quads' WORD_MASKS), not shifted
    or masked again."""
    shift = words * 0 + SHIFT
    if BITS == 4:  # the signs in the same word
        sign_shift = words * 0 + SHIFT // 4
        pairs = gl.inline_asm_elementwise(QUAD_ASM, QUAD_CONSTRAINTS,
                                          [words, tables[0], tables[1], tables[2], tables[3], shift, words, sign_shift],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=2)
    elif BITS == 3:  # magnitudes as 2-bit codes, one table word of lows, one of highs
        sign_shift = words * 0 + SHIFT // 2
        signed_asm: gl.constexpr = MASKED_SIGNED_CRUMB_QUAD_ASM if MASKED else SIGNED_CRUMB_QUAD_ASM
        pairs = gl.inline_asm_elementwise(signed_asm, QUAD_CONSTRAINTS,
                                          [words, tables[0], tables[0], tables[1], tables[1], shift, signs, sign_shift],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=2)
    else:  # one table word of lows (with HIGH_BYTES all zero, unread), one of highs
        if MASKED:
            asm: gl.constexpr = MASKED_HIGH_CRUMB_QUAD_ASM if HIGH_BYTES else MASKED_CRUMB_QUAD_ASM
        else:
            asm: gl.constexpr = HIGH_CRUMB_QUAD_ASM if HIGH_BYTES else CRUMB_QUAD_ASM
        pairs = gl.inline_asm_elementwise(asm, CRUMB_QUAD_CONSTRAINTS,
                                          [words, tables[0], tables[0], tables[1], tables[1], shift],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=2)
    return pairs


@gluon.jit
def _sign_fragment(signs, C: gl.constexpr):
    """A thread's sign words [W, 32, C / 2] (3 bits) -> [W, 8, 4, C, 2] as _fragment lays out the
    magnitude words, each shifted left by 4 (chunk % 2) + 2 (row half): then a left shift by the
    quad's a brings its 4 signs to bits 7, 15, 23 and 31 (fragments.py)."""
    words = gl.reshape(signs, [signs.shape[0], 8, 4, C // 2])
    chunks = gl.reshape(gl.join(words, words << 4), [signs.shape[0], 8, 4, C])
    return gl.join(chunks, chunks << 2)


@gluon.jit
def _quads(words, tables, C: gl.constexpr, BITS: gl.constexpr = 4, HIGH_BYTES: gl.constexpr = False,
           WORD_MASKS: gl.constexpr = False):
    """A step's words [W, 32, 2C] (4 bits), [W, 32, C] (2 bits), or at 3 bits the pair (magnitude
    words [W, 32, C], sign words [W, 32, C / 2]) decoded: the four quads' values (a, b) = (0, 0),
    (0, 1), (1, 0), (1, 1), each [W, 8, 4, C, 2, 2] (warp, lane // 4, lane % 4, chunk, row half, c) in
    fp16: the operand's element (row w 16 + 8 h + lane // 4, column 32 chunk + 16 a + 8 b + 2 (lane % 4) + c).
    WORD_MASKS (2-bit code words): each word masked with lut.CRUMB_MASKED as it is and shifted by 2, and
    each of the two shifted by 16 for row half 1 after, so that a word's four selectors take 2 masks and
    3 shifts instead of 4 and 3."""
    if BITS == 3:
        words, sign_words = words
        if len(tables) == 4:  # the 8 signed values: the signs go into the selectors (fragments.SIGN_SELECTORS)
            return _signed_selector_quads(words, sign_words, tables, C, HIGH_BYTES)
    MASKED: gl.constexpr = WORD_MASKS and BITS != 4
    if MASKED:  # each word masked twice (crumbs at bits 0 and 2 of its nibbles), row half 1 shifted down after
        halves = _fragment(words & WORD_MASK, C, BITS, 16)
        odd_halves = _fragment((words >> 2) & WORD_MASK, C, BITS, 16)
        odd_doubled = gl.join(odd_halves, odd_halves)
    else:
        halves = _fragment(words, C, BITS, 16)
    doubled = gl.join(halves, halves)
    signs = 0
    if BITS == 3:  # the same registers, but reached by reshapes: a linear layout, made the magnitudes' (no data moves)
        signs = _sign_fragment(sign_words, C)
        signs = gl.convert_layout(gl.join(signs, signs), doubled.type.layout, assert_trivial=True)
    first, second = _quad(doubled, tables, 0, BITS, signs, HIGH_BYTES, MASKED)
    if MASKED:
        third, fourth = _quad(odd_doubled, tables, 2, BITS, signs, HIGH_BYTES, MASKED)
    else:
        third, fourth = _quad(doubled, tables, 16 if BITS == 4 else 2, BITS, signs, HIGH_BYTES)
    return first, second, third, fourth


@gluon.jit
def _signed_selector_quads(words, sign_words, tables, C: gl.constexpr, HIGH_BYTES: gl.constexpr = False):
    """_quads of 3-bit codes in SIGN_SELECTORS' layout (fragments.py): each magnitude word masked once a
    quad column a (lut.CRUMB_MASKED, shifted by 2 a first) and its signs put beside the magnitudes, at
    bit 2 of each nibble (the sign word of chunks 2 i + e holds those of quad column a at bit 2 e + a
    of each nibble: shifted by 2 - 2 e - a, masked with lut.SELECTOR_SIGNS), so that each selector
    nibble is a signed code that looks its value up in the 8-value table (4 words: lut.table_words(3,
    signed=True)) by MASKED_CRUMB_QUAD_ASM, with no sign step; row half 1's quads 16 bits up. HIGH_BYTES: by
    their high bytes alone (MASKED_HIGH_CRUMB_QUAD_ASM; the table of lut.high_byte_signed_values)."""
    magnitudes = gl.reshape(words, [words.shape[0], 8, 4, C])
    signs = gl.reshape(sign_words, [sign_words.shape[0], 8, 4, C // 2])
    first_signs = _chunk_signs(gl.join(signs << 2, signs), magnitudes)
    second_signs = _chunk_signs(gl.join(signs << 1, signs >> 1), magnitudes)
    first_half = _selector_halves((magnitudes & WORD_MASK) | first_signs)
    second_half = _selector_halves(((magnitudes >> 2) & WORD_MASK) | second_signs)
    first, second = _signed_quad(first_half, tables, HIGH_BYTES)
    third, fourth = _signed_quad(second_half, tables, HIGH_BYTES)
    return first, second, third, fourth


@gluon.jit
def _chunk_signs(pairs, magnitudes):
    """[W, 8, 4, C / 2, 2] sign words (chunk 2 i + e's at [..., i, e]), masked to the selectors' sign bits,
    as [W, 8, 4, C] in the magnitudes' layout (the same registers: no data moves)."""
    signs = gl.reshape(pairs, magnitudes.shape) & SELECTOR_SIGN_MASK
    return gl.convert_layout(signs, magnitudes.type.layout, assert_trivial=True)


@gluon.jit
def _selector_halves(selectors):
    """[W, 8, 4, C] selector words (row half 0's quad in the low 16 bits, row half 1's in the high) ->
    [W, 8, 4, C, 2, 2] (row half, the pair the PTX packs), row half 1's shifted down."""
    halves = gl.join(selectors, selectors >> 16)
    return gl.join(halves, halves)


@gluon.jit
def _signed_quad(selectors, tables, HIGH_BYTES: gl.constexpr = False):
    """The two half2 tiles of a quad whose selector nibbles are signed 3-bit codes, by the 8-value table (with
    HIGH_BYTES by its high bytes alone)."""
    shift = selectors * 0
    asm: gl.constexpr = MASKED_HIGH_CRUMB_QUAD_ASM if HIGH_BYTES else MASKED_CRUMB_QUAD_ASM
    return gl.inline_asm_elementwise(asm, CRUMB_QUAD_CONSTRAINTS,
                                     [selectors, tables[0], tables[1], tables[2], tables[3], shift],
                                     dtype=(gl.float16, gl.float16), is_pure=True, pack=2)


@gluon.jit
def _decode(words, tables, C: gl.constexpr, A_LAYOUT: gl.constexpr, BITS: gl.constexpr = 4):
    """[16 W, 32 C] fp16 in wgmma's operand layout from a step's words (_quads')."""
    first, second, third, fourth = _quads(words, tables, C, BITS)
    values = gl.join(gl.join(first, second), gl.join(third, fourth))  # [w, l//4, l%4, ch, h, c, b, a]
    values = gl.permute(values, (0, 4, 1, 3, 7, 6, 2, 5))  # [w, h, l//4, ch, a, b, l%4, c]
    values = gl.reshape(values, [16 * first.shape[0], 32 * C])
    return gl.convert_layout(values, A_LAYOUT, assert_trivial=True)


@gluon.jit
def _operand_quads(tile, like, C: gl.constexpr):
    """_decode undone: a [16 W, 32 C] tile in wgmma's operand layout (the activations, a row's scale
    broadcast) as _quads' four quads, in the layout of `like` (a quad of _quads'; asserted trivial:
    each element in the register of the weight it meets)."""
    values = gl.reshape(tile, [like.shape[0], 2, 8, C, 2, 2, 4, 2])  # [w, h, l//4, ch, a, b, l%4, c]
    return _split_quads(gl.permute(values, (0, 2, 6, 3, 1, 7, 5, 4)), like)


@gluon.jit
def _split_quads(values, like):
    """[w, l//4, l%4, ch, h, c, b, a] values as _quads' four quads (a, b), in the layout of `like`
    (asserted trivial: no data moves)."""
    low, high = gl.split(values)
    first, second = gl.split(low)
    third, fourth = gl.split(high)
    return (gl.convert_layout(first, like.type.layout, assert_trivial=True),
            gl.convert_layout(second, like.type.layout, assert_trivial=True),
            gl.convert_layout(third, like.type.layout, assert_trivial=True),
            gl.convert_layout(fourth, like.type.layout, assert_trivial=True))


@gluon.jit
def _ordered_quads(x_ptr, like, C: gl.constexpr, W: gl.constexpr):
    """A step's activations stored in fragment order (fragments.fragment_input_order: lane l % 4's 8 C
    inputs contiguous) as _operand_quads makes them from natural order, in the layout of `like`: each
    thread loads its 8 C inputs as 16-byte vectors (the 8 threads of a row quad and the warps read
    the same ones), then both row halves take them (asserted trivial)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8 * C], [32, 1], [W, 1], [1, 0])
    threads = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, layout))
    inputs = gl.arange(0, 8 * C, layout=gl.SliceLayout(0, layout))
    x = gl.load(x_ptr + (threads % 4)[:, None] * (8 * C) + inputs[None, :])
    values = gl.reshape(x, [W, 8, 4, C, 2, 2, 2])  # [w, l//4, l%4, ch, a, b, c]
    return _split_quads(gl.permute(gl.join(values, values), (0, 1, 2, 3, 7, 6, 5, 4)), like)  # both row halves


@gluon.jit
def _chunks(quad, C: gl.constexpr):
    """A quad [W, 8, 4, C, 2, 2] as C tensors [W, 8, 4, 2, 2], one a chunk (in a thread's registers: no data moves)."""
    chunks = (gl.permute(quad, (0, 1, 2, 4, 5, 3)),)  # the chunk last
    for _ in gl.static_range(C.bit_length() - 1):  # halve every tensor's chunks
        halved = ()
        for j in gl.static_range(len(chunks)):
            chunk = chunks[j]
            low, high = gl.split(gl.reshape(chunk, chunk.shape[:-1] + [chunk.shape[-1] // 2, 2]))
            halved = halved + (low, high)
        chunks = halved
    rows = ()
    for j in gl.static_range(len(chunks)):
        rows = rows + (gl.reshape(chunks[j], chunks[j].shape[:-1]),)
    return rows


@gluon.jit
def _row_products(products, quads, x_quads, C: gl.constexpr, FIRST: gl.constexpr):
    """products [W, 8, 4, 2, 2] (a thread's two rows, a half2 each) plus the step's unscaled weights x
    inputs summed along the row: one HFMA2 a weight pair (the first, where FIRST, an HMUL2)."""
    for q in gl.static_range(4):
        weights = _chunks(quads[q], C)
        x = _chunks(x_quads[q], C)
        for j in gl.static_range(C):
            x_chunk = gl.convert_layout(x[j], weights[j].type.layout, assert_trivial=True)
            if FIRST and q == 0 and j == 0:
                products = gl.inline_asm_elementwise(SCALE_ASM, "=r,r,r", [weights[j], x_chunk], dtype=gl.float16,
                                                     is_pure=True, pack=2)
            else:
                products = gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [weights[j], x_chunk, products],
                                                     dtype=gl.float16, is_pure=True, pack=2)
    return products


@gluon.jit
def _row_scale(scales, tile, like, C: gl.constexpr):
    """The rows' scale (at `scales`, in the operand's row layout) as _row_products' sums hold the rows,
    reached through a [16 W, 32 C] `tile` in the operand layout and a quad `like` (_operand_quads)."""
    scale, _ = gl.broadcast(gl.load(scales)[:, None], tile)
    return _chunks(_operand_quads(scale, like, C)[0], C)[0]


@gluon.jit
def _scaled_into(acc, products, scale):
    """acc + products x scale (_row_products', _row_scale's): a HFMA2 a row and thread."""
    products = gl.convert_layout(products, acc.type.layout, assert_trivial=True)
    scale = gl.convert_layout(scale, acc.type.layout, assert_trivial=True)
    return gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [products, scale, acc], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _scaled_weights(words, scales, res_words, res_scales, tables, res_tables, C: gl.constexpr, A_LAYOUT: gl.constexpr,
                    RES_BITS: gl.constexpr, BITS: gl.constexpr):
    """A step's weights in wgmma's operand layout: its words decoded and scaled by the row's scale
    (`scales` points at it), plus with RES_BITS the residual stage's, decoded by its own tables and
    scaled (HFMA2)."""
    weights = _decode(words, tables, C, A_LAYOUT, BITS)
    scale, _ = gl.broadcast(gl.load(scales)[:, None], weights)
    weights = gl.inline_asm_elementwise(SCALE_ASM, "=r,r,r", [weights, scale], dtype=gl.float16, is_pure=True, pack=2)
    if RES_BITS:
        residual = _decode(res_words, res_tables, C, A_LAYOUT, RES_BITS)
        res_scale, _ = gl.broadcast(gl.load(res_scales)[:, None], residual)
        weights = gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [residual, res_scale, weights], dtype=gl.float16,
                                            is_pure=True, pack=2)
    return weights


@gluon.jit
def _gemv_step(acc, products, words, scales, tables, x, C: gl.constexpr, A_LAYOUT: gl.constexpr, BITS: gl.constexpr,
               STEP: gl.constexpr, RUN: gl.constexpr):
    """(acc, products) after one step of one token, elementwise in fp16, the row's scale at `scales`.
    RUN 1: acc + W x scale (HMUL2, HFMA2 a weight pair). RUN > 1 (a group's steps, STEP of them
    done): the run's unscaled products summed (HMUL2, then HFMA2 a weight pair), and scaled into acc
    once, at its last step (HFMA2)."""
    if RUN == 1:
        scale = gl.load(scales)
    weights = _decode(words, tables, C, A_LAYOUT, BITS)
    x, _ = gl.broadcast(x[None, :], acc)
    if RUN == 1:
        scale, _ = gl.broadcast(scale[:, None], acc)
        acc = gl.inline_asm_elementwise(HALF_FMA_ASM, "=r,r,r,r,r", [weights, x, scale, acc], dtype=gl.float16,
                                        is_pure=True, pack=2)
    else:
        if STEP == 0:
            products = gl.inline_asm_elementwise(SCALE_ASM, "=r,r,r", [weights, x], dtype=gl.float16, is_pure=True,
                                                 pack=2)
        else:
            products = gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [weights, x, products], dtype=gl.float16,
                                                 is_pure=True, pack=2)
        if STEP == RUN - 1:
            scale, _ = gl.broadcast(gl.load(scales)[:, None], acc)
            acc = gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [products, scale, acc], dtype=gl.float16,
                                            is_pure=True, pack=2)
    return acc, products


@gluon.jit
def _load_codes(pointers, EVICT: gl.constexpr):
    """A step's code words; EVICT: marked to leave L1 first, as tqc's Triton kernels do (each word is read once)."""
    if EVICT:
        words = gl.load(pointers, eviction_policy="evict_first")
    else:
        words = gl.load(pointers)
    return words


@gluon.jit
def _thread_codes(codes_ptr, block, first_step, STEPS: gl.constexpr, WORDS: gl.constexpr, W: gl.constexpr):
    """Pointers to this thread's words of the program's first step: a step's words of a 64-row block
    are [BLOCK_WARPS warps, 32 lanes, WORDS], contiguous per thread, and a block's steps follow each
    other (kernels/fragments.py); a program of W warps takes W / BLOCK_WARPS neighbouring blocks."""
    words_layout: gl.constexpr = thread_words_layout(WORDS, W)
    warp = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, words_layout)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, words_layout)))
    register = gl.arange(0, WORDS, layout=gl.SliceLayout(0, gl.SliceLayout(1, words_layout)))
    warp_block = block * (W // BLOCK_WARPS) + warp // BLOCK_WARPS
    thread_words = ((warp % BLOCK_WARPS)[:, None, None] * 32 + lane[None, :, None]) * WORDS + register[None, None, :]
    return codes_ptr + ((warp_block * STEPS + first_step) * (BLOCK_WARPS * 32 * WORDS))[:, None, None] + thread_words


@gluon.jit
def _tables(table_ptr, C: gl.constexpr, W: gl.constexpr, BITS: gl.constexpr, SIGN_SELECTORS: gl.constexpr = False):
    """The PRMT table words (4 for 4 bits, 2 for 2 and 3, 4 for 3 with SIGN_SELECTORS: lut.table_words) in
    the decoded words' layout, each lane its own copy."""
    WORDS: gl.constexpr = thread_word_count(32 * C, BITS)
    TABLE_WORDS: gl.constexpr = 4 if BITS == 4 or (BITS == 3 and SIGN_SELECTORS) else 2
    words_layout: gl.constexpr = thread_words_layout(WORDS, W)
    warp = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, words_layout)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, words_layout)))
    copy = (lane[None, :, None] % COPIES) * TABLE_WORDS + warp[:, None, None] * 0
    zeros = gl.zeros([W, 32, WORDS], gl.int32, words_layout)
    tables = ()
    for j in gl.static_range(TABLE_WORDS):
        table = _fragment(gl.load(table_ptr + copy + j) + zeros, C, BITS, 0)
        tables = tables + (gl.join(table, table),)
    return tables


@triton.constexpr_function
def thread_words_layout(words, warps):
    """A step's code words [warps, 32 lanes, words], each thread its own words, contiguous."""
    return gl.BlockedLayout([1, 1, words], [1, 32, 1], [warps, 1, 1], [2, 1, 0])


@triton.constexpr_function
def thread_word_count(block_k, bits):
    """A thread's code words a step of block_k inputs: 2 C for 4 bits, C for 2 and for 3 bits' magnitudes
    (fragments.PLANE_CODES; 3 bits' signs: C / 2 more, in their own plane)."""
    return block_k // 32 * (2 if bits == 4 else 1)


@gluon.jit
def _copy_codes(codes, step_words, ITERS: gl.constexpr, WORDS: gl.constexpr, W: gl.constexpr, EVICT: gl.constexpr):
    """Every step's code words of the program copied into shared memory asynchronously (cp.async), a
    commit group a step, so that all are in flight at once (ptxas keeps only a step or two of register
    loads in flight, whatever the source asks); each thread copies, and later reads, its own words."""
    words = gl.allocate_shared_memory(gl.int32, [ITERS, W, 32, WORDS],
                                      gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0]))
    for i in gl.static_range(ITERS):
        if EVICT:
            async_load(words.index(i), codes + i * step_words, eviction_policy="evict_first")
        else:
            async_load(words.index(i), codes + i * step_words)
        async_copy.commit_group()
    return words


@gluon.jit
def _copied_words(words, i: gl.constexpr, ITERS: gl.constexpr, WORDS: gl.constexpr, W: gl.constexpr):
    """Step i's words from _copy_codes, once its group has landed."""
    async_copy.wait_group(ITERS - 1 - i)
    return words.index(i).load(thread_words_layout(WORDS, W))


@gluon.jit
def _first_words(codes, step_words, ITERS: gl.constexpr, LOOKAHEAD: gl.constexpr, EVICT: gl.constexpr,
                 PRESENT: gl.constexpr):
    """The code words of a program's first LOOKAHEAD steps, a load each (none where not PRESENT)."""
    loaded = ()
    if PRESENT:
        for j in gl.static_range(LOOKAHEAD):
            if j < ITERS:
                loaded = loaded + (_load_codes(codes + j * step_words, EVICT),)
    return loaded


@gluon.jit
def _step_words(loaded, copied, codes, step_words, i: gl.constexpr, ITERS: gl.constexpr, LOOKAHEAD: gl.constexpr,
                WORDS: gl.constexpr, W: gl.constexpr, EVICT: gl.constexpr, STAGED: gl.constexpr,
                PRELOADED: gl.constexpr):
    """(loaded, step i's words) of the unrolled step loop: from shared memory (STAGED), or from
    registers loaded LOOKAHEAD steps ahead (`loaded` grows by one load a step; PRELOADED: it came
    with the first LOOKAHEAD steps' words, _first_words)."""
    if STAGED:
        words = _copied_words(copied, i, ITERS, WORDS, W)
    else:
        if i == 0 and not PRELOADED:
            loaded = _first_words(codes, step_words, ITERS, LOOKAHEAD, EVICT, True)
        if i + LOOKAHEAD < ITERS:
            loaded = loaded + (_load_codes(codes + (i + LOOKAHEAD) * step_words, EVICT),)
        words = loaded[i]
    return loaded, words


@gluon.jit
def _more_words(loaded, codes, i: gl.constexpr, ITERS: gl.constexpr, LOOKAHEAD: gl.constexpr, WORDS: gl.constexpr,
                W: gl.constexpr, EVICT: gl.constexpr, PRESENT: gl.constexpr, PRELOADED: gl.constexpr):
    """_step_words for another set of code words a step (the residual stage's, 3 bits' signs), WORDS a
    thread, loaded into registers; or nothing where the kernel has none (not PRESENT)."""
    words = 0
    if PRESENT:
        loaded, words = _step_words(loaded, codes, codes, BLOCK_WARPS * 32 * WORDS, i, ITERS, LOOKAHEAD, WORDS, W,
                                    EVICT, False, PRELOADED)
    return loaded, words


@gluon.jit
def _base_words(loaded, sign_loaded, copied, codes, sign_codes, step_words, i: gl.constexpr, ITERS: gl.constexpr,
                LOOKAHEAD: gl.constexpr, BLOCK_K: gl.constexpr, W: gl.constexpr, EVICT: gl.constexpr,
                STAGED: gl.constexpr, BITS: gl.constexpr, PRELOADED: gl.constexpr):
    """(loaded, sign_loaded, step i's words of the base stage): _step_words' words, at 3 bits paired
    with their sign words (_decode)."""
    loaded, words = _step_words(loaded, copied, codes, step_words, i, ITERS, LOOKAHEAD,
                                thread_word_count(BLOCK_K, BITS), W, EVICT, STAGED, PRELOADED)
    sign_loaded, signs = _more_words(sign_loaded, sign_codes, i, ITERS, LOOKAHEAD, BLOCK_K // 64, W, EVICT, BITS == 3,
                                     PRELOADED)
    if BITS == 3:
        words = (words, signs)
    return loaded, sign_loaded, words


@gluon.jit
def _stage_words(state, copied, codes, res_codes, sign_codes, step_words, i: gl.constexpr, ITERS: gl.constexpr,
                 LOOKAHEAD: gl.constexpr, BLOCK_K: gl.constexpr, W: gl.constexpr, EVICT: gl.constexpr,
                 STAGED: gl.constexpr, BITS: gl.constexpr, RES_BITS: gl.constexpr, PRELOADED: gl.constexpr):
    """(state, step i's words of the base stage, of the residual stage) of the unrolled step loop:
    _base_words' and _more_words'; state = (loaded, res_loaded, sign_loaded), their loads so far."""
    loaded, res_loaded, sign_loaded = state
    loaded, sign_loaded, words = _base_words(loaded, sign_loaded, copied, codes, sign_codes, step_words, i, ITERS,
                                             LOOKAHEAD, BLOCK_K, W, EVICT, STAGED, BITS, PRELOADED)
    res_loaded, res_words = _more_words(res_loaded, res_codes, i, ITERS, LOOKAHEAD,
                                        thread_word_count(BLOCK_K, RES_BITS), W, EVICT, RES_BITS > 0, PRELOADED)
    return (loaded, res_loaded, sign_loaded), words, res_words


@gluon.jit
def _sign_codes(codes_ptr, first_step, N: gl.constexpr, K: gl.constexpr, BLOCK_K: gl.constexpr, W: gl.constexpr,
                BITS: gl.constexpr):
    """At 3 bits, pointers to this thread's sign words of the program's first step (the sign plane
    follows the N K / 16 magnitude words), else codes_ptr (never read)."""
    signs = codes_ptr
    if BITS == 3:
        signs = _thread_codes(codes_ptr + N * K // 16, gl.program_id(0), first_step, K // BLOCK_K, BLOCK_K // 64, W)
    return signs


@gluon.jit
def _wait_for_previous_kernel(PDL: gl.constexpr):
    """Under programmatic dependent launch (sm_90): wait for the previous kernel (the rotation, which
    writes the activations and zeroes the output), then let the next one launch (as the lookup
    kernels' triton_kernels.pdl_start)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@triton.constexpr_function
def staging_layout(block_k, warps):
    """A [16, block_k] activation tile over 32 warps threads, each its own run of columns, none twice."""
    columns = 16 * block_k // (32 * warps)  # a thread's
    lanes_across = block_k // columns
    return gl.BlockedLayout([1, columns], [32 // lanes_across, lanes_across], [warps, 1], [1, 0])


@triton.constexpr_function
def pair_layout(warps):
    """[16 warps rows, 16 tokens] over the threads, each 2 neighbouring rows x 4 tokens, none twice."""
    return gl.BlockedLayout([2, 4], [8, 4], [warps, 1], [0, 1])


@triton.constexpr_function
def accumulator_layout(warps, tokens=16):
    """wgmma's accumulator over 16 rows a warp and n = `tokens` tokens."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, tokens, 16])


@triton.constexpr_function
def operand_layout(warps, tokens=16):
    """wgmma's register operand A in fp16 (for products over `tokens` tokens): where the decoded weights land."""
    return gl.DotOperandLayout(operand_index=0, parent=accumulator_layout(warps, tokens), k_width=2)


@gluon.jit
def _program_codes(codes_ptr, table_ptr, scales_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, N: gl.constexpr,
                   K: gl.constexpr, G: gl.constexpr, BLOCK_K: gl.constexpr, ITERS: gl.constexpr, W: gl.constexpr,
                   EVICT: gl.constexpr, STAGED: gl.constexpr, PDL: gl.constexpr, BITS: gl.constexpr,
                   RES_BITS: gl.constexpr, LOOKAHEAD: gl.constexpr, PRELOAD: gl.constexpr,
                   TOKEN_TILE: gl.constexpr = 16, SIGN_SELECTORS: gl.constexpr = False):
    """What a program reads its weights with, for products over TOKEN_TILE tokens: (first step, its rows
    in the operand's row layout, their scale pointers (a step's group: (first_step + i) * BLOCK_K // G
    on), this thread's code pointers,
    words a step, the PRMT tables, with STAGED every step's words already in flight to shared
    memory, else the pointers again; then the residual stage's code pointers, scale pointers and
    tables (the base's where the widths match: one codebook a width), read only where the kernel
    has one; the sign words' pointers (_sign_codes); and with PRELOAD the first LOOKAHEAD steps'
    words of the base stage, the residual stage and the signs, each a tuple of loads (else empty)).
    It reads only the read-only weights, so under programmatic dependent launch (PDL) it runs while
    the rotation finishes, and waits for it last: with PRELOAD the first steps' trips to memory
    overlap the rotation too."""
    C: gl.constexpr = BLOCK_K // 32
    WORDS: gl.constexpr = thread_word_count(BLOCK_K, BITS)
    first_step = gl.program_id(1) * ITERS
    rows = gl.program_id(0) * 16 * W + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, operand_layout(W, TOKEN_TILE)))
    codes = _thread_codes(codes_ptr, gl.program_id(0), first_step, K // BLOCK_K, WORDS, W)
    res_codes = codes
    tables = _tables(table_ptr, C, W, BITS, SIGN_SELECTORS)
    res_tables = tables
    if RES_BITS:
        RES_WORDS: gl.constexpr = thread_word_count(BLOCK_K, RES_BITS)
        res_codes = _thread_codes(res_codes_ptr, gl.program_id(0), first_step, K // BLOCK_K, RES_WORDS, W)
        if RES_BITS != BITS:
            res_tables = _tables(res_table_ptr, C, W, RES_BITS)
    step_words: gl.constexpr = BLOCK_WARPS * 32 * WORDS
    copied = codes
    if STAGED:
        copied = _copy_codes(codes, step_words, ITERS, WORDS, W, EVICT)
    sign_codes = _sign_codes(codes_ptr, first_step, N, K, BLOCK_K, W, BITS)
    first = ((), (), ())
    if PRELOAD:
        RES_STEP: gl.constexpr = BLOCK_WARPS * 32 * thread_word_count(BLOCK_K, RES_BITS)
        first = (_first_words(codes, step_words, ITERS, LOOKAHEAD, EVICT, not STAGED),
                 _first_words(res_codes, RES_STEP, ITERS, LOOKAHEAD, EVICT, RES_BITS > 0),
                 _first_words(sign_codes, BLOCK_WARPS * 32 * (BLOCK_K // 64), ITERS, LOOKAHEAD, EVICT, BITS == 3))
    _wait_for_previous_kernel(PDL)
    row_scales = rows * (K // G)
    return (first_step, rows, scales_ptr + row_scales, codes, step_words, tables, copied, res_codes,
            res_scales_ptr + row_scales, res_tables, sign_codes, first)


@gluon.jit
def fragment_dot_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                        M, N: gl.constexpr, K: gl.constexpr, G: gl.constexpr, BLOCK_K: gl.constexpr,
                        ITERS: gl.constexpr, X_LAYOUT: gl.constexpr, LOOKAHEAD: gl.constexpr, num_warps: gl.constexpr,
                        EVICT: gl.constexpr = False, STAGED: gl.constexpr = False, PDL: gl.constexpr = False,
                        RES_BITS: gl.constexpr = 0, BITS: gl.constexpr = 4, SCALE_AFTER: gl.constexpr = False,
                        PRELOAD: gl.constexpr = False, TOKEN_TILE: gl.constexpr = 16, X_STAGES: gl.constexpr = 0,
                        SIGN_SELECTORS: gl.constexpr = False):
    """out[M, N] += x @ W^T over this program's 16 num_warps rows, ITERS steps of BLOCK_K inputs (G a
    multiple of BLOCK_K) and TOKEN_TILE tokens (wgmma's n: 16, or up to 128 for a prompt or a batch), on
    tensor cores; grid (N / BLOCK_N, splits, token tiles): each program decodes its weights once for
    its tile's tokens. x: fp16, or bf16 turned to fp16
    as it is loaded (a layer whose input arrives rotated reads attention's output as it comes:
    FragmentLayerKernel.takes_input_as_it_comes). The steps are unrolled, each
    step's code words loaded LOOKAHEAD steps before it decodes. BITS: 4, 3 or 2 (fragments.py).
    RES_BITS: W adds a residual stage of 4 or 2 bits in the same layout (res_codes_ptr,
    res_scales_ptr, res_table_ptr; with RES_BITS 0 they are never read). SCALE_AFTER (as the family
    launches it; checked on a GPU, run 125): the tensor cores multiply the unscaled weights, each stage into an
    accumulator of its own over a group's steps (where ITERS covers whole groups, else a step), which
    is then scaled into the sums in float32 (_scaled_products): 8 FFMA a thread, stage and group
    instead of an HMUL2 (HFMA2) a weight pair. PRELOAD (the lab's; timed in run 129, its sums not yet
    checked on a GPU): the first LOOKAHEAD steps' code words are loaded before the wait for the
    previous kernel (_program_codes). X_STAGES (tiles above 16 tokens; 0: every step's activations
    held at once): a ring of that many steps' activations in shared memory, the next ones loaded
    while a step multiplies, so that a program's steps, and not its shared memory, set how often K
    is split (_ring_step)."""
    gl.static_assert(not ((RES_BITS or BITS == 3) and STAGED), "STAGED copies one set of words only")
    W: gl.constexpr = num_warps
    BLOCK_N: gl.constexpr = 16 * W
    C: gl.constexpr = BLOCK_K // 32
    mma_layout: gl.constexpr = accumulator_layout(W, TOKEN_TILE)
    a_layout: gl.constexpr = operand_layout(W, TOKEN_TILE)
    x_load_layout: gl.constexpr = staging_layout(BLOCK_K, W)
    (first_step, rows, scales, codes, step_words, tables, copied, res_codes, res_scales, res_tables, sign_codes,
     first) = _program_codes(codes_ptr, table_ptr, scales_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, N, K, G,
                             BLOCK_K, ITERS, W, EVICT, STAGED, PDL, BITS, RES_BITS, LOOKAHEAD, PRELOAD, TOKEN_TILE,
                             SIGN_SELECTORS)
    first_token = gl.program_id(2) * TOKEN_TILE  # this program's tile of tokens, as if they were all there are
    x_ptr += first_token * K
    out_ptr += first_token * N
    M -= first_token

    # the activations of every step, into shared memory once: [ITERS, TOKEN_TILE, BLOCK_K]; or of the
    # ring's first X_STAGES - 1 steps, [X_STAGES, TOKEN_TILE, BLOCK_K]
    SLOTS: gl.constexpr = X_STAGES if X_STAGES else ITERS
    AHEAD: gl.constexpr = X_STAGES - 1  # steps of activations a ring holds ahead
    x_smem = gl.allocate_shared_memory(gl.float16, [SLOTS, TOKEN_TILE, BLOCK_K], X_LAYOUT)
    tokens = gl.arange(0, TOKEN_TILE, layout=gl.SliceLayout(1, x_load_layout))
    columns = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_load_layout))
    offsets = tokens[:, None] * K + first_step * BLOCK_K + columns[None, :]
    if TOKEN_TILE == TOKENS:  # loaded together, then stored
        tiles = ()
        for i in gl.static_range(ITERS):
            tiles = tiles + (_x_step(x_ptr, offsets, i, tokens, M, BLOCK_K),)
        for i in gl.static_range(ITERS):
            x_smem.index(i).store(tiles[i])
    else:  # a larger tile step by step (its registers)
        for i in gl.static_range(AHEAD if X_STAGES else ITERS):
            x_smem.index(i).store(_x_step(x_ptr, offsets, i, tokens, M, BLOCK_K))
    fence_async_shared()
    barrier()

    acc = gl.zeros([BLOCK_N, TOKEN_TILE], gl.float32, mma_layout)
    products, res_products = acc, acc  # SCALE_AFTER's, a stage each
    RUN: gl.constexpr = G // BLOCK_K if ITERS % (G // BLOCK_K) == 0 else 1
    row_scales = (gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))) * (K // G)
    state = first
    for i in gl.static_range(ITERS):
        state, words, res_words = _stage_words(state, copied, codes, res_codes, sign_codes, step_words, i, ITERS,
                                               LOOKAHEAD, BLOCK_K, W, EVICT, STAGED, BITS, RES_BITS, PRELOAD)
        group = (first_step + i) * BLOCK_K // G
        ahead = 0
        if X_STAGES and i + AHEAD < ITERS:  # in flight while this step decodes and multiplies
            ahead = _x_step(x_ptr, offsets, i + AHEAD, tokens, M, BLOCK_K)
        x = x_smem.index(i % SLOTS).permute((1, 0))
        if SCALE_AFTER:
            products = warpgroup_mma(_decode(words, tables, C, a_layout, BITS), x, products, use_acc=i % RUN != 0)
            if RES_BITS:
                res_products = warpgroup_mma(_decode(res_words, res_tables, C, a_layout, RES_BITS), x, res_products,
                                             use_acc=i % RUN != 0)
            if i % RUN == RUN - 1:
                acc = _scaled_products(acc, products, scales_ptr + row_scales + group)
                if RES_BITS:
                    acc = _scaled_products(acc, res_products, res_scales_ptr + row_scales + group)
        else:
            weights = _scaled_weights(words, scales + group, res_words, res_scales + group, tables, res_tables, C,
                                      a_layout, RES_BITS, BITS)
            acc = warpgroup_mma(weights, x, acc)
        if X_STAGES and i + AHEAD < ITERS:
            _ring_step(x_smem, ahead, (i + AHEAD) % X_STAGES)

    _add_into(out_ptr, acc, gl.program_id(0) * BLOCK_N, M, N, W)


@gluon.jit
def _x_step(x_ptr, offsets, i: gl.constexpr, tokens, M, BLOCK_K: gl.constexpr):
    """Step i's activations [TOKEN_TILE, BLOCK_K] as fp16, the tokens from M on zero."""
    return gl.load(x_ptr + offsets + i * BLOCK_K, mask=(tokens < M)[:, None], other=0.0).to(gl.float16)


@gluon.jit
def _ring_step(x_smem, tile, slot: gl.constexpr):
    """A later step's activations into the ring's `slot`, the one the step before this one read: every
    warp has multiplied by it, as the barrier closing that step's _ring_step says (its products are
    synchronous); this barrier then makes the tile visible to the steps after."""
    x_smem.index(slot).store(tile)
    fence_async_shared()
    barrier()


@gluon.jit
def _scaled_products(acc, products, scales):
    """acc + products x the rows' scales (at `scales`, in the accumulator's row layout), in float32."""
    return acc + products * gl.load(scales).to(gl.float32)[:, None]


@gluon.jit
def _add_into(out_ptr, acc, first_row, M, N: gl.constexpr, W: gl.constexpr):
    """out[token, first_row + r] += acc[r, token] for the M tokens: float32 by atomic adds; 16 bits by
    packed reductions of neighbouring rows (triton_kernels.PAIR_ADD_ASM), as sm_90 has no scalar 16-bit
    atomic add and Triton makes each a compare-and-swap loop (3x slower layers, run 113)."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    dtype: gl.constexpr = out_ptr.dtype.element_ty
    pairs: gl.constexpr = pair_layout(W)
    values = gl.convert_layout(acc, pairs).to(dtype)
    rows = first_row + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, pairs))
    tokens = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, pairs))
    offsets = tokens[None, :] * N + rows[:, None]
    valid = (tokens < M)[None, :] & (rows >= 0)[:, None]
    if dtype == gl.float32:
        gl.atomic_add(out_ptr + offsets, values, mask=valid, sem="relaxed")
    else:
        low, high = _row_pairs(values)
        first, _ = _row_pairs(offsets)
        live, _ = _row_pairs(valid.to(gl.int32))
        asm: gl.constexpr = BF16_PAIR_ADD_ASM if dtype == gl.bfloat16 else F16_PAIR_ADD_ASM
        gl.inline_asm_elementwise(asm, "=r,l,h,h,r", [(out_ptr + first).to(gl.int64, bitcast=True), low, high, live],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _row_pairs(tile):
    """[R, T] -> (rows 0, 2, 4, ..., rows 1, 3, 5, ...), each [R / 2, T], without moving data (a thread holds both)."""
    R: gl.constexpr = tile.shape[0]
    T: gl.constexpr = tile.shape[1]
    return gl.split(gl.permute(gl.reshape(tile, [R // 2, 2, T]), (0, 2, 1)))


@gluon.jit
def fragment_gemv_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                         M, N: gl.constexpr, K: gl.constexpr, G: gl.constexpr, BLOCK_K: gl.constexpr,
                         ITERS: gl.constexpr, X_LAYOUT: gl.constexpr, LOOKAHEAD: gl.constexpr, num_warps: gl.constexpr,
                         EVICT: gl.constexpr = False, STAGED: gl.constexpr = False, PDL: gl.constexpr = False,
                         RES_BITS: gl.constexpr = 0, BITS: gl.constexpr = 4, SUM_STEPS: gl.constexpr = False,
                         ROW_SUMS: gl.constexpr = False, X_ORDERED: gl.constexpr = False, PRELOAD: gl.constexpr = False,
                         HIGH_BYTES: gl.constexpr = False, WORD_MASKS: gl.constexpr = False,
                         SIGN_SELECTORS: gl.constexpr = False):
    """fragment_dot_kernel for one token on CUDA cores, from the same fragment layout: each thread multiplies its
    decoded weights by the inputs they meet and sums in fp16 over the program's steps; then the row
    sums in float32 across the four lanes that share a row, added into out as fragment_dot_kernel adds
    (_add_into). M is 1; X_LAYOUT is unused (fragment_dot_kernel's signature). With RES_BITS the two
    stages' weights are summed first (HMUL2, HFMA2), then multiplied (HFMA2). SUM_STEPS (the lab's,
    checked on a GPU, run 124): without a residual, where ITERS covers whole groups, a group's steps
    sum their unscaled products and scale them once (_gemv_step's RUN). ROW_SUMS (as the family
    launches it; checked on a GPU, run 125): each thread sums a step's unscaled products along each of its two rows
    (_row_products: one HFMA2 a weight pair, the residual stage's apart) and scales them into its
    row sums once (_scaled_into), or once a group's steps with SUM_STEPS, residual or not. X_ORDERED
    (the lab's, with ROW_SUMS; not yet checked on a GPU): x is stored in fragment order
    (fragments.fragment_input_order), so each thread loads its inputs as two 16-byte vectors a step
    instead of eight 4-byte words (_ordered_quads). PRELOAD: as fragment_dot_kernel's. HIGH_BYTES (2 bits, no
    residual, ROW_SUMS; as the family launches it, checked on a GPU, run 225): the codes looked up by their high
    bytes in a table of scaled values (lut.HIGH_CRUMB_ASM, 3 PRMTs a quad instead of 4), the row sums
    multiplied back by lut.HIGH_BYTE_FACTOR; at 3 bits with SIGN_SELECTORS (registry.GRID_CODEBOOK3, not yet
    checked on a GPU) the same for codes of codebook.high_byte_codebook(3), by lut.HIGH_BYTE_FACTOR3.
    WORD_MASKS (ROW_SUMS; TQC_WORD_MASKS=1, checked on a GPU, run 231): the 2-bit code words (2 bits, 3 bits'
    magnitudes, a 2-bit residual) masked once for two quads (_quads)."""
    gl.static_assert(not WORD_MASKS or ROW_SUMS, "WORD_MASKS: row sums")
    gl.static_assert(not ((RES_BITS or BITS == 3) and STAGED), "STAGED copies one set of words only")
    gl.static_assert(not HIGH_BYTES or ((BITS == 2 or BITS == 3 and SIGN_SELECTORS) and RES_BITS == 0 and ROW_SUMS),
                     "HIGH_BYTES: 2 bits or 3 with sign selectors, row sums")
    gl.static_assert(ROW_SUMS or not X_ORDERED, "X_ORDERED feeds ROW_SUMS' products")
    W: gl.constexpr = num_warps
    BLOCK_N: gl.constexpr = 16 * W
    C: gl.constexpr = BLOCK_K // 32
    a_layout: gl.constexpr = operand_layout(W)
    (first_step, _, scales, codes, step_words, tables, copied, res_codes, res_scales, res_tables, sign_codes,
     first) = _program_codes(codes_ptr, table_ptr, scales_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, N, K, G,
                             BLOCK_K, ITERS, W, EVICT, STAGED, PDL, BITS, RES_BITS, LOOKAHEAD, PRELOAD, 16,
                             SIGN_SELECTORS)
    columns = first_step * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float16, a_layout)
    tile = acc
    like = tables[0]  # a quad's layout (_quads)
    if ROW_SUMS:  # a thread's two rows, a half2 each
        acc = _chunks(gl.zeros_like(like, dtype=gl.float16), C)[0]
    products, res_products = acc, acc
    RUN: gl.constexpr = G // BLOCK_K if SUM_STEPS and ITERS % (G // BLOCK_K) == 0 else 1
    state = first
    for i in gl.static_range(ITERS):
        state, words, res_words = _stage_words(state, copied, codes, res_codes, sign_codes, step_words, i, ITERS,
                                               LOOKAHEAD, BLOCK_K, W, EVICT, STAGED, BITS, RES_BITS, PRELOAD)
        group = (first_step + i) * BLOCK_K // G
        x = gl.load(x_ptr + columns + i * BLOCK_K).to(gl.float16)  # natural order (unused with X_ORDERED: not compiled)
        if ROW_SUMS:
            if X_ORDERED:
                x_quads = _ordered_quads(x_ptr + (first_step + i) * BLOCK_K, like, C, W)
            else:
                x_quads = _operand_quads(gl.broadcast(x[None, :], tile)[0], like, C)
            products = _row_products(products, _quads(words, tables, C, BITS, HIGH_BYTES, WORD_MASKS), x_quads, C,
                                     i % RUN == 0)
            if RES_BITS:
                res_quads = _quads(res_words, res_tables, C, RES_BITS, False, WORD_MASKS)
                res_products = _row_products(res_products, res_quads, x_quads, C, i % RUN == 0)
            if i % RUN == RUN - 1:
                acc = _scaled_into(acc, products, _row_scale(scales + group, tile, like, C))
                if RES_BITS:
                    acc = _scaled_into(acc, res_products, _row_scale(res_scales + group, tile, like, C))
        elif RES_BITS:
            weights = _scaled_weights(words, scales + group, res_words, res_scales + group, tables, res_tables, C,
                                      a_layout, RES_BITS, BITS)
            x, _ = gl.broadcast(x[None, :], acc)
            acc = gl.inline_asm_elementwise(FMA_ASM, "=r,r,r,r", [weights, x, acc], dtype=gl.float16, is_pure=True,
                                            pack=2)
        else:
            acc, products = _gemv_step(acc, products, words, scales + group, tables, x, C, a_layout, BITS, i % RUN,
                                       RUN)
    sums_layout: gl.constexpr = pair_layout(W)
    if ROW_SUMS:  # [W, 8, 4, h, c] -> rows w 16 + 8 h + lane // 4
        rows = gl.permute(gl.sum(gl.sum(acc.to(gl.float32), axis=4), axis=2), (0, 2, 1))
        sums = gl.convert_layout(gl.reshape(rows, [BLOCK_N]), gl.SliceLayout(1, sums_layout))
        if HIGH_BYTES and BITS == 2:
            sums = sums * HIGH_BYTES_SCALE
        elif HIGH_BYTES:
            sums = sums * HIGH_BYTES_SCALE3
    else:
        sums = gl.convert_layout(gl.sum(acc.to(gl.float32), axis=1), gl.SliceLayout(1, sums_layout))
    token_column = sums[:, None] + gl.zeros([BLOCK_N, TOKENS], gl.float32, sums_layout)  # adds token 0 (M = 1)
    _add_into(out_ptr, token_column, gl.program_id(0) * BLOCK_N, M, N, W)


@lru_cache(maxsize=None)
def x_layout(block_k: int, tokens: int = 16):
    """Shared memory of the activations, [steps, tokens, block_k]: a step's tile is wgmma's B operand (transposed)."""
    return gl.NVMMASharedLayout.get_default_for([tokens, block_k], gl.float16)


@gluon.jit
def fragment_dequant_kernel(out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                            N: gl.constexpr, K: gl.constexpr, G: gl.constexpr, BLOCK_K: gl.constexpr,
                            ITERS: gl.constexpr, num_warps: gl.constexpr, BITS: gl.constexpr = 4,
                            RES_BITS: gl.constexpr = 0, LOOKAHEAD: gl.constexpr = 2,
                            SIGN_SELECTORS: gl.constexpr = False):
    """out[N, K] = the weights the fragment layout stands for, in out's dtype (for prefill: dequantize
    + cuBLAS): each program decodes ITERS steps of one block of 16 num_warps rows with the PRMT
    lookups of the tensor-core kernel (_decode), scales them in float32 (the residual stage's added
    by a fused multiply-add), as fragments.fragment_dequant_kernel computes them (its Triton
    counterpart, which the CPU interpreter runs), and stores each step's tile in natural order, 16
    bytes a thread and row run (through shared memory: convert_layout). Grid (N / (16 num_warps),
    K / (BLOCK_K ITERS))."""
    W: gl.constexpr = num_warps
    C: gl.constexpr = BLOCK_K // 32
    a_layout: gl.constexpr = operand_layout(W)
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_K, BLOCK_K // 8], [W, 1], [1, 0])
    (first_step, _, scales, codes, step_words, tables, copied, res_codes, res_scales, res_tables, sign_codes,
     first) = _program_codes(codes_ptr, table_ptr, scales_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, N, K, G,
                             BLOCK_K, ITERS, W, True, False, False, BITS, RES_BITS, LOOKAHEAD, False, 16,
                             SIGN_SELECTORS)
    rows = gl.program_id(0) * 16 * W + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, store_layout))
    columns = first_step * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, store_layout))
    offsets = rows[:, None] * K + columns[None, :]
    state = first
    for i in gl.static_range(ITERS):
        state, words, res_words = _stage_words(state, copied, codes, res_codes, sign_codes, step_words, i, ITERS,
                                               LOOKAHEAD, BLOCK_K, W, True, False, BITS, RES_BITS, False)
        group = (first_step + i) * BLOCK_K // G
        weights = _float_weights(words, scales + group, tables, C, a_layout, BITS)
        if RES_BITS:
            residual = _decode(res_words, res_tables, C, a_layout, RES_BITS).to(gl.float32)
            res_scale, _ = gl.broadcast(gl.load(res_scales + group).to(gl.float32)[:, None], residual)
            weights = gl.fma(residual, res_scale, weights)
        tile = gl.convert_layout(weights.to(out_ptr.dtype.element_ty), store_layout)
        gl.store(out_ptr + offsets + i * BLOCK_K, tile)


@gluon.jit
def _float_weights(words, scales, tables, C: gl.constexpr, A_LAYOUT: gl.constexpr, BITS: gl.constexpr):
    """A step's words decoded (_decode) and multiplied by their rows' scale (at `scales`) in float32."""
    weights = _decode(words, tables, C, A_LAYOUT, BITS).to(gl.float32)
    scale, _ = gl.broadcast(gl.load(scales).to(gl.float32)[:, None], weights)
    return weights * scale
