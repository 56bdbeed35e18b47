"""The kernel layout of packed codes (docs/kernel_layout.md), and the conversions to and from it.

tqc/bitpack.py packs 32 / w consecutive codes of a row in one word. The kernels want instead that
one wide, contiguous load gives every thread the codes of the same "slot", so a tile decodes
with a shift and a mask, elementwise, no reshuffling in registers. So a row of K codes is cut
into chunks of 32 * B codes (B = `slot_words(K, G)`, a power of two dividing G); inside a chunk
code k = t * B + kw (slot t in 0..31, column kw in 0..B-1; 2B divides G). A plane of width w stores, per
chunk, w runs of B words; word (a, kw) holds slots t = a * (32 / w) + j, j = 0 .. 32 / w - 1, in
bits [j * w, (j + 1) * w). Planes are split and ordered as in bitpack (4 -> [4], 3 -> [2, 1],
2 -> [2]), each plane contiguous per row, so a row still takes exactly K * b / 32 words.
"""

from __future__ import annotations

import torch

from tqc.bitpack import pack, plane_shifts, plane_widths, unpack

MAX_SLOT_WORDS = 64
WORD_BITS = 32


def slot_words(k: int, group_size: int) -> int:
    """B: the largest power of two <= min(64, group size / 2) with K a multiple of 32 * B.

    2B dividing G keeps two neighbouring slots (t even, t + 1) inside one group.
    """
    b = MAX_SLOT_WORDS
    while b > 1 and (k % (WORD_BITS * b) or group_size % (2 * b)):
        b //= 2
    return b


def pair_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 [2**(2 bits), 2]: the values of slots (t, t + 1), t even, indexed as the GEMV extracts them.

    The GEMV reads it as int64 (`.view(torch.int64)`): one 8-byte gather, slot t's bits low.

    Even bits: the index is the 2b-bit field of both codes, slot t low. 3 bits: the 4-bit field of
    the 2-bit plane, shifted left by 2, or'd with the 2-bit field of the 1-bit plane.
    """
    index = torch.arange(2 ** (2 * bits))
    if bits % 2 == 0:
        first, second = index & (2**bits - 1), index >> bits
    else:
        high, low = index >> 2, index & 3
        first, second = ((high & 3) << 1) | (low & 1), ((high >> 2) << 1) | (low >> 1)
    return torch.stack((codebook[first], codebook[second]), dim=-1).contiguous()


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
    codes = _to_slot_order(unpack(packed, bits, k), b)
    n, chunks = codes.shape[:2]
    planes = []
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        per_word = WORD_BITS // width
        part = ((codes >> shift) & (2**width - 1)).reshape(n, chunks, width, per_word, b)
        offsets = torch.arange(per_word, dtype=torch.int64, device=packed.device).view(1, 1, 1, -1, 1) * width
        word = (part << offsets).sum(dim=3)  # [N, chunks, width, B], < 2**32
        planes.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).reshape(n, -1))
    return torch.cat(planes, dim=-1)


def _rows_to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    b = slot_words(k, group_size)
    n = words.shape[0]
    chunks = k // (WORD_BITS * b)
    codes = torch.zeros(n, chunks, WORD_BITS, b, dtype=torch.int64, device=words.device)
    start = 0
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        per_word = WORD_BITS // width
        count = k * width // WORD_BITS
        plane = (words[:, start : start + count].to(torch.int64) & 0xFFFFFFFF).reshape(n, chunks, width, 1, b)
        offsets = torch.arange(per_word, dtype=torch.int64, device=words.device).view(1, 1, 1, -1, 1) * width
        part = ((plane >> offsets) & (2**width - 1)).reshape(n, chunks, WORD_BITS, b)
        codes |= part << shift
        start += count
    return pack(codes.reshape(n, k), bits)
