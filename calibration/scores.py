"""Score every (layer, option): the output error the option leaves, weighted by the layer's inputs.

For a layer W with input second moment H, option o leaves dW = W - Q_o(W) and the output error
e_o = tr(dW H dW^T) (computed in the rotated basis, where TurboQuant quantizes: R H R^T). The
predicted damage is alpha * e_o (`statistics.LayerStats.alpha`). Errors are measured on a seeded
sample of rows (an unbiased estimate of the sum over rows), through the quantizer's own
`fit_stage` / `decode_stage`, so the score sees the scales TurboQuant really fits.
"""

from __future__ import annotations

import torch

from tqc.codebook import gaussian_distortion
from tqc.layout import LayerSpec, layer_bytes, layer_seed, rotation_seed
from tqc.codebook import Codebook
from tqc.options import GRID_OPTIONS, SCORED_OPTIONS, TURBOQUANT_BASE_BITS, TURBOQUANT_OPTIONS, QuantOption
from tqc.rotation import random_signs, rotate
from tqc.turboquant import decode_stage, fit_stage

from .measurement import OptionScore

DEFAULT_ROWS = 128
GROUPS_PER_ROW = 64  # groups handed to fit_stage per row (any shape works: fits are per group)


def sample_rows(out_features: int, rows: int, name: str, seed: int) -> torch.Tensor:
    """Seeded row indices (all rows when `rows` >= out_features)."""
    if rows >= out_features:
        return torch.arange(out_features)
    generator = torch.Generator().manual_seed(layer_seed(seed, f"rows:{name}"))
    return torch.randperm(out_features, generator=generator)[:rows].sort().values


def rotated_hessian(hessian: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """R H R^T for the per-group rotation R (H symmetric)."""
    return rotate(rotate(hessian, signs, group_size).T.contiguous(), signs, group_size)


def rotated_rows(name: str, weight: torch.Tensor, group_size: int, seed: int, rows: int) -> torch.Tensor:
    """The layer's sampled rows in the rotated basis, as groups [rows * in / g, g]."""
    n, k = weight.shape
    index = sample_rows(n, rows, name, seed)
    signs = random_signs(rotation_seed(seed, name), k)
    return rotate(weight[index].detach().float(), signs, group_size).reshape(-1, group_size)


def _fit_groups(groups: torch.Tensor, bits: int, codebook: Codebook = "lloyd-max") -> torch.Tensor:
    """Quantize-dequantize independent groups [m, g] through TurboQuant's own stage fit."""
    m, g = groups.shape
    width = GROUPS_PER_ROW
    padded = torch.cat([groups, groups.new_zeros((-m) % width, g)]).reshape(-1, width, g)
    codes, scales = fit_stage(padded, bits, codebook)
    return decode_stage(codes, scales, bits, codebook_name=codebook).reshape(-1, g)[:m]


def residual_errors(groups: torch.Tensor) -> dict[QuantOption, torch.Tensor]:
    """What every scored option (SCORED_OPTIONS) leaves of the rotated groups [m, g]: {option: groups - Q(groups)}."""
    left_by_option = {}
    for base in TURBOQUANT_BASE_BITS:
        left = groups - _fit_groups(groups, base)
        for option in (o for o in TURBOQUANT_OPTIONS if o.base_bits == base):
            left_by_option[option] = left - _fit_groups(left, option.residual_bits) if option.residual_bits else left
    for option in GRID_OPTIONS:
        left_by_option[option] = groups - _fit_groups(groups, option.base_bits, option.codebook)
    return left_by_option


def score_layers(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, int]], seed: int, rows: int
) -> dict[str, dict[str, OptionScore]]:
    """Score every TurboQuant option of every layer {name: (weight, H, alpha, group size)}.

    Stage fits work group by group, so the sampled rows of all layers that share a group size are
    quantized together in one call per stage (one large tensor op instead of 211 small ones).
    """
    scores: dict[str, dict[str, OptionScore]] = {}
    for group_size in sorted({entry[3] for entry in layers.values()}):
        names = [name for name, entry in layers.items() if entry[3] == group_size]
        parts = [rotated_rows(name, layers[name][0], group_size, seed, rows) for name in names]
        left = residual_errors(torch.cat(parts))
        offsets = [0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()]
        for i, name in enumerate(names):
            weight, hessian, alpha, _ = layers[name]
            n, k = weight.shape
            h = rotated_hessian(hessian.float(), random_signs(rotation_seed(seed, name), k), group_size)
            factor = n / min(rows, n)

            def quadratic(groups: torch.Tensor) -> float:
                flat = groups.reshape(-1, k)
                return float(((flat @ h) * flat).sum()) * factor

            energy = quadratic(parts[i])
            scores[name] = {
                option.name: _option_score(option, LayerSpec(option, group_size, k, n), alpha, quadratic(rest[offsets[i] : offsets[i + 1]]), energy)
                for option, rest in left.items()
            }
    return scores


def _option_score(option: QuantOption, spec: LayerSpec, alpha: float, error: float, energy: float) -> OptionScore:
    return OptionScore(bytes=layer_bytes(spec), damage=alpha * error, relative_error=error / energy if energy > 0 else 0.0)


def theory_error(option: QuantOption) -> float:
    """Relative squared error of an option on Gaussian weights (its codebook's; the residual stage
    quantizes what the base stage left, so their distortions multiply)."""
    error = gaussian_distortion(option.base_bits, option.codebook)
    return error * gaussian_distortion(option.residual_bits) if option.residual_bits else error


def prior_scores(in_features: int, out_features: int, group_size: int, factor: float = 1.0) -> dict[str, OptionScore]:
    """Data-free scores: damage = relative error x weights x factor / 1e9 (factor: the layer's
    relative sensitivity per weight, 1 when every weight counts alike; see prior.RolePrior)."""
    return {
        option.name: OptionScore(
            bytes=layer_bytes(LayerSpec(option, group_size, in_features, out_features)),
            damage=theory_error(option) * in_features * out_features * factor / 1e9,
            relative_error=theory_error(option),
        )
        for option in SCORED_OPTIONS
    }
