"""Codebook lookups to int8 in registers, for kernels on int8 activations (`dp4a`, int8 tensor cores).

Used by the int8 kernel family (int8_kernels.py, layers on int8 activations) and by the lab
scripts/int8_gemv_lab.py (docs/performance-history.md, runs 48-51). The codebook is rounded to int8
(level / max * 127) and the factor multiplied back into the output. A PRMT then yields 4 int8 values at once, ready for `dp4a` or a tensor-core dot:

- 2 bits: the 4 levels are one word; the selector is the codes' crumbs masked into 4 nibbles.
- 3 bits: the 8 levels are two words (A, B); the selector's nibbles are a crumb (bits 0-1,
  from the crumb plane) and a high bit (bit 2, from the high plane), each shifted and masked,
  joined by one LOP3.
- 4 bits, 16 levels in two PRMTs and an xor, with no sign step: PRMT picks byte s (s < 8) of
  two registers, and for s >= 8 returns byte s - 8's sign replicated (0x00 or 0xFF). So with
  P1 = prmt(A, B, s) and P2 = prmt(C, D, s ^ 8), P1 ^ P2 is level(s) for every s when A, B hold
  levels 0-7 and C, D hold level(s + 8) ^ (sign of level(s) replicated), which must have a clear
  sign bit: codes s and s + 8 must share a sign. The stored code is the codebook index (levels
  ascending, 0-7 negative) with bits 2 and 3 swapped, which makes it so.

The int8 layout (`pack_words`; `to_int8_layout` converts the packed model's bitpack layout at
attach time): a row's codes in input order. 4 bits: word i holds inputs 8i onward, a nibble each
(quads at bits 0 and 16). 2 bits, and the crumb plane of 3 bits
(the codes' low 2 bits): word i holds inputs 16i onward, quad q at bit 16 (q // 2) + 2 (q % 2)
and its codes a nibble apart. The high plane of 3 bits follows the crumb plane in the row: word
i holds the third bits of inputs 32i onward, input 16 h + 4 q + j (h the crumb word's half) at
bit 16 h + q + 4 j, so that one shift puts a quad's four at the nibbles' bit 2. `emulate`
computes what the PTX computes, in numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from tqc.bitpack import pack, unpack
from tqc.codebook import int8_codebook

from .lut import byte_word, prmt

INT8_BITS = (2, 3, 4)
SIGN_FLIP = 0x88888888  # the selector nibbles' bit 3, flipped for the second PRMT of 4 bits


def int8_levels(bits: int) -> tuple[np.ndarray, float]:
    """The codebook rounded to int8 (ascending, int64 values) and the factor that maps them back."""
    levels, factor = int8_codebook(bits)
    return levels.numpy(), factor


def int8_stored_code(index, bits: int):
    """Codebook index -> stored code: bits 2 and 3 swapped for 4 bits (its own inverse), as is below."""
    if bits < 4:
        return index
    return (index & 3) | ((index >> 2 & 1) << 3) | ((index >> 3 & 1) << 2)


def int8_table_words(bits: int) -> list[int]:
    """The PRMT table as unsigned words: one for 2 bits, (A, B) for 3, (A, B, C, D) for 4 (module docstring)."""
    if bits not in INT8_BITS:
        raise ValueError(f"no int8 lookup for {bits}-bit codes")
    levels, _ = int8_levels(bits)
    by_stored = levels[int8_stored_code(np.arange(2**bits), bits)] & 0xFF
    if bits < 4:
        return [byte_word(by_stored[i : i + 4]) for i in range(0, 2**bits, 4)]
    first = by_stored[:8]
    second = by_stored[8:] ^ np.where(first & 0x80, 0xFF, 0)
    if (second & 0x80).any():
        raise AssertionError("codes s and s + 8 must share a sign")
    return [byte_word(first[:4]), byte_word(first[4:]), byte_word(second[:4]), byte_word(second[4:])]


def quad_shifts(bits: int) -> tuple[int, ...]:
    """Where each quad of a code word starts (the shift that brings its selector to bits 0-15);
    for 3 bits, of the crumb word."""
    return (0, 16) if bits == 4 else (0, 2, 16, 18)


def high_bit(half: int, quad: int, i: int) -> int:
    """3 bits: the bit of the high-plane word holding code i of quad `quad` of crumb word `half`."""
    return 16 * half + quad + 4 * i


def emulate(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The int8 levels the PTX decodes from rows of code words ([N, K * bits / 32] uint32): [N, K]."""
    table = [np.uint32(w) for w in int8_table_words(bits)]
    crumbs = words[:, : k // 16] if bits == 3 else words
    quads = []
    for shift in quad_shifts(bits):
        selector = crumbs >> np.uint32(shift)
        if bits == 4:
            quads.append(prmt(table[0], table[1], selector) ^ prmt(table[2], table[3], selector ^ np.uint32(SIGN_FLIP)))
            continue
        selector = selector & np.uint32(0x3333)
        if bits == 3:
            quads.append(prmt(table[0], table[1], selector | _high_nibbles(words[:, k // 16 :], shift)))
        else:
            quads.append(prmt(table[0], table[0], selector))
    data = np.stack(quads, axis=-1).astype(np.uint32)
    return data.view(np.int8).reshape(words.shape[0], k).astype(np.int64)


def _high_nibbles(high: np.ndarray, shift: int) -> np.ndarray:
    """3 bits: for every crumb word, its quad's (at `shift`) high bits moved to the nibbles' bit 2."""
    quad = quad_shifts(3).index(shift)
    out = []
    for half in (0, 1):
        base = high_bit(half, quad, 0)  # the quad's 4 bits sit at base + 4 i; they go to 4 i + 2
        moved = high >> np.uint32(base - 2) if base >= 2 else high << np.uint32(2 - base)
        out.append(moved & np.uint32(0x4444))
    return np.stack(out, axis=-1).reshape(high.shape[0], -1)  # crumb word 2 w + half


def pack_words(index: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codebook indices -> [N, K * bits / 32] int32 code words in input order (module docstring),
    on index's device."""
    stored = int8_stored_code(index.long(), bits)
    if bits == 3:
        planes = [_pack(stored & 3, 16, _crumb_bit), _pack(stored >> 2, 32, _high_plane_bit)]
    else:
        planes = [_pack(stored, 32 // bits, _nibble_bit if bits == 4 else _crumb_bit)]
    word = torch.cat(planes, dim=1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_words`: [N, K * bits / 32] int32 code words -> [N, K] codebook indices (int64)."""
    words = words.long() & 0xFFFFFFFF
    if bits == 3:
        crumbs = _unpack(words[:, : k // 16], 16, _crumb_bit, 3)
        stored = crumbs | _unpack(words[:, k // 16 :], 32, _high_plane_bit, 1) << 2
    else:
        stored = _unpack(words, 32 // bits, _nibble_bit if bits == 4 else _crumb_bit, 2**bits - 1)
    return int8_stored_code(stored, bits)


def _nibble_bit(position: int) -> int:
    """4 bits: where code `position` of a word sits (its quad's shift, then a nibble each)."""
    return quad_shifts(4)[position // 4] + 4 * (position % 4)


def _crumb_bit(position: int) -> int:
    """2 bits and the crumb plane of 3 bits: where code `position` of a word sits."""
    return quad_shifts(2)[position // 4] + 4 * (position % 4)


def _high_plane_bit(position: int) -> int:
    """The high plane of 3 bits: where the third bit of input `position` of a word's 32 sits."""
    return high_bit(position // 16, position % 16 // 4, position % 4)


def _pack(values: torch.Tensor, per_word: int, bit_of) -> torch.Tensor:
    """[N, K] small values -> [N, K / per_word] int64 words, value p of a word at bit `bit_of(p)`."""
    n, k = values.shape
    grouped = values.reshape(n, k // per_word, per_word)
    word = torch.zeros(n, k // per_word, dtype=torch.int64, device=values.device)
    for position in range(per_word):
        word |= grouped[:, :, position] << bit_of(position)
    return word


def _unpack(words: torch.Tensor, per_word: int, bit_of, mask: int) -> torch.Tensor:
    """Inverse of `_pack`: [N, W] int64 words -> [N, W * per_word] values of `mask`'s width."""
    values = torch.stack([words >> bit_of(position) & mask for position in range(per_word)], dim=-1)
    return values.reshape(words.shape[0], -1)


ROWS_AT_ONCE = 2048  # the conversions go through int64 codes, 8 bytes a weight: a vocabulary head at once is GBs


def to_int8_layout(packed: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """A layer's codes from the packed model's bitpack layout into the input-order words above."""
    return torch.cat([pack_words(unpack(rows, bits, k), bits) for rows in packed.split(ROWS_AT_ONCE)])


def to_bitpack_layout(words: torch.Tensor, bits: int, k: int, group_size: int = 0) -> torch.Tensor:
    """Inverse of `to_int8_layout`."""
    return torch.cat([pack(unpack_words(rows, bits, k), bits) for rows in words.split(ROWS_AT_ONCE)])
