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
from tqc.layout import LayerSpec, layer_bytes, layer_seed
from tqc.options import TURBOQUANT_BASE_BITS, TURBOQUANT_OPTIONS, QuantOption
from tqc.rotation import random_signs, rotate
from tqc.turboquant import decode_stage, fit_stage

from .measurement import OptionScore

DEFAULT_ROWS = 128


def sample_rows(out_features: int, rows: int, name: str, seed: int) -> torch.Tensor:
    """Seeded row indices (all rows when `rows` >= out_features)."""
    if rows >= out_features:
        return torch.arange(out_features)
    generator = torch.Generator().manual_seed(layer_seed(seed, f"rows:{name}"))
    return torch.randperm(out_features, generator=generator)[:rows].sort().values


def rotated_hessian(hessian: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """R H R^T for the per-group rotation R (H symmetric)."""
    return rotate(rotate(hessian, signs, group_size).T.contiguous(), signs, group_size)


def output_errors(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, seed: int, rows: torch.Tensor
) -> tuple[dict[QuantOption, float], float]:
    """({option: tr(dW H dW^T)} for every TurboQuant option, tr(W H W^T)), summed over all rows."""
    n, k = weight.shape
    signs = random_signs(seed, k)
    w = rotate(weight[rows].detach().float(), signs, group_size).reshape(len(rows), k // group_size, group_size)
    h = rotated_hessian(hessian.float(), signs, group_size)
    factor = n / len(rows)

    def quadratic(delta: torch.Tensor) -> float:
        flat = delta.reshape(len(rows), k)
        return float(((flat @ h) * flat).sum()) * factor

    errors = {}
    for base in TURBOQUANT_BASE_BITS:
        codes, scales = fit_stage(w, base)
        left = w - decode_stage(codes, scales, base)
        for option in (o for o in TURBOQUANT_OPTIONS if o.base_bits == base):
            rest = left
            if option.residual_bits:
                res_codes, res_scales = fit_stage(left, option.residual_bits)
                rest = left - decode_stage(res_codes, res_scales, option.residual_bits)
            errors[option] = quadratic(rest)
    return errors, quadratic(w)


def layer_scores(
    name: str, weight: torch.Tensor, hessian: torch.Tensor, alpha: float, group_size: int, seed: int, rows: int
) -> dict[str, OptionScore]:
    """Bytes, damage and relative error of every TurboQuant option for one layer."""
    n, k = weight.shape
    errors, energy = output_errors(weight, hessian, group_size, layer_seed(seed, name), sample_rows(n, rows, name, seed))
    return {
        option.name: OptionScore(
            bytes=layer_bytes(LayerSpec(option, group_size, k, n)),
            damage=alpha * error,
            relative_error=error / energy if energy > 0 else 0.0,
        )
        for option, error in errors.items()
    }


def theory_error(option: QuantOption) -> float:
    """Relative squared error of an option on Gaussian weights (Lloyd-Max; the residual stage
    quantizes what the base stage left, so their distortions multiply)."""
    error = gaussian_distortion(option.base_bits)
    return error * gaussian_distortion(option.residual_bits) if option.residual_bits else error


def prior_scores(in_features: int, out_features: int, group_size: int) -> dict[str, OptionScore]:
    """Data-free scores: every weight equally sensitive, damage = relative error x weights / 1e9."""
    return {
        option.name: OptionScore(
            bytes=layer_bytes(LayerSpec(option, group_size, in_features, out_features)),
            damage=theory_error(option) * in_features * out_features / 1e9,
            relative_error=theory_error(option),
        )
        for option in TURBOQUANT_OPTIONS
    }
