"""Codebook lookups in registers: byte-permute (PRMT) tables and the PTX that decodes 4 codes.

A gather from a codebook in memory costs a load instruction per weight or pair of weights, and on
the H100 those loads, not the weight traffic, bounded the one-token kernels: with the gather
replaced by arithmetic the same GEMV ran 2x faster (docs/performance-history.md, run 3). `prmt.b32 d, a,
b, sel` picks any 4 of the 8 bytes of two registers by the 4 nibbles of `sel`, so a table of up
to 8 bytes lives in 2 registers and one instruction looks up 4 bytes. An fp16 codebook value is 2
bytes, so every width decodes 4 codes (a quad) at a time: one PRMT looks up their 4 low bytes, one their 4
high bytes, and two interleave them into two half2.
- 2-bit codes: the tables are the 4 values' low bytes and their high bytes (one word each).
- 4-bit codes: the codebook is symmetric, so a code is a sign and a 3-bit magnitude; the tables
  are the 8 magnitudes' low and high bytes (two words each), and one xor puts the 4 signs into
  the high bytes.
- 3-bit codes: a 2-bit magnitude, looked up as 2-bit codes over the 4 magnitudes, and a sign
  plane, xor-ed in the same way.

Where the kernel layout puts each bit so that these steps need no other shuffling is
repack.py's business (docs/kernel_layout.md); `stored_code` / `codebook_code` convert between
the codebook's index and the stored sign-magnitude code. `emulate_quad` computes what the PTX computes, in numpy, so the tables and bit positions are tested without a GPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from tqc.codebook import Codebook, codebook_levels, gaussian_codebook, high_byte_codebook

SIGN_MAGNITUDE_BITS = (3, 4)  # stored as sign and magnitude; 2-bit codes are looked up with their sign
PAIR_LOWS, PAIR_HIGHS = 0x5140, 0x7362  # PRMT selectors: half2 of lookups (0, 1) and (2, 3)
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
def lookup_values(bits: int, codebook_name: Codebook = "lloyd-max") -> tuple[float, ...]:
    """The fp16 values the PRMT table holds: the 4 signed values (2 bits) or the magnitudes (3, 4 bits)."""
    codebook = codebook_levels(bits, codebook_name)
    values = codebook if bits == 2 else codebook[2 ** (bits - 1):]
    return tuple(values.half().float().tolist())


@lru_cache(maxsize=None)
def high_byte_values() -> tuple[float, ...]:
    """The 2-bit values as the high-byte lookup holds them (HIGH_CRUMB_ASM): lookup_values(2) times
    1 / HIGH_BYTE_FACTOR, each the nearest of +-HIGH_BYTE_LEVELS, fp16 numbers whose low byte is zero."""
    values = lookup_values(2)
    level = dict(zip(sorted({abs(v) for v in values}), HIGH_BYTE_LEVELS))  # inner, outer magnitude
    return tuple(float(np.copysign(level[abs(v)], v)) for v in values)


def signed_values(bits: int, magnitudes: tuple[float, ...] | None = None,
                  codebook: Codebook = "lloyd-max") -> tuple[float, ...]:
    """The table of signed codes looked up whole (3 bits' SIGN_SELECTORS): value i at the stored code i
    (stored_code: sign << (bits - 1) | magnitude), the magnitudes (lookup_values' of `codebook`), then the
    same negated."""
    magnitudes = magnitudes or lookup_values(bits, codebook)
    return magnitudes + tuple(-value for value in magnitudes)


@lru_cache(maxsize=None)
def high_byte_signed_values() -> tuple[float, ...]:
    """signed_values(3) of codebook.high_byte_codebook(3), times its factor: fp16 numbers whose low bytes are
    zero (0.5, 1.5, 2.5, 4 and their negatives), looked up by their high bytes (option "3g")."""
    levels, factor = high_byte_codebook(3)
    return signed_values(3, tuple(float(np.float16(v * factor)) for v in levels[4:].tolist()))


def table_words(bits: int, high_bytes: bool = False, signed: bool = False,
                codebook: Codebook = "lloyd-max") -> tuple[int, ...]:
    """The 32-bit words of a stage's PRMT table: low bytes of the fp16 lookup values, then their high bytes.

    4 words for 4 bits (8 magnitudes), 2 for 2 and 3 bits (4 values or magnitudes), of `codebook`'s levels;
    with `high_bytes` (2 bits) those of high_byte_values, whose low bytes are all zero; with `signed` (3 bits)
    4, those of signed_values, with `high_bytes` too (3 bits on the grid codebook) those of
    high_byte_signed_values (low bytes zero).
    """
    if high_bytes and bits == 3:
        if codebook != "grid":
            raise ValueError("3-bit codes are looked up by their high bytes on the grid codebook only (option 3g)")
        values = high_byte_signed_values()
    elif high_bytes:
        values = high_byte_values()
    else:
        values = signed_values(bits, codebook=codebook) if signed else lookup_values(bits, codebook)
    raw = np.array(values, dtype=np.float16).view(np.uint16).astype(np.uint32)
    lows, highs = raw & 0xFF, raw >> 8
    packed = [lows[i : i + 4] for i in range(0, len(raw), 4)] + [highs[i : i + 4] for i in range(0, len(raw), 4)]
    return tuple(byte_word(part) for part in packed)


def byte_word(values) -> int:
    """4 bytes, the first at the lowest address, as an unsigned 32-bit word (a PRMT table word)."""
    return int(sum(int(b) << (8 * i) for i, b in enumerate(values)))


# The PTX, as `tl.inline_asm_elementwise` runs it with pack=2 on a tile whose two packed elements
# are the same word (columns 2 kw and 2 kw + 1 of a doubled word tile): every input operand comes
# twice ($n and $n+1). One call decodes a quad, 4 slots of a word: the selector (w >> $12) & mask
# holds their magnitudes (or 2-bit codes) in its 4 nibbles; PRMT looks up their low bytes in the
# table $4 $6 and their high bytes in $8 $10; for signed codes the 4 signs, at bits 7, 15, 23, 31
# of $14 << $16, are xor-ed into the high bytes; two PRMTs interleave low and high bytes into the
# outputs, half2 registers holding slots (0, 1) and (2, 3) of the quad. A mask of 0 takes $2 as the
# selector itself: the caller masked the whole word once (a PRMT reads only a selector's low 16 bits,
# so one mask of 0x33333333 and one shift by 16 give two quads' selectors; the one-token kernel's
# WORD_MASKS).


def select_asm(mask: int) -> str:
    """The PTX that puts a quad's selector into s: (w >> $12) & mask, or with mask 0 the word $2 as it is."""
    return f"shr.u32 s, $2, $12; and.b32 s, s, {mask:#06x}; " if mask else "mov.b32 s, $2; "


def quad_asm(mask: int, signed: bool) -> str:
    """The PTX of one quad (above) for a code plane whose selector nibbles are `mask` wide (0: $2 is the selector)."""
    sign = f"shl.b32 m, $14, $16; and.b32 m, m, {BYTE_SIGNS:#x}; xor.b32 h, h, m; " if signed else ""
    return ("{ .reg .b32 s, l, h, m; "
            f"{select_asm(mask)}prmt.b32 l, $4, $6, s; prmt.b32 h, $8, $10, s; {sign}"
            f"prmt.b32 $0, l, h, {PAIR_LOWS:#06x}; prmt.b32 $1, l, h, {PAIR_HIGHS:#06x}; }}")


NIBBLE_ASM = quad_asm(0x7777, signed=True)  # 4 bits: 3-bit magnitudes, signs in the same word
SIGNED_CRUMB_ASM = quad_asm(0x3333, signed=True)  # 3 bits: 2-bit magnitudes, signs in the sign plane
CRUMB_ASM = quad_asm(0x3333, signed=False)  # 2 bits: the codes themselves
CRUMB_MASKED = 0x33333333  # a 2-bit word masked once: its low half one quad's selector, its high half another's
SELECTOR_SIGNS = 0x44444444  # where 3-bit codes' signs join their magnitudes in a selector (SIGN_SELECTORS)
MASKED_SIGNED_CRUMB_ASM = quad_asm(0, signed=True)  # SIGNED_CRUMB_ASM on a selector masked outside
MASKED_CRUMB_ASM = quad_asm(0, signed=False)  # CRUMB_ASM on a selector masked outside

# 2-bit codes by their high bytes alone (the one-token kernel's HIGH_BYTES, on unless TQC_HIGH_BYTES=0). Scaled by
# 1 / HIGH_BYTE_FACTOR, the 2-bit Lloyd-Max values become +-0.375 and +-1.25 to 0.04% (their ratio 3.333
# against 3.336; the factor splits the difference): fp16 numbers with 2 mantissa bits, so their low bytes are
# zero. A quad is then one lookup of its 4 high bytes and two PRMTs that put a zero byte under each
# (selectors HIGH_PAIR_LOWS, HIGH_PAIR_HIGHS: nibble 4 picks the zero register's byte), 3 PRMTs instead of 4.
# The kernel multiplies its sums by HIGH_BYTE_FACTOR.
HIGH_BYTE_LEVELS = (0.375, 1.25)
HIGH_BYTE_FACTOR = float(np.sqrt(np.prod(gaussian_codebook(2)[2:].double().numpy()) / np.prod(HIGH_BYTE_LEVELS)))
HIGH_BYTE_FACTOR3 = 1 / high_byte_codebook(3)[1]  # what 3-bit sums by high bytes are multiplied by (option 3g)
HIGH_PAIR_LOWS, HIGH_PAIR_HIGHS = 0x1404, 0x3424


def high_crumb_asm(mask: int) -> str:
    """The PTX of one quad of 2-bit codes by their high bytes (above; mask 0: $2 is the selector)."""
    return ("{ .reg .b32 s, h; "
            f"{select_asm(mask)}prmt.b32 h, $8, $10, s; "
            f"prmt.b32 $0, h, 0, {HIGH_PAIR_LOWS:#06x}; prmt.b32 $1, h, 0, {HIGH_PAIR_HIGHS:#06x}; }}")


HIGH_CRUMB_ASM = high_crumb_asm(0x3333)
MASKED_HIGH_CRUMB_ASM = high_crumb_asm(0)
SIGNED_CONSTRAINTS = "=r,=r" + ",r" * 16
UNSIGNED_CONSTRAINTS = "=r,=r" + ",r" * 12


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


def emulate_quad(words: np.ndarray, bits: int, shift: int, signs: np.ndarray | None = None,
                 sign_shift: int = 0, high_bytes: bool = False, word_masks: bool = False,
                 sign_selectors: bool = False, codebook: Codebook = "lloyd-max") -> tuple[np.ndarray, np.ndarray]:
    """A quad as quad_asm (with `high_bytes`, 2 bits: HIGH_CRUMB_ASM) computes it: the selector from
    words >> shift, the signs (if any) from signs << sign_shift; (half2 of slots 0 and 1, half2 of
    slots 2 and 3) as uint32 bits. With `word_masks` (2-bit code words) the selector is what the
    one-token kernel's WORD_MASKS hands the MASKED_ PTX: the word shifted by shift % 16, masked with
    CRUMB_MASKED, then shifted by the rest (16 for row half 1), its high half left for PRMT to ignore.
    With `sign_selectors` (3 bits) the selector nibbles are signed codes, looked up in signed_values' table."""
    t = [np.uint32(x) for x in table_words(bits, high_bytes, sign_selectors, codebook)]
    lows, highs = ((t[0], t[1]), (t[2], t[3])) if len(t) == 4 else ((t[0], t[0]), (t[1], t[1]))
    if sign_selectors:
        selector = (words >> np.uint32(shift)) & np.uint32(0x7777)
    elif word_masks:
        selector = ((words >> np.uint32(shift % 16)) & np.uint32(CRUMB_MASKED)) >> np.uint32(shift - shift % 16)
    else:
        selector = (words >> np.uint32(shift)) & np.uint32(0x7777 if bits == 4 else 0x3333)
    if high_bytes:
        high, zero = prmt(*highs, selector), np.uint32(0)
        return prmt(high, zero, np.uint32(HIGH_PAIR_LOWS)), prmt(high, zero, np.uint32(HIGH_PAIR_HIGHS))
    low, high = prmt(*lows, selector), prmt(*highs, selector)
    if signs is not None:
        high = high ^ ((signs << np.uint32(sign_shift)) & np.uint32(BYTE_SIGNS))
    return prmt(low, high, np.uint32(PAIR_LOWS)), prmt(low, high, np.uint32(PAIR_HIGHS))


def half2_values(bits: np.ndarray) -> np.ndarray:
    """uint32 half2 bits -> float32 [..., 2] (low half first)."""
    return np.stack([(bits & 0xFFFF).astype(np.uint16).view(np.float16), (bits >> 16).astype(np.uint16).view(np.float16)],
                    axis=-1).astype(np.float32)
