"""The kernel layout of packed codes (docs/kernel_layout.md), and the conversions to and from it.

tqc/bitpack.py packs 32 / w consecutive codes of a row in one word. The kernels want instead that
one wide, contiguous load gives every thread the codes of the same slots, and that the register
lookups of lut.py find every bit where their PTX expects it. So a row of K codes is cut into
chunks of 32 * B codes (B = `slot_words(K, G)`, a power of two, 2B dividing G); inside a chunk
code k = t * B + kw (slot t in 0..31, column kw in 0..B-1). Codes are stored as lut.stored_code
(sign and magnitude for 3 and 4 bits) and split into planes: 4 bits -> one nibble plane, 3 bits
-> a crumb plane (2-bit magnitudes) and a sign plane, 2 bits -> one crumb plane. A plane of width
w stores, per chunk, w runs of B words: word (a, kw) holds slots t = a * (32 / w) + j, j = 0 ..
32 / w - 1, at the bit positions of `slot_bits`. Planes are contiguous per row, in that order,
so a row still takes exactly K * b / 32 words.
"""

from __future__ import annotations

import torch

from tqc.bitpack import pack, unpack

from .lut import codebook_code, stored_code

MAX_SLOT_WORDS = 64
WORD_BITS = 32
SIGN_NIBBLE = (1, 3, 5, 7, 0, 2, 4, 6)  # 4-bit: slot j's sign sits in bit 3 of this nibble


def planes(bits: int) -> tuple[tuple[str, int], ...]:
    """The (kind, width) planes of a code width, in storage order."""
    return {4: (("nibble", 4),), 3: (("crumb", 2), ("sign", 1)), 2: (("crumb", 2),)}[bits]


def slot_bits(kind: str, slot: int) -> tuple[tuple[int, int], ...]:
    """(bit of the stored code, bit of the word) pairs for slot j of a word of this plane kind.

    Slot j is code i = j % 4 of quad j // 4, and each quad's four codes sit where one shift and
    mask make them the 4 nibbles of a PRMT selector (lut.quad_asm). nibble: magnitude in nibble
    j, sign in bit 3 of nibble SIGN_NIBBLE[j] (the signs of quad q land on bits 7, 15, 23, 31,
    the high bytes' sign bits, after a left shift by 4q). crumb: quad r at bit
    16 (r // 2) + 2 (r % 2), its codes 4 bits apart. sign: slot j of quad u = j // 4 at bit
    8 i + 7 - u (bits 7, 15, 23, 31 after a left shift by u).
    """
    quad, i = divmod(slot, 4)
    if kind == "nibble":
        return (0, 4 * slot), (1, 4 * slot + 1), (2, 4 * slot + 2), (3, 4 * SIGN_NIBBLE[slot] + 3)
    if kind == "crumb":
        low = 16 * (quad // 2) + 2 * (quad % 2) + 4 * i
        return (0, low), (1, low + 1)
    return ((2, 8 * i + 7 - quad),)


def slot_words(k: int, group_size: int) -> int:
    """B: the largest power of two <= min(64, group size / 2) with K a multiple of 32 * B.

    2B dividing G keeps two neighbouring slots (t even, t + 1) inside one group.
    """
    b = MAX_SLOT_WORDS
    while b > 1 and (k % (WORD_BITS * b) or group_size % (2 * b)):
        b //= 2
    return b


def _to_slot_order(codes: torch.Tensor, b: int) -> torch.Tensor:
    """[N, K] codes in k order -> [N, chunks, 32, B] indexed by (chunk, slot t, column kw)."""
    return codes.reshape(codes.shape[0], -1, WORD_BITS, b)


ROWS_PER_STEP = 4096  # rows converted at once: the int64 intermediates of a 128k-row head would take gigabytes


def to_kernel_layout(packed: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    """Repack int32 codes from the bitpack layout into the kernel layout (same shape, same device)."""
    return torch.cat([_rows_to_kernel_layout(rows, bits, k, group_size) for rows in packed.split(ROWS_PER_STEP)])


def to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    """Inverse of `to_kernel_layout`."""
    return torch.cat([_rows_to_bitpack_layout(rows, bits, k, group_size) for rows in words.split(ROWS_PER_STEP)])


def _rows_to_kernel_layout(packed: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    b = slot_words(k, group_size)
    codes = _to_slot_order(stored_code(unpack(packed, bits, k), bits), b)
    n, chunks = codes.shape[:2]
    out = []
    for kind, width in planes(bits):
        per_word = WORD_BITS // width
        slots = codes.reshape(n, chunks, width, per_word, b)
        word = torch.zeros(n, chunks, width, b, dtype=torch.int64, device=packed.device)
        for j in range(per_word):
            for source, target in slot_bits(kind, j):
                word |= ((slots[:, :, :, j] >> source) & 1) << target
        out.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).reshape(n, -1))
    return torch.cat(out, dim=-1)


def _rows_to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    b = slot_words(k, group_size)
    n = words.shape[0]
    chunks = k // (WORD_BITS * b)
    codes = torch.zeros(n, chunks, WORD_BITS, b, dtype=torch.int64, device=words.device)
    start = 0
    for kind, width in planes(bits):
        per_word = WORD_BITS // width
        count = k * width // WORD_BITS
        plane = (words[:, start : start + count].to(torch.int64) & 0xFFFFFFFF).reshape(n, chunks, width, b)
        slots = codes.view(n, chunks, width, per_word, b)
        for j in range(per_word):
            for source, target in slot_bits(kind, j):
                slots[:, :, :, j] |= ((plane >> target) & 1) << source
        start += count
    return pack(codebook_code(codes.reshape(n, k), bits), bits)
