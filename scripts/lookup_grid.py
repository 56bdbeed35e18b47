"""How close a codebook's magnitudes come to fp16 numbers that share their low byte, under one common factor.

    python scripts/lookup_grid.py

A PRMT lookup of fp16 values needs one byte permute for the low bytes and one for the high bytes of a
quad. Where every value's low byte is the same, one permute of the high bytes does, and a quad takes 3
PRMTs instead of 4 (the 2-bit lookups by their high bytes, lut.HIGH_BYTE_LEVELS: low byte zero). Scaling
all values by one factor (undone on the sums) keeps the codebook; so the question is how far the nearest
such fp16 numbers lie from the scaled magnitudes. fp16 numbers with low byte L are 2^e (1 + j / 4 + L /
1024), j = 0..3: four a binade. For 2 and 3 bits, the worst relative error of the best factor, with
the low byte zero and with the best low byte; printed, and written as JSON with -o.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from tqc.kernels.lut import lookup_values
from tqc.plan import write_text_atomic

FACTORS = np.linspace(1.0, 2.0, 100_001)[:-1]  # one binade: the grid repeats with every power of 2


def worst_errors(magnitudes: np.ndarray, low_byte: int) -> np.ndarray:
    """For each factor f in FACTORS, the largest relative distance of f x magnitude to an fp16 number
    whose low byte is `low_byte`."""
    grid = 1 + np.arange(4) / 4 + low_byte / 1024
    grid = np.concatenate([grid / 2, grid, grid * 2])  # the neighbouring binades' points
    scaled = FACTORS[:, None] * magnitudes[None, :]
    mantissa = scaled / 2 ** np.floor(np.log2(scaled))  # in [1, 2)
    distance = np.abs(mantissa[..., None] - grid).min(-1) / mantissa
    return distance.max(-1)


def best_fit(bits: int, low_bytes: range) -> dict:
    """The factor and low byte that put `bits`' magnitudes closest to such fp16 numbers."""
    magnitudes = np.unique(np.abs(np.array(lookup_values(bits))))
    error, low_byte, factor = min((float(errors.min()), low, float(FACTORS[errors.argmin()]))
                                  for low in low_bytes for errors in [worst_errors(magnitudes, low)])
    return {"bits": bits, "magnitudes": magnitudes.tolist(), "low_byte": low_byte, "factor": factor,
            "worst_relative_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="JSON to write")
    args = parser.parse_args()
    results = [best_fit(bits, low_bytes) for bits in (2, 3) for low_bytes in (range(1), range(256))]
    for r in results:
        print(f"{r['bits']}-bit magnitudes {[round(m, 4) for m in r['magnitudes']]}: factor {r['factor']:.5f}, "
              f"low byte {r['low_byte']:#04x}: worst {100 * r['worst_relative_error']:.2f}% off")
    if args.output:
        write_text_atomic(args.output, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
