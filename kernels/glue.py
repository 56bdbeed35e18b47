"""The rotation fused into the kernel that produces a quantized layer's input (prologue fusion).

A TurboQuant layer rotates its input before the lookup kernel reads it (registry.rotate, one
launch). In a decoder that input is made by an elementwise step, residual add + RMSNorm before
q/k/v, gate/up and the head, SiLU x up before down_proj, so the step can write the rotated input
itself, in the layout the lookup kernel wants (registry.RotationTarget), and zero the output the
kernel adds into: one launch fewer per layer, and under programmatic dependent launch the lookup
kernel starts while the step runs.

    norm_rotate_kernel    h' = h + delta; x = rotate(rms_norm(h') * weight), rounded as torch's
                          F.rms_norm, Hugging Face's Llama RMSNorm or Gemma's (1 + weight) round it
                          (NORM_FORMS); or with no residual x = rotate(rms_norm(h) * weight)
    swiglu_rotate_kernel  x = rotate(silu(gate) * up) (or Gemma's gelu_tanh(gate) * up); down_proj's
                          output primed with the residual, which it then adds onto (fused_linear's onto)
    combine_rotate_kernel x = rotate(attention's output), combined from the one-launch attention's
                          slices (kernels/attention.py) for o_proj

The benchmark decoder (decode_bench.py) calls norm_linear and swiglu_linear itself; a model from
`tqc.load` gets them through hf_glue.py, which replaces its norms and MLPs.

`fused_linear(layer, tokens, like, produce)` runs a layer on an input that `produce(target)`
writes, for every strategy (the lookup kernels want it in slot-pair order, dequantize + cuBLAS in
natural order, the int8 family rounded to int8 per group with its scales, as rotate_int8_kernel
writes it); it returns None (the caller runs the steps unfused) where the layer has no kernel, is
not tuned for this token count yet, or takes more than MAX_TOKENS tokens. Intermediate values are
rounded to the activations' dtype where the unfused steps round them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import registry
from .attention import DecodeAttention, Slices, combine_slices
from .launch import launch
from .registry import RotationTarget, next_power_of_2, pdl_launch, zeroed_output
from .int8_kernels import store_int8
from .triton_kernels import pdl_start, prime_output, rotate_signed, store_in_order

# Beyond MAX_TOKENS the rotation has a launch of its own: the fused norm (one program per token row) was slower at
# prefill, a 2048-token prefill of the 8B-shaped decoder 60.9 ms with it and 58.1 ms without (docs/performance-history.md,
# run 19, the lookup kernels of then), and still is with the split butterflies: TQC_GLUE_MAX_TOKENS=4096 fuses
# prefills too, and an 8-layer decoder's 2048-token prefill takes 14.87-14.88 ms against 14.69-14.73 (H100, runs 200-201)
MAX_TOKENS = int(os.environ.get("TQC_GLUE_MAX_TOKENS", "16"))
MAX_BLOCK_K = 256  # columns per program: the largest power of two up to this that divides K
PRELOAD = True  # the norm's first weights and signs loaded before the PDL wait (norm_rotate_kernel)
COMBINE_IN_ROTATION = True  # attention_linear: the attention's slices combined in o_proj's rotation launch
COMBINE_WIDTH: int | None = None  # columns a program of that launch: None for block_width's (a lab's knob)
# How norm_rotate_kernel rounds rms_norm(h) * weight (its FORM): once, as torch's F.rms_norm (the
# benchmark decoder's); before the weight, as Hugging Face's LlamaRMSNorm; once with 1 + weight, as Gemma3RMSNorm
NORM_FORMS = {"rms_norm": 0, "llama": 1, "gemma": 2}


def block_width(k: int, group_size: int) -> int | None:
    """Columns per program for inputs of width k, whole groups; None where no power of two fits."""
    block = math.gcd(k, MAX_BLOCK_K)
    return block if block % group_size == 0 else None


@triton.jit(do_not_specialize=["CLEAR"])
def norm_rotate_kernel(h_ptr, delta_ptr, weight_ptr, h_out_ptr, signs_ptr, out_ptr, scales_ptr, clear_ptr, fill_ptr, CLEAR,
                       eps, K: tl.constexpr, LOG_G: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr,
                       INT8: tl.constexpr, PER_WORD: tl.constexpr, ROW: tl.constexpr, RESIDUAL: tl.constexpr,
                       FORM: tl.constexpr, PDL: tl.constexpr = False, FRAGMENT_STEP: tl.constexpr = 0,
                       PRELOAD: tl.constexpr = True, FILL: tl.constexpr = False):
    """grid (M, P): each program loads its token's whole row (ROW, the next power of two >= K, at
    once: a loop over blocks waited for each load in turn) for the sum of squares, then writes
    h_out and the rotated normalised input for column blocks p, p + P, ... of BLOCK_K (P: norm_column_programs,
    K / BLOCK_K up to 16 tokens). RESIDUAL: h' = h + delta is normalised and h_out is h';
    else h is normalised and h_out is the result (delta unused). FORM (NORM_FORMS) rounds the
    normalised input as torch's F.rms_norm does (0), as Hugging Face's Llama RMSNorm (1: before the
    weight) or Gemma's (2: * (1 + weight), once). The weight and signs of the program's first block are
    read-only: with PRELOAD they are loaded before waiting for the kernel before (PDL), so that
    their trip to memory is not on the path after the row's reduction."""
    first = tl.program_id(1)
    if not PRELOAD:
        pdl_start(PDL)
    first_weight, first_signs = _weight_and_signs(weight_ptr, signs_ptr, first * BLOCK_K + tl.arange(0, BLOCK_K))
    if PRELOAD:
        pdl_start(PDL)
    prime_output(clear_ptr, fill_ptr, CLEAR, BLOCK_K, FILL)
    token = tl.program_id(0)
    row = tl.arange(0, ROW)
    whole = _row(h_ptr, delta_ptr, h_out_ptr, token * K + row, row < K, RESIDUAL)
    scale = tl.rsqrt(tl.sum(whole * whole) / K + eps)
    tokens = token + tl.arange(0, 1)
    dtype = h_out_ptr.dtype.element_ty
    for block in range(first, K // BLOCK_K, tl.num_programs(1)):
        cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
        h = _row(h_ptr, delta_ptr, h_out_ptr, token * K + cols, cols < K, RESIDUAL)
        weight, signs = first_weight, first_signs
        if block != first:  # several tokens: one program walks the row's blocks
            weight, signs = _weight_and_signs(weight_ptr, signs_ptr, cols)
        if FORM == 0:  # (h * scale * weight).to(dtype)
            x = (h * scale * weight).to(dtype).to(tl.float32)
        elif FORM == 1:  # weight * (h * scale).to(dtype), in the activations' dtype
            x = ((h * scale).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
        else:  # (h * scale * (1 + weight)).to(dtype)
            x = (h * scale * (weight + 1.0)).to(dtype).to(tl.float32)
        tl.store(h_out_ptr + token * K + cols, h.to(dtype) if RESIDUAL else x.to(dtype))
        _store(x[None, :], signs, out_ptr, scales_ptr, tokens, block, K, LOG_G, BLOCK_K, PAIR_WIDTH, INT8,
               PER_WORD, FRAGMENT_STEP)


@triton.jit
def _weight_and_signs(weight_ptr, signs_ptr, cols):
    """The norm's weight (float32) and the rotation's signs of columns `cols` (whole groups inside K)."""
    return tl.load(weight_ptr + cols).to(tl.float32), tl.load(signs_ptr + cols)


@triton.jit
def _row(h_ptr, delta_ptr, like_ptr, offsets, mask, RESIDUAL: tl.constexpr):
    """h (RESIDUAL: h + delta, rounded to the activations' dtype as the unfused add is) at
    `offsets`, in float32."""
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        h += tl.load(delta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h = h.to(like_ptr.dtype.element_ty).to(tl.float32)
    return h


@triton.jit(do_not_specialize=["CLEAR"])
def swiglu_rotate_kernel(gate_up_ptr, signs_ptr, out_ptr, scales_ptr, clear_ptr, fill_ptr, CLEAR, K: tl.constexpr,
                         LOG_G: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr, INT8: tl.constexpr,
                         PER_WORD: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr = False,
                         FRAGMENT_STEP: tl.constexpr = 0, FILL: tl.constexpr = False):
    """grid (M, K / BLOCK_K): x = silu(gate) * up (GELU: gelu_tanh(gate) * up, Gemma's) for one
    token's BLOCK_K columns (gate_up is [M, 2K], gate first), rotated."""
    pdl_start(PDL)
    prime_output(clear_ptr, fill_ptr, CLEAR, BLOCK_K, FILL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dtype = gate_up_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + token * 2 * K + cols).to(tl.float32)
    up = tl.load(gate_up_ptr + token * 2 * K + K + cols).to(tl.float32)
    if GELU:  # 0.5 g (1 + tanh(y)) = g sigmoid(2y), y = sqrt(2 / pi) (g + 0.044715 g^3)
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = (gate / (1.0 + tl.exp(-2.0 * y))).to(dtype).to(tl.float32)
    else:
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    x = (act * up).to(dtype).to(tl.float32)
    tokens = token + tl.arange(0, 1)
    signs = tl.load(signs_ptr + cols)
    _store(x[None, :], signs, out_ptr, scales_ptr, tokens, tl.program_id(1), K, LOG_G, BLOCK_K, PAIR_WIDTH, INT8,
           PER_WORD, FRAGMENT_STEP)


@triton.jit(do_not_specialize=["CLEAR"])
def combine_rotate_kernel(partial_ptr, stats_ptr, like_ptr, signs_ptr, out_ptr, scales_ptr, clear_ptr, fill_ptr, CLEAR,
                          HEADS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                          K: tl.constexpr, LOG_G: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr,
                          INT8: tl.constexpr, PER_WORD: tl.constexpr, PDL: tl.constexpr = False,
                          FRAGMENT_STEP: tl.constexpr = 0, FILL: tl.constexpr = False):
    """grid (1, K / BLOCK_K), K = HEADS * D: one token's attention output, BLOCK_K / D heads a program,
    combined from the attention's SPLITS slices (attention.combine_slices) and rounded to like's
    dtype, as the attention's own combining stores it, then rotated."""
    block = tl.program_id(1)
    signs = tl.load(signs_ptr + block * BLOCK_K + tl.arange(0, BLOCK_K))
    pdl_start(PDL)
    prime_output(clear_ptr, fill_ptr, CLEAR, BLOCK_K, FILL)
    heads = block * (BLOCK_K // D) + tl.arange(0, BLOCK_K // D)
    combined = combine_slices(partial_ptr, stats_ptr, heads, heads < HEADS, HEADS, SPLITS, BLOCK_S, D)
    x = tl.reshape(combined, (BLOCK_K,)).to(like_ptr.dtype.element_ty).to(tl.float32)
    _store(x[None, :], signs, out_ptr, scales_ptr, tl.arange(0, 1), block, K, LOG_G, BLOCK_K, PAIR_WIDTH, INT8,
           PER_WORD, FRAGMENT_STEP)


@triton.jit
def _store(x, signs, out_ptr, scales_ptr, tokens, block, K: tl.constexpr, LOG_G: tl.constexpr,
           BLOCK_K: tl.constexpr, PAIR_WIDTH: tl.constexpr, INT8: tl.constexpr, PER_WORD: tl.constexpr,
           FRAGMENT_STEP: tl.constexpr):
    """Rotate one token's column block `block` by its signs and store it as the target wants: in
    16 bits (in store_rotated's order), or rounded to int8 with its scales (int8_kernels.store_int8)."""
    cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
    x = rotate_signed(x, signs, LOG_G, 1, BLOCK_K)
    if INT8:
        store_int8(x, out_ptr, scales_ptr, tokens, tokens >= 0, block, K, LOG_G, 1, BLOCK_K, False, PER_WORD)
    else:
        store_in_order(x, out_ptr, tokens, cols, (cols < K)[None, :], K, PAIR_WIDTH, FRAGMENT_STEP)


def _target_arguments(target: RotationTarget, rotated: torch.Tensor) -> tuple:
    """signs, out, scales, clear, fill, CLEAR: the kernels' arguments for `target`, positionally (as
    kernels/launch.py wants tensors); `rotated` stands in for the pointers the constexprs leave unread."""
    clear, scales, fill = target.clear, target.scales, target.clear_from
    return (target.signs, rotated, rotated if scales is None else scales, rotated if clear is None else clear,
            rotated if fill is None else fill, 0 if clear is None else clear.numel())


def _constexprs(target: RotationTarget, device: torch.device, k: int) -> dict:
    block = block_width(k, target.group_size)
    if block is None:
        raise ValueError(f"no power of two up to {MAX_BLOCK_K} divides K={k} in whole groups of {target.group_size}")
    return {"INT8": target.scales is not None, "PER_WORD": target.per_word, "K": k,
            "LOG_G": target.group_size.bit_length() - 1, "BLOCK_K": block,
            "PAIR_WIDTH": target.pair_width, "FRAGMENT_STEP": target.fragment_step,
            "FILL": target.clear_from is not None} | pdl_launch(device)


def norm_column_programs(m: int, blocks: int) -> int:
    """Programs a token of norm_rotate_kernel's launch: up to 16 tokens every column block its own (each
    program reads the token's whole row for its norm), as registry.rotation_block_m spreads the rotation's
    launch; for more, fewer, each walking its share of the row's `blocks` (about 16 blocks' worth of programs)."""
    if not registry.SPREAD_ROTATION:
        return max(1, blocks // m)
    return max(1, min(blocks, blocks * registry.SPREAD_TOKENS // m))


def norm_rotate(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                target: RotationTarget, form: str = "rms_norm") -> tuple[torch.Tensor, torch.Tensor]:
    """For [M, K] activations, in one launch: (h + delta, rotate(rms_norm(h + delta) * weight)),
    or with delta None (h_normed, rotate(h_normed)), h_normed = rms_norm(h) * weight, rounded
    as `form` (NORM_FORMS) rounds it."""
    m, k = h.shape
    h_out = torch.empty_like(h)
    rotated = torch.empty(m, k, device=h.device, dtype=target.dtype)
    options = _constexprs(target, h.device, k)
    column_programs = norm_column_programs(m, k // options["BLOCK_K"])
    launch(norm_rotate_kernel, (m, column_programs), h, h if delta is None else delta, weight, h_out,
           *_target_arguments(target, rotated), eps, ROW=next_power_of_2(k), RESIDUAL=delta is not None, FORM=NORM_FORMS[form],
           PRELOAD=PRELOAD, **options)
    return h_out, rotated


def swiglu_rotate(gate_up: torch.Tensor, target: RotationTarget, gelu: bool = False) -> torch.Tensor:
    """rotate(silu(gate) * up) for [M, 2K] gate_up (`gelu`: gelu_tanh(gate) * up), in one launch."""
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    rotated = torch.empty(m, k, device=gate_up.device, dtype=target.dtype)
    options = _constexprs(target, gate_up.device, k)
    launch(swiglu_rotate_kernel, (m, k // options["BLOCK_K"]), gate_up, *_target_arguments(target, rotated),
           GELU=gelu, **options)
    return rotated


def combine_rotate(slices: Slices, like: torch.Tensor, target: RotationTarget, width: int) -> torch.Tensor:
    """rotate(attention's output) for one token, from its slices, in one launch of programs `width`
    columns wide (_combine_width); rounded to like's dtype before the rotation, as the attention's
    own combining rounds it."""
    k = slices.heads * slices.head_dim
    rotated = torch.empty(1, k, device=like.device, dtype=target.dtype)
    options = _constexprs(target, like.device, k) | {"BLOCK_K": width}
    launch(combine_rotate_kernel, (1, k // width), slices.partial, slices.stats, like,
           *_target_arguments(target, rotated), HEADS=slices.heads, SPLITS=slices.splits,
           BLOCK_S=slices.block_s, D=slices.head_dim, **options)
    return rotated


def _combine_width(k: int, head_dim: int, group_size: int) -> int | None:
    """Columns a program of combine_rotate takes (COMBINE_WIDTH, else block_width's): whole heads and
    whole rotation groups, dividing the attention's width k; None where that cannot be."""
    width = COMBINE_WIDTH or block_width(k, group_size)
    fits = width is not None and k % width == 0 and width % head_dim == 0 and width % group_size == 0
    return width if fits else None


def fused_linear(layer, tokens: int, like: torch.Tensor, produce: Callable[[RotationTarget], torch.Tensor],
                 then=None, onto: torch.Tensor | None = None) -> torch.Tensor | None:
    """layer(x) where `produce(target)` writes x already rotated (on int8 activations: rounded, its
    scales in target.scales), or None where the layer has no kernel, is not tuned for this token
    count yet, the tokens are more than MAX_TOKENS, its width cannot be cut in whole groups
    (block_width), or its strategy rotates in a launch of its own (LayerKernel.fusable).
    `then`: a later layer (o_proj after q/k/v) whose output the same launch zeroes, where it can
    take it (_then_zeroes); it finds it at its next call (registry.ZeroedOutput). `onto`: a
    residual, [tokens, N], added to the output: `produce` writes it where it would zero the output
    the kernel adds into (target.clear_from), else it is added after."""
    kernel = getattr(layer, "kernel", None)
    config = kernel.tuned(tokens) if kernel is not None and tokens <= MAX_TOKENS else None
    if config is None or not kernel.fusable(config) or block_width(layer.in_features, kernel.key.group_size) is None:
        return None
    out = kernel.output(tokens, like.device, like.dtype, config)
    later = _then_zeroes(then, tokens) if out is not None else 0
    if later:  # one buffer, this layer's output first, zeroed as one
        both = torch.empty(out.numel() + later, device=out.device, dtype=out.dtype)
        out, spare = both[:out.numel()].view(out.shape), both[out.numel():].view(tokens, -1)
    target = kernel.rotation_target(layer, config, out, like.dtype)
    if later:
        target = dataclasses.replace(target, clear=both)
    fills = onto is not None and target.clear is out and _fills(out, onto)
    if fills:
        target = dataclasses.replace(target, clear_from=onto)
    rotated = produce(target)
    if later:
        zeroed_output(then).out = spare
    result = kernel.finish(kernel.multiply(rotated, layer, config, out, target.scales), layer)
    return result if onto is None or fills else onto + result


def _fills(out: torch.Tensor, onto: torch.Tensor) -> bool:
    """Whether `onto` can be copied into `out` as it is (a launch's clear_from)."""
    return onto.shape == out.shape and onto.dtype == out.dtype and onto.is_contiguous()


def _then_zeroes(then, tokens: int) -> int:
    """How many elements of `then`'s output a step before it zeroes for its next call on `tokens` tokens:
    all of them where it runs its input as it comes (registry.DIRECT_INPUTS,
    LayerKernel.takes_input_as_it_comes, on a tuned configuration), else none."""
    kernel = getattr(then, "kernel", None) if registry.DIRECT_INPUTS else None
    config = kernel.tuned(tokens) if kernel is not None else None
    return tokens * kernel.key.n if config is not None and kernel.takes_input_as_it_comes(then, config) else 0


def norm_linear(layer, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float, form: str = "rms_norm", then=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(h + delta, layer(rms_norm(h + delta) * weight)) with the rotation in the norm's launch, or
    None; with delta None (x, layer(x)), x = rms_norm(h) * weight (rounded as norm_rotate's
    `form`). `then`: fused_linear's."""
    residual = []

    def produce(target: RotationTarget) -> torch.Tensor:
        h_out, rotated = norm_rotate(h, delta, weight, eps, target, form)
        residual.append(h_out)
        return rotated

    out = fused_linear(layer, h.shape[0], h, produce, then)
    return None if out is None else (residual[0], out)


def swiglu_linear(layer, gate_up: torch.Tensor, gelu: bool = False, onto: torch.Tensor | None = None) -> torch.Tensor | None:
    """layer(silu(gate) * up) (`gelu`: gelu_tanh(gate) * up) with the rotation in the SwiGLU launch,
    plus `onto` (the residual: fused_linear's), or None."""
    return fused_linear(layer, gate_up.shape[0], gate_up, lambda target: swiglu_rotate(gate_up, target, gelu),
                        onto=onto)


def attention_linear(layer, attention: DecodeAttention, qkv: torch.Tensor, cache: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor | None:
    """layer(attention(qkv, cache, pos)) for one token with the attention's slices combined in the
    launch that rotates the layer's input (slices_linear)."""
    return slices_linear(layer, qkv, attention.heads, attention.head_dim, lambda: attention.slices(qkv, cache, pos))


def slices_linear(layer, like: torch.Tensor, heads: int, head_dim: int, attend: Callable[[], Slices]) -> torch.Tensor | None:
    """layer(the attention's output) for one token, where attend() runs the attention and leaves its
    Slices, combined in the launch that rotates the layer's input (combine_rotate): the attention's
    programs end with their slice, with no count and no last program combining. None, attend()
    not called, where fused_linear's is, where a program's columns are no whole number of heads,
    where the layer takes the attention's output as it comes into an output zeroed before
    (registry.DIRECT_INPUTS: no launch of its own to combine in), or COMBINE_IN_ROTATION is off."""
    kernel = getattr(layer, "kernel", None)
    if not COMBINE_IN_ROTATION or kernel is None or like.shape[0] != 1 or _then_zeroes(layer, 1):
        return None
    width = _combine_width(heads * head_dim, head_dim, kernel.key.group_size)
    if width is None:
        return None
    return fused_linear(layer, 1, like, lambda target: combine_rotate(attend(), like, target, width))
