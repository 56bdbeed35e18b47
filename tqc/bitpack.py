"""Dense packing of b-bit codes into int32 words, no bits wasted (3-bit included).

Layout (format version 1), for codes of shape [rows, K] with K a multiple of 32:
a b-bit code is split into bit planes of power-of-two widths, high bits first
(4 -> [4], 3 -> [2, 1], 2 -> [2], 8 -> [8]). Plane p of width w packs 32 / w consecutive codes
of a row into one int32 word, code j of the word in bits [j*w, (j+1)*w). The planes are
concatenated along the last dimension, so a row of K codes takes exactly K * b / 32 words.
Every width goes through the same path; the kernels decode it with constexpr plane widths.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def plane_widths(bits: int) -> tuple[int, ...]:
    """Power-of-two widths, high first, that add up to `bits`."""
    widths, rest = [], bits
    for width in (8, 4, 2, 1):
        if rest >= width:
            widths.append(width)
            rest -= width
    return tuple(widths)


def plane_shifts(bits: int) -> tuple[int, ...]:
    """The bit position in the code of each plane of `plane_widths(bits)`."""
    shifts, position = [], bits
    for width in plane_widths(bits):
        position -= width
        shifts.append(position)
    return tuple(shifts)


def packed_words(k: int, bits: int) -> int:
    """int32 words per row of k codes."""
    if k % WORD_BITS:
        raise ValueError(f"packed rows need a multiple of {WORD_BITS} codes, got {k}")
    return k * bits // WORD_BITS


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) of shape [..., K] into int32 [..., K * bits / 32]."""
    packed_words(codes.shape[-1], bits)
    codes = codes.to(torch.int64)
    planes = []
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        per_word = WORD_BITS // width
        part = ((codes >> shift) & (2**width - 1)).reshape(*codes.shape[:-1], -1, per_word)
        offsets = torch.arange(per_word, dtype=torch.int64, device=codes.device) * width
        word = (part << offsets).sum(dim=-1)  # < 2**32, fits int64
        planes.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
    return torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: int, k: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of `pack`: int32 [..., K * bits / 32] -> codes [..., K] (int64 unless `dtype` says).

    Works in int32 throughout: an arithmetic shift smears the sign bit only into bits above the
    field being extracted, which the mask drops, so no widening to int64 is needed.
    """
    words = packed.to(torch.int32)
    codes: torch.Tensor | None = None
    start = 0
    for width, shift in zip(plane_widths(bits), plane_shifts(bits)):
        count = k * width // WORD_BITS
        offsets = torch.arange(0, WORD_BITS, width, dtype=torch.int32, device=packed.device)
        part = ((words[..., start : start + count, None] >> offsets) & (2**width - 1)).reshape(*packed.shape[:-1], k)
        if shift:
            part <<= shift
        codes = part if codes is None else codes.bitwise_or_(part)
        start += count
    return codes if dtype == torch.int32 else codes.to(dtype)
