"""The fragment layout of 4-, 3- and 2-bit codes: each thread's words in the order of wgmma's register operand.

The layout of the fragment kernel family (registry.FragmentLayerKernel, gluon_kernels.py; docs/
kernel_layout.md "Fragment layout"): `attach(model)` on Hopper repacks eligible layers into it
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
3-bit codes are planes, as in the lookups' layout (repack.planes): their 2-bit magnitudes in the
2-bit layout, then, after every magnitude word of the layer, the signs: a word a thread for two
chunks 2 i + e, the sign of the magnitude word's code 8 h + 4 a + 2 b + c at bit 8 (2 b + c) + 7 -
(4 e + 2 h + a), so that a left shift by 4 e + 2 h + a brings a quad's 4 signs to the high bytes'
sign bits (the lookups' sign plane, slot 16 e + 8 h + 4 a + 2 b + c). With SIGN_SELECTORS (the default since
session 51; TQC_SIGN_SELECTORS=0 switches it off) the sign words are laid out for the selectors instead
("selector_sign": `fragment_slot_bits`): that sign at bit 16 h + 4 (2 b + c) + 2 e + a, beside the magnitude's
crumb (at 16 h + 4 (2 b + c) + 2 a of its word), so that one shift and mask put a quad column's signs at bit 2
of the selector nibbles (gluon_kernels._signed_selector_quads).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

from tqc.bitpack import pack, unpack
from tqc.codebook import Codebook

from .lut import codebook_code, emulate_quad, half2_values, lookup_values, stored_code
from .repack import planes, slot_bits

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


def fragment_input_order(block_k: int = BLOCK_K) -> torch.Tensor:
    """The natural input at each position of a step's activations in fragment order (the one-token
    kernel's X_ORDERED): lane quad q = l % 4's 8 C inputs contiguous, in its words' slot order:
    position 8 C q + 8 ch + 4 a + 2 b + c holds input 32 ch + 16 a + 8 b + 2 q + c."""
    q, ch, a, b, c = torch.meshgrid(*(torch.arange(n) for n in (4, block_k // 32, 2, 2, 2)), indexing="ij")
    return (32 * ch + 16 * a + 8 * b + 2 * q + c).reshape(-1)


def _natural_order(values: torch.Tensor, n: int, k: int, block_k: int, warps: int) -> torch.Tensor:
    """Inverse of _fragment_order: [N / 16 W, K / block_k, W, 32, 2 C, 8] -> [N, K]."""
    c, rows = block_k // 32, 16 * warps
    values = values.reshape(n // rows, k // block_k, warps, 8, 4, c, 2, 2, 2, 2)  # nb, s, w, r, q, ch, h, a, b, cc
    return values.permute(0, 2, 6, 3, 1, 5, 7, 8, 4, 9).reshape(n, k)


def fits(n: int, k: int, group_size: int, block_k: int = BLOCK_K, warps: int = WARPS) -> bool:
    """Whether a layer can take this layout: whole row blocks and steps, one scale a row and step."""
    return n % (16 * warps) == 0 and k % block_k == 0 and block_k % 32 == 0 and group_size % block_k == 0


PLANE_CODES = {"nibble": 8, "crumb": 16, "sign": 32, "selector_sign": 32}  # codes a word of each plane kind holds
QUAD_SHIFTS = {"nibble": (0, 16), "crumb": (0, 2, 16, 18)}  # where a word's quads start, in slot order
# 3-bit codes' signs laid out to join their magnitudes in the PRMT selectors, each code looked up whole in a
# table of the 8 signed values (lut.table_words(3, signed=True)): no sign step a quad, 11% fewer instructions
# in the one-token kernel at 8 steps, 10% at 4, statically; checked on the H100 (runs 231, 234), 3-bit Llama-3-8B
# layers 1-4% faster at one token, 2-3% at 16, the decoder at plan 3 2% (runs 232-234). TQC_SIGN_SELECTORS=0: off.
SIGN_SELECTORS = os.environ.get("TQC_SIGN_SELECTORS", "1") == "1"


def fragment_planes(bits: int, sign_selectors: bool | None = None) -> tuple[tuple[str, int], ...]:
    """The (kind, width) planes of the fragment layout: repack.planes', 3 bits' signs as "selector_sign"
    where `sign_selectors` (default: SIGN_SELECTORS as it stands) is on."""
    if bits == 3 and (SIGN_SELECTORS if sign_selectors is None else sign_selectors):
        return ("crumb", 2), ("selector_sign", 1)
    return planes(bits)


def fragment_slot_bits(kind: str, slot: int) -> tuple[tuple[int, int], ...]:
    """repack.slot_bits, and for "selector_sign" the sign (bit 2 of the stored code) of slot 16 e + 8 h +
    4 a + j at bit 16 h + 4 j + 2 e + a."""
    if kind != "selector_sign":
        return slot_bits(kind, slot)
    e, h, a, j = slot >> 4, slot >> 3 & 1, slot >> 2 & 1, slot & 3
    return ((2, 16 * h + 4 * j + 2 * e + a),)


def _pack_planes(stored: torch.Tensor, block_k: int, warps: int, bits: int) -> list[torch.Tensor]:
    """[N, K] stored codes -> each plane of `fragment_planes(bits)` as int32 words [N / 16 W, K / block_k,
    W, 32, words a thread]: slot j of a word holds the code at position j of the word's run of
    _fragment_order's codes (so a crumb word's code 8 h + 4 a + 2 b + c is slot 4 a + 2 b + c of row
    half h, and a sign word's code 16 e + 8 h + ... is chunk 2 i + e's)."""
    codes = _fragment_order(stored.to(torch.int64), block_k, warps)
    words = []
    for kind, _ in fragment_planes(bits):
        slots = PLANE_CODES[kind]
        plane = codes.reshape(*codes.shape[:-2], -1, slots)
        word = torch.zeros(plane.shape[:-1], dtype=torch.int64, device=stored.device)
        for slot in range(slots):
            for source, target in fragment_slot_bits(kind, slot):
                word |= ((plane[..., slot] >> source) & 1) << target
        words.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
    return words


def pack_fragments(stored: torch.Tensor, block_k: int, warps: int = 4, bits: int = 4) -> torch.Tensor:
    """[N, K] stored codes (`lut.stored_code`) -> the fragment layout, flat int32 [N K bits / 32]: each
    plane whole in turn (3 bits: the magnitudes' crumbs, then the signs), [N / 16 W, K / block_k, W,
    32, words a thread]."""
    return torch.cat([plane.flatten() for plane in _pack_planes(stored, block_k, warps, bits)])


def _split_planes(words: torch.Tensor, n: int, k: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Flat fragment words -> each plane's words, flat, rows in order (a row block's are contiguous)."""
    return words.reshape(-1).split([n * k * width // 32 for _, width in fragment_planes(bits)])


def emulate_fragments(words: torch.Tensor, n: int, k: int, block_k: int, warps: int = 4, bits: int = 4) -> torch.Tensor:
    """[N, K] float32 codebook values (unscaled) of fragment words, decoded as the kernels' PRMT lookups
    decode them (`lut.emulate_quad`, a word's quads in slot order; at 3 bits the sign word of chunk
    2 i + e shifted by 4 e + quad, as gluon_kernels._sign_fragment and _quad shift it; with
    SIGN_SELECTORS its signs put beside the magnitudes in the selectors, as _signed_selector_quads puts
    them), then put back in row and input order."""
    c, rows = block_k // 32, 16 * warps
    shape = (n // rows, k // block_k, warps, 32, -1)
    raw, *signs = (plane.reshape(shape).numpy().view(np.uint32) for plane in _split_planes(words, n, k, bits))
    kind = planes(bits)[0][0]
    halves = []
    for quad, shift in enumerate(QUAD_SHIFTS[kind]):  # each quad: slots (0, 1), then (2, 3)
        if bits == 4:
            pairs = emulate_quad(raw, 4, shift, raw, shift // 4)
        elif bits == 3 and SIGN_SELECTORS:
            pairs = emulate_quad(_signed_selectors(raw, signs[0], shift, c), 3, 0, sign_selectors=True)
        elif bits == 3:
            pairs = emulate_quad(raw, 3, shift, np.repeat(signs[0], 2, axis=-1),
                                 (4 * (np.arange(c) % 2) + quad).astype(np.uint32))
        else:
            pairs = emulate_quad(raw, 2, shift)
        halves += [half2_values(pair) for pair in pairs]
    values = torch.from_numpy(np.stack(halves, axis=-2).reshape(*raw.shape, PLANE_CODES[kind]))
    return _natural_order(values, n, k, block_k, warps)


def _signed_selectors(magnitudes: np.ndarray, signs: np.ndarray, shift: int, c: int) -> np.ndarray:
    """SIGN_SELECTORS' selectors of the quad at bit `shift` (16 h + 2 a) of each magnitude word [..., C]:
    its crumbs at bits 0-1 of each nibble and the signs of chunk 2 i + e (bit 16 h + 4 j + 2 e + a of sign
    word i, [..., C / 2]) at bit 2."""
    row_half, column = shift // 16, shift % 16 // 2
    e = np.arange(c, dtype=np.uint64) % 2
    sign_words = np.repeat(signs, 2, axis=-1).astype(np.uint64) << np.uint64(2)  # each sign 2 bits up: at 4 j + 2
    sign_bits = (sign_words >> (np.uint64(16 * row_half + column) + 2 * e)) & np.uint64(0x4444)
    return ((magnitudes >> np.uint32(shift)) & np.uint32(0x3333)) | sign_bits.astype(np.uint32)


def unpack_fragments(words: torch.Tensor, n: int, k: int, block_k: int = BLOCK_K, warps: int = WARPS,
                     bits: int = 4) -> torch.Tensor:
    """Inverse of pack_fragments: [N, K] stored codes."""
    c, rows = block_k // 32, 16 * warps
    codes = torch.zeros(n // rows, k // block_k, warps, 32, 2 * c, 8, dtype=torch.int64, device=words.device)
    for (kind, _), plane in zip(fragment_planes(bits), _split_planes(words, n, k, bits)):
        slots = PLANE_CODES[kind]
        word = (plane.to(torch.int64) & 0xFFFFFFFF).reshape(*codes.shape[:4], -1)
        by_word = codes.view(*codes.shape[:4], -1, slots)
        for slot in range(slots):
            for source, target in fragment_slot_bits(kind, slot):
                by_word[..., slot] |= ((word >> target) & 1) << source
    return _natural_order(codes, n, k, block_k, warps)


def to_fragments_layout(packed: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """A layer's codes from the packed model's bitpack layout into the fragment layout, as [N, K bits /
    32] int32 (the bitpack shape; the kernels read it flat), converted ROWS_AT_ONCE rows at a time."""
    rows = WARPS * 16
    parts = [_pack_planes(stored_code(unpack(part, bits, k), bits), BLOCK_K, WARPS, bits)
             for part in packed.split(ROWS_AT_ONCE - ROWS_AT_ONCE % rows)]
    return torch.cat([plane.flatten() for plane_parts in zip(*parts) for plane in plane_parts]).reshape(packed.shape)


def to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """Inverse of `to_fragments_layout`."""
    n, step = words.shape[0], ROWS_AT_ONCE - ROWS_AT_ONCE % (WARPS * 16)
    widths = [width for _, width in fragment_planes(bits)]
    out = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = torch.cat([plane[start * k * width // 32 : stop * k * width // 32]
                          for plane, width in zip(_split_planes(words, n, k, bits), widths)])
        out.append(pack(codebook_code(unpack_fragments(part, stop - start, k, bits=bits), bits), bits))
    return torch.cat(out)


def fragment_weights(words: torch.Tensor, scales: torch.Tensor, n: int, k: int, group_size: int,
                     dtype: torch.dtype, residual: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     bits: int = 4, codebook: Codebook = "lloyd-max") -> torch.Tensor:
    """The weights [N, K] in `dtype` that fragment words of `bits`-bit codes of `codebook` and their scales
    stand for, plus a residual stage's (its words, scales and bits) if given, with the fp16 values the kernels
    look up, by `fragment_dequant_kernel` on the words' device: the interpreter's way (and
    TQC_GLUON_DEQUANT=0's) for prefill's dequantize + cuBLAS, which on a GPU runs
    gluon_kernels.fragment_dequant_kernel (the same numbers: registry.FragmentLayerKernel.dequantize)."""
    out = torch.empty(n, k, dtype=dtype, device=words.device)
    res_words, res_scales, res_bits = residual or (words, scales, 0)
    tables = _decode_tables(words.device, bits, SIGN_SELECTORS, codebook)
    res_tables = _decode_tables(words.device, res_bits or bits, SIGN_SELECTORS)
    fragment_dequant_kernel[(n // (16 * WARPS), k // BLOCK_K)](out, words, scales, *tables, res_words, res_scales,
                                                               *res_tables, N=n, K=k, G=group_size, BLOCK_K=BLOCK_K,
                                                               W=WARPS, BITS=bits, RES_BITS=res_bits)
    return out


@lru_cache(maxsize=None)
def _decode_tables(device: torch.device, bits: int, sign_selectors: bool,
                   codebook: Codebook = "lloyd-max") -> tuple[torch.Tensor, torch.Tensor]:
    """fragment_dequant_kernel's tables on `device`, made once (not inside a CUDA graph's capture): the
    fp16 values the lookups hold (3 and 4 bits: the magnitudes) as float32, and each code's bits'
    positions in its word, plane by plane: [codes a word, bits of the plane] flat, for 3 bits the
    magnitudes' [16, 2] then the signs' [32], laid out as `sign_selectors` says (fragment_planes)."""
    values = torch.tensor(lookup_values(bits, codebook), device=device)
    positions = [target for kind, _ in fragment_planes(bits, sign_selectors) for slot in range(PLANE_CODES[kind])
                 for _, target in sorted(fragment_slot_bits(kind, slot))]
    return values, torch.tensor(positions, dtype=torch.int32, device=device)


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
    weight = _step_values(words_ptr, values_ptr, positions_ptr, block, step, N, K, BLOCK_K, W, BITS)
    weight = weight * tl.load(scales_ptr + groups).to(tl.float32)[:, None]
    if RES_BITS:
        residual = _step_values(res_words_ptr, res_values_ptr, res_positions_ptr, block, step, N, K, BLOCK_K, W,
                                RES_BITS)
        weight += residual * tl.load(res_scales_ptr + groups).to(tl.float32)[:, None]
    columns = step * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + columns[None, :], weight.to(out_ptr.dtype.element_ty))


@triton.jit
def _step_values(words_ptr, values_ptr, positions_ptr, block, step, N: tl.constexpr, K: tl.constexpr,
                 BLOCK_K: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """The codebook values [16 W rows, BLOCK_K inputs] (row and input order) of one step of one row
    block: its words [W, 32 lanes, words a thread] (3 bits: the magnitudes', then each magnitude
    word's sign word from the sign plane), each code's bits gathered by their positions
    (_decode_tables), then the tile permuted as _natural_order permutes."""
    C: tl.constexpr = BLOCK_K // 32
    SLOTS: tl.constexpr = 8 if BITS == 4 else 16  # codes a word of the first plane (PLANE_CODES)
    WIDTH: tl.constexpr = 4 if BITS == 4 else 2  # a code's bits in it
    STEP_WORDS: tl.constexpr = W * 32 * 2 * C * 8 // SLOTS
    first = block * (K // BLOCK_K) + step
    words = tl.load(words_ptr + first * STEP_WORDS + tl.arange(0, STEP_WORDS))
    slot = tl.arange(0, SLOTS)
    code = tl.zeros([STEP_WORDS, SLOTS], tl.int32)
    for j in tl.static_range(WIDTH):
        code |= ((words[:, None] >> tl.load(positions_ptr + slot * WIDTH + j)[None, :]) & 1) << j
    if BITS == 3:  # word t C + ch's signs: slots 16 (ch % 2) + slot of sign word t C / 2 + ch // 2
        word = tl.arange(0, STEP_WORDS)
        sign_word = first * (STEP_WORDS // 2) + word // C * (C // 2) + word % C // 2
        signs = tl.load(words_ptr + N * K // 16 + sign_word)
        sign_slot = 16 * (word % C % 2)[:, None] + slot[None, :]
        code |= ((signs[:, None] >> tl.load(positions_ptr + SLOTS * WIDTH + sign_slot)) & 1) << 2
    if BITS == 2:
        value = tl.load(values_ptr + code)
    else:  # sign and magnitude
        magnitude = tl.load(values_ptr + (code & (2 ** (BITS - 1) - 1)))
        value = tl.where(code >= 2 ** (BITS - 1), -magnitude, magnitude)
    # [w, r = l // 4, q = l % 4, ch, h, a, b, c] -> rows (w, h, r) x inputs (ch, a, b, q, c)
    value = tl.reshape(value, [W, 8, 4, C, 2, 2, 2, 2])
    return tl.reshape(tl.permute(value, [0, 4, 1, 3, 5, 6, 2, 7]), [16 * W, BLOCK_K])
