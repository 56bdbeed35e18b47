"""Data-tuned TurboQuant: GPTQ in the rotated space, fed block by block with calibration inputs.

For a layer W [N, K] with input second moment H = E[x x^T], the weight is rotated group by group as
`turboquant.quantize` does (W R^T, and H becomes R H R^T, `scores.rotated_hessian`), then quantized
one column at a time with TurboQuant's own quantizer: the nearest level (the option's codebook) times the group's
fp16 scale (for `b+r` options, plus the residual level of what the base level left). Each column's
error is spread over the columns still to come through the upper Cholesky factor of H^-1 (GPTQ,
Frantar et al. 2022: dampening 1% of the mean diagonal, blocks of 128 columns, lazy batch updates).
A group's scales are fitted by `turboquant.fit_stage` when the loop reaches the group's first
column, from the weights as the earlier columns' errors have left them.

`scales` is the cheaper variant without error feedback: each (row, group) takes, among fit_stage's
scale and the RMS grid, the scale with the least H-weighted error of that group (its diagonal block
of R H R^T), refined by weighted least squares.

Both return exactly the tensors `turboquant.quantize` returns, so the packed format, the loader,
the kernels and the memory model do not change. `quantize_calibrated` runs them through a model
block by block: the calibration windows go through the blocks already quantized, so every layer's
H is measured on the inputs it will really see (docs/gptq.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tqc.bitpack import pack
from tqc.codebook import Codebook, codebook_levels, nearest_code
from tqc.layout import LayerSpec, rotation_seed
from tqc.linear import empty_quantized_linear, load_packed_tensors
from tqc.models import linear_layers, load_tokenizer, resolve_model
from tqc.plan import Plan, QuantizerRef
from tqc.turboquant import SCALE_GRID, decode_stage, fit_stage, rotated_weight, weight_signs

from .data import DEFAULT_DATA, data_ref, sample_windows
from .scores import rotated_hessian

BLOCK_COLUMNS = 128  # GPTQ's lazy-update block
REFINE_STEPS = 3
BATCH_WINDOWS = 8  # calibration windows per block forward


# ------------------------------------------------------------------------------ one layer: GPTQ


Stage = tuple[int, Codebook]  # a stage's bits and levels


def _stages(spec: LayerSpec) -> tuple[Stage, ...]:
    """The layer's stages: the base one on the option's codebook, the residual one (if any) on Lloyd-Max's."""
    option = spec.option
    base = (option.base_bits, option.codebook)
    return (base, (option.residual_bits, "lloyd-max")) if option.residual_bits else (base,)


def _packed(spec: LayerSpec, seed: int, codes: list[torch.Tensor], scales: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `turboquant.quantize`, same names, order, shapes and dtypes."""
    bits = [stage_bits for stage_bits, _ in _stages(spec)]
    tensors = {"codes": pack(codes[0], bits[0]), "scales": scales[0], "seed": torch.tensor([seed], dtype=torch.int64)}
    if len(bits) > 1:
        tensors["residual_codes"] = pack(codes[1], bits[1])
        tensors["residual_scales"] = scales[1]
    return tensors


def _rotated(weight: torch.Tensor, hessian: torch.Tensor, spec: LayerSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W R^T (float32 [N, K]) and R H R^T (float64 [K, K]) for the layer's seeded rotation; where the
    input arrives rotated (tqc.folding), W and H were both taken in the rotated basis already."""
    rotated = rotated_weight(weight, seed, spec)
    if spec.input_rotated:
        return rotated, hessian.double()
    return rotated, rotated_hessian(hessian.double(), weight_signs(seed, spec), spec.group_size)


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, float64 (GPTQ's Hinv)."""
    h = hessian.double().clone()
    diagonal = h.diagonal()
    diagonal[diagonal <= 0] = 1.0  # a column no input ever touches: any value keeps H definite
    diagonal += damp * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _fit_group(columns: torch.Tensor, stages: tuple[Stage, ...]) -> list[torch.Tensor]:
    """fp16 scales [N] per stage for one group's current columns [N, g] (turboquant's stage fits)."""
    left, scales = columns[:, None, :], []
    for stage_bits, codebook in stages:
        codes, stage_scales = fit_stage(left, stage_bits, codebook)
        scales.append(stage_scales[:, 0])
        left = left - decode_stage(codes, stage_scales, stage_bits, codebook_name=codebook)
    return scales


def _quantize_column(column: torch.Tensor, scales: list[torch.Tensor], books: list[tuple[torch.Tensor, torch.Tensor]]):
    """(dequantized column, codes per stage): base level, then the residual level of what it left."""
    value, quantized, codes = column, torch.zeros_like(column), []
    for scale, (codebook, midpoints) in zip(scales, books):
        code = torch.bucketize(value / scale, midpoints)
        level = codebook[code] * scale
        value, quantized = value - level, quantized + level
        codes.append(code)
    return quantized, codes


def gptq_quantize(weight: torch.Tensor, spec: LayerSpec, seed: int, hessian: torch.Tensor, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """TurboQuant tensors of one layer, columns quantized in order with GPTQ error feedback."""
    n, k, g = spec.out_features, spec.in_features, spec.group_size
    w, h = _rotated(weight, hessian, spec, seed)
    u = inverse_cholesky(h, damp).float()
    stages = _stages(spec)
    levels = [codebook_levels(stage_bits, codebook) for stage_bits, codebook in stages]
    books = [(book, (book[1:] + book[:-1]) / 2) for book in levels]
    codes = [torch.zeros(n, k, dtype=torch.uint8) for _ in stages]
    scales = [torch.zeros(n, spec.groups, dtype=torch.float16) for _ in stages]
    block = max(BLOCK_COLUMNS, g)  # a group never straddles two blocks (group sizes divide 128 or are 256)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, u1 = w[:, start:end], u[start:end, start:end]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            column = start + i
            if column % g == 0:
                fitted = _fit_group(w1[:, i : i + g], stages)
                for stage, scale in enumerate(fitted):
                    scales[stage][:, column // g] = scale
                group_scales = [s.float() for s in fitted]
            quantized, column_codes = _quantize_column(w1[:, i], group_scales, books)
            for stage, code in enumerate(column_codes):
                codes[stage][:, column] = code.to(torch.uint8)
            error = (w1[:, i] - quantized) / u1[i, i]
            w1[:, i:] -= error[:, None] * u1[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return _packed(spec, seed, codes, scales)


# ------------------------------------------------------------------------ one layer: scales only


def _weighted_error(left: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """d_g^T H_gg d_g per (row, group) for d [N, G, g] and the diagonal blocks H_gg [G, g, g]."""
    return torch.einsum("ngi,gij,ngj->ng", left, blocks, left)


def _weighted_stage(x: torch.Tensor, blocks: torch.Tensor, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, fp16 scales) of one stage with the least H-weighted error per (row, group)."""
    stage_bits, codebook_name = stage
    codebook = codebook_levels(stage_bits, codebook_name)

    def levels(scale: torch.Tensor) -> torch.Tensor:
        return codebook[nearest_code(x / scale[..., None], codebook).long()]

    rms = x.square().mean(-1).sqrt().clamp_min(1e-12)
    candidates = [fit_stage(x, stage_bits, codebook_name)[1].float(), *(rms * m for m in SCALE_GRID)]
    best_scale, best_err = rms, torch.full_like(rms, float("inf"))
    for scale in candidates:
        err = _weighted_error(x - levels(scale) * scale[..., None], blocks)
        best_scale, best_err = torch.where(err < best_err, scale, best_scale), torch.minimum(err, best_err)
    for _ in range(REFINE_STEPS):  # weighted least squares for the current levels, kept if it helps
        level = levels(best_scale)
        weighted = torch.einsum("gij,ngj->ngi", blocks, level)
        refined = (x * weighted).sum(-1) / (level * weighted).sum(-1).clamp_min(1e-12)
        refined = torch.where(refined > 0, refined, best_scale)
        err = _weighted_error(x - levels(refined) * refined[..., None], blocks)
        best_scale, best_err = torch.where(err < best_err, refined, best_scale), torch.minimum(err, best_err)
    scale = best_scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)
    return nearest_code(x / scale[..., None], codebook), scale.to(torch.float16)


def scales_quantize(weight: torch.Tensor, spec: LayerSpec, seed: int, hessian: torch.Tensor, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """TurboQuant tensors of one layer with scales fitted to the H-weighted error (no feedback)."""
    n, k, g = spec.out_features, spec.in_features, spec.group_size
    w, h = _rotated(weight, hessian, spec, seed)
    h = h + torch.eye(k, dtype=h.dtype) * (damp * h.diagonal().mean())
    blocks = torch.stack([h[i : i + g, i : i + g] for i in range(0, k, g)]).float()
    left, codes, scales = w.reshape(n, spec.groups, g), [], []
    for stage in _stages(spec):
        stage_codes, stage_scales = _weighted_stage(left, blocks, stage)
        left = left - decode_stage(stage_codes, stage_scales, stage[0], codebook_name=stage[1])
        codes.append(stage_codes.reshape(n, k))
        scales.append(stage_scales)
    return _packed(spec, seed, codes, scales)


LayerQuantizer = Callable[[torch.Tensor, LayerSpec, int, torch.Tensor, float], dict[str, torch.Tensor]]
METHODS: dict[str, LayerQuantizer] = {"gptq": gptq_quantize, "scales": scales_quantize}


# ------------------------------------------------------------------------ the model, block by block


def calibration_windows(model_name: str, settings: QuantizerRef) -> torch.Tensor:
    """[samples, seq_len] token ids from the training text (never the test file)."""
    path = Path(settings.data) if settings.data else DEFAULT_DATA
    data = data_ref(path, settings.samples, settings.seq_len, settings.seed)
    return sample_windows(load_tokenizer(resolve_model(model_name)), data)


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated decoder blocks (the first ModuleList whose entries hold linear layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and linear_layers(module[0]):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    return []


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _block_inputs(model: nn.Module, blocks: list[nn.Module], windows: torch.Tensor) -> tuple[list, list]:
    """First block's hidden states per batch, and every block's keyword arguments per batch.

    One pass of the source model; the masks and position embeddings do not depend on the weights,
    so they are recorded for every block (models may give blocks different masks)."""
    hidden, kwargs = [], [[] for _ in blocks]

    def record(index: int):
        def hook(module, args, keywords):
            if index == 0:
                hidden.append(args[0] if args else keywords["hidden_states"])
            kwargs[index].append({key: value for key, value in keywords.items() if key != "hidden_states"})
            if index == len(blocks) - 1:
                raise _Stop

        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in windows.split(BATCH_WINDOWS):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def _hessians(layers: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """H = mean x x^T of each layer's input over one `run` (layers sharing an input share the work)."""
    sums = {name: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for name, l in layers.items()}
    tokens = dict.fromkeys(layers, 0)
    last: list = [None, None]  # the last input seen and its x^T x (kept alive: identity is safe)

    def hook(name: str):
        def accumulate(module, args):
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                last[:] = [args[0], (x.T @ x).double()]
            sums[name] += last[1]
            tokens[name] += args[0].numel() // args[0].shape[-1]

        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(tokens[name], 1) for name in layers}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _quantize_layers(model, layers, hessians, specs, plan, bar) -> None:
    """Quantize `layers` with the plan's method and swap the results into the model."""
    settings = plan.quantizer
    for name, linear in layers.items():
        seed = rotation_seed(plan.seed, name)
        tensors = METHODS[settings.method](linear.weight, specs[name], seed, hessians[name], settings.damp)
        if specs[name].has_bias:
            tensors["bias"] = linear.bias.detach().to(torch.float16)
        module = empty_quantized_linear(specs[name], device="cpu")
        load_packed_tensors(module, tensors)
        _replace(model, name, module)
        bar.update(1)


def quantize_calibrated(model: nn.Module, plan: Plan, specs: dict[str, LayerSpec], progress: bool = True) -> set[str]:
    """Quantize the TurboQuant layers of `specs` in place, block by block, with the plan's method;
    return their names (RTN layers are left to the plain quantizer).

    Each block's layer inputs come from the blocks before it already quantized (sequential); the
    layers of one block all see that block's full-precision activations. Layers outside the blocks
    (a quantized lm_head) take their H from one forward of the quantized model."""
    windows = calibration_windows(plan.model.name, plan.quantizer)
    linears = linear_layers(model)
    todo = [name for name, spec in specs.items() if spec.option.scheme == "turboquant"]
    blocks = decoder_blocks(model)
    with torch.no_grad(), tqdm(total=len(todo), desc=f"{plan.quantizer.method}", unit="layer", disable=not progress) as bar:
        hidden, kwargs = _block_inputs(model, [block for _, block in blocks], windows)
        for index, (prefix, block) in enumerate(blocks):

            def run_block(block=block, index=index) -> list[torch.Tensor]:
                outputs = [block(h, **kw) for h, kw in zip(hidden, kwargs[index])]
                return [out[0] if isinstance(out, tuple) else out for out in outputs]

            layers = {name: linears[name] for name in todo if name.startswith(prefix + ".")}
            _quantize_layers(model, layers, _hessians(layers, run_block), specs, plan, bar)
            hidden = run_block()
        rest = {name: linears[name] for name in todo if not any(name.startswith(p + ".") for p, _ in blocks)}
        if rest:

            def run_model() -> None:
                for batch in windows.split(2):
                    model(input_ids=batch, use_cache=False)

            _quantize_layers(model, rest, _hessians(rest, run_model), specs, plan, bar)
    return set(todo)
