"""The Triton kernel sources: every layer property a `tl.constexpr`, each configuration its own kernel.

    fwht_kernel     rotate activations: x' = FWHT_G(x * signs) / sqrt(G), per group of G inputs
                    (and zero the output the split-K kernels add into)
    lut_dot_kernel  any number of tokens on tensor cores: decode a slot pair to fp16 in registers,
                    `tl.dot` with the activations, scale; split over K with atomics for few tokens;
                    WEIGHTS_LEFT: the weights are the left operand, decoded in its register layout
    lut_fma_kernel  one token on CUDA cores (fp16 pairs or float32), the tuner's choice for one
                    token on every H100 key; also serves layers too narrow for tensor cores (2B < 16)
    dequant_kernel  write the decoded weight (then cuBLAS, for very many tokens)

The codes are in the kernel layout of repack.py (docs/kernel_layout.md). The unit of decoding is
a **slot pair** (t, t + 1) of a chunk: `decode_pair` turns the [BLOCK_N, B] word tile(s) holding
it (`step_words`, loaded once per word) into an fp16 [BLOCK_N, 2B] tile whose column 2 kw + h is
slot t + h of column kw, i.e. input k0 + h B + kw (k0 = first input of slot t); the rotation
stores the activations in that order (pair order) for `pair_inputs`.
Decoding is a codebook lookup in registers (lut.py: PRMT byte permutes, no memory gather), run as
inline PTX on a GPU and as the same bit arithmetic in Triton under TRITON_INTERPRET (ASM=False).
Both stages of a residual option decode the same way; each stage's scale multiplies its dot.
On sm_90 the lookup kernels are launched while the rotation runs (programmatic dependent launch,
PDL): `_start` waits for it after reading only read-only data (tables, prefetched codes).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .lut import CRUMB_ASM, NIBBLE_ASM, SIGNED_CONSTRAINTS, SIGNED_CRUMB_ASM, TABLE_COPIES, UNSIGNED_CONSTRAINTS

TABLE_COPIES = tl.constexpr(TABLE_COPIES)
NIBBLE_ASM = tl.constexpr(NIBBLE_ASM)
CRUMB_ASM = tl.constexpr(CRUMB_ASM)
SIGNED_CRUMB_ASM = tl.constexpr(SIGNED_CRUMB_ASM)
SIGNED_CONSTRAINTS = tl.constexpr(SIGNED_CONSTRAINTS)
UNSIGNED_CONSTRAINTS = tl.constexpr(UNSIGNED_CONSTRAINTS)
# The butterflies by tl.split / tl.join (fwht_split_tile: 22 SASS instructions, 7 adds and one shuffle an element of
# fwht_kernel's 16 x 256 tile, compiled for sm_90) instead of sums of selected halves (45, 8 of them shuffles). The
# same transform to float32 rounding (25 GPU tests, H100 run 193); the rotation takes 0.9-1.0 us at one token
# against 1.1-1.2, 11.6 us at 2048 tokens of 4096 inputs against 13.9, 42.5 against 48.8 at 14336 (run 192).
# TQC_FWHT_SPLIT=0: the sums of selected halves, as before session 44.
FWHT_SPLIT = tl.constexpr(os.environ.get("TQC_FWHT_SPLIT", "1") == "1")


@triton.jit
def fwht_tile(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LOG_G: tl.constexpr):
    """Orthonormal Walsh-Hadamard transform of every group of 2**LOG_G columns of a [BLOCK_M, BLOCK_K] tile.

    log2(G) butterfly stages in registers; each pairs columns h apart: (a, b) -> (a + b, a - b) / sqrt(2).
    With FWHT_SPLIT, fwht_split_tile's way.
    """
    if FWHT_SPLIT:
        return fwht_split_tile(x, BLOCK_M, BLOCK_K, LOG_G)
    pair = tl.arange(0, 2)[None, :, None]
    for stage in tl.static_range(LOG_G):
        y = tl.reshape(x, (BLOCK_M * BLOCK_K // (2 << stage), 2, 1 << stage))
        a = tl.sum(tl.where(pair == 0, y, 0.0), axis=1)
        b = tl.sum(tl.where(pair == 1, y, 0.0), axis=1)
        y = (a[:, None, :] + tl.where(pair == 0, 1.0, -1.0) * b[:, None, :]) * 0.7071067811865476
        x = tl.reshape(y, (BLOCK_M, BLOCK_K))
    return x


@triton.jit
def fwht_split_tile(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LOG_G: tl.constexpr):
    """fwht_tile with each stage's pairs split apart (tl.split) and joined back (tl.join): one add or
    subtract an element a stage, the 1 / sqrt(G) once at the end."""
    for stage in tl.static_range(LOG_G):
        pairs = tl.permute(tl.reshape(x, (BLOCK_M * BLOCK_K // (2 << stage), 2, 1 << stage)), (0, 2, 1))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_M, BLOCK_K))
    return x * (1.0 / (1 << LOG_G)) ** 0.5


@triton.jit
def clear_output(clear_ptr, CLEAR, BLOCK: tl.constexpr):
    """Zero clear_ptr[:CLEAR], spread over all programs of the launch (the output a split-K kernel adds into)."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    for start in range(program * BLOCK, CLEAR, programs * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        tl.store(clear_ptr + offsets, tl.zeros((BLOCK,), dtype=clear_ptr.dtype.element_ty), mask=offsets < CLEAR)


@triton.jit
def prime_output(clear_ptr, fill_ptr, CLEAR, BLOCK: tl.constexpr, FILL: tl.constexpr):
    """clear_output, or with FILL clear_ptr[:CLEAR] = fill_ptr[:CLEAR]: the split-K kernel then adds
    its products onto what was there (a residual), and no launch adds it after."""
    if FILL:
        programs = tl.num_programs(0) * tl.num_programs(1)
        program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        for start in range(program * BLOCK, CLEAR, programs * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            tl.store(clear_ptr + offsets, tl.load(fill_ptr + offsets, mask=offsets < CLEAR), mask=offsets < CLEAR)
    else:
        clear_output(clear_ptr, CLEAR, BLOCK)


@triton.jit
def rotate_tile(x, signs_ptr, cols, K: tl.constexpr, LOG_G: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """FWHT_G(x * signs) / sqrt(G) of a float32 [BLOCK_M, BLOCK_K] tile (columns `cols`, whole groups)."""
    signs = tl.load(signs_ptr + cols, mask=cols < K, other=0.0)
    return rotate_signed(x, signs, LOG_G, BLOCK_M, BLOCK_K)


@triton.jit
def rotate_signed(x, signs, LOG_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """rotate_tile with the columns' signs already loaded."""
    return fwht_tile(x * signs[None, :], BLOCK_M, BLOCK_K, LOG_G)


@triton.jit
def store_rotated(x, signs_ptr, out_ptr, tokens, cols, mask, K: tl.constexpr, LOG_G: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr,
                  FRAGMENT_STEP: tl.constexpr = 0):
    """Rotate a float32 [BLOCK_M, BLOCK_K] tile of activations (rows `tokens`, columns `cols`, whole
    groups) and store it: out = FWHT_G(x * signs) / sqrt(G), in slot-pair order if PAIR_WIDTH = B > 0
    (input h B + kw of each run of 2B at position 2 kw + h; see pair_inputs), or in the fragment
    order of steps of FRAGMENT_STEP > 0 inputs (fragments.fragment_input_order: input
    32 ch + 16 a + 8 b + 2 q + c of a step at position 8 C q + 8 ch + 4 a + 2 b + c)."""
    x = rotate_tile(x, signs_ptr, cols, K, LOG_G, BLOCK_M, BLOCK_K)
    store_in_order(x, out_ptr, tokens, cols, mask, K, PAIR_WIDTH, FRAGMENT_STEP)


@triton.jit
def store_in_order(x, out_ptr, tokens, cols, mask, K: tl.constexpr, PAIR_WIDTH: tl.constexpr,
                   FRAGMENT_STEP: tl.constexpr):
    """Store a rotated tile in the order the kernel reading it wants (store_rotated)."""
    targets = cols
    if PAIR_WIDTH > 0:
        targets = cols // (2 * PAIR_WIDTH) * (2 * PAIR_WIDTH) + 2 * (cols % PAIR_WIDTH) + (cols // PAIR_WIDTH) % 2
    if FRAGMENT_STEP > 0:
        inner = cols % FRAGMENT_STEP
        targets = (cols - inner + inner // 2 % 4 * (FRAGMENT_STEP // 4) + inner // 32 * 8 + inner // 16 % 2 * 4
                   + inner // 8 % 2 * 2 + inner % 2)
    tl.store(out_ptr + tokens[:, None] * K + targets[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Under programmatic dependent launch (sm_90): wait for the previous kernel, then let the next
    one launch at once (it reads only read-only weights before its own wait)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["M", "CLEAR"])
def fwht_kernel(x_ptr, signs_ptr, out_ptr, clear_ptr, M, CLEAR, K: tl.constexpr, LOG_G: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr = 0, PDL: tl.constexpr = False,
                FRAGMENT_STEP: tl.constexpr = 0):
    """out = rotate(x): grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); BLOCK_K a multiple of the group size.

    PAIR_WIDTH, FRAGMENT_STEP: see store_rotated. Also zeroes clear_ptr[:CLEAR] (the output a split-K kernel adds
    into), saving a launch. PDL: see pdl_start.
    """
    pdl_start(PDL)
    clear_output(clear_ptr, CLEAR, BLOCK_K)
    tokens, cols, mask, x = input_tile(x_ptr, M, K, BLOCK_M, BLOCK_K)
    store_rotated(x, signs_ptr, out_ptr, tokens, cols, mask, K, LOG_G, BLOCK_M, BLOCK_K, PAIR_WIDTH, FRAGMENT_STEP)


@triton.jit
def input_tile(x_ptr, M, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (tokens, cols, mask, float32 tile) of an [M, K] input, grid (token blocks, column blocks)."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (tokens < M)[:, None] & (cols < K)[None, :]
    return tokens, cols, mask, tl.load(x_ptr + tokens[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def block_rows(N: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, row_mask) of this program's BLOCK_N rows: `rows` clamped to N - 1, so that every
    weight load stays in bounds without a mask (a masked load also zeroes its registers first);
    only the final store is masked, by `row_mask`."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if N % BLOCK_N != 0:
        rows = tl.minimum(rows, N - 1)
    return rows, row_mask


@triton.jit
def _plane_tile(ptr, rows, chunk, slot, START: tl.constexpr, WIDTH: tl.constexpr, ROW_WORDS: tl.constexpr,
                B: tl.constexpr):
    """The [BLOCK_N, B] words of one plane (width WIDTH, START words into the row) holding `slot` of `chunk`.

    Each code word is read once, so it is marked first to go from L1 (evict_first), leaving L1 to
    what programs reread (activations, scales): one-token layers 3-14% faster on the H200
    (docs/performance-history.md, runs 40-41).
    """
    word = START + (chunk * WIDTH + slot // (32 // WIDTH)) * B
    return tl.load(ptr + rows[:, None] * ROW_WORDS + word + tl.arange(0, B)[None, :], eviction_policy="evict_first")


@triton.jit
def _doubled(words):
    """[R, B] -> [R, 2B], column 2 kw + h = column kw: the two elements one packed asm call receives."""
    return tl.reshape(tl.join(words, words), (words.shape[0], 2 * words.shape[1]))


@triton.jit
def _splat(value, like):
    """An int32 tile shaped like `like`, every element `value` (an asm operand)."""
    return value + tl.zeros_like(like)


@triton.jit
def _half_bits(low, high, sign):
    """fp16 from its low byte, high byte (sign bit clear) and sign: the interpreter's PRMT."""
    return (low | (high << 8) | (sign << 15)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _table_byte(first, second, index):
    """Byte `index` (0-7) of the table words (first, second): the interpreter's PRMT lookup."""
    return (tl.where(index < 4, first, second) >> (8 * (index % 4))) & 0xFF


@triton.jit
def load_table(table_ptr, rows, BITS: tl.constexpr):
    """A stage's PRMT table (lut.table_words) as a tuple of [BLOCK_N, 1] int32 tensors, loaded once.

    LayerKernel.table stores TABLE_COPIES copies and each row reads copy `row % TABLE_COPIES`:
    with a different address per thread the compiler holds the words in registers, where with
    one address it keeps them in uniform registers and copies one out before every lookup.
    """
    WORDS: tl.constexpr = 4 if BITS == 4 else 2
    base = table_ptr + (rows % TABLE_COPIES)[:, None] * WORDS
    if BITS == 4:
        table = (tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3))
    else:
        table = (tl.load(base), tl.load(base + 1))
    return table


@triton.jit
def step_words(codes_ptr, rows, first_slot, K: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr):
    """Load the word tiles one stage's step of SLOTS slots from first_slot reads: a tuple with one
    (codes, signs) pair of [BLOCK_N, B] int32 tiles per WORD_SLOTS slots; signs only for 3 bits (else the codes).

    A nibble word holds 8 slots, a crumb word 16, a sign word 32: each word is loaded once per
    step and decodes several pairs (`_lut_step` doubles the tiles, `_doubled`, where it uses them).
    """
    WORD_SLOTS: tl.constexpr = 8 if BITS == 4 else 16
    ROW_WORDS: tl.constexpr = K * BITS // 32
    chunk = first_slot // 32
    start = first_slot % 32
    tiles = ()
    for offset in tl.static_range(0, SLOTS, WORD_SLOTS):
        words = _plane_tile(codes_ptr, rows, chunk, start + offset, 0, 4 if BITS == 4 else 2, ROW_WORDS, B)
        signs = words
        if BITS == 3:
            signs = _plane_tile(codes_ptr, rows, chunk, start + offset, K * 2 // 32, 1, ROW_WORDS, B)
        tiles = tiles + ((words, signs),)
    return tiles


@triton.jit
def decode_pair(words, signs, table, OFFSET: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr):
    """fp16 [BLOCK_N, 2B]: column 2 kw + h is the codebook value of slot `start + OFFSET + h`, column kw.

    `words`, `signs` are the doubled step_words tiles of that slot; `start`, a multiple of every
    plane's slots per word, fixes the pair's bit positions (repack.slot_bits) as constexprs. Plain Triton: the
    interpreter's path; on a GPU decode_quad looks the codes up with PRMT, a quad at a time.
    """
    h = (tl.arange(0, 2 * B) % 2)[None, :]
    QUAD: tl.constexpr = OFFSET // 4  # in the chunk
    I: tl.constexpr = OFFSET % 4  # the pair's first code in its quad
    if BITS == 4:
        magnitude = (words >> (4 * (OFFSET % 8 + h))) & 7
        sign = (words >> (8 * (I + h) + 7 - 4 * (QUAD % 2))) & 1  # repack.SIGN_NIBBLE
        values = _half_bits(_table_byte(table[0], table[1], magnitude), _table_byte(table[2], table[3], magnitude), sign)
    else:
        R: tl.constexpr = QUAD % 4  # the quad in its crumb word
        code = (words >> (16 * (R // 2) + 2 * (R % 2) + 4 * (I + h))) & 3
        sign = tl.zeros_like(code)
        if BITS == 3:
            sign = (signs >> (8 * (I + h) + 7 - QUAD)) & 1
        values = _half_bits(_table_byte(table[0], table[0], code), _table_byte(table[1], table[1], code), sign)
    return values


@triton.jit
def decode_quad(words, signs, table, OFFSET: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                ASM: tl.constexpr):
    """The decode_pair tiles of slots OFFSET, OFFSET + 1 and OFFSET + 2, OFFSET + 3 (OFFSET % 4 == 0).

    On a GPU one lut.quad_asm call returns both: the quad's selector is one shift and mask of the
    word, the signs (4 and 3 bits) one shift of the sign word (the nibble word itself for 4 bits).
    """
    QUAD: tl.constexpr = OFFSET // 4
    if ASM:
        if BITS == 4:
            lows = [_splat(table[0], words), _splat(table[1], words)]
            highs = [_splat(table[2], words), _splat(table[3], words)]
            shift: tl.constexpr = 16 * (QUAD % 2)
            sign_args = [words, _splat(4 * (QUAD % 2), words)]
        else:
            lows = [_splat(table[0], words), _splat(table[0], words)]
            highs = [_splat(table[1], words), _splat(table[1], words)]
            R: tl.constexpr = QUAD % 4
            shift: tl.constexpr = 16 * (R // 2) + 2 * (R % 2)
            sign_args = [signs, _splat(QUAD, words)]
        args = [words] + lows + highs + [_splat(shift, words)]
        if BITS == 2:
            first, second = tl.inline_asm_elementwise(CRUMB_ASM, UNSIGNED_CONSTRAINTS, args,
                                                      dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            asm: tl.constexpr = NIBBLE_ASM if BITS == 4 else SIGNED_CRUMB_ASM
            first, second = tl.inline_asm_elementwise(asm, SIGNED_CONSTRAINTS, args + sign_args,
                                                      dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        first = decode_pair(words, signs, table, OFFSET, B, BITS)
        second = decode_pair(words, signs, table, OFFSET + 2, B, BITS)
    return first, second


@triton.jit
def pair_inputs(x_ptr, tokens, token_mask, k0, K: tl.constexpr, B: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_M, 2B] fp16: the activations of the slot pair at input k0, in decode_pair's column order.

    The rotation stored them in that order (fwht_kernel's PAIR_WIDTH). On a GPU they are loaded
    as words and laid out like a doubled word tile (`_doubled`): each thread's neighbouring
    columns arrive as one half2 register, the layout of the decoded weights, so nothing is
    repacked before HALF_FMA_ASM.
    """
    if ASM:
        words = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tokens[:, None] * (K // 2) + k0 // 2
                        + tl.arange(0, B)[None, :], mask=token_mask[:, None], other=0)
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [_doubled(words)], dtype=tl.float16, is_pure=True,
                                      pack=2)
    else:
        x = tl.load(x_ptr + tokens[:, None] * K + k0 + tl.arange(0, 2 * B)[None, :], mask=token_mask[:, None],
                    other=0.0)
    return x


@triton.jit
def scale_rows(scales_ptr, rows, first_input, K: tl.constexpr, G: tl.constexpr):
    """[BLOCK_N] pointers to each row's scale of the group holding input `first_input` (a step's first)."""
    return scales_ptr + rows * (K // G) + first_input // G


@triton.jit
def _row_scales(scales, first_input, OFFSET: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr,
                DTYPE: tl.constexpr = tl.float32):
    """[BLOCK_N] in DTYPE: each row's scale of the group holding input first_input + OFFSET (a pair
    never straddles groups); `scales` = scale_rows(.., first_input, ..). ALIGNED: first_input is a
    multiple of G, so the group is a constant number of scales on and the load an immediate offset."""
    if ALIGNED:
        group = OFFSET // G
    else:
        group = (first_input % G + OFFSET) // G
    return tl.load(scales + group).to(DTYPE)


@triton.jit
def _accumulate(out_ptr, offsets, values, mask, SPLIT: tl.constexpr):
    """Store a program's result, or add it atomically when K is split over several programs."""
    if SPLIT:
        tl.atomic_add(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


# out[$1] += the half2 ($2, $3), if $4: a packed 16-bit reduction, native on sm_90 and fire and
# forget. {0}: bf16 or f16.
PAIR_ADD_ASM = ("{{ .reg .pred p; .reg .b32 v; setp.ne.b32 p, $4, 0; mov.b32 v, {{$2, $3}}; "
                "@p red.global.add.noftz.{0}x2 [$1], v; mov.u32 $0, 0; }}")
BF16_PAIR_ADD_ASM = tl.constexpr(PAIR_ADD_ASM.format("bf16"))
F16_PAIR_ADD_ASM = tl.constexpr(PAIR_ADD_ASM.format("f16"))


@triton.jit
def _accumulate_rows(out_ptr, rows, sums, row_mask, SPLIT: tl.constexpr, PAIRS: tl.constexpr, THREADS: tl.constexpr,
                     ASM: tl.constexpr):
    """The one-token kernel's _accumulate of its [BLOCK_N] row sums (`rows`: their offsets in out;
    the int8 kernels pass their [tokens, rows] tile flattened token-major).

    Split over K into a 16-bit output, Triton adds one element per atomic, as a program holds
    fewer rows than threads, and each is a compare-and-swap loop (sm_90 has no scalar 16-bit
    atomic add). So, where PAIRS (N even), neighbouring rows add as one packed half2 reduction.
    """
    BLOCK_N: tl.constexpr = sums.shape[0]
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if SPLIT and PAIRS and dtype.primitive_bitwidth == 16:
        low, high = tl.split(tl.reshape(sums.to(dtype), (BLOCK_N // 2, 2)))
        first, second = tl.split(tl.reshape(rows, (BLOCK_N // 2, 2)))
        valid, _ = tl.split(tl.reshape(row_mask.to(tl.int32), (BLOCK_N // 2, 2)))  # rows come in pairs
        if ASM:
            _add_pairs(out_ptr + first, low, high, valid, THREADS)
        else:  # the interpreter: the same pairing, two atomic adds
            tl.atomic_add(out_ptr + first, low, mask=valid != 0, sem="relaxed")
            tl.atomic_add(out_ptr + second, high, mask=valid != 0, sem="relaxed")
    else:
        _accumulate(out_ptr, rows, sums, row_mask, SPLIT)


@triton.jit
def _add_pairs(pointers, low, high, valid, THREADS: tl.constexpr):
    """*pointers += (low, high) as half2, where `valid`, one packed reduction (PAIR_ADD_ASM) per pair.

    Triton spreads a tensor with fewer elements than the program's threads over them in copies; a
    store or atomic of its own runs in one copy only, an asm statement in every copy, which would
    add each pair again. So the P pairs are laid out over THREADS elements first, P of them live.
    """
    P: tl.constexpr = low.shape[0]
    asm: tl.constexpr = BF16_PAIR_ADD_ASM if low.dtype == tl.bfloat16 else F16_PAIR_ADD_ASM
    if P < THREADS:
        live = tl.arange(0, THREADS) < P
        pointers = _spread(pointers, THREADS)
        low, high = _spread(low, THREADS), _spread(high, THREADS)
        valid = tl.where(live, _spread(valid, THREADS), 0)
    addresses = pointers.to(tl.int64)  # an integer operand: Triton checks pointer and float operands' types
    tl.inline_asm_elementwise(asm, "=r,l,h,h,r", [addresses, low, high, valid], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _spread(values, SIZE: tl.constexpr):
    """[SIZE] from [P] (P dividing SIZE): element i is values[i % P]."""
    P: tl.constexpr = values.shape[0]
    return tl.reshape(tl.broadcast_to(values[None, :], (SIZE // P, P)), (SIZE,))


@triton.jit
def _dot_pair(acc, x_ptr, w, scales, tokens, token_mask, first_input, OFFSET: tl.constexpr, K: tl.constexpr,
              G: tl.constexpr, B: tl.constexpr, ALIGNED: tl.constexpr, WEIGHTS_LEFT: tl.constexpr, ASM: tl.constexpr):
    """acc + scale * (x' @ w^T) for one decoded slot pair at input first_input + OFFSET, on tensor cores.

    WEIGHTS_LEFT: acc is [BLOCK_N, BLOCK_M] and gets scale * (w @ x'^T). With the weights as the
    left operand, sm_90's wgmma reads them from registers and Triton decodes the codes straight in
    that layout; as the right operand they pass through shared memory (a store, a barrier and
    ldmatrix per pair).
    """
    x = pair_inputs(x_ptr, tokens, token_mask, first_input + OFFSET, K, B, ASM)
    scale = _row_scales(scales, first_input, OFFSET, G, ALIGNED)
    if WEIGHTS_LEFT:
        acc += tl.dot(w, tl.trans(x)) * scale[:, None]
    else:
        acc += tl.dot(x, tl.trans(w)) * scale[None, :]
    return acc


# acc + w * x * scale on half2 registers: two products and two sums per instruction pair (HMUL2, HFMA2).
HALF_FMA_ASM = tl.constexpr("{ .reg .b32 p; mul.rn.f16x2 p, $1, $2; fma.rn.f16x2 $0, p, $3, $4; }")
HALF_FMA_CONSTRAINTS = tl.constexpr("=r,r,r,r,r")
# The same over 4 half2 of one row a thread holds (pack=8, 4 registers an operand: w $4-$7, x
# $8-$11, scale $12-$15, acc $16-$19): the products are summed first and scaled once, 5
# instructions instead of 8; the sum lands in the first half2 of acc, the other three pass through.
RUN_FMA_ASM = tl.constexpr("{ .reg .b32 p; mul.rn.f16x2 p, $4, $8; fma.rn.f16x2 p, $5, $9, p; "
                           "fma.rn.f16x2 p, $6, $10, p; fma.rn.f16x2 p, $7, $11, p; fma.rn.f16x2 $0, p, $12, $16; "
                           "mov.b32 $1, $17; mov.b32 $2, $18; mov.b32 $3, $19; }")
RUN_FMA_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r" + ",r" * 16)
HALF_RUNS = tl.constexpr(2)  # HALF_ACC: True for fp16 per pair (HALF_FMA_ASM), HALF_RUNS per run (RUN_FMA_ASM)


@triton.jit
def _fma_pair(acc, x_ptr, w, scales, first_input, OFFSET: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
              B: tl.constexpr, ALIGNED: tl.constexpr, HALF_ACC: tl.constexpr, ASM: tl.constexpr):
    """acc + scale * w * x' for one decoded slot pair, one token, elementwise into [BLOCK_N, 2B].

    HALF_ACC: in fp16, two weights per instruction (HALF_FMA_ASM on the half2 registers the decode
    and pair_inputs produce); the sums over one program's slots stay short, at most a few dozen
    terms, and programs add up in float32. HALF_RUNS (only where each thread holds 8 or more
    columns of a row: tuning.run_sums_fit): RUN_FMA_ASM sums 4 half2 of products before one
    scale. Else in float32.
    """
    one = tl.arange(0, 1)
    x = pair_inputs(x_ptr, one, one < 1, first_input + OFFSET, K, B, ASM)
    if HALF_ACC:
        scale = _row_scales(scales, first_input, OFFSET, G, ALIGNED, tl.float16)[:, None]
        if ASM and HALF_ACC == HALF_RUNS:
            acc = tl.inline_asm_elementwise(RUN_FMA_ASM, RUN_FMA_CONSTRAINTS, [w, x, scale, acc], dtype=tl.float16,
                                            is_pure=True, pack=8)
        elif ASM:
            acc = tl.inline_asm_elementwise(HALF_FMA_ASM, HALF_FMA_CONSTRAINTS, [w, x, scale, acc], dtype=tl.float16,
                                            is_pure=True, pack=2)
        else:
            acc = acc + w * x * scale
    else:
        acc = acc + w.to(tl.float32) * x.to(tl.float32) * _row_scales(scales, first_input, OFFSET, G, ALIGNED)[:, None]
    return acc


# acc + (w s + w_res s_res) x' on half2 registers: the two stages' scaled weights summed first
# (HMUL2, HFMA2), then one HFMA2 by the activations: 3 instructions per 2 weights instead of 4.
FOLDED_FMA_ASM = tl.constexpr("{ .reg .b32 w; mul.rn.f16x2 w, $1, $2; fma.rn.f16x2 w, $3, $4, w; "
                              "fma.rn.f16x2 $0, w, $5, $6; }")
FOLDED_FMA_CONSTRAINTS = tl.constexpr("=r,r,r,r,r,r,r")


@triton.jit
def _folded_fma_pair(acc, x_ptr, w, res_w, scales, res_scales, first_input, OFFSET: tl.constexpr, K: tl.constexpr,
                     G: tl.constexpr, B: tl.constexpr, ALIGNED: tl.constexpr, ASM: tl.constexpr):
    """acc + (scale w + res_scale res_w) x' for one slot pair of a residual option, in fp16 (HALF_ACC)."""
    one = tl.arange(0, 1)
    x = pair_inputs(x_ptr, one, one < 1, first_input + OFFSET, K, B, ASM)
    scale = _row_scales(scales, first_input, OFFSET, G, ALIGNED, tl.float16)[:, None]
    res_scale = _row_scales(res_scales, first_input, OFFSET, G, ALIGNED, tl.float16)[:, None]
    if ASM:
        acc = tl.inline_asm_elementwise(FOLDED_FMA_ASM, FOLDED_FMA_CONSTRAINTS, [w, scale, res_w, res_scale, x, acc],
                                        dtype=tl.float16, is_pure=True, pack=2)
    else:
        acc = acc + (w * scale + res_w * res_scale) * x
    return acc


# The decoded weights scaled in fp16 before the dot (SCALE_FIRST): w s on half2 registers, or a
# residual option's two stages folded into one operand, w s + w_res s_res (HMUL2, HFMA2).
SCALE_ASM = tl.constexpr("mul.rn.f16x2 $0, $1, $2;")
SCALE_CONSTRAINTS = tl.constexpr("=r,r,r")
FOLD_SCALE_ASM = tl.constexpr("{ .reg .b32 w; mul.rn.f16x2 w, $1, $2; fma.rn.f16x2 $0, $3, $4, w; }")
FOLD_SCALE_CONSTRAINTS = tl.constexpr("=r,r,r,r,r")


@triton.jit
def _scaled_dot_pair(acc, x_ptr, w, res_w, scales, res_scales, tokens, token_mask, first_input, OFFSET: tl.constexpr,
                     K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, ALIGNED: tl.constexpr,
                     RES_BITS: tl.constexpr, WEIGHTS_LEFT: tl.constexpr, ASM: tl.constexpr):
    """acc + x' @ (scale w (+ res_scale res_w))^T for one decoded slot pair, on tensor cores
    (SCALE_FIRST): each row's scale multiplies its decoded weights in fp16, the residual stage's
    folded in, so the dot accumulates into acc in place, one dot a pair for both stages, with no
    float32 multiply-add of the [BLOCK_N, BLOCK_M] product after every pair (_dot_pair)."""
    w, x = _scaled_pair(x_ptr, w, res_w, scales, res_scales, tokens, token_mask, first_input, OFFSET, K, G, B, ALIGNED,
                        RES_BITS, ASM)
    return _dot_into(acc, w, x, WEIGHTS_LEFT)


@triton.jit
def _scaled_pair(x_ptr, w, res_w, scales, res_scales, tokens, token_mask, first_input, OFFSET: tl.constexpr,
                 K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, ALIGNED: tl.constexpr, RES_BITS: tl.constexpr,
                 ASM: tl.constexpr):
    """(scale w (+ res_scale res_w), x') of one decoded slot pair: its operands for _dot_into."""
    x = pair_inputs(x_ptr, tokens, token_mask, first_input + OFFSET, K, B, ASM)
    scale = _row_scales(scales, first_input, OFFSET, G, ALIGNED, tl.float16)[:, None]
    if RES_BITS > 0:
        res_scale = _row_scales(res_scales, first_input, OFFSET, G, ALIGNED, tl.float16)[:, None]
        if ASM:
            w = tl.inline_asm_elementwise(FOLD_SCALE_ASM, FOLD_SCALE_CONSTRAINTS, [w, scale, res_w, res_scale],
                                          dtype=tl.float16, is_pure=True, pack=2)
        else:
            w = w * scale + res_w * res_scale
    elif ASM:
        w = tl.inline_asm_elementwise(SCALE_ASM, SCALE_CONSTRAINTS, [w, scale], dtype=tl.float16, is_pure=True, pack=2)
    else:
        w = w * scale
    return w, x


@triton.jit
def _dot_into(acc, w, x, WEIGHTS_LEFT: tl.constexpr):
    """acc + x @ w^T ([BLOCK_M, BLOCK_N]), or with WEIGHTS_LEFT acc + w @ x^T ([BLOCK_N, BLOCK_M])."""
    if WEIGHTS_LEFT:
        acc = tl.dot(w, tl.trans(x), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _along_k(a, b):
    """[R, 2C]: a's C columns, then b's (a, b [R, C]): operands of several pairs joined into one dot's
    inner dimension, in the same order for the weights and the activations. Joined on a new last
    dimension that is then moved before the columns, it keeps each thread's registers, where
    interleaving the two (a plain reshape of the join) sends the weights through shared memory."""
    ROWS: tl.constexpr = a.shape[0]
    COLUMNS: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, 2 * COLUMNS))


@triton.jit
def _pair_update(acc, x_ptr, w, scales, tokens, token_mask, first_input, OFFSET: tl.constexpr, K: tl.constexpr,
                 G: tl.constexpr, B: tl.constexpr, ALIGNED: tl.constexpr, DOT: tl.constexpr, HALF_ACC: tl.constexpr,
                 WEIGHTS_LEFT: tl.constexpr, ASM: tl.constexpr):
    """One decoded pair (at input first_input + OFFSET) into the accumulator: on tensor cores (DOT)
    or CUDA cores (one token)."""
    if DOT:
        acc = _dot_pair(acc, x_ptr, w, scales, tokens, token_mask, first_input, OFFSET, K, G, B, ALIGNED,
                        WEIGHTS_LEFT, ASM)
    else:
        acc = _fma_pair(acc, x_ptr, w, scales, first_input, OFFSET, K, G, B, ALIGNED, HALF_ACC, ASM)
    return acc


# Ask L2 for one 128-byte line ($1): a hint, nothing waits for it.
PREFETCH_ASM = tl.constexpr("{ prefetch.global.L2 [$1]; mov.u32 $0, 0; }")


@triton.jit
def _prefetch_plane(ptr, rows, first_slot, START: tl.constexpr, WIDTH: tl.constexpr,
                    ROW_WORDS: tl.constexpr, B: tl.constexpr, SLOT_COUNT: tl.constexpr):
    """Prefetch into L2 the words of one plane (as _plane_tile) that SLOT_COUNT slots from first_slot take.

    They are contiguous in each row: words START + s * WIDTH / 32 * B onwards for slot s.
    """
    WORDS: tl.constexpr = SLOT_COUNT * WIDTH * B // 32
    LINES: tl.constexpr = WORDS // 32 if WORDS >= 32 else 1
    offsets = rows[:, None] * ROW_WORDS + START + first_slot * WIDTH // 32 * B + tl.arange(0, LINES)[None, :] * 32
    tl.inline_asm_elementwise(PREFETCH_ASM, "=r,l", [ptr + offsets], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_stage(codes_ptr, rows, first_slot, K: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                    SLOT_COUNT: tl.constexpr):
    """Prefetch every plane of a stage's codes for SLOT_COUNT slots from first_slot (step_words' planes)."""
    ROW_WORDS: tl.constexpr = K * BITS // 32
    _prefetch_plane(codes_ptr, rows, first_slot, 0, 4 if BITS == 4 else 2, ROW_WORDS, B, SLOT_COUNT)
    if BITS == 3:
        _prefetch_plane(codes_ptr, rows, first_slot, K * 2 // 32, 1, ROW_WORDS, B, SLOT_COUNT)


@triton.jit
def _tables(table_ptr, res_table_ptr, rows, BITS: tl.constexpr, RES_BITS: tl.constexpr):
    """Both stages' load_table (the residual's is the base's when there is none: never read)."""
    table = load_table(table_ptr, rows, BITS)
    res_table = table
    if RES_BITS > 0:
        res_table = load_table(res_table_ptr, rows, RES_BITS)
    return table, res_table


@triton.jit
def _start(codes_ptr, res_codes_ptr, rows, first_slot, K: tl.constexpr, B: tl.constexpr,
           BITS: tl.constexpr, RES_BITS: tl.constexpr, SLOT_COUNT: tl.constexpr, PREFETCH: tl.constexpr,
           PDL: tl.constexpr):
    """A lookup kernel's prologue: prefetch the program's codes (PREFETCH), then, under programmatic
    dependent launch (PDL), wait for the rotation and let the next kernel launch. Weights and tables
    are read-only for the model's lifetime, so they may be read before the wait; nothing the
    previous kernels write is touched before it."""
    if PREFETCH:
        _prefetch_stage(codes_ptr, rows, first_slot, K, B, BITS, SLOT_COUNT)
        if RES_BITS > 0:
            _prefetch_stage(res_codes_ptr, rows, first_slot, K, B, RES_BITS, SLOT_COUNT)
    pdl_start(PDL)


@triton.jit
def _step_tiles(codes_ptr, res_codes_ptr, rows, first_slot, K: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                RES_BITS: tl.constexpr, SLOTS: tl.constexpr):
    """Both stages' step_words of one step (the residual's are the base's when there is none: never read)."""
    tiles = step_words(codes_ptr, rows, first_slot, K, B, BITS, SLOTS)
    res_tiles = tiles
    if RES_BITS > 0:
        res_tiles = step_words(res_codes_ptr, rows, first_slot, K, B, RES_BITS, SLOTS)
    return tiles, res_tiles


@triton.jit
def _lut_step(acc, x_ptr, tiles, scales_ptr, table, res_tiles, res_scales_ptr, res_table, rows,
              tokens, token_mask, first_slot, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr,
              BITS: tl.constexpr, RES_BITS: tl.constexpr, SLOTS: tl.constexpr, ASM: tl.constexpr,
              DOT: tl.constexpr, HALF_ACC: tl.constexpr, WEIGHTS_LEFT: tl.constexpr = False,
              SCALE_FIRST: tl.constexpr = False, DOT_PAIRS: tl.constexpr = 1):
    """acc plus SLOTS slots from first_slot of both stages, whose word tiles (`_step_tiles`) are
    loaded: decode two pairs at a time, then `_dot_pair` (tensor cores) or `_fma_pair` (CUDA cores)
    each, or for a residual option in fp16 `_folded_fma_pair` per pair of both stages; with
    SCALE_FIRST `_scaled_dot_pair` per pair of both stages, or one dot per DOT_PAIRS pairs (2 or 4,
    `_along_k`; SLOTS is a multiple of 8); each row's scales from one address per step (scale_rows)."""
    WORD_SLOTS: tl.constexpr = 8 if BITS == 4 else 16  # slots per tile of step_words
    RES_WORD_SLOTS: tl.constexpr = 8 if RES_BITS == 4 else 16
    FOLD: tl.constexpr = RES_BITS > 0 and HALF_ACC and not DOT
    ALIGNED: tl.constexpr = SLOTS * B % G == 0  # every step starts a group
    first_input = first_slot * B
    scales = scale_rows(scales_ptr, rows, first_input, K, G)
    res_scales = scales  # never read without a residual stage
    if RES_BITS > 0:
        res_scales = scale_rows(res_scales_ptr, rows, first_input, K, G)
    for offset in tl.static_range(0, SLOTS, 4):
        if offset % WORD_SLOTS == 0:
            words, signs = tiles[offset // WORD_SLOTS]
            words, signs = _doubled(words), _doubled(signs)
        first, second = decode_quad(words, signs, table, offset, B, BITS, ASM)
        if RES_BITS > 0:
            if offset % RES_WORD_SLOTS == 0:
                res_words, res_signs = res_tiles[offset // RES_WORD_SLOTS]
                res_words, res_signs = _doubled(res_words), _doubled(res_signs)
            res_first, res_second = decode_quad(res_words, res_signs, res_table, offset, B, RES_BITS, ASM)
        else:
            res_first, res_second = first, second  # never read without a residual stage
        # each pair's first input is first_input + (offset + 2 half) B
        if DOT and SCALE_FIRST and DOT_PAIRS == 1:
            acc = _scaled_dot_pair(acc, x_ptr, first, res_first, scales, res_scales, tokens, token_mask, first_input,
                                   offset * B, K, G, B, ALIGNED, RES_BITS, WEIGHTS_LEFT, ASM)
            acc = _scaled_dot_pair(acc, x_ptr, second, res_second, scales, res_scales, tokens, token_mask,
                                   first_input, (offset + 2) * B, K, G, B, ALIGNED, RES_BITS, WEIGHTS_LEFT, ASM)
        elif DOT and SCALE_FIRST:  # both pairs in one dot, or (DOT_PAIRS = 4) with the two before them
            w1, x1 = _scaled_pair(x_ptr, first, res_first, scales, res_scales, tokens, token_mask, first_input,
                                  offset * B, K, G, B, ALIGNED, RES_BITS, ASM)
            w2, x2 = _scaled_pair(x_ptr, second, res_second, scales, res_scales, tokens, token_mask, first_input,
                                  (offset + 2) * B, K, G, B, ALIGNED, RES_BITS, ASM)
            w, x = _along_k(w1, w2), _along_k(x1, x2)
            if DOT_PAIRS == 2:
                acc = _dot_into(acc, w, x, WEIGHTS_LEFT)
            elif offset % 8 == 0:
                held_w, held_x = w, x
            else:
                acc = _dot_into(acc, _along_k(held_w, w), _along_k(held_x, x), WEIGHTS_LEFT)
        elif FOLD:
            acc = _folded_fma_pair(acc, x_ptr, first, res_first, scales, res_scales, first_input, offset * B, K, G, B,
                                   ALIGNED, ASM)
            acc = _folded_fma_pair(acc, x_ptr, second, res_second, scales, res_scales, first_input, (offset + 2) * B, K,
                                   G, B, ALIGNED, ASM)
        else:
            acc = _pair_update(acc, x_ptr, first, scales, tokens, token_mask, first_input, offset * B, K, G, B,
                               ALIGNED, DOT, HALF_ACC, WEIGHTS_LEFT, ASM)
            acc = _pair_update(acc, x_ptr, second, scales, tokens, token_mask, first_input, (offset + 2) * B, K, G, B,
                               ALIGNED, DOT, HALF_ACC, WEIGHTS_LEFT, ASM)
            if RES_BITS > 0:
                acc = _pair_update(acc, x_ptr, res_first, res_scales, tokens, token_mask, first_input, offset * B, K,
                                   G, B, ALIGNED, DOT, HALF_ACC, WEIGHTS_LEFT, ASM)
                acc = _pair_update(acc, x_ptr, res_second, res_scales, tokens, token_mask, first_input,
                                   (offset + 2) * B, K, G, B, ALIGNED, DOT, HALF_ACC, WEIGHTS_LEFT, ASM)
    return acc


@triton.jit
def _lut_steps(acc, x_ptr, codes_ptr, scales_ptr, table, res_codes_ptr, res_scales_ptr, res_table, rows,
               tokens, token_mask, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
               RES_BITS: tl.constexpr, SLOTS: tl.constexpr, ITERS: tl.constexpr, ASM: tl.constexpr,
               DOT: tl.constexpr, HALF_ACC: tl.constexpr, WEIGHTS_LEFT: tl.constexpr, LOOKAHEAD: tl.constexpr,
               STAGES: tl.constexpr, SCALE_FIRST: tl.constexpr = False, DOT_PAIRS: tl.constexpr = 1):
    """acc plus the program's ITERS steps (`_lut_step`), from slot program_id(1) * ITERS * SLOTS.

    A run-time loop, software-pipelined over STAGES steps: Triton copies the loads of the next
    STAGES - 1 steps into shared memory asynchronously (cp.async) while one step decodes. (The
    launch option num_stages pipelines only loops with a `tl.dot`, so the CUDA-core kernel names
    it on its loop.) LOOKAHEAD instead: the steps are unrolled and each step's code words are
    loaded before the previous step decodes (ptxas may still sink the loads towards their use).
    """
    first_slot = tl.program_id(1) * ITERS * SLOTS
    if LOOKAHEAD:
        tiles, res_tiles = _step_tiles(codes_ptr, res_codes_ptr, rows, first_slot, K, B, BITS, RES_BITS, SLOTS)
        for step in tl.static_range(ITERS):
            current, res_current = tiles, res_tiles
            if step + 1 < ITERS:
                tiles, res_tiles = _step_tiles(codes_ptr, res_codes_ptr, rows, first_slot + (step + 1) * SLOTS, K, B,
                                               BITS, RES_BITS, SLOTS)
            acc = _lut_step(acc, x_ptr, current, scales_ptr, table, res_current, res_scales_ptr, res_table, rows,
                            tokens, token_mask, first_slot + step * SLOTS, K, G, B, BITS, RES_BITS, SLOTS, ASM, DOT,
                            HALF_ACC, WEIGHTS_LEFT, SCALE_FIRST, DOT_PAIRS)
    else:
        for step in tl.range(ITERS, num_stages=STAGES):
            tiles, res_tiles = _step_tiles(codes_ptr, res_codes_ptr, rows, first_slot + step * SLOTS, K, B, BITS,
                                           RES_BITS, SLOTS)
            acc = _lut_step(acc, x_ptr, tiles, scales_ptr, table, res_tiles, res_scales_ptr, res_table, rows, tokens,
                            token_mask, first_slot + step * SLOTS, K, G, B, BITS, RES_BITS, SLOTS, ASM, DOT, HALF_ACC,
                            WEIGHTS_LEFT, SCALE_FIRST, DOT_PAIRS)
    return acc


@triton.jit(do_not_specialize=["M"])
def lut_dot_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr, M,
                   N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                   RES_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr,
                   ITERS: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False,
                   WEIGHTS_LEFT: tl.constexpr = False, LOOKAHEAD: tl.constexpr = False,
                   STAGES: tl.constexpr = 1, SCALE_FIRST: tl.constexpr = False, DOT_PAIRS: tl.constexpr = 1):
    """out[M, N] (+)= x' @ W'^T on tensor cores; grid (cdiv(N, BLOCK_N), splits, cdiv(M, BLOCK_M)).

    A program takes BLOCK_N rows and ITERS runs of SLOTS consecutive slots (SLOTS a multiple of
    every plane's slots per word; K = splits * ITERS * SLOTS * B). Few tokens: many splits, each
    adding its partial sums atomically into the output the rotation kernel zeroed, so every SM is
    busy even for one token (padded to BLOCK_M = 16 rows of the dot). Many tokens: one split,
    a tiled GEMM. PREFETCH, PDL: see _start. WEIGHTS_LEFT: see _dot_pair. SCALE_FIRST: see _scaled_dot_pair.
    LOOKAHEAD, STAGES: see _lut_steps; DOT_PAIRS: _lut_step.
    """
    rows, row_mask = block_rows(N, BLOCK_N)
    table, res_table = _tables(table_ptr, res_table_ptr, rows, BITS, RES_BITS)  # before _start's wait: read-only
    _start(codes_ptr, res_codes_ptr, rows, tl.program_id(1) * ITERS * SLOTS, K, B, BITS, RES_BITS,
           SLOTS * ITERS, PREFETCH, PDL)
    tokens = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = tokens < M
    if WEIGHTS_LEFT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _lut_steps(acc, x_ptr, codes_ptr, scales_ptr, table, res_codes_ptr, res_scales_ptr, res_table, rows, tokens,
                     token_mask, K, G, B, BITS, RES_BITS, SLOTS, ITERS, ASM, True, False, WEIGHTS_LEFT, LOOKAHEAD,
                     STAGES, SCALE_FIRST, DOT_PAIRS)
    if WEIGHTS_LEFT:  # acc[row, token]
        offsets, mask = tokens[None, :] * N + rows[:, None], token_mask[None, :] & row_mask[:, None]
    else:
        offsets, mask = tokens[:, None] * N + rows[None, :], token_mask[:, None] & row_mask[None, :]
    _accumulate(out_ptr, offsets, acc, mask, K > SLOTS * B * ITERS)


@triton.jit
def lut_fma_kernel(x_ptr, out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                   N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                   RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, ITERS: tl.constexpr,
                   ASM: tl.constexpr, THREADS: tl.constexpr, HALF_ACC: tl.constexpr = False,
                   PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False, LOOKAHEAD: tl.constexpr = False,
                   STAGES: tl.constexpr = 1):
    """out[N] (+)= W' x' for one token on CUDA cores; grid (cdiv(N, BLOCK_N), splits). As lut_dot_kernel.
    THREADS: 32 num_warps (_add_pairs).

    HALF_ACC: see _fma_pair. PREFETCH, PDL: see _start. LOOKAHEAD, STAGES: see _lut_steps.
    """
    rows, row_mask = block_rows(N, BLOCK_N)
    table, res_table = _tables(table_ptr, res_table_ptr, rows, BITS, RES_BITS)  # before _start's wait: read-only
    _start(codes_ptr, res_codes_ptr, rows, tl.program_id(1) * ITERS * SLOTS, K, B, BITS, RES_BITS,
           SLOTS * ITERS, PREFETCH, PDL)
    if HALF_ACC:
        acc = tl.zeros((BLOCK_N, 2 * B), dtype=tl.float16)
    else:
        acc = tl.zeros((BLOCK_N, 2 * B), dtype=tl.float32)
    acc = _lut_steps(acc, x_ptr, codes_ptr, scales_ptr, table, res_codes_ptr, res_scales_ptr, res_table, rows, rows,
                     row_mask, K, G, B, BITS, RES_BITS, SLOTS, ITERS, ASM, False, HALF_ACC, False, LOOKAHEAD, STAGES)
    _accumulate_rows(out_ptr, rows, tl.sum(acc.to(tl.float32), axis=1), row_mask, K > SLOTS * B * ITERS, N % 2 == 0,
                     THREADS, ASM)


@triton.jit
def dequant_kernel(out_ptr, codes_ptr, scales_ptr, table_ptr, res_codes_ptr, res_scales_ptr, res_table_ptr,
                   N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
                   RES_BITS: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """out[N, K] = W' in out's dtype; grid (cdiv(N, BLOCK_N), K // (32 * B)): one chunk per program."""
    WORD_SLOTS: tl.constexpr = 8 if BITS == 4 else 16  # slots per tile of step_words
    RES_WORD_SLOTS: tl.constexpr = 8 if RES_BITS == 4 else 16
    rows, row_mask = block_rows(N, BLOCK_N)
    chunk = tl.program_id(1)
    first_input = chunk * 32 * B
    ALIGNED: tl.constexpr = 32 * B % G == 0
    scales = scale_rows(scales_ptr, rows, first_input, K, G)
    res_scales = scale_rows(res_scales_ptr, rows, first_input, K, G)  # never read without a residual stage
    table, res_table = _tables(table_ptr, res_table_ptr, rows, BITS, RES_BITS)
    tiles, res_tiles = _step_tiles(codes_ptr, res_codes_ptr, rows, chunk * 32, K, B, BITS, RES_BITS, 32)
    for offset in tl.static_range(0, 32, 4):
        if offset % WORD_SLOTS == 0:
            words, signs = tiles[offset // WORD_SLOTS]
            words, signs = _doubled(words), _doubled(signs)
        first, second = decode_quad(words, signs, table, offset, B, BITS, ASM)
        res_first, res_second = first, second  # unread when RES_BITS == 0
        if RES_BITS > 0:
            if offset % RES_WORD_SLOTS == 0:
                res_words, res_signs = res_tiles[offset // RES_WORD_SLOTS]
                res_words, res_signs = _doubled(res_words), _doubled(res_signs)
            res_first, res_second = decode_quad(res_words, res_signs, res_table, offset, B, RES_BITS, ASM)
        for half in tl.static_range(2):
            if half == 0:
                w, r = first, res_first
            else:
                w, r = second, res_second
            w = w.to(tl.float32) * _row_scales(scales, first_input, (offset + 2 * half) * B, G, ALIGNED)[:, None]
            if RES_BITS > 0:
                w += r.to(tl.float32) * _row_scales(res_scales, first_input, (offset + 2 * half) * B, G, ALIGNED)[:, None]
            _store_pair(out_ptr, w, rows, row_mask, first_input + (offset + 2 * half) * B, K, B)


@triton.jit
def _store_pair(out_ptr, w, rows, row_mask, k0, K: tl.constexpr, B: tl.constexpr):
    """Store a decoded pair tile (column 2 kw + h = input k0 + h B + kw) as two contiguous [BLOCK_N, B] runs."""
    first, second = tl.split(tl.reshape(w, (w.shape[0], B, 2)))
    offsets = rows[:, None] * K + k0 + tl.arange(0, B)[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offsets, first.to(dtype), mask=row_mask[:, None])
    tl.store(out_ptr + offsets + B, second.to(dtype), mask=row_mask[:, None])
