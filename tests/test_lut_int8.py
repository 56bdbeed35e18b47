"""tqc.kernels.lut_int8: the int8 codebook lookups, checked through the numpy emulation of their PTX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tqc.codebook import gaussian_codebook
from tqc.kernels.lut import prmt
from tqc.kernels.lut_int8 import emulate, int8_levels, int8_table_words, pack_words


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_code_decodes_to_its_int8_level(bits):
    levels, _ = int8_levels(bits)
    index = torch.randint(0, 2**bits, (16, 1024), generator=torch.Generator().manual_seed(bits))
    words = pack_words(index, bits)
    assert words.shape == (16, 1024 * bits // 32)
    decoded = emulate(words.numpy().view(np.uint32), bits, 1024)
    assert (decoded == levels[index.numpy()]).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_levels_stay_within_half_a_step_of_the_codebook(bits):
    levels, factor = int8_levels(bits)
    codebook = gaussian_codebook(bits).double().numpy()
    assert np.abs(levels).max() == 127 and len(set(levels.tolist())) == 2**bits
    assert np.abs(levels * factor - codebook).max() <= factor / 2 + 1e-12


def test_4_bit_second_table_has_clear_sign_bits():
    """The xor of the two PRMTs only works if the second pair of words never replicates a set sign."""
    _, _, c, d = int8_table_words(4)
    assert not (c | d) & 0x80808080


def test_codes_wider_than_4_bits_have_no_int8_lookup():
    with pytest.raises(ValueError, match="5-bit"):
        int8_table_words(5)


def run_ptx(asm: str, operands: dict[int, int | float]) -> dict[int, int | float]:
    """A scalar interpreter for the small PTX subset of the int8 kernels' inline asm (integers as
    uint32, floats in float32), operands by number; returns them after the run."""
    values: dict[str, int | float] = {f"${n}": v for n, v in operands.items()}

    def get(token: str):
        token = token.strip()
        return values[token] if token in values else int(token, 0)

    body = asm.strip().removeprefix("{").removesuffix("}")
    for statement in filter(None, (s.strip() for s in body.split(";"))):
        if statement.startswith(".reg"):
            continue
        op, args = statement.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op in ("mov.s32", "mov.u32", "mov.b32", "mov.f32"):
            values[dst] = get(src[0])
        elif op == "shr.u32":
            values[dst] = (get(src[0]) & 0xFFFFFFFF) >> get(src[1])
        elif op == "shl.b32":
            values[dst] = (get(src[0]) << get(src[1])) & 0xFFFFFFFF
        elif op in ("and.b32", "or.b32", "xor.b32"):
            a, b = get(src[0]), get(src[1])
            values[dst] = {"and.b32": a & b, "or.b32": a | b, "xor.b32": a ^ b}[op] & 0xFFFFFFFF
        elif op == "prmt.b32":
            values[dst] = int(prmt(np.uint32(get(src[0])), np.uint32(get(src[1])), np.uint32(get(src[2]))))
        elif op == "dp4a.s32.s32":
            a, b = (np.array([get(s)], dtype=np.uint32).view(np.int8).astype(np.int64) for s in src[:2])
            values[dst] = int(get(src[2]) + (a * b).sum())
        elif op == "cvt.rn.f32.s32":
            values[dst] = float(np.float32(get(src[0])))
        elif op == "fma.rn.f32":
            values[dst] = float(np.float32(get(src[0])) * np.float32(get(src[1])) + np.float32(get(src[2])))
        else:
            raise AssertionError(f"no emulation for {op}")
    return {int(k[1:]): v for k, v in values.items() if k.startswith("$")}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dp4a_ptx_sums_four_words_of_int8_products(bits):
    """int8_kernels.dp4a_asm, run by the interpreter above on a group laid out as the one-token
    kernel loads it (code words in input order, activations in planes), equals the integer dot."""
    from tqc.kernels.int8_kernels import dp4a_asm

    g, per_word = 128, 8 if bits == 4 else 16
    rng = np.random.default_rng(bits)
    index = torch.from_numpy(rng.integers(0, 2**bits, size=(1, g)))
    x = rng.integers(-127, 128, size=g)
    words = pack_words(index, bits).numpy().view(np.uint32)[0]
    crumbs, highs = (words[: g // 16], words[g // 16 :]) if bits == 3 else (words, None)
    planes = x.astype(np.int8).reshape(-1, per_word // 4, 4).transpose(1, 0, 2).copy().view(np.uint32)[..., 0]
    levels, _ = int8_levels(bits)
    asm = dp4a_asm(bits)
    for first in range(0, len(crumbs), 4):  # one asm call per 4 consecutive words
        operands, n = {}, 4
        for values in ([crumbs[first + e] for e in range(4)],
                       *([[highs[(first + e) // 2] for e in range(4)]] if bits == 3 else []),
                       *([planes[j][first + e] for e in range(4)] for j in range(len(planes))),
                       [0.5] * 4, [1.0, 2.0, 3.0, 4.0], *([w] * 4 for w in int8_table_words(bits))):
            for value in values:
                operands[n], n = int(value) if not isinstance(value, float) else value, n + 1
        out = run_ptx(asm, operands)
        inputs = slice(first * per_word, (first + 4) * per_word)
        expected = int((levels[index[0, inputs].numpy()] * x[inputs]).sum())
        assert out[0] == pytest.approx(1.0 + 0.5 * expected, rel=1e-6) and (out[1], out[2], out[3]) == (2.0, 3.0, 4.0)
