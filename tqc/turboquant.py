"""TurboQuant for weights: rotate each group, fit a scale, encode with a Lloyd-Max codebook.

Stage 1 encodes the rotated weight with the `base_bits` Gaussian codebook (the option's: Lloyd-Max, or
the grid's for "3g", codebook.codebook_levels); the optional residual
stage encodes what stage 1 left with its own scale and `residual_bits` codebook. Each stage's
per-(row, group) scale minimises that stage's squared error (grid search around the RMS, then
alternating least-squares refinement), not merely the RMS.
"""

from __future__ import annotations

import torch

from .bitpack import pack, unpack
from .activations import round_to_int8
from .codebook import Codebook, codebook_levels, int8_codebook
from .layout import LayerSpec
from .rotation import random_signs, rotate

SCALE_GRID = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # multiples of the group's RMS, searched first
ZOOM_STEP = 0.05  # then best +- this multiple of the RMS
REFINE_STEPS = 3
ROW_CHUNK = 4096


def _lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebook[codes] for int32/int64 codes (index_select: several times faster than indexing)."""
    return codebook.index_select(0, codes.reshape(-1)).view(codes.shape)


def _encode(x: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, midpoints: torch.Tensor):
    """Nearest-level codes (int32) of x / scale, and the squared error per (row, group)."""
    normalized = x / scale[..., None]
    codes = torch.bucketize(normalized, midpoints, out_int32=True)
    error = normalized.sub_(_lookup(codebook, codes)).square_().sum(-1).mul_(scale.square())
    return codes, error


def _search_scale(x: torch.Tensor, codebook: torch.Tensor, midpoints: torch.Tensor):
    """Per-group scale with the least error among the RMS grid and one zoomed step around its best."""
    rms = x.square().mean(-1).sqrt_().clamp_min_(1e-12)
    best_err = torch.full_like(rms, float("inf"))
    best_scale = rms.clone()

    def consider(scale: torch.Tensor) -> None:
        nonlocal best_err, best_scale
        _, err = _encode(x, scale, codebook, midpoints)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)

    for multiplier in SCALE_GRID:
        consider(rms * multiplier)
    grid_best = best_scale
    for direction in (-1.0, 1.0):
        consider(grid_best + rms * (direction * ZOOM_STEP))
    return best_scale, best_err


def _fit_chunk(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, groups, g] -> (codes uint8 like x, scales fp16 [rows, groups])."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    scale, best_err = _search_scale(x, codebook, midpoints)
    for _ in range(REFINE_STEPS):  # least-squares scale for the current codes, kept if it helps
        codes, _ = _encode(x, scale, codebook, midpoints)
        levels = _lookup(codebook, codes)
        refined = (x * levels).sum(-1) / levels.square().sum(-1).clamp_min_(1e-12)
        refined_err = (x - levels * refined[..., None]).square_().sum(-1)
        scale = torch.where((refined > 0) & (refined_err < best_err), refined, scale)
        best_err = torch.minimum(refined_err, best_err)
    scale = scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)
    codes, _ = _encode(x, scale, codebook, midpoints)
    return codes.to(torch.uint8), scale.to(torch.float16)


def fit_stage(x: torch.Tensor, bits: int, codebook_name: Codebook = "lloyd-max") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode x [rows, groups, g] at `bits`: (codes uint8 [rows, groups, g], scales fp16 [rows, groups])."""
    codebook = codebook_levels(bits, codebook_name).to(x.device)
    parts = [_fit_chunk(chunk, codebook) for chunk in x.split(ROW_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def decode_stage(codes: torch.Tensor, scales: torch.Tensor, bits: int, int8_levels: bool = False,
                 codebook_name: Codebook = "lloyd-max") -> torch.Tensor:
    """codes [rows, groups, g] (any integer dtype) and scales [rows, groups] -> float32 values.

    int8_levels: through the codebook rounded to int8 (layers on int8 activations, tqc.activations);
    the codes are fitted against the exact levels either way.
    """
    if int8_levels:
        levels, factor = int8_codebook(bits)
        codebook = (levels.double() * factor).float().to(scales.device)
    else:
        codebook = codebook_levels(bits, codebook_name).to(scales.device)
    index = codes if codes.dtype in (torch.int32, torch.int64) else codes.int()
    return _lookup(codebook, index).mul_(scales.float()[..., None])


def weight_signs(seed: int, spec: LayerSpec) -> torch.Tensor:
    """The signs the weight's groups are rotated with, and the input at run time."""
    return random_signs(seed, spec.in_features)


def activation_signs(seed: int, spec: LayerSpec) -> torch.Tensor:
    """The signs the input is rotated with at run time (in blocks of spec.rotation_size): the weight's,
    or ones where the input arrives rotated."""
    return torch.ones(spec.in_features) if spec.input_rotated else weight_signs(seed, spec)


def rotated_weight(weight: torch.Tensor, seed: int, spec: LayerSpec) -> torch.Tensor:
    """W R^T in float32: the weight in the basis of the rotated inputs its codes are fitted in. Where
    the input arrives rotated (spec.input_rotated), the fold rotated the weight with it (tqc.folding)."""
    weight = weight.detach().float()
    return weight if spec.input_rotated else rotate(weight, weight_signs(seed, spec), spec.group_size)


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int) -> dict[str, torch.Tensor]:
    """The packed tensors of a TurboQuant layer (see `layout.tensor_layout`), computed on the
    weight's device (a GPU fits the codes of a large model in seconds)."""
    option = spec.option
    n, k, g = spec.out_features, spec.in_features, spec.group_size
    rotated = rotated_weight(weight, seed, spec).reshape(n, spec.groups, g)
    codes, scales = fit_stage(rotated, option.base_bits, option.codebook)
    tensors = {
        "codes": pack(codes.reshape(n, k), option.base_bits),
        "scales": scales,
        "seed": torch.tensor([seed], dtype=torch.int64),
    }
    if option.residual_bits:
        residual = rotated - decode_stage(codes, scales, option.base_bits, codebook_name=option.codebook)
        res_codes, res_scales = fit_stage(residual, option.residual_bits)
        tensors["residual_codes"] = pack(res_codes.reshape(n, k), option.residual_bits)
        tensors["residual_scales"] = res_scales
    return tensors


def dequantize(tensors: dict[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
    """The weight in the rotated basis, float32 [out, in] (multiply by the rotated activation)."""
    option = spec.option
    n, k, g = spec.out_features, spec.in_features, spec.group_size
    shape = (n, spec.groups, g)
    codes = unpack(tensors["codes"], option.base_bits, k, torch.int32).view(shape)
    weight = decode_stage(codes, tensors["scales"], option.base_bits, spec.activations == "int8", option.codebook)
    if option.residual_bits:
        codes = unpack(tensors["residual_codes"], option.residual_bits, k, torch.int32).view(shape)
        weight += decode_stage(codes, tensors["residual_scales"], option.residual_bits)
    return weight.reshape(n, k)


def prepare_input(x: torch.Tensor, signs: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Rotate the activation group by group, as the weight was, unless it arrives rotated (and round it
    to int8 per group where the layer runs on int8 activations); `signs`: activation_signs."""
    rotated = rotate(x, signs, spec.rotation_size)
    return round_to_int8(rotated, spec.group_size) if spec.activations == "int8" else rotated
