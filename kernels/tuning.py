"""Autotuning per GPU and shape, stored as data: one JSON file per GPU, with the Triton version.

The first call of a kernel key at a token bucket times every candidate launch configuration
(`triton.testing.do_bench`, median) and records the fastest; the file is rewritten atomically, so
a second load of the model on the same GPU and Triton version does not tune again. The file lives
in $TQC_KERNEL_CACHE or ~/.cache/tqc/kernels/.
"""

from __future__ import annotations

import ast
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from tqdm import tqdm

from tqc.memory import parse_size
from tqc.plan import write_text_atomic

TOKEN_BUCKETS = (1, 16, 64, 256, 1024, 4096)
# 15: the rotation's launch spread over a program a token up to 16 tokens (session 46, registry.rotation_block_m)
# changed what the candidates of 2-255 tokens are timed beside, and so which wins: on the H100 the 16-token picks
# moved (gate/up 8 warps x 16 steps -> 4 x 8, down 4 x 7 -> 8 x 14) and the 8-layer decoder's 16-token forward
# went from 0.73 to 0.69 ms with the retuned cache (docs/performance-history.md, runs 208-213);
# 14: the fragment family's tensor-core kernel over tiles of 64 or 128 tokens beyond 16 (token_tile);
# 13: fragment_gemv candidates by how they sum before a scale (sums); 12: one-token fragment_gemv
# candidates; 11: scale-first candidates with four slot pairs a dot; 10: scale-first tensor-core
# candidates; 9: run-summed fp16 candidates; 8: lookahead; 7: weights-left tensor-core candidates;
# 6: fp16 accumulation, prefetch, streamed timing.
TUNE_FORMAT = 15  # older caches are retuned


class LaunchConfig(BaseModel):
    """One way to run a layer: the strategy and its launch parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    strategy: Literal["dot", "fma", "dequant", "int8", "dp4a", "fragments", "fragment_gemv"]  # int8 family:
    # int8_dot_kernel, int8_gemv_kernel (for both, iters: groups a program); fragment family:
    # fragment_dot_kernel, fragment_gemv_kernel (iters: steps of 64 inputs a program)
    block_m: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 1
    slots: int = 32  # dot/fma: slots decoded per step (a multiple of every plane's slots per word)
    iters: int = 1  # dot/fma: steps per program; K / (slots * B * iters) programs split K ("all": one split)
    whole_k: bool = False  # dot: one program walks all of K (iters derived), a tiled GEMM
    accumulate: Literal["fp32", "fp16", "fp16_runs"] = "fp32"  # fma: fp16 multiplies and sums two weights per
    # instruction; fp16_runs: and a thread's 8 columns of a row are summed before one scale
    prefetch: bool = False  # dot/fma: each program first asks L2 for all its codes (triton_kernels._start)
    weights_left: bool = False  # dot: the weights are the left operand, decoded in its registers (_dot_pair)
    lookahead: bool = False  # dot/fma: steps unrolled, each step's codes loaded before the last one decodes
    scale_first: bool = False  # dot: the decoded weights scaled in fp16 (both stages folded) and the dot
    # accumulating in place, instead of each pair's product scaled after its dot (_scaled_dot_pair)
    dot_pairs: Literal[1, 2, 4] = 1  # dot with scale_first: slot pairs joined into one dot's inner dimension,
    # one wait on the tensor cores a dot instead of a pair (_along_k; slots are multiples of 8)
    sums: Literal["rows", "steps", "rows_steps"] = "rows"  # fragment_gemv: what a thread sums unscaled before
    # one scale: a step's products along each of its rows (ROW_SUMS), a group's steps (SUM_STEPS), or both
    ordered_inputs: bool = False  # fragment_gemv with row sums: the rotation writes its input in fragment
    # order, which the kernel loads as two 16-byte vectors a thread and step (X_ORDERED)
    token_tile: Literal[16, 64, 128] = 16  # fragments: tokens a program multiplies its decoded weights by
    # (wgmma's n; a grid axis over the tiles), so that a prompt or a batch decodes each weight once a tile
    x_stages: int = 0  # fragments' tiles above 16 tokens: a ring of this many steps' activations in shared memory,
    # loaded ahead (X_STAGES); 0: all of a program's steps held at once

    @model_validator(mode="after")
    def _joined_pairs_scale_first(self) -> "LaunchConfig":
        if self.dot_pairs > 1 and not (self.strategy == "dot" and self.scale_first):
            raise ValueError(f"dot_pairs={self.dot_pairs} needs strategy 'dot' with scale_first")
        if self.sums != "rows" and self.strategy != "fragment_gemv":
            raise ValueError(f"sums={self.sums!r} needs strategy 'fragment_gemv'")
        if self.ordered_inputs and (self.strategy != "fragment_gemv" or self.sums == "steps"):
            raise ValueError("ordered_inputs needs strategy 'fragment_gemv' with row sums")
        if self.token_tile != 16 and self.strategy != "fragments":
            raise ValueError(f"token_tile={self.token_tile} needs strategy 'fragments'")
        if self.x_stages and (self.token_tile == 16 or not 2 <= self.x_stages < self.iters):
            raise ValueError(f"x_stages={self.x_stages} needs a token tile above 16 and 2 to iters - 1 stages")
        return self


class TuneEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: LaunchConfig
    microseconds: float


class TuneFile(BaseModel):
    """The tuning results of one GPU under one Triton version; entries keyed by 'KEY/mBUCKET'."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[15] = TUNE_FORMAT
    gpu: str
    triton_version: str
    entries: dict[str, TuneEntry] = {}


def token_bucket(tokens: int) -> int:
    """The smallest bucket >= tokens (the last bucket takes everything larger)."""
    return next((b for b in TOKEN_BUCKETS if tokens <= b), TOKEN_BUCKETS[-1])


# (block_n, num_warps, slots, iters[, num_stages]): few rows and slots per program give many programs
# (split-K); num_stages > 1 software-pipelines the step loop (the next steps' loads copied into
# shared memory while one decodes). Until session 9 the CUDA-core kernel's loop ignored it
# (Triton pipelines only loops with a tl.dot unless tl.range names the stages), so its
# num_stages=3 shapes ran unpipelined; pipelined, they lost (run 37) and now run at 1.
# One token runs on CUDA cores (fma: it beat the tensor-core kernel padded to 16 rows on every
# H100 key of run 3), in fp16 pairs (it beat float32 on every key of run 10; two float32 shapes
# stay candidates); 2-16 tokens on tensor cores (dot); beyond, tiles or dequantize + cuBLAS.
# The short fp16 shapes also run with each thread's 8 columns of a row summed before one scale
# (fp16_runs, where a thread holds 8 or more columns and B >= 32): on the H200 (run 44) 4-6% faster
# on every 3-bit 8B one-token key, 1-11% slower at 4 bits; retuned (run 46), every 3-bit key and the
# large 2-bit ones chose it. The tuner decides per layer.
FMA_FP32_SHAPES = ((16, 4, 8, 2), (32, 4, 8, 4))
FMA_HALF_SHAPES = ((8, 4, 8, 1), (8, 4, 8, 2), (16, 4, 8, 1), (16, 4, 8, 2), (16, 4, 16, 1), (32, 4, 8, 2),
                   (16, 4, 16, 2), (32, 4, 16, 2), (16, 4, 8, 4),
                   (32, 4, 32, 1))  # one step of 32 slots: rows in chunks of 16 words (Qwen) run-summed at 3 bits
SPLIT_SHAPES = ((32, 4, 8, 1), (32, 4, 8, 2), (64, 4, 8, 1), (64, 4, 16, 1), (64, 8, 16, 1), (128, 8, 8, 1),
                (64, 4, 8, 4, 3))
# With the weights as the left operand, sm_90's wgmma takes them from registers in tiles of 64 rows
# a warp group: split shapes of 64 rows or more also run that way (H200 run 30: q/o 4-bit at 16
# tokens 14.3 -> 12.3 us, 3-bit not faster, so the tuner decides per layer).
WEIGHTS_LEFT_MIN_ROWS = 64
# Every tensor-core shape also runs with the decoded weights scaled before the dot (`scale_first`,
# a residual option's two stages folded into one operand): half an fp16 multiply a weight instead
# of a float32 multiply-add of the [rows, tokens] product after every pair's dot, and one dot a
# pair for 4+2 and 4+4 instead of two. The tuner decides per layer.
# Longer programs, up to all of an 8B layer's K in one, as they are and with their steps unrolled,
# the next step's codes in flight (`lookahead`, as are the shapes above of several steps; on the
# H200 the one-token kernels wait on latency, a few short steps per program).
FMA_LONG_SHAPES = ((8, 4, 16, 4), (16, 4, 16, 4), (8, 4, 32, 2), (16, 4, 8, 8), (32, 8, 16, 4))
# Long programs whose step loop is software-pipelined (num_stages > 1: Triton copies the next steps'
# loads into shared memory asynchronously while one step decodes; _lut_steps). On the H200 (run 37)
# every such candidate lost, by 8-20%, to short unpipelined programs; two stay, so the tuner
# keeps measuring them on other GPUs.
FMA_PIPELINED_SHAPES = ((16, 4, 8, 4, 3), (8, 4, 16, 4, 3))
# A pipelined tensor-core shape's slots may round up (slot_choices) to 16 but no further: at 32
# (3 bits) the 16-token split shape (64, 4, 8, 4, 3) staged 262-278 KB of shared memory, over the
# H100's 227 KB, and its 12 variants failed to compile on every 3-bit key (runs 127-128); at 16
# (2 bits) it runs, and the 2-bit 8B gate/up key chose it. (No one-token CUDA-core shape failed
# to compile, so the rule leaves them as they are.)
PIPELINED_MAX_SLOTS = 16
GEMM_SHAPES = ((64, 64, 4), (64, 128, 4))  # (block_m, block_n, warps), one program per output tile
MIN_DOT_WIDTH = 8  # B: a slot pair is the dot's inner dimension 2B, which tensor cores want >= 16


def slot_choices(bits: int, residual_bits: int) -> tuple[int, ...]:
    """Slots per step that keep every shift a constant: multiples of each plane's slots per word."""
    per_word = max(32 if b == 3 else 16 if b == 2 else 8 for b in (bits, residual_bits) if b)
    return tuple(s for s in (8, 16, 32) if s % per_word == 0)


def run_sums_fit(config: LaunchConfig, slot_width: int) -> bool:
    """fp16_runs needs every thread to hold 8 or more columns of a row of the [block_n, 2B] tile
    (B = slot_width >= 16; tests/test_kernels.py checks the layouts); elsewhere the kernel
    accumulates per pair, as fp16."""
    return slot_width >= 16 and config.block_n * 2 * slot_width >= 8 * 32 * config.num_warps


def candidate_configs(bucket: int, bits: int = 4, residual_bits: int = 0, slot_width: int = 64,
                      slot_count: int = 64) -> list[LaunchConfig]:
    """The launch configurations worth timing for a token bucket and a layer (B = slot width, K / B slots)."""
    allowed = slot_choices(bits, residual_bits)

    def split(strategy: str, n: int, w: int, s: int, i: int, stages: int = 1) -> LaunchConfig | None:
        slots = min((a for a in allowed if a >= s), default=32)
        iters = max(1, min(i, slot_count // slots))
        if slot_count % (slots * iters) or (strategy == "dot" and stages > 1 and slots > PIPELINED_MAX_SLOTS):
            return None
        return LaunchConfig(strategy=strategy, block_n=n, num_warps=w, slots=slots, iters=iters, num_stages=stages)

    dequant = [LaunchConfig(strategy="dequant", block_n=32)]
    configs = []
    if bucket == 1:
        configs += [split("fma", *shape) for shape in FMA_FP32_SHAPES]
        half = [c.model_copy(update={"accumulate": "fp16"}) for c in map(lambda s: split("fma", *s), FMA_HALF_SHAPES)
                if c is not None]
        runs = [c.model_copy(update={"accumulate": "fp16_runs"}) for c in half if run_sums_fit(c, slot_width)]
        configs += half + [c.model_copy(update={"prefetch": True}) for c in half] + runs
        long = [c.model_copy(update={"accumulate": "fp16"}) for c in map(lambda s: split("fma", *s),
                                                                         FMA_LONG_SHAPES + FMA_PIPELINED_SHAPES)
                if c is not None]
        configs += long + [c.model_copy(update={"lookahead": True, "num_stages": 1}) for c in half + long if c.iters > 1]
    if slot_width >= MIN_DOT_WIDTH and 1 < bucket <= 16:
        splits = [c for c in map(lambda s: split("dot", *s), SPLIT_SHAPES) if c is not None]
        splits += [c.model_copy(update={"weights_left": True}) for c in splits if c.block_n >= WEIGHTS_LEFT_MIN_ROWS]
        splits += [c.model_copy(update={"scale_first": True}) for c in splits]
        splits += [c.model_copy(update={"dot_pairs": 4}) for c in splits if c.scale_first]
        configs += splits + [c.model_copy(update={"prefetch": True}) for c in splits]
        configs += [c.model_copy(update={"lookahead": True, "num_stages": 1}) for c in splits if c.iters > 1]
    if slot_width >= MIN_DOT_WIDTH and bucket > 16:
        configs += [LaunchConfig(strategy="dot", block_m=m, block_n=n, num_warps=w, slots=min(allowed), whole_k=True,
                                 scale_first=scale_first) for m, n, w in GEMM_SHAPES for scale_first in (False, True)]
    if bucket > 1:
        configs += dequant
    return list(dict.fromkeys(c for c in configs if c is not None))


# The int8 family (layers on int8 activations): (block_n, groups per program, warps) split over K for
# up to 16 tokens (lab runs 50-51 on the H200: (64, 8, 4) and (64, 14, 4) fastest at 8B shapes),
# (block_m, block_n, warps) tiles over all of K beyond. Pipelined over 3 stages, as in the lab.
INT8_SPLIT_SHAPES = ((64, 8, 4), (64, 14, 4), (64, 16, 4), (64, 4, 4), (32, 8, 4), (128, 8, 8), (64, 2, 4))
INT8_TILE_SHAPES = ((64, 64, 4), (64, 128, 4), (128, 128, 8), (128, 64, 4))
INT8_STAGES = 3
# One token on CUDA cores with dp4a (block_n, groups a program, warps): the lab's fastest (run 50) and
# neighbours, and (64, 32, 4): whole rows of an 8B layer a program, no split to add up, the longest
# runs of each row read (over a model's footprint short runs cost more, run 67; tuned over 2 GiB the
# fused gate/up keys still chose 4 groups, run 68). Int8LayerKernel.fits drops those that leave a
# thread fewer than 4 code words.
DP4A_SHAPES = ((64, 8, 8), (128, 8, 4), (64, 8, 4), (64, 4, 4), (32, 8, 4), (64, 16, 8), (128, 4, 4), (64, 32, 4))


def int8_candidates(bucket: int, groups: int) -> list[LaunchConfig]:
    """The int8 family's launch configurations for a token bucket and a layer of `groups` groups a row."""
    if bucket > 64:  # or the weights dequantized to 16 bits and cuBLAS, on the input rounded alike
        return [LaunchConfig(strategy="int8", block_m=m, block_n=n, num_warps=w, iters=groups, whole_k=True,
                             num_stages=INT8_STAGES) for m, n, w in INT8_TILE_SHAPES] + [
            LaunchConfig(strategy="dequant", block_n=32)]
    block_m = 16 if bucket <= 16 else 64
    steps = [(n, min(s, groups), w) for n, s, w in INT8_SPLIT_SHAPES]
    configs = [LaunchConfig(strategy="int8", block_m=block_m, block_n=n, num_warps=w, iters=s, num_stages=INT8_STAGES)
               for n, s, w in steps if groups % s == 0]
    if bucket == 1:
        configs = [LaunchConfig(strategy="dp4a", block_n=n, num_warps=w, iters=min(s, groups))
                   for n, s, w in DP4A_SHAPES if groups % min(s, groups) == 0] + configs
    return list(dict.fromkeys(configs))


def read_verbose_log(path: str | Path) -> dict[str, list[tuple[float, LaunchConfig]]]:
    """{'KEY/mBUCKET': [(microseconds, configuration), ...]} of every tuning a verbose Tuner printed
    (`tqc bench layers -v` on stderr): the candidates timed before each 'tuned ENTRY:' line."""
    runs: dict[str, list[tuple[float, LaunchConfig]]] = {}
    current: list[tuple[float, LaunchConfig]] = []
    for line in Path(path).read_text().splitlines():
        if timed := re.match(r"\s+([\d.]+) us\s+(\{.*\})", line):
            current.append((float(timed.group(1)), LaunchConfig(**ast.literal_eval(timed.group(2)))))
        elif tuned := re.match(r"tuned (\S+):", line):
            runs[tuned.group(1)], current = current, []
    return runs


Harness = tuple[Callable[[LaunchConfig], object], int]  # (run a configuration, layer calls per run)
# Weights streamed per timed replay: several times the L2 cache (50-60 MB). A model spreads its
# layers wider, which some kernels feel: 32 layers' fused 3-bit gate/up on dp4a (1.5 GB) take
# 26.5 us each where 5 copies of one (230 MB) take 22.3; the fp16 lookups 21.8 against 21.2 (run
# 67). TQC_STREAM_BYTES (e.g. 2GiB) tunes over a wider footprint; the cache does not record which.
# It does not pay: over 2 GiB the tuner chose the same dp4a gate/up configuration, and the decoder
# ran 2.17 ms against 2.09 (run 68). The slowdown is the kernel's over a wide footprint, not a choice.
STREAM_BYTES = 256 * 2**20


def stream_copies(nbytes: int, free_bytes: int | None = None) -> int:
    """Copies of a layer's weights that make one replay stream STREAM_BYTES (or TQC_STREAM_BYTES)
    from device memory, in at most half of `free_bytes` where given (a model loading next to them)."""
    streamed = parse_size(os.environ["TQC_STREAM_BYTES"]) if os.environ.get("TQC_STREAM_BYTES") else STREAM_BYTES
    if free_bytes is not None:
        streamed = min(streamed, free_bytes // 2)
    return max(1, math.ceil(streamed / nbytes))


def default_cache_dir() -> Path:
    return Path(os.environ.get("TQC_KERNEL_CACHE") or Path.home() / ".cache" / "tqc" / "kernels")


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def device_seconds(fn: Callable[[], object]) -> float:
    """Median time of fn on the GPU, replayed in a CUDA graph (triton.testing.do_bench_cudagraph).

    A graph removes the host's launch overhead, which for a one-token layer (a few microseconds
    of GPU work behind tens of microseconds of Python) would otherwise decide the ranking.
    """
    from triton.testing import do_bench_cudagraph  # noqa: PLC0415

    fn()  # compile and allocate outside the capture
    return do_bench_cudagraph(fn, rep=20, return_mode="median") / 1e3


class Tuner:
    """Finds and remembers the fastest LaunchConfig per (kernel key, token bucket) on one GPU."""

    def __init__(self, gpu: str, triton_version: str, path: Path | None, verbose: bool = False,
                 timer: Callable[[Callable[[], object]], float] | None = None):
        self.path, self.verbose = path, verbose
        self.timer = timer or device_seconds
        self.data = TuneFile(gpu=gpu, triton_version=triton_version)
        if path is not None and path.is_file():
            try:
                stored = TuneFile.model_validate_json(path.read_text())
            except ValidationError:
                stored = None  # an unreadable cache is retuned, never trusted
            if stored is not None and (stored.gpu, stored.triton_version) == (gpu, triton_version):
                self.data = stored

    @classmethod
    def for_device(cls, device=None, cache_dir: Path | None = None, verbose: bool = False) -> Tuner:
        import torch  # noqa: PLC0415
        import triton  # noqa: PLC0415

        gpu = torch.cuda.get_device_name(device)
        directory = cache_dir or default_cache_dir()
        return cls(gpu, triton.__version__, directory / f"{gpu_slug(gpu)}.json", verbose)

    def config(self, key: str, bucket: int, harness: Callable[[], Harness], candidates: list[LaunchConfig]) -> LaunchConfig:
        """The stored choice for (key, bucket), or time the candidates now and store the fastest.

        `harness()`, called only to tune, gives (run, calls): run(config) makes `calls` layer calls.
        """
        entry_key = f"{key}/m{bucket}"
        if entry_key not in self.data.entries:
            self.data.entries[entry_key] = self.tune(*harness(), candidates, desc=f"tuning {entry_key}")
            if self.verbose:
                entry = self.data.entries[entry_key]
                print(f"tuned {entry_key}: {entry.config.model_dump()} {entry.microseconds:.1f} us", file=sys.stderr)
            self.save()
        return self.data.entries[entry_key].config

    def tune(self, run: Callable[[LaunchConfig], object], calls: int, candidates: list[LaunchConfig],
             desc: str = "tuning") -> TuneEntry:
        """Time every candidate (compiling each on first use: a first load on a new GPU takes a
        while, shown by a progress bar on a terminal) and return the fastest."""
        from triton.runtime.errors import OutOfResources  # noqa: PLC0415

        best, error = None, None
        for config in tqdm(candidates, desc=desc, unit="config", leave=False, disable=None):
            try:
                seconds = self.timer(lambda: run(config)) / calls
            except OutOfResources as err:  # a configuration this GPU cannot run (shared memory, registers)
                error = err
                continue
            if self.verbose:
                print(f"  {seconds * 1e6:9.1f} us  {config.model_dump()}", file=sys.stderr)
            if best is None or seconds * 1e6 < best.microseconds:
                best = TuneEntry(config=config, microseconds=seconds * 1e6)
        if best is None:
            raise RuntimeError(f"no launch configuration ran ({error})") from error
        return best

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, self.data.model_dump_json(indent=1) + "\n")
