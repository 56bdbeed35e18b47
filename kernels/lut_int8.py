"""Codebook lookups to int8 in registers, for kernels on int8 activations (`dp4a`, int8 tensor cores).

Not used by tqc's kernels yet: scripts/int8_gemv_lab.py times them (docs/performance.md, runs
48-51). The codebook is rounded to int8 (level / max * 127) and the factor back folded into the
group scales. A PRMT then yields 4 int8 values at once, ready for `dp4a` or a tensor-core dot:

- 2 bits: the 4 levels are one word; the selector is the codes' crumbs masked into 4 nibbles.
- 4 bits, 16 levels in two PRMTs and an xor, with no sign step: PRMT picks byte s (s < 8) of
  two registers, and for s >= 8 returns byte s - 8's sign replicated (0x00 or 0xFF). So with
  P1 = prmt(A, B, s) and P2 = prmt(C, D, s ^ 8), P1 ^ P2 is level(s) for every s when A, B hold
  levels 0-7 and C, D hold level(s + 8) ^ (sign of level(s) replicated), which must have a clear
  sign bit: codes s and s + 8 must share a sign. The stored code is the codebook index (levels
  ascending, 0-7 negative) with bits 2 and 3 swapped, which makes it so.

The layout the lab uses (`pack_words`): code word i of a row holds inputs i * 32 / b onward in
input order, 4 bits a nibble each (quads at bits 0 and 16), 2 bits with quad q at bit
16 (q // 2) + 2 (q % 2) and its codes a nibble apart, so that a shift and a mask make a
quad's selector. `emulate_word` computes what the PTX computes, in numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from tqc.codebook import gaussian_codebook

from .lut import prmt

INT8_BITS = (2, 4)  # the widths with an int8 lookup so far
SIGN_FLIP = 0x88888888  # the selector nibbles' bit 3, flipped for the second PRMT of 4 bits


def int8_levels(bits: int) -> tuple[np.ndarray, float]:
    """The codebook rounded to int8 (ascending, int64 values) and the factor that maps them back."""
    levels = gaussian_codebook(bits).double().numpy()
    factor = float(np.abs(levels).max() / 127)
    return np.round(levels / factor).astype(np.int64), factor


def int8_stored_code(index: np.ndarray, bits: int) -> np.ndarray:
    """Codebook index -> stored code: bits 2 and 3 swapped for 4 bits (its own inverse), as is for 2."""
    if bits == 2:
        return index
    return (index & 3) | ((index >> 2 & 1) << 3) | ((index >> 3 & 1) << 2)


def _word(values: np.ndarray) -> int:
    """4 bytes, first at the lowest address, as an unsigned 32-bit word."""
    return int(sum(int(b) << (8 * i) for i, b in enumerate(values)))


def int8_table_words(bits: int) -> list[int]:
    """The PRMT table as unsigned words: (A, B, C, D) for 4 bits (module docstring), one word for 2."""
    if bits not in INT8_BITS:
        raise ValueError(f"no int8 lookup for {bits}-bit codes")
    levels, _ = int8_levels(bits)
    by_stored = levels[int8_stored_code(np.arange(2**bits), bits)] & 0xFF
    if bits == 2:
        return [_word(by_stored)]
    first = by_stored[:8]
    second = by_stored[8:] ^ np.where(first & 0x80, 0xFF, 0)
    if (second & 0x80).any():
        raise AssertionError("codes s and s + 8 must share a sign")
    return [_word(first[:4]), _word(first[4:]), _word(second[:4]), _word(second[4:])]


def quad_shifts(bits: int) -> tuple[int, ...]:
    """Where each quad of a code word starts (the shift that brings its selector to bits 0-15)."""
    return (0, 16) if bits == 4 else (0, 2, 16, 18)


def emulate_word(words: np.ndarray, bits: int) -> np.ndarray:
    """The int8 values the PTX decodes from uint32 code words: [..., 32 / bits], in input order."""
    table = [np.uint32(w) for w in int8_table_words(bits)]
    quads = []
    for shift in quad_shifts(bits):
        selector = words >> np.uint32(shift)
        if bits == 4:
            quads.append(prmt(table[0], table[1], selector) ^ prmt(table[2], table[3], selector ^ np.uint32(SIGN_FLIP)))
        else:
            quads.append(prmt(table[0], table[0], selector & np.uint32(0x3333)))
    data = np.stack(quads, axis=-1).astype(np.uint32)
    return data.view(np.int8).reshape(*words.shape, 32 // bits).astype(np.int64)


def pack_words(index: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codebook indices -> [N, K * bits / 32] int32 code words in input order (module docstring)."""
    n, k = index.shape
    per_word = 32 // bits
    stored = torch.from_numpy(int8_stored_code(index.cpu().numpy().astype(np.int64), bits))
    stored = stored.reshape(n, k // per_word, per_word)
    word = torch.zeros(n, k // per_word, dtype=torch.int64)
    for position in range(per_word):
        quad, i = divmod(position, 4)
        word |= stored[:, :, position] << (quad_shifts(bits)[quad] + 4 * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).to(index.device)
