"""The registry of quantization options a layer can take.

An option is a frozen row: scheme, base bits, residual bits. Its name is what a person writes in a
plan: "4", "4+2" (TurboQuant with a residual stage), "3g" (3-bit TurboQuant on the high-byte grid
codebook: as small as "3", 1% more squared error on a Gaussian, its codes decoded with fewer instructions
on the GPU), "rtn4", "rtn8" (round-to-nearest baseline), "fp16" (left unquantized).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .codebook import Codebook

Scheme = Literal["turboquant", "rtn", "fp16"]

TURBOQUANT_BASE_BITS = (2, 3, 4)
TURBOQUANT_RESIDUAL_BITS = (0, 2, 4)
RTN_BITS = (2, 3, 4, 8)
GRID_BASE_BITS = (3,)  # the base widths that take the grid codebook (codebook.high_byte_codebook), no residual
GROUP_SIZES = (32, 64, 128, 256)
SCALE_BITS = 16  # every scale (and RTN zero point) is stored as fp16

_NAME = re.compile(r"^(?:(?P<rtn>rtn)(?P<rbits>\d)|(?P<base>\d)(?P<grid>g)?(?:\+(?P<res>\d))?|(?P<fp16>fp16))$")


@dataclass(frozen=True, order=True)
class QuantOption:
    scheme: Scheme
    base_bits: int = 16
    residual_bits: int = 0
    codebook: Codebook = "lloyd-max"  # the base stage's levels (codebook.codebook_levels); residual stages: Lloyd-Max

    @property
    def name(self) -> str:
        if self.scheme == "fp16":
            return "fp16"
        if self.scheme == "rtn":
            return f"rtn{self.base_bits}"
        base = f"{self.base_bits}{'g' if self.codebook == 'grid' else ''}"
        return f"{base}+{self.residual_bits}" if self.residual_bits else base

    def __str__(self) -> str:
        return self.name

    @property
    def is_quantized(self) -> bool:
        return self.scheme != "fp16"

    @property
    def code_bits(self) -> int:
        """Bits of codes per weight (base plus residual)."""
        return self.base_bits + self.residual_bits if self.is_quantized else 0

    def scales_per_group(self) -> int:
        """fp16 numbers stored per (output row, group): TurboQuant one per stage, RTN scale and zero."""
        if self.scheme == "turboquant":
            return 2 if self.residual_bits else 1
        return 2 if self.scheme == "rtn" else 0

    def bits_per_weight(self, group_size: int) -> float:
        """Average stored bits per weight, scales included (seeds are per layer and negligible)."""
        if not self.is_quantized:
            return 16.0
        return self.code_bits + self.scales_per_group() * SCALE_BITS / group_size

    @classmethod
    def parse(cls, name: str | int | float) -> QuantOption:
        """Parse a plan's option string; raise ValueError naming the allowed ones."""
        text = str(name).strip().lower()
        m = _NAME.match(text)
        option = None
        if m and m["fp16"]:
            option = cls("fp16")
        elif m and m["rtn"] and int(m["rbits"]) in RTN_BITS:
            option = cls("rtn", int(m["rbits"]))
        elif m and m["base"]:
            base, res = int(m["base"]), int(m["res"] or 0)
            if base in TURBOQUANT_BASE_BITS and res in TURBOQUANT_RESIDUAL_BITS and not m["grid"]:
                option = cls("turboquant", base, res)
            elif m["grid"] and base in GRID_BASE_BITS and not res:
                option = cls("turboquant", base, 0, "grid")
        if option is None:
            raise ValueError(f"'{name}' is not a quantization option (choose from {', '.join(ALL_NAMES)})")
        return option


TURBOQUANT_OPTIONS: tuple[QuantOption, ...] = tuple(
    QuantOption("turboquant", b, r) for b in TURBOQUANT_BASE_BITS for r in TURBOQUANT_RESIDUAL_BITS
)
# Scored by calibration like the others, but a plan takes them only where asked (--options, --uniform, an edit)
GRID_OPTIONS: tuple[QuantOption, ...] = tuple(QuantOption("turboquant", b, 0, "grid") for b in GRID_BASE_BITS)
SCORED_OPTIONS: tuple[QuantOption, ...] = (*TURBOQUANT_OPTIONS, *GRID_OPTIONS)  # what calibration scores
RTN_OPTIONS: tuple[QuantOption, ...] = tuple(QuantOption("rtn", b) for b in RTN_BITS)
FP16 = QuantOption("fp16")
ALL_NAMES: tuple[str, ...] = tuple(o.name for o in (*TURBOQUANT_OPTIONS, *GRID_OPTIONS, *RTN_OPTIONS, FP16))


def resolve_group_size(in_features: int, preferred: int) -> int:
    """The largest allowed group size <= preferred that divides in_features.

    SmolLM2's hidden size 576 is not a multiple of 128, so its q/k/v/gate/up layers get 64.
    Raises ValueError when none divides (such a layer stays in fp16).
    """
    for size in sorted((g for g in GROUP_SIZES if g <= preferred), reverse=True):
        if in_features % size == 0:
            return size
    raise ValueError(f"in_features={in_features} is not a multiple of any group size <= {preferred}")
