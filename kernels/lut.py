"""Codebook lookups in registers: byte-permute (PRMT) tables and the PTX that decodes a slot pair.

A gather from a codebook in memory costs a load instruction per weight or pair of weights, and on
the H100 those loads, not the weight traffic, bounded the one-token kernels: with the gather
replaced by arithmetic the same GEMV ran 2x faster (docs/performance.md, run 3). `prmt.b32 d, a,
b, sel` picks any 4 of the 8 bytes of two registers by the 4 nibbles of `sel`, so a table of up
to 8 bytes lives in 2 registers and one instruction looks up 4 bytes. An fp16 codebook value is 2
bytes, so:

- 2-bit codes (and 3-bit magnitudes): the 4 values' low bytes and high bytes make one 8-byte
  table; the selector `[c1, c1 + 4, c2, c2 + 4]` returns the half2 of two codes in one PRMT.
- 4-bit codes: the codebook is symmetric, so a code is a sign and a 3-bit magnitude. Two PRMTs
  (low bytes, high bytes of the 8 magnitudes) look up 4 codes, one xor puts the 4 signs into the
  high bytes, and two more PRMTs interleave low and high bytes into two half2.
- 3-bit codes: a 2-bit magnitude (as 2-bit codes, over the 4 magnitudes) and a sign plane.

Where the kernel layout puts each bit so that these steps need no other shuffling is
repack.py's business (docs/kernel_layout.md); `stored_code` / `codebook_code` convert between
the codebook's index and the stored sign-magnitude code. The `emulate_*` functions compute what
the PTX computes, in numpy, so the tables and bit positions are tested without a GPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from tqc.codebook import gaussian_codebook

SIGN_MAGNITUDE_BITS = (3, 4)  # stored as sign and magnitude; 2-bit codes are looked up with their sign
PAIR_LOWS, PAIR_HIGHS = 0x5140, 0x7362  # PRMT selectors: half2 of lookups (0, 1) and (2, 3)
SIGN_MASK = 0x80008000  # the sign bits of a half2
TABLE_COPIES = 32  # copies of a table in memory, one per lane (triton_kernels.load_table)
BYTE_SIGNS = 0x80808080  # the sign bits of 4 high bytes


def stored_code(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codebook index (ascending values) -> stored code: for 3 and 4 bits, sign << (bits - 1) | magnitude."""
    if bits not in SIGN_MAGNITUDE_BITS:
        return codes
    half = 2 ** (bits - 1)
    negative = codes < half
    magnitude = torch.where(negative, half - 1 - codes, codes - half)
    return (negative.to(codes.dtype) << (bits - 1)) | magnitude


def codebook_code(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `stored_code`."""
    if bits not in SIGN_MAGNITUDE_BITS:
        return stored
    half = 2 ** (bits - 1)
    negative, magnitude = stored >> (bits - 1), stored & (half - 1)
    return torch.where(negative.bool(), half - 1 - magnitude, half + magnitude)


@lru_cache(maxsize=None)
def lookup_values(bits: int) -> tuple[float, ...]:
    """The fp16 values the PRMT table holds: the 4 signed values (2 bits) or the magnitudes (3, 4 bits)."""
    codebook = gaussian_codebook(bits)
    values = codebook if bits == 2 else codebook[2 ** (bits - 1):]
    return tuple(values.half().float().tolist())


def table_words(bits: int) -> tuple[int, ...]:
    """The 32-bit words of a stage's PRMT table: low bytes of the fp16 lookup values, then their high bytes.

    4 words for 4 bits (8 magnitudes), 2 for 2 and 3 bits (4 values or magnitudes).
    """
    raw = np.array(lookup_values(bits), dtype=np.float16).view(np.uint16).astype(np.uint32)
    lows, highs = raw & 0xFF, raw >> 8
    packed = [lows[i : i + 4] for i in range(0, len(raw), 4)] + [highs[i : i + 4] for i in range(0, len(raw), 4)]
    return tuple(int(sum(int(b) << (8 * j) for j, b in enumerate(part))) for part in packed)


# The PTX, as `tl.inline_asm_elementwise` runs it with pack=2 on a tile whose two packed elements
# are the same word (columns 2 kw and 2 kw + 1 of a doubled word tile): every input operand comes
# twice ($n and $n+1). The outputs are half2 registers: slot t low, slot t + 1 high.

# Slots 4q .. 4q + 3 of a nibble word $2: magnitudes at (w >> $12) & 0x7777, tables $4 $6 (low
# bytes) $8 $10 (high bytes), the 4 signs at bits 7, 15, 23, 31 of w << $14, xor-ed into the high bytes.
NIBBLE_ASM = (
    "{ .reg .b32 s, l, h, m; shr.u32 s, $2, $12; and.b32 s, s, 0x7777; prmt.b32 l, $4, $6, s; prmt.b32 h, $8, $10, s; "
    f"shl.b32 m, $2, $14; and.b32 m, m, {BYTE_SIGNS:#x}; xor.b32 h, h, m; "
    f"prmt.b32 $0, l, h, {PAIR_LOWS:#06x}; prmt.b32 $1, l, h, {PAIR_HIGHS:#06x}; }}"
)
NIBBLE_CONSTRAINTS = "=r,=r" + ",r" * 14

# One pair of a crumb word $1: codes at bits (w >> $3) & 0x0303, the 8-byte table in $5 $7.
CRUMB_ASM = ("{ .reg .b32 q; shr.u32 q, $1, $3; and.b32 q, q, 0x0303; mad.lo.u32 q, q, 0x11, 0x4040; "
             "prmt.b32 $0, $5, $7, q; }")
CRUMB_CONSTRAINTS = "=r" + ",r" * 8
# The same over magnitudes, then the signs: bits 15 and 31 of the sign word $9 shifted left by $11.
SIGNED_CRUMB_ASM = ("{ .reg .b32 q, m; shr.u32 q, $1, $3; and.b32 q, q, 0x0303; mad.lo.u32 q, q, 0x11, 0x4040; "
                    f"prmt.b32 $0, $5, $7, q; shl.b32 m, $9, $11; and.b32 m, m, {SIGN_MASK:#x}; xor.b32 $0, $0, m; }}")
SIGNED_CRUMB_CONSTRAINTS = "=r" + ",r" * 12


# --- numpy emulation of the PTX above (for tests, no GPU) ------------------------------------------


def prmt(a: np.ndarray, b: np.ndarray, selector: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode) on uint32 arrays."""
    source = (np.asarray(b, dtype=np.uint64) << np.uint64(32)) | np.asarray(a, dtype=np.uint64)
    selector = np.asarray(selector, dtype=np.uint64)
    out = np.zeros(np.broadcast(source, selector).shape, dtype=np.uint64)
    for k in range(4):
        nibble = (selector >> np.uint64(4 * k)) & np.uint64(0xF)
        byte = (source >> (np.uint64(8) * (nibble & np.uint64(7)))) & np.uint64(0xFF)
        byte = np.where(nibble & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
        out |= byte.astype(np.uint64) << np.uint64(8 * k)
    return out.astype(np.uint32)


def emulate_nibble_pair(words: np.ndarray, pair: int) -> np.ndarray:
    """Pair p of a nibble word as NIBBLE_ASM computes it (q = p // 2), as uint32 half2 bits."""
    t = [np.uint32(x) for x in table_words(4)]
    quad = pair // 2
    s = (words >> np.uint32(16 * quad)) & np.uint32(0x7777)
    low, high = prmt(t[0], t[1], s), prmt(t[2], t[3], s)
    high = high ^ ((words << np.uint32(4 * quad)) & np.uint32(BYTE_SIGNS))
    return prmt(low, high, np.uint32(PAIR_LOWS if pair % 2 == 0 else PAIR_HIGHS))


def emulate_crumb_pair(words: np.ndarray, pair: int, bits: int) -> np.ndarray:
    """Pair p of a crumb word as CRUMB_ASM computes it (shift 16 (p // 4) + 2 (p % 4))."""
    t = [np.uint32(x) for x in table_words(bits)]
    q = (words >> np.uint32(16 * (pair // 4) + 2 * (pair % 4))) & np.uint32(0x0303)
    return prmt(t[0], t[1], (q * np.uint32(0x11) + np.uint32(0x4040)).astype(np.uint32))


def emulate_sign(values: np.ndarray, signs: np.ndarray, pair: int) -> np.ndarray:
    """The sign step of SIGNED_CRUMB_ASM for pair p of a sign word (shift p)."""
    return values ^ ((signs << np.uint32(pair)) & np.uint32(SIGN_MASK))


def half2_values(bits: np.ndarray) -> np.ndarray:
    """uint32 half2 bits -> float32 [..., 2] (low half first)."""
    return np.stack([(bits & 0xFFFF).astype(np.uint16).view(np.float16), (bits >> 16).astype(np.uint16).view(np.float16)],
                    axis=-1).astype(np.float32)
