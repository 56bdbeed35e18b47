"""The fragment layout of 4- and 2-bit codes: each thread's words in the order of wgmma's register operand.

The layout of the fragment kernel family (registry.FragmentLayerKernel, gluon_kernels.py; docs/
kernel_layout.md "Fragment layout"): `attach(model, fragments=True)` repacks eligible layers into it
(`to_fragments_layout`, rows of 64 and steps of 64 inputs); scripts/gluon_dot16_lab.py packs other
step sizes and warp counts for its experiments. wgmma's A operand (fp16, 16 rows a warp, W warps) gives lane l of
warp w rows 16 w + l // 4 (+ 8) and, per 16 inputs, columns 2 (l % 4) + {0, 1} (+ 8). Over a step
of BLOCK_K = 32 C inputs a thread holds 2 rows x C chunks x 8 weights: one nibble word per (row
half h, chunk ch), its 8 codes in the slot order of tqc's lookups (`repack.slot_bits`): slot
4 a + 2 b + c of the word of (h, ch) in lane l holds input 32 ch + 16 a + 8 b + 2 (l % 4) + c of
row 16 w + 8 h + l // 4. Words are stored [row block, step, warp, lane, 2 C], (ch, h) in that
order in the last dimension, so that a thread's 2 C words of a step are one contiguous vector.
2-bit codes take one word per chunk, both row halves: code 8 h + 4 a + 2 b + c of the word of ch
holds what slot 4 a + 2 b + c of the 4-bit word (h, ch) holds, in the crumb order of the lookups
(quad 2 h + a at bit 16 h + 2 a, its codes 4 bits apart), so C words a thread and step.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

from tqc.bitpack import pack, unpack

from .lut import codebook_code, emulate_quad, half2_values, lookup_values, stored_code
from .repack import slot_bits

BLOCK_K = 64  # the family's step: inputs a thread's 4 words of a row pair cover, one 16-byte load
WARPS = 4  # 64 rows a program (one warpgroup)
ROWS_AT_ONCE = 4096  # rows converted at once (int64 intermediates)


def _fragment_order(codes: torch.Tensor, block_k: int, warps: int) -> torch.Tensor:
    """[N, K] -> [N / 16 W, K / block_k, W, 32 lanes, 2 C words, 8 slots]: each code where its word holds it."""
    n, k = codes.shape
    c, rows = block_k // 32, 16 * warps
    # row = 16 W nb + 16 w + 8 h + r, input = block_k s + 32 ch + 16 a + 8 b + 2 q + cc, lane = 4 r + q
    codes = codes.reshape(n // rows, warps, 2, 8, k // block_k, c, 2, 2, 4, 2)
    codes = codes.permute(0, 4, 1, 3, 8, 5, 2, 6, 7, 9)  # nb, s, w, r, q, ch, h, a, b, cc
    return codes.reshape(n // rows, k // block_k, warps, 32, 2 * c, 8)  # slot 4 a + 2 b + cc


def _natural_order(values: torch.Tensor, n: int, k: int, block_k: int, warps: int) -> torch.Tensor:
    """Inverse of _fragment_order: [N / 16 W, K / block_k, W, 32, 2 C, 8] -> [N, K]."""
    c, rows = block_k // 32, 16 * warps
    values = values.reshape(n // rows, k // block_k, warps, 8, 4, c, 2, 2, 2, 2)  # nb, s, w, r, q, ch, h, a, b, cc
    return values.permute(0, 2, 6, 3, 1, 5, 7, 8, 4, 9).reshape(n, k)


def fits(n: int, k: int, group_size: int, block_k: int = BLOCK_K, warps: int = WARPS) -> bool:
    """Whether a layer can take this layout: whole row blocks and steps, one scale a row and step."""
    return n % (16 * warps) == 0 and k % block_k == 0 and block_k % 32 == 0 and group_size % block_k == 0


# codes a word holds and the lookups' name for their bit order (repack.slot_bits): 4 bits, one word
# per (chunk, row half), slot 4 a + 2 b + c; 2 bits, one word per chunk, code 8 h + 4 a + 2 b + c
# (crumb quad 2 h + a, the quads of lut.CRUMB_ASM)
WORD_CODES = {4: (8, "nibble"), 2: (16, "crumb")}
QUAD_SHIFTS = {4: (0, 16), 2: (0, 2, 16, 18)}  # where a word's quads start, in slot order


def pack_fragments(stored: torch.Tensor, block_k: int, warps: int = 4, bits: int = 4) -> torch.Tensor:
    """[N, K] stored codes (`lut.stored_code`) -> int32 words [N / 16 W, K / block_k, W, 32, words a
    thread]: 2 C words for 4 bits, C for 2."""
    slots, kind = WORD_CODES[bits]
    codes = _fragment_order(stored.to(torch.int64), block_k, warps)
    codes = codes.reshape(*codes.shape[:-2], -1, slots)
    word = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=stored.device)
    for slot in range(slots):
        for source, target in slot_bits(kind, slot):
            word |= ((codes[..., slot] >> source) & 1) << target
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def emulate_fragments(words: torch.Tensor, n: int, k: int, block_k: int, warps: int = 4, bits: int = 4) -> torch.Tensor:
    """[N, K] float32 codebook values (unscaled) of fragment words, decoded as the kernel's PRMT lookups
    decode them (`lut.emulate_quad`, a word's quads in slot order), then put back in row and input order."""
    raw = words.numpy().view(np.uint32)
    halves = []
    for shift in QUAD_SHIFTS[bits]:  # each quad: slots (0, 1), then (2, 3)
        pairs = emulate_quad(raw, 4, shift, raw, shift // 4) if bits == 4 else emulate_quad(raw, 2, shift)
        halves += [half2_values(pair) for pair in pairs]
    values = torch.from_numpy(np.stack(halves, axis=-2).reshape(*raw.shape, WORD_CODES[bits][0]))
    return _natural_order(values, n, k, block_k, warps)


def unpack_fragments(words: torch.Tensor, n: int, k: int, block_k: int = BLOCK_K, warps: int = WARPS,
                     bits: int = 4) -> torch.Tensor:
    """Inverse of pack_fragments: [N, K] stored codes."""
    slots, kind = WORD_CODES[bits]
    codes = torch.zeros((*words.shape, slots), dtype=torch.int64, device=words.device)
    word = words.to(torch.int64) & 0xFFFFFFFF
    for slot in range(slots):
        for source, target in slot_bits(kind, slot):
            codes[..., slot] |= ((word >> target) & 1) << source
    return _natural_order(codes, n, k, block_k, warps)


def to_fragments_layout(packed: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """A 4- or 2-bit layer's codes from the packed model's bitpack layout into the fragment layout, as
    [N, K bits / 32] int32 (the bitpack shape; the kernel reads it flat)."""
    if bits not in WORD_CODES:
        raise ValueError(f"the fragment layout holds 4- and 2-bit codes, not {bits}-bit")
    rows = WARPS * 16
    chunks = [pack_fragments(stored_code(unpack(part, bits, k), bits), BLOCK_K, WARPS, bits).reshape(part.shape[0], -1)
              for part in packed.split(ROWS_AT_ONCE - ROWS_AT_ONCE % rows)]
    return torch.cat(chunks)


def to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """Inverse of `to_fragments_layout`."""
    rows = WARPS * 16
    return torch.cat([pack(codebook_code(unpack_fragments(part.reshape(-1), part.shape[0], k, bits=bits), bits), bits)
                      for part in words.split(ROWS_AT_ONCE - ROWS_AT_ONCE % rows)])


def fragment_weights(words: torch.Tensor, scales: torch.Tensor, n: int, k: int, group_size: int,
                     dtype: torch.dtype, residual: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     bits: int = 4) -> torch.Tensor:
    """The weights [N, K] in `dtype` that fragment words of `bits`-bit codes and their scales stand for,
    plus a residual stage's (its words, scales and bits) if given, with the fp16 values the kernels
    look up, by `fragment_dequant_kernel` on the words' device (for prefill: dequantize + cuBLAS)."""
    out = torch.empty(n, k, dtype=dtype, device=words.device)
    res_words, res_scales, res_bits = residual or (words, scales, 0)
    tables, res_tables = _decode_tables(words.device, bits), _decode_tables(words.device, res_bits or bits)
    fragment_dequant_kernel[(n // (16 * WARPS), k // BLOCK_K)](out, words, scales, *tables, res_words, res_scales,
                                                               *res_tables, N=n, K=k, G=group_size, BLOCK_K=BLOCK_K,
                                                               W=WARPS, BITS=bits, RES_BITS=res_bits)
    return out


@lru_cache(maxsize=None)
def _decode_tables(device: torch.device, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fragment_dequant_kernel's tables on `device`, made once (not inside a CUDA graph's capture): the
    fp16 values the lookups hold (4-bit: the 8 magnitudes) as float32, and each code's bits' positions
    in its word [codes a word, bits]."""
    slots, kind = WORD_CODES[bits]
    values = torch.tensor(lookup_values(bits), device=device)
    positions = torch.tensor([[target for _, target in sorted(slot_bits(kind, slot))] for slot in range(slots)],
                             dtype=torch.int32, device=device)
    return values, positions


@triton.jit
def fragment_dequant_kernel(out_ptr, words_ptr, scales_ptr, values_ptr, positions_ptr, res_words_ptr, res_scales_ptr,
                            res_values_ptr, res_positions_ptr, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                            BLOCK_K: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr, RES_BITS: tl.constexpr):
    """out[N, K] = scale x value of each code (+ the residual stage's of RES_BITS bits, its own
    tables, if RES_BITS), decoded from the fragment layout; grid (N / 16 W, K / BLOCK_K): a program
    decodes one step of one row block and stores it a row at a time (_step_values)."""
    block, step = tl.program_id(0), tl.program_id(1)
    rows = block * 16 * W + tl.arange(0, 16 * W)
    groups = rows * (K // G) + step * BLOCK_K // G
    weight = _step_values(words_ptr, values_ptr, positions_ptr, block, step, K, BLOCK_K, W, BITS)
    weight = weight * tl.load(scales_ptr + groups).to(tl.float32)[:, None]
    if RES_BITS:
        residual = _step_values(res_words_ptr, res_values_ptr, res_positions_ptr, block, step, K, BLOCK_K, W, RES_BITS)
        weight += residual * tl.load(res_scales_ptr + groups).to(tl.float32)[:, None]
    columns = step * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + columns[None, :], weight.to(out_ptr.dtype.element_ty))


@triton.jit
def _step_values(words_ptr, values_ptr, positions_ptr, block, step, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 W: tl.constexpr, BITS: tl.constexpr):
    """The codebook values [16 W rows, BLOCK_K inputs] (row and input order) of one step of one row
    block: its words [W, 32 lanes, words a thread], each code's bits gathered by their positions
    (positions_ptr [codes a word, BITS]), then the tile permuted as _natural_order permutes."""
    C: tl.constexpr = BLOCK_K // 32
    SLOTS: tl.constexpr = 8 if BITS == 4 else 16  # codes a word (WORD_CODES)
    STEP_WORDS: tl.constexpr = W * 32 * 2 * C * 8 // SLOTS
    words = tl.load(words_ptr + (block * (K // BLOCK_K) + step) * STEP_WORDS + tl.arange(0, STEP_WORDS))
    slot = tl.arange(0, SLOTS)
    code = tl.zeros([STEP_WORDS, SLOTS], tl.int32)
    for j in tl.static_range(BITS):
        code |= ((words[:, None] >> tl.load(positions_ptr + slot * BITS + j)[None, :]) & 1) << j
    if BITS == 4:  # sign and magnitude
        magnitude = tl.load(values_ptr + (code & 7))
        value = tl.where(code >= 8, -magnitude, magnitude)
    else:
        value = tl.load(values_ptr + code)
    # [w, r = l // 4, q = l % 4, ch, h, a, b, c] -> rows (w, h, r) x inputs (ch, a, b, q, c)
    value = tl.reshape(value, [W, 8, 4, C, 2, 2, 2, 2])
    return tl.reshape(tl.permute(value, [0, 4, 1, 3, 5, 6, 2, 7]), [16 * W, BLOCK_K])
