"""Kernel generation and lookup: one specialised kernel per distinct layer configuration.

A `KernelKey` (code bits, residual bits, group size, N, K) fixes every constexpr of the kernel
sources in triton_kernels.py; `generate(specs)` returns one `LayerKernel` per distinct key, and
`kernel_for(spec)` is the registry the loader uses. A `LayerKernel` runs the strategy and launch
parameters the tuner found for this GPU and token bucket (tuning.py): the tensor-core kernel split
over K for few tokens, or tiled over M and N for many, the CUDA-core kernel for one token, or
dequantize + cuBLAS. `prepare(module, layout)` repacks a layer's codes into its family's layout
(repack.py, lut_int8.py or fragments.py) once, when the kernel is attached. Families: the fp16
lookups (LayerKernel), the int8 one on int8 activations (Int8LayerKernel), and, where asked for
(`KernelRegistry(fragments=True)`, as `attach` does on Hopper), the Gluon fragment family
(FragmentLayerKernel) for the layers of the options a GPU has checked on it (CHECKED_FRAGMENT_OPTIONS).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tqc.codebook import Codebook
from tqc.layout import LayerSpec, layer_bytes

from . import fragments, int8_kernels, lut_int8, repack
from .launch import launch
from . import triton_kernels as tk
from .lut import TABLE_COPIES, table_words
from .repack import slot_words
from .tuning import (Harness, LaunchConfig, Tuner, candidate_configs, int8_candidates, run_sums_fit, stream_copies,
                     token_bucket)

KERNEL_LAYOUT = "kernel"  # repack.py, for the fp16 lookup kernels
INT8_LAYOUT = "int8"  # lut_int8.pack_words, for the int8 family
FRAGMENT_LAYOUT = "fragments"  # fragments.py, for the fragment family (Gluon)
LAYOUTS = {KERNEL_LAYOUT: repack, INT8_LAYOUT: lut_int8, FRAGMENT_LAYOUT: fragments}  # module: to_<name>_layout,
# to_bitpack_layout
MAX_FRAGMENT_TOKENS = 16  # wgmma's n at one token tile of 16; above, tiles of 64 or 128 tokens or dequantize + cuBLAS
# (the tuner picks). A tile's activations of all of a program's steps sit in shared memory at once:
# tokens x steps x 64 inputs x 2 bytes, at most 64 KB (the two 128-KB candidates were the slowest of run 184's
# five tiles at 128 tokens: 210 and 301 us against 144-150)
FRAGMENT_TILE_INPUTS = 32 * 1024
# ... and only up to this bucket: each tile reads and decodes the whole layer again, so at 2048 tokens the tiles
# took 2.0-4.7 ms where dequantize + cuBLAS took 0.87 (Llama-3-8B's gate+up, H100 run 184)
FRAGMENT_TILE_MAX_BUCKET = 256
# TQC_TOKEN_TILES=0: above 16 tokens the family only dequantizes for cuBLAS, as before session 42 (the tiles' sums
# checked on the H100 for all five options, runs 184-185: tests/test_kernels_accuracy.py -k token_tiles)
TOKEN_TILES = os.environ.get("TQC_TOKEN_TILES", "1") != "0"
# Warps a tensor-core program (num_warps): 4 is one 64-row block; 8 or 16 take 2 or 4 neighbouring blocks, each
# warpgroup its own, all multiplying the same activations in shared memory, which the program then reads once for
# 128 or 256 rows (at 64 rows a program, gate+up's 448 programs read its 128 tokens' activations 448 times; at 16
# tokens as many bytes as its 4-bit codes). The tuner is offered them (16 warps above 16 tokens only); H100 run 194:
# the tuner's pick for 16 tokens of gate/up 17.7 us against 18.9 (with 4 warps), 30.2 against 30.9 on gate+up.
# TQC_WIDE_PROGRAMS=0: 4 warps only, as before session 44
WIDE_PROGRAMS = os.environ.get("TQC_WIDE_PROGRAMS", "1") == "1"
PROGRAM_WARPS = (4, 8, 16)
# Tiles are also offered programs of 8 or 16 steps that stream their activations through a ring of 2 steps
# (LaunchConfig.x_stages): fewer K-splits, so fewer atomic adds into the output, in less shared memory. H100 run 191,
# Llama-3-8B's gate+up at 4 bits, the tuner's best: 128 tokens 107.2 us (64-token tiles, 16 steps, 8 warps, the
# ring) against 145.7 without both; 64 tokens 60.8 against 76.8. TQC_TILE_RING=0: all steps held, as before
TILE_RING = os.environ.get("TQC_TILE_RING", "1") == "1"
FRAGMENT_TILE_THREAD_TOKENS = 1024  # tokens x warps at most: 16 warps leave a thread 128 registers, and over 128
# tokens its accumulator and operands spill (compiled for sm_90; 162-171 registers at 4 and 8 warps)
# Dequantize + cuBLAS decodes with the tensor-core kernel's PRMT lookups (gluon_kernels.fragment_dequant_kernel),
# up to this many steps of 64 inputs a program; TQC_GLUON_DEQUANT=0: with the plain Triton kernel that the CPU
# interpreter runs (fragments.fragment_dequant_kernel; the family's only one before session 43)
FRAGMENT_DEQUANT_STEPS = 4
GLUON_DEQUANT = os.environ.get("TQC_GLUON_DEQUANT", "1") != "0"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter cannot run inline PTX: decode in Triton
ALLOW_PDL = os.environ.get("TQC_PDL", "1") != "0"  # TQC_PDL=0: no programmatic dependent launch (to measure it)
# TQC_PRELOAD=1: the fragment family loads its first steps' codes before waiting for the rotation (run 129's A/B;
# no faster, and its sums not checked on a GPU: a switch for measurements, off by default)
FRAGMENT_PRELOAD = os.environ.get("TQC_PRELOAD", "0") == "1"
# TQC_DIRECT_INPUTS=1: a layer whose input arrives rotated (o_proj, tqc.folding) runs on the fragment family with
# no launch before its matmul: the step before attention zeroes its output too (glue.fused_linear's `then`) and
# the kernel reads attention's output as it comes. Its sums hold on the H100 (runs 130, 132), yet the decoder
# is no faster (run 130, scripts/o_proj_fold_lab.py; docs/performance-history.md): a switch for measurements, off.
DIRECT_INPUTS = os.environ.get("TQC_DIRECT_INPUTS", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for launch grids: plain Python, as Triton's own `triton.cdiv` is a compiler
    function whose host call costs microseconds, a large share of a launch when a decode step is
    bound by the CPU (runs 72-74)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# Up to 16 tokens the rotation's launch gives each token's column blocks programs of their own: 16
# tokens in one program a column block made 16 programs (K = 4096) that each rotated a 16 x 256 tile and
# zeroed 1/16 of the output in a loop. On the H100 (runs 202-204) the 16-token rotation goes from 1.7 to
# 1.1-1.2 us, 8B's gate/up at 4 bits from 18.0 to 17.0 us, and with the norm step spread the same way
# (glue.norm_column_programs) an 8-layer decoder's 16-token forward from 0.87 to 0.73 ms.
# TQC_SPREAD_ROTATION=0: the tiles of 16 tokens, as before session 46.
SPREAD_ROTATION = os.environ.get("TQC_SPREAD_ROTATION", "1") == "1"
SPREAD_TOKENS = 16  # up to this many tokens (a decode step's) the rotation's launches are spread as above and below


def rotation_block_m(m: int) -> int:
    """Tokens a program of a rotation launch takes for m tokens: one up to 16 tokens, then m / 16 rounded
    to a power of two (about 16 token blocks), 16 from 256 tokens on (a prefill's tiles, as before)."""
    if not SPREAD_ROTATION:
        return min(16, next_power_of_2(m))
    return min(16, max(1, next_power_of_2(m) // 16))


# Up to 16 tokens a program of the rotation's launch takes 128 inputs (or a group, if wider) instead of 256: a
# one-token 4096-input layer gets 32 programs instead of 16. H100 run 209, two pairs of processes side by side:
# 8B's gate/up at 4 bits 14.0-14.1 against 14.3 us at one token, 16.2 against 16.4 at 16; at 3 bits and 16 tokens
# 15.1 against 15.2-15.4; gate+up level. Beyond 16 tokens (not measured) 256, as before; the int8 family's
# rotate_int8_kernel keeps 256 (not measured either).
# TQC_ROTATION_BLOCK_K=256: as before session 47.
ROTATION_BLOCK_K = int(os.environ.get("TQC_ROTATION_BLOCK_K", "128"))


def rotation_block_k(m: int, group_size: int) -> int:
    """Inputs a program of a rotation launch takes for m tokens: whole groups, ROTATION_BLOCK_K or more up to 16
    tokens, 256 or more beyond."""
    return max(group_size, ROTATION_BLOCK_K if m <= SPREAD_TOKENS else 256)


@lru_cache(maxsize=None)
def uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (sm_90 and later): a lookup kernel launches while the rotation
    runs and prefetches its weights before waiting for it."""
    return ALLOW_PDL and not INTERPRETED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True, order=True)
class KernelKey:
    """Everything a generated kernel is specialised on."""

    bits: int
    residual_bits: int
    group_size: int
    n: int
    k: int
    activations: str = "fp16"
    codes: str = KERNEL_LAYOUT  # FRAGMENT_LAYOUT: the fragment family (takes_fragments)
    codebook: Codebook = "lloyd-max"  # the base stage's levels (option "3g": the grid's)

    @classmethod
    def of(cls, spec: LayerSpec, codes: str = KERNEL_LAYOUT) -> KernelKey:
        return cls(spec.option.base_bits, spec.option.residual_bits, spec.group_size, spec.out_features, spec.in_features,
                   spec.activations, codes, spec.option.codebook)

    @property
    def name(self) -> str:
        int8 = "a8" if self.activations == "int8" else ""
        fragment = "fr" if self.codes == FRAGMENT_LAYOUT else ""
        grid = "g" if self.codebook == "grid" else ""
        return f"b{self.bits}{grid}r{self.residual_bits}g{self.group_size}n{self.n}k{self.k}{int8}{fragment}"


def supports(spec: LayerSpec) -> bool:
    """Whether a generated kernel exists for this layer (TurboQuant; RTN stays on the reference path)."""
    return spec.option.scheme == "turboquant" and spec.in_features % 32 == 0 and spec.group_size >= 32


# The options whose products on the fragment family a GPU has checked (tests/test_kernels_accuracy.py -k
# fragment). Its kernels take every TurboQuant option, 2-4 bits with a residual stage of 2 or 4 bits or
# none: compiled and counted in CI, their prefill weights tested interpreted; the others join this set
# once a GPU run of that test has passed, and until then serve only where asked for (`unchecked`).
CHECKED_FRAGMENT_OPTIONS = frozenset({"2", "3", "3g", "4", "4+2", "4+4"})  # runs 122, 248 (docs/performance-history.md)


def takes_fragments(spec: LayerSpec, unchecked: bool = False) -> bool:
    """Whether the fragment family serves a layer: TurboQuant of an option in CHECKED_FRAGMENT_OPTIONS
    (with `unchecked`, of any option) on fp16 activations, in whole blocks of 64 rows and 64 inputs, a
    group a multiple of 64."""
    return (supports(spec) and (unchecked or spec.option.name in CHECKED_FRAGMENT_OPTIONS)
            and spec.activations == "fp16" and fragments.fits(spec.out_features, spec.in_features, spec.group_size))


def fragments_available(device: torch.device) -> str | None:
    """Why the fragment family cannot run on `device`, or None if it can: its kernel is Gluon's and
    multiplies with wgmma, which only sm_90 has."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return f"it needs a Hopper GPU (wgmma), not {device}"
    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return "it needs Triton with Gluon (3.5 or later)"
    return None


def layout_of(spec: LayerSpec) -> str:
    """The code layout of a layer's default kernel family (the fragment family is asked for: KernelRegistry)."""
    return INT8_LAYOUT if spec.activations == "int8" else KERNEL_LAYOUT


@dataclass
class LayerKernel:
    """The generated kernel family of one KernelKey; callable as `kernel(x, module)`."""

    layout = KERNEL_LAYOUT  # of the codes it reads (prepare)
    key: KernelKey
    tuner: Tuner
    _tables: dict[tuple[int, torch.device, bool, bool, str], torch.Tensor] = field(default_factory=dict)
    # Per-call work done once: a decode step calls every kernel with the same token count, and
    # rebuilding the candidate list or the constexprs each call costs more than the launch itself.
    _configs: dict[int, LaunchConfig] = field(default_factory=dict)
    _specialised: dict[LaunchConfig, tuple[int, dict[str, int]]] = field(default_factory=dict)

    def table(self, bits: int, device: torch.device, high_bytes: bool = False, signed: bool = False,
              codebook: Codebook = "lloyd-max") -> torch.Tensor:
        """A stage's PRMT table (lut.table_words) as int32 on `device`, TABLE_COPIES times (load_table)."""
        key = (bits, device, high_bytes, signed, codebook)
        if key not in self._tables:
            words = [w - 2**32 if w >= 2**31 else w for w in table_words(bits, high_bytes, signed, codebook)]
            self._tables[key] = torch.tensor(words * TABLE_COPIES, dtype=torch.int32, device=device)
        return self._tables[key]

    def weights(self, module) -> tuple[torch.Tensor, ...]:
        """The six weight arguments of every kernel: codes, scales, lookup table, then the residual's."""
        check_layout(module, self.layout)
        device = module.codes.device
        base = (module.codes, module.scales, self.table(self.key.bits, device, codebook=self.key.codebook))
        if not self.key.residual_bits:
            return base + base  # never read: RES_BITS == 0 is a constexpr branch
        return base + (module.residual_codes, module.residual_scales, self.table(self.key.residual_bits, device))

    @cached_property
    def slot_width(self) -> int:
        """B of the kernel layout (repack.slot_words)."""
        return slot_words(self.key.k, self.key.group_size)

    @cached_property
    def constexprs(self) -> dict[str, int]:
        k = self.key
        return {"N": k.n, "K": k.k, "G": k.group_size, "B": self.slot_width, "BITS": k.bits,
                "RES_BITS": k.residual_bits, "ASM": not INTERPRETED}

    def __call__(self, x: torch.Tensor, module) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.key.k).contiguous()
        config = self.config_for(x2, module)
        zeroed = take_zeroed_output(module, x2.shape[0])
        if zeroed is not None and self.takes_input_as_it_comes(module, config):
            out = self.multiply(x2, module, config, zeroed)
        else:
            out = self.run(x2, module, config)
        return self.finish(out, module).reshape(*lead, self.key.n)

    def takes_input_as_it_comes(self, module, config: LaunchConfig) -> bool:
        """Whether `config` runs `module` on its input as it comes into an output zeroed beforehand, with
        no launch before the matmul (ZeroedOutput): a layer whose input arrives rotated, on a kernel
        that reads natural order in any 16-bit dtype. Not the lookups (slot-pair order, fp16)."""
        return False

    def config_for(self, x: torch.Tensor, module) -> LaunchConfig:
        """The tuned launch configuration for x's token count ([M, K]); tunes on first use."""
        bucket = token_bucket(x.shape[0])
        config = self._configs.get(bucket)
        if config is None:
            config = self._configs[bucket] = self.tuner.config(self.key.name, bucket, lambda: self.streamed(x, module),
                                                               self.candidates(bucket))
        return config

    def tuned(self, tokens: int) -> LaunchConfig | None:
        """The stored configuration for a token count, or None before it has been tuned."""
        entry = self.tuner.data.entries.get(f"{self.key.name}/m{token_bucket(tokens)}")
        return entry.config if entry is not None else None

    @staticmethod
    def finish(out: torch.Tensor, module) -> torch.Tensor:
        """Add the layer's bias, if any, to a kernel's output."""
        if module.spec.has_bias:
            out += module.bias.to(out.dtype)
        return out

    def streamed(self, x: torch.Tensor, module) -> Harness:
        """The tuner's harness: run a configuration over enough copies of the layer's weights that
        they stream from device memory, as in a model's decode step, not from L2 (on a GPU)."""
        copies = [module]
        if x.is_cuda:
            free_bytes = torch.cuda.mem_get_info(x.device)[0]
            copies = [weight_copy(module) for _ in range(stream_copies(layer_bytes(module.spec), free_bytes))]
        return (lambda config: [self.run(x, copy, config) for copy in copies]), len(copies)

    def specialise(self, config: LaunchConfig) -> tuple[int, dict[str, int]]:
        """(K-splits, every constexpr) of the dot or fma kernel under one launch configuration."""
        specialised = self._specialised.get(config)
        if specialised is None:
            specialised = self._specialised[config] = self._specialise(config)
        return specialised

    def _specialise(self, config: LaunchConfig) -> tuple[int, dict[str, int]]:
        slot_count = self.key.k // self.slot_width
        iters = slot_count // config.slots if config.whole_k else config.iters
        if slot_count % (config.slots * iters):  # a hand-edited or foreign tuning cache: never run part of K
            raise ValueError(f"{self.key.name}: {config.slots} slots x {iters} steps a program do not tile "
                             f"its {slot_count} slots of {self.slot_width} words (a stale tuning cache? remove "
                             f"~/.cache/tqc/kernels or $TQC_KERNEL_CACHE to tune again)")
        constexprs = self.constexprs | {"BLOCK_N": config.block_n, "SLOTS": config.slots, "ITERS": iters}
        constexprs["PREFETCH"] = config.prefetch and not INTERPRETED
        constexprs["LOOKAHEAD"] = config.lookahead
        constexprs["STAGES"] = config.num_stages
        if config.strategy == "fma":
            half = config.accumulate != "fp32"
            if config.accumulate == "fp16_runs" and run_sums_fit(config, self.slot_width):
                half = tk.HALF_RUNS.value
            constexprs |= {"HALF_ACC": half, "THREADS": 32 * config.num_warps}
        else:
            constexprs |= {"BLOCK_M": config.block_m, "WEIGHTS_LEFT": config.weights_left,
                           "SCALE_FIRST": config.scale_first, "DOT_PAIRS": config.dot_pairs}
        return slot_count // (config.slots * iters), constexprs

    def candidates(self, bucket: int) -> list[LaunchConfig]:
        b = self.slot_width
        return candidate_configs(bucket, self.key.bits, self.key.residual_bits, b, self.key.k // b)

    def run(self, x: torch.Tensor, module, config: LaunchConfig) -> torch.Tensor:
        """Launch one strategy with one launch configuration (x is [M, K], contiguous)."""
        out = self.output(x.shape[0], x.device, x.dtype, config)
        target = self.rotation_target(module, config, out, x.dtype)
        rotated = rotate(x, target.signs, target.group_size, clear=target.clear, dtype=target.dtype,
                         pair_width=target.pair_width, fragment_step=target.fragment_step)
        return self.multiply(rotated, module, config, out)

    def fusable(self, config: LaunchConfig) -> bool:
        """Whether a decoder's norm or SwiGLU step may write this strategy's input (glue.py): always here."""
        return True

    def splits(self, config: LaunchConfig) -> int:
        """Programs over K that add into one output (more than one: the output is zeroed first)."""
        return self.specialise(config)[0]

    def output(self, tokens: int, device: torch.device, dtype: torch.dtype, config: LaunchConfig) -> torch.Tensor | None:
        """The [tokens, N] output a lookup kernel writes (or, split over K, adds into); None for
        dequantize + cuBLAS, whose matmul makes its own."""
        if config.strategy == "dequant":
            return None
        return torch.empty(tokens, self.key.n, device=device, dtype=dtype)

    def rotation_target(self, module, config: LaunchConfig, out: torch.Tensor | None, dtype: torch.dtype) -> RotationTarget:
        """What the rotation before the matmul must write (a fused producer, kernels/glue.py, does
        the same): for the lookup kernels in slot-pair order, fp16, and the output zeroed when the
        kernel splits K; for dequantize + cuBLAS in natural order, in the activations' dtype."""
        if config.strategy == "dequant":
            return RotationTarget(module.signs, module.rotation_size, 0, dtype, None)
        return RotationTarget(module.signs, module.rotation_size, self.slot_width, torch.float16,
                              out if self.splits(config) > 1 else None)

    def multiply(self, rotated: torch.Tensor, module, config: LaunchConfig, out: torch.Tensor | None,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
        """out (+)= rotated @ W'^T under `config` (rotated as rotation_target says; `scales`: the
        int8 family's, unused here)."""
        if config.strategy == "dequant":
            return F.linear(rotated, self.dequantize(module, rotated.dtype, config.block_n))
        m, n = rotated.shape[0], self.key.n
        splits, constexprs = self.specialise(config)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **constexprs,
                   **pdl_launch(rotated.device)}
        if config.strategy == "fma":
            if m != 1:
                raise ValueError(f"the CUDA-core kernel takes one token, got {m}")
            launch(tk.lut_fma_kernel, (cdiv(n, config.block_n), splits), rotated, out, *self.weights(module),
                   **options)
        else:
            grid = (cdiv(n, config.block_n), splits, cdiv(m, config.block_m))
            launch(tk.lut_dot_kernel, grid, rotated, out, *self.weights(module), m, **options)
        return out

    def dequantize(self, module, dtype: torch.dtype, block_n: int = 32) -> torch.Tensor:
        """The decoded weight W' [N, K] in `dtype` (rotated basis)."""
        out = torch.empty(self.key.n, self.key.k, device=module.codes.device, dtype=dtype)
        grid = (cdiv(self.key.n, block_n), self.key.k // (32 * self.slot_width))
        tk.dequant_kernel[grid](out, *self.weights(module), **self.constexprs, BLOCK_N=block_n)
        return out


class Int8LayerKernel(LayerKernel):
    """The int8 family of a key on int8 activations (int8_kernels.py): the rotation rounds the input
    to int8 per (token, group), int8_dot_kernel multiplies; the tuner picks its launch shape."""

    layout = INT8_LAYOUT

    def candidates(self, bucket: int) -> list[LaunchConfig]:
        """The family's launch shapes (int8_candidates) that this key can run."""
        return [c for c in int8_candidates(bucket, self.key.k // self.key.group_size) if self.fits(c)]

    def fits(self, config: LaunchConfig) -> bool:
        """dp4a only where a group has 4 code words or more (one asm call) and the tile gives every
        thread a call of its own: with fewer, the compiled kernel gives wrong sums (run 56)."""
        words = self.key.group_size // self.plane_width
        return config.strategy != "dp4a" or (words >= 4 and config.block_n * words >= 4 * 32 * config.num_warps)

    def table(self, bits: int, device: torch.device) -> torch.Tensor:
        """The int8 PRMT table (lut_int8.int8_table_words), 4 words a copy, one copy a lane."""
        if (bits, device) not in self._tables:
            words = [w - 2**32 if w >= 2**31 else w for w in lut_int8.int8_table_words(bits)]
            words += [0] * (4 - len(words))
            self._tables[(bits, device)] = torch.tensor(words * TABLE_COPIES, dtype=torch.int32, device=device)
        return self._tables[(bits, device)]

    @cached_property
    def factor(self) -> float:
        return lut_int8.int8_levels(self.key.bits)[1]

    def levels(self, device: torch.device) -> torch.Tensor:
        """The int8 levels by stored code (the decode without inline PTX looks them up in memory)."""
        if ("levels", device) not in self._tables:
            levels, _ = lut_int8.int8_levels(self.key.bits)
            by_stored = levels[lut_int8.int8_stored_code(torch.arange(2**self.key.bits), self.key.bits).numpy()]
            self._tables[("levels", device)] = torch.tensor(by_stored, dtype=torch.int8, device=device)
        return self._tables[("levels", device)]

    def weights(self, module) -> tuple[torch.Tensor, ...]:
        """codes, scales, PRMT table, levels: the weight arguments of int8_dot_kernel."""
        check_layout(module, INT8_LAYOUT)
        device = module.codes.device
        return module.codes, module.scales, self.table(self.key.bits, device), self.levels(device)

    def run(self, x: torch.Tensor, module, config: LaunchConfig) -> torch.Tensor:
        """Launch one strategy with one launch configuration (x is [M, K], contiguous)."""
        out = self.output(x.shape[0], x.device, x.dtype, config)
        target = self.rotation_target(module, config, out, x.dtype)
        return self.multiply(self.rotate(x, target), module, config, out, target.scales)

    def fusable(self, config: LaunchConfig) -> bool:
        """Not dequantize + cuBLAS: its input is rounded and multiplied back, which the glue does not do."""
        return config.strategy != "dequant"

    def splits(self, config: LaunchConfig) -> int:
        return self.key.k // (self.key.group_size * config.iters)

    def rotation_target(self, module, config: LaunchConfig, out: torch.Tensor | None, dtype: torch.dtype) -> RotationTarget:
        """int8 values with their scales per (token, group), in the dp4a kernel's planes for one
        token, and the output zeroed when the kernel splits K; for dequantize + cuBLAS the rounded
        values multiplied back, in the activations' dtype."""
        g = self.key.group_size
        if config.strategy == "dequant":
            return RotationTarget(module.signs, g, 0, dtype, None)
        scales = torch.empty(out.shape[0], self.key.k // g, device=out.device, dtype=torch.float32)
        per_word = self.plane_width if config.strategy == "dp4a" else 0
        return RotationTarget(module.signs, g, 0, torch.int8, out if self.splits(config) > 1 else None, scales,
                              per_word)

    def multiply(self, rotated: torch.Tensor, module, config: LaunchConfig, out: torch.Tensor | None,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
        """out (+)= the layer on `rotated` under `config` (int8 values with their `scales`, as
        rotation_target says; for dequantize + cuBLAS, rounded and multiplied back)."""
        if config.strategy == "dequant":
            return F.linear(rotated, self.dequantize(module, rotated.dtype, config.block_n))
        (m, k), n, g = rotated.shape, self.key.n, self.key.group_size
        if config.strategy == "dp4a":
            if m != 1:
                raise ValueError(f"the dp4a kernel takes one token, got {m}")
            if not INTERPRETED and not self.fits(config):
                raise ValueError(f"dp4a launch {config} does not fit {self.key.name}: too few code words a thread")
            launch(
                int8_kernels.int8_gemv_kernel, (cdiv(n, config.block_n), self.splits(config)),
                rotated, scales, out, *self.weights(module), self.factor, N=n, K=k, G=g, BITS=self.key.bits,
                BLOCK_N=config.block_n, STEPS=config.iters, THREADS=32 * config.num_warps, ASM=not INTERPRETED,
                num_warps=config.num_warps, num_stages=1, **pdl_launch(rotated.device))
            return out
        grid = (cdiv(n, config.block_n), self.splits(config), cdiv(m, config.block_m))
        launch(
            int8_kernels.int8_dot_kernel, grid,
            rotated, scales, out, *self.weights(module), self.factor, m, N=n, K=k, G=g, BITS=self.key.bits,
            BLOCK_N=config.block_n, BLOCK_M=config.block_m, STEPS=config.iters, ASM=not INTERPRETED,
            THREADS=32 * config.num_warps, num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl_launch(rotated.device))
        return out

    @cached_property
    def plane_width(self) -> int:
        """Inputs per code word of the dp4a kernel's activation planes (3 bits: per crumb word)."""
        return 8 if self.key.bits == 4 else 16

    def rotate(self, x: torch.Tensor, target: RotationTarget) -> torch.Tensor:
        """x rotated and rounded as `target` says (rotate_int8_kernel), in a launch of its own."""
        (m, k), g = x.shape, self.key.group_size
        values = torch.empty(m, k, device=x.device, dtype=target.dtype)
        block_m, block_k = rotation_block_m(m), max(g, 256)
        launch(
            int8_kernels.rotate_int8_kernel, (cdiv(m, block_m), cdiv(k, block_k)),
            x, target.signs, values, values if target.scales is None else target.scales,
            values if target.clear is None else target.clear, m, 0 if target.clear is None else target.clear.numel(),
            K=k, LOG_G=g.bit_length() - 1, BLOCK_M=block_m, BLOCK_K=block_k, ROUNDED=target.scales is None,
            PER_WORD=target.per_word, **pdl_launch(x.device))
        return values

    def dequantize(self, module, dtype: torch.dtype, block_n: int = 32) -> torch.Tensor:
        """The weight the int8 dot multiplies, [N, K] in `dtype` (rotated basis)."""
        (n, k, g), device = (self.key.n, self.key.k, self.key.group_size), module.codes.device
        out = torch.empty(n, k, device=device, dtype=dtype)
        int8_kernels.int8_dequant_kernel[(cdiv(n, block_n), k // g)](
            out, *self.weights(module), self.factor, N=n, K=k, G=g, BITS=self.key.bits, BLOCK_N=block_n,
            ASM=not INTERPRETED)
        return out


# How the family's kernels apply the scales. 1-16 tokens: the tensor cores' unscaled products once a
# group (SCALE_AFTER). One token, on CUDA cores: a thread's unscaled products summed along its rows
# (ROW_SUMS), over a group's steps (SUM_STEPS) or both, then scaled; no one way was fastest on every
# Llama-3-8B shape (run 125), so each is a candidate (LaunchConfig.sums) where it applies.
FRAGMENT_DOT_SCALING = {"SCALE_AFTER": True}
GEMV_SUMS = {"rows": {"ROW_SUMS": True}, "steps": {"SUM_STEPS": True}, "rows_steps": {"ROW_SUMS": True, "SUM_STEPS": True}}
# The one-token kernel on activations the rotation wrote in fragment order (LaunchConfig.ordered_inputs,
# X_ORDERED: two 16-byte loads a thread and step, not eight 4-byte ones): correct on the GPU but no
# faster, +6% on gate/up at the best step count (run 127), so not offered to the tuner;
# test_kernels_accuracy.py runs it regardless, fragment_checks.sh lab times it; TQC_ORDERED_INPUTS=1 offers it.
ORDERED_INPUT_CANDIDATES = os.environ.get("TQC_ORDERED_INPUTS", "0") == "1"
# 2-bit codes looked up by their high bytes in the one-token kernel (gluon_kernels HIGH_BYTES, lut.HIGH_CRUMB_ASM):
# 3 PRMTs a quad instead of 4, 7.5% fewer instructions at 4 steps, statically; the 2-bit kernel is
# issue-bound (docs/performance.md "Where it stands"). 5-12% faster 2-bit Llama-3-8B layers at one token on
# the H100 (runs 225-228); TQC_HIGH_BYTES=0 switches it off.
HIGH_BYTES = os.environ.get("TQC_HIGH_BYTES", "1") == "1"
# Each word of 2-bit codes masked once for two quads' selectors, not once a quad (gluon_kernels WORD_MASKS,
# lut.MASKED_CRUMB_ASM): 2 LOP3 fewer a word in the one-token kernel, 5% of the 2-bit kernel's instructions at
# 8 steps, statically (docs/kernel_layout.md). Correct on the H100 (run 231) but no faster: 2-bit and 4+2 layers
# level at one token (runs 232-233), 3-bit ones take SIGN_SELECTORS' selectors instead. TQC_WORD_MASKS=1.
WORD_MASKS = os.environ.get("TQC_WORD_MASKS", "0") == "1"
# 3-bit codes of codebook.high_byte_codebook(3) (option "3g": {0.5, 1.5, 2.5, 4} / 1.873, +1.03% squared error on a
# Gaussian against Lloyd-Max's) are looked up by their high bytes in the one-token kernel, as 2-bit codes are
# (HIGH_BYTES): 9.5% fewer instructions at 8 steps, statically (scripts/grid_codebook.py --static); on an H100 4-8%
# off 8B's 3-bit one-token layers and 6% off the decoder at plan 3 (runs 241-246).


def program_warps(n: int) -> tuple[int, ...]:
    """The warps a tensor-core program of the fragment family may have: 4, and with WIDE_PROGRAMS those of
    PROGRAM_WARPS whose rows (16 a warp) divide n."""
    return tuple(w for w in PROGRAM_WARPS if w == 4 or WIDE_PROGRAMS and n % (16 * w) == 0)


class FragmentLayerKernel(LayerKernel):
    """Layers on fp16 activations (those takes_fragments names), their codes in the order of wgmma's
    register operand (fragments.py): the Gluon `fragment_dot_kernel` (gluon_kernels.py) for 1-16
    tokens or `fragment_gemv_kernel` for one, split over K into the output the rotation zeroes
    (natural order; with LaunchConfig.ordered_inputs fragment order), launched under programmatic
    dependent launch (and, as the lookups, straight to the compiled kernel after the first call:
    launch.py); above 16 tokens tiles of 64 or 128 tokens, or `gluon_kernels.fragment_dequant_kernel` +
    cuBLAS. Asked for by KernelRegistry(fragments=True), which `attach` sets where the GPU can run it:
    on Llama-3-8B's shapes on an H100 it takes 26-51% less time than the lookup kernels at 16 tokens,
    9% less to 1% more at one, the decoder 7-10% less (docs/performance-history.md, run 126). Hopper GPUs;
    Gluon does not run under TRITON_INTERPRET."""

    layout = FRAGMENT_LAYOUT

    def candidates(self, bucket: int) -> list[LaunchConfig]:
        """Steps of 64 inputs a program, up to 16 that tile K (the tuner picks), on tensor cores and at
        one token also on CUDA cores; above 16 tokens, tiles of 64 or 128 tokens (no larger than the
        bucket, four or more steps a program, up to FRAGMENT_TILE_MAX_BUCKET tokens; 64, 128 or 256 rows
        a program: program_warps) on tensor cores, or dequantize + cuBLAS."""
        steps = self.key.k // fragments.BLOCK_K
        iters = [i for i in range(1, 17) if steps % i == 0]
        if bucket > MAX_FRAGMENT_TOKENS:
            return [LaunchConfig(strategy="dequant")] + self.tile_candidates(bucket, iters)
        configs = [LaunchConfig(strategy="fragments", iters=i, num_warps=w) for i in iters
                   for w in (program_warps(self.key.n) if bucket > 1 else (4,)) if w <= 8]
        if bucket == 1:
            gemvs = [LaunchConfig(strategy="fragment_gemv", iters=i, sums=sums) for sums in GEMV_SUMS for i in iters
                     if sums == "rows" or self.sums_steps(i) and (sums == "rows_steps" or not self.key.residual_bits)]
            ordered = [c.model_copy(update={"ordered_inputs": True}) for c in gemvs if c.sums != "steps"]
            configs += gemvs + (ordered if ORDERED_INPUT_CANDIDATES else [])
        return configs

    def tile_candidates(self, bucket: int, iters: list[int]) -> list[LaunchConfig]:
        """Tiles of 64 or 128 tokens (none wider than the bucket, 64 for buckets below) for a bucket above 16
        tokens, up to FRAGMENT_TILE_MAX_BUCKET: `iters` steps a program, 4 or more; program_warps' warps where
        their registers hold the tile; with TILE_RING also 8 or more steps through a ring of 2; each where
        the activations it holds at once fit FRAGMENT_TILE_INPUTS."""
        if not TOKEN_TILES or bucket > FRAGMENT_TILE_MAX_BUCKET:
            return []
        configs = []
        for tile, steps, warps, stages in itertools.product((64, 128), iters, program_warps(self.key.n), (0, 2)):
            held = stages or steps  # steps of activations in shared memory at once
            offered = tile <= max(bucket, 64) and steps >= 4 and (not stages or TILE_RING and steps >= 8)
            fits = (tile * warps <= FRAGMENT_TILE_THREAD_TOKENS
                    and tile * held * fragments.BLOCK_K <= FRAGMENT_TILE_INPUTS)
            if offered and fits:
                configs.append(LaunchConfig(strategy="fragments", iters=steps, token_tile=tile, num_warps=warps,
                                            x_stages=stages))
        return configs

    def takes_input_as_it_comes(self, module, config: LaunchConfig) -> bool:
        """The tensor-core and one-token kernels read natural order and convert bf16 as they load."""
        return module.rotation_size == 1 and config.strategy != "dequant" and not config.ordered_inputs

    def sums_steps(self, iters: int) -> bool:
        """Whether a program of `iters` steps covers whole groups, so SUM_STEPS can sum a group's steps
        (fragment_gemv_kernel's RUN; without ROW_SUMS only where the layer has no residual stage)."""
        return iters % (self.key.group_size // fragments.BLOCK_K) == 0

    def splits(self, config: LaunchConfig) -> int:
        return self.key.k // (fragments.BLOCK_K * config.iters)

    def rotation_target(self, module, config: LaunchConfig, out: torch.Tensor | None, dtype: torch.dtype) -> RotationTarget:
        """Natural order: fp16 with the output zeroed (every program adds into it), or for
        dequantize + cuBLAS in the activations' dtype."""
        if config.strategy == "dequant":
            return RotationTarget(module.signs, module.rotation_size, 0, dtype, None)
        return RotationTarget(module.signs, module.rotation_size, 0, torch.float16, out,
                              fragment_step=fragments.BLOCK_K if config.ordered_inputs else 0)

    def multiply(self, rotated: torch.Tensor, module, config: LaunchConfig, out: torch.Tensor | None,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
        """out += rotated @ W'^T (zeroed by the rotation), or dequantize + cuBLAS."""
        if config.strategy == "dequant":
            return F.linear(rotated, self.dequantize(module, rotated.dtype))
        m, n = rotated.shape[0], self.key.n
        if m > 1 and config.strategy == "fragment_gemv":
            raise ValueError(f"the fragment family's one-token kernel takes one token, got {m}")
        splits, constexprs = self.specialise(config)  # made once per config (LayerKernel.specialise)
        launch(self.gluon_kernel(config), (n // (16 * config.num_warps), splits, cdiv(m, config.token_tile)), rotated,
               out, *self.config_weights(module, config), m, **constexprs, **pdl_launch(rotated.device))
        return out

    @staticmethod
    def row_sums_gemv(config: LaunchConfig) -> bool:
        """Whether the config launches the one-token kernel with row sums (where HIGH_BYTES and WORD_MASKS apply)."""
        return config.strategy == "fragment_gemv" and GEMV_SUMS[config.sums].get("ROW_SUMS", False)

    def high_bytes(self, config: LaunchConfig) -> bool:
        """Whether the config's kernel looks codes up by their high bytes (HIGH_BYTES): the one-token kernel with
        row sums, on a layer of 2 bits (or 3 with sign selectors on the grid codebook, option 3g) without a
        residual stage."""
        on_grid = self.key.bits == 2 or self.key.codebook == "grid" and self.sign_selectors
        return HIGH_BYTES and self.row_sums_gemv(config) and on_grid and not self.key.residual_bits

    def word_masks(self, config: LaunchConfig) -> bool:
        """Whether the config's kernel masks each word of 2-bit codes once (WORD_MASKS): the one-token kernel
        with row sums, on a layer with such words (2 bits, 3 bits' magnitudes where SIGN_SELECTORS does not mask
        them its own way, a 2-bit residual)."""
        words = self.key.bits == 2 or self.key.bits == 3 and not self.sign_selectors or self.key.residual_bits == 2
        return WORD_MASKS and self.row_sums_gemv(config) and words

    @property
    def sign_selectors(self) -> bool:
        """Whether the layer's 3-bit codes are laid out and looked up with their signs in the selectors
        (fragments.SIGN_SELECTORS): every kernel of the family then reads the table lut.table_words(3, signed=True)."""
        return fragments.SIGN_SELECTORS and self.key.bits == 3

    def weights(self, module) -> tuple[torch.Tensor, ...]:
        """LayerKernel.weights, with SIGN_SELECTORS' table of the 8 signed values at 3 bits."""
        weights = super().weights(module)
        if not self.sign_selectors:
            return weights
        return (*weights[:2], self.table(3, weights[0].device, signed=True, codebook=self.key.codebook), *weights[3:])

    def config_weights(self, module, config: LaunchConfig) -> tuple[torch.Tensor, ...]:
        """weights(module), the table lut.table_words(bits, True, ...) where the config looks codes up by high bytes."""
        weights = self.weights(module)
        if not self.high_bytes(config):
            return weights
        table = self.table(self.key.bits, weights[0].device, high_bytes=True, signed=self.sign_selectors,
                           codebook=self.key.codebook)
        return (*weights[:2], table, *weights[3:])

    @staticmethod
    def gluon_kernel(config: LaunchConfig):
        """The Gluon kernel of a config: fragment_dot_kernel, or fragment_gemv_kernel at one token."""
        from . import gluon_kernels as gk  # noqa: PLC0415  (Gluon only where a layer asks for it)

        return gk.fragment_gemv_kernel if config.strategy == "fragment_gemv" else gk.fragment_dot_kernel

    def _specialise(self, config: LaunchConfig) -> tuple[int, dict]:
        """(K-splits, every constexpr of gluon_kernel(config), num_warps among them)."""
        from . import gluon_kernels as gk  # noqa: PLC0415

        constexprs = {"N": self.key.n, "K": self.key.k, "G": self.key.group_size, "BLOCK_K": fragments.BLOCK_K,
                      "ITERS": config.iters, "X_LAYOUT": gk.x_layout(fragments.BLOCK_K, config.token_tile),
                      "LOOKAHEAD": 2, "EVICT": True, "num_warps": config.num_warps, "RES_BITS": self.key.residual_bits,
                      "BITS": self.key.bits, "PRELOAD": FRAGMENT_PRELOAD} | self.scaling(config)
        if self.high_bytes(config):
            constexprs["HIGH_BYTES"] = True
        if self.word_masks(config):
            constexprs["WORD_MASKS"] = True
        if self.sign_selectors:
            constexprs["SIGN_SELECTORS"] = True
        return self.splits(config), constexprs

    @staticmethod
    def scaling(config: LaunchConfig) -> dict:
        """The constexprs saying how the config's kernel applies the scales (FRAGMENT_DOT_SCALING, GEMV_SUMS)
        and, for the one-token kernel, where it reads its inputs (X_ORDERED); the tensor-core kernel's
        token tile (TOKEN_TILE: a wider tile scales its weights, its products in fewer registers)."""
        if config.strategy == "fragment_gemv":
            return GEMV_SUMS[config.sums] | {"X_ORDERED": config.ordered_inputs}
        if config.token_tile == 16:
            return FRAGMENT_DOT_SCALING | {"TOKEN_TILE": 16}
        return {"SCALE_AFTER": False, "TOKEN_TILE": config.token_tile, "X_STAGES": config.x_stages}

    def dequantize(self, module, dtype: torch.dtype, block_n: int = 0) -> torch.Tensor:
        """The decoded weight W' [N, K] in `dtype` (rotated basis), from the fragment layout: on a GPU by
        gluon_kernels.fragment_dequant_kernel, under the interpreter (or GLUON_DEQUANT off) by its Triton
        counterpart fragments.fragment_dequant_kernel; the same numbers."""
        if INTERPRETED or not GLUON_DEQUANT:
            return self.triton_weights(module, dtype)
        from . import gluon_kernels as gk  # noqa: PLC0415

        key = self.key
        out = torch.empty(key.n, key.k, dtype=dtype, device=module.codes.device)
        steps = key.k // fragments.BLOCK_K
        iters = max(i for i in range(1, FRAGMENT_DEQUANT_STEPS + 1) if steps % i == 0)
        launch(gk.fragment_dequant_kernel, (key.n // (16 * fragments.WARPS), steps // iters), out,
               *self.weights(module), N=key.n, K=key.k, G=key.group_size, BLOCK_K=fragments.BLOCK_K, ITERS=iters,
               num_warps=fragments.WARPS, BITS=key.bits, RES_BITS=key.residual_bits, SIGN_SELECTORS=self.sign_selectors)
        return out

    def triton_weights(self, module, dtype: torch.dtype) -> torch.Tensor:
        """dequantize by the plain Triton kernel (fragments.fragment_dequant_kernel), which the interpreter runs."""
        codes, scales, _, res_codes, res_scales, _ = self.weights(module)
        key = self.key
        residual = (res_codes, res_scales, key.residual_bits) if key.residual_bits else None
        return fragments.fragment_weights(codes, scales, key.n, key.k, key.group_size, dtype, residual, key.bits,
                                          key.codebook)


def pdl_launch(device: torch.device) -> dict:
    """The launch arguments of programmatic dependent launch, where it is used (uses_pdl)."""
    return {"PDL": True, "launch_pdl": True} if uses_pdl(device) else {}


@dataclass(frozen=True)
class RotationTarget:
    """How a lookup kernel wants its input rotated: signs and Hadamard size of the layer's run-time
    rotation (its group size, 1 where its input arrives rotated: LayerSpec.rotation_size), the columns
    in slot-pair order of width `pair_width` (fwht_kernel's PAIR_WIDTH), in `dtype`, and `clear`
    (the output it adds into) zeroed, if not None. With `scales` (the int8 family): rounded to int8
    per (token, group), absmax / 127 written there, in planes of `per_word` inputs if > 0
    (int8_kernels.store_int8). With `fragment_step` > 0 (the fragment family's X_ORDERED): the
    columns in the fragment order of steps that wide (fragments.fragment_input_order). With
    `clear_from` (kernels/glue.py's producers only), `clear` is filled with its values instead of
    zeros: the kernel adds the layer's output onto them (a residual)."""

    signs: torch.Tensor
    group_size: int
    pair_width: int
    dtype: torch.dtype
    clear: torch.Tensor | None
    scales: torch.Tensor | None = None
    per_word: int = 0
    fragment_step: int = 0
    clear_from: torch.Tensor | None = None


@dataclass
class ZeroedOutput:
    """A layer's output for its next call, zeroed by the launch of an earlier step (glue.fused_linear's
    `then`): the layer's kernel adds into it with no launch of its own before (DIRECT_INPUTS)."""

    out: torch.Tensor | None = None


def zeroed_output(module) -> ZeroedOutput:
    """The module's slot for a zeroed output, made on first use (a plain attribute: nn.Module's
    __setattr__ is slow, and the slot changes every call)."""
    slot = module.__dict__.get("_zeroed_output")
    if slot is None:
        slot = module.__dict__["_zeroed_output"] = ZeroedOutput()
    return slot


def take_zeroed_output(module, tokens: int) -> torch.Tensor | None:
    """The output an earlier step zeroed for this call of `module` on `tokens` tokens, once; else None."""
    slot = getattr(module, "__dict__", {}).get("_zeroed_output")
    if slot is None or slot.out is None:
        return None
    out, slot.out = slot.out, None
    return out if out.shape[0] == tokens else None


def family(key: KernelKey) -> type[LayerKernel]:
    """The kernel family that serves a key: the fragment family where the key asks for it, the int8
    one on int8 activations, else the fp16 lookups."""
    if key.codes == FRAGMENT_LAYOUT:
        return FragmentLayerKernel
    return Int8LayerKernel if key.activations == "int8" else LayerKernel


def weight_copy(module) -> SimpleNamespace:
    """A copy of what the kernels read of a prepared layer: its weights cloned, its signs shared."""
    names = ("codes", "scales", "residual_codes", "residual_scales")
    return SimpleNamespace(codes_layout=module.codes_layout, signs=module.signs, rotation_size=module.rotation_size,
                           **{name: getattr(module, name).clone() for name in names if hasattr(module, name)})


def rotate(x: torch.Tensor, signs: torch.Tensor, group_size: int, clear: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, pair_width: int = 0, fragment_step: int = 0) -> torch.Tensor:
    """x' = FWHT_g(x * signs) / sqrt(g) per group, by the Triton butterfly kernel. x: [M, K].

    `clear`, if given, is zeroed by the same launch (the output a split-K kernel adds into).
    `dtype`: of the result (the lookup kernels take fp16, the tensor cores' operand type), else x's.
    `pair_width` = B > 0: columns in the lookup kernels' slot-pair order (fwht_kernel); `fragment_step`
    > 0: in the fragment order of steps that wide (fragments.fragment_input_order); else natural.
    """
    m, k = x.shape
    block_m, block_k = rotation_block_m(m), rotation_block_k(m, group_size)
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    grid = (cdiv(m, block_m), cdiv(k, block_k))
    target = out if clear is None else clear
    launch(tk.fwht_kernel, grid, x, signs, out, target, m, 0 if clear is None else clear.numel(), K=k,
           LOG_G=group_size.bit_length() - 1, BLOCK_M=block_m, BLOCK_K=block_k, PAIR_WIDTH=pair_width,
           FRAGMENT_STEP=fragment_step, **pdl_launch(x.device))
    return out


def check_layout(module, layout: str) -> None:
    if getattr(module, "codes_layout", None) != layout:
        raise ValueError(f"the layer's codes are not in the {layout} layout: call tqc.kernels.prepare(module)")


def prepare(module, layout: str | None = None) -> None:
    """Repack a layer's codes into `layout` (its kernel's, LayerKernel.layout; default: layout_of its
    spec), in place; a layer in another kernel layout goes back to bitpack first; `restore` undoes it."""
    layout = layout or layout_of(module.spec)
    if getattr(module, "codes_layout", None) == layout:
        return
    restore(module)
    _convert(module, getattr(LAYOUTS[layout], f"to_{layout}_layout"))
    module.codes_layout = layout


def restore(module) -> None:
    """Put a prepared layer's codes back in the bitpack layout (for saving or the reference path)."""
    layout = getattr(module, "codes_layout", None)
    if layout is None:
        return
    _convert(module, LAYOUTS[layout].to_bitpack_layout)
    module.codes_layout = None
    module.kernel = None


def _convert(module, convert) -> None:
    spec = module.spec
    module.codes = convert(module.codes, spec.option.base_bits, spec.in_features, spec.group_size)
    if spec.option.residual_bits:
        module.residual_codes = convert(module.residual_codes, spec.option.residual_bits, spec.in_features, spec.group_size)


@dataclass
class KernelRegistry:
    """The kernels generated so far, by key, all tuned through one Tuner (one GPU, one cache file)."""

    tuner: Tuner
    kernels: dict[KernelKey, LayerKernel] = field(default_factory=dict)
    fragments: bool = False  # the fragment family for every layer it serves (takes_fragments)
    unchecked_fragments: bool = False  # ... also of options no GPU has checked on it (benchmarks, tests)

    def kernel_for(self, spec: LayerSpec) -> LayerKernel:
        """The generated kernel of a layer's key, created on first use."""
        on_fragments = self.fragments and takes_fragments(spec, self.unchecked_fragments)
        key = KernelKey.of(spec, FRAGMENT_LAYOUT if on_fragments else KERNEL_LAYOUT)
        if key not in self.kernels:
            self.kernels[key] = family(key)(key, self.tuner)
        return self.kernels[key]

    def generate(self, specs: Iterable[LayerSpec]) -> dict[KernelKey, LayerKernel]:
        """One LayerKernel per distinct key among the supported layers of a plan."""
        return {KernelKey.of(s): self.kernel_for(s) for s in specs if supports(s)}
