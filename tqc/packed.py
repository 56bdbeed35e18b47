"""The packed model directory: build it from a plan, load it back without full-precision weights.

A packed directory holds
    model.safetensors   quantized layers' codes/scales/seeds, everything else in fp16
    config.json, tokenizer files
    plan.yaml           the resolved plan it was built from
    manifest.json       format version, tqc version, source model, layer specs, sha256 of every file
It is written under a temporary name beside the target and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import __version__
from .activations import Activations, takes_int8
from .folding import fold_value_rotations
from .fusion import fuse_siblings
from .layout import LayerSpec, rotation_seed
from .linear import QuantizedLinear, TurboQuantLinear, empty_quantized_linear, quantize_linear
from .models import LinearShape, SourceModel, empty_model, linear_layers, linear_shapes, load_config, load_model, load_tokenizer, resolve_model
from .options import QuantOption
from .plan import ModelRef, Plan, PlanError, current_umask, plan_to_text

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.yaml"
STORAGE_DTYPE = torch.float16


class PackedModelError(ValueError):
    """A packed directory that is missing, truncated, tampered with or inconsistent (one line)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    bytes: int
    sha256: str


class LayerEntry(_Strict):
    option: str
    group_size: int
    in_features: int
    out_features: int
    has_bias: bool
    activations: Activations = "fp16"
    input_rotated: bool = False  # o_proj's rotation folded into v_proj (tqc.folding)

    @model_validator(mode="after")
    def _activations_fit_the_option(self) -> LayerEntry:
        if self.activations == "int8" and not takes_int8(QuantOption.parse(self.option), "int8"):
            raise ValueError(f"option {self.option} cannot run on int8 activations")
        self.spec()  # a spec that cannot be (input_rotated on a layer that cannot take it)
        return self

    def spec(self) -> LayerSpec:
        return LayerSpec(QuantOption.parse(self.option), self.group_size, self.in_features, self.out_features,
                         self.has_bias, self.activations, self.input_rotated)

    @classmethod
    def of(cls, spec: LayerSpec) -> LayerEntry:
        return cls(
            option=spec.option.name,
            group_size=spec.group_size,
            in_features=spec.in_features,
            out_features=spec.out_features,
            has_bias=spec.has_bias,
            activations=spec.activations,
            input_rotated=spec.input_rotated,
        )


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    tqc_version: str = __version__
    source: ModelRef
    storage_dtype: Literal["float16"] = "float16"
    layers: dict[str, LayerEntry]
    files: dict[str, FileEntry]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- build


def check_plan_against_model(plan: Plan, layers: dict[str, LinearShape]) -> None:
    """Every plan layer exists in the model and every model layer is in the plan."""
    for name, entry in plan.layers.items():
        if name not in layers:
            raise PlanError(f"plan names layer '{name}', which the model does not have")
        in_features = layers[name].in_features
        if entry.quant_option.is_quantized and (in_features % entry.group_size or in_features % 32):
            raise PlanError(
                f"layer '{name}', field 'group_size': {entry.group_size} does not divide in_features={in_features}"
            )
    missing = [name for name in layers if name not in plan.layers]
    if missing:
        raise PlanError(f"plan has no entry for layer '{missing[0]}' (write option: fp16 to keep it unquantized)")


def quantize_model(model: nn.Module, plan: Plan, progress: bool = True,
                   device: torch.device | str | None = None, fold: bool = False) -> dict[str, LayerSpec]:
    """Replace the plan's quantized layers in place; round the rest to the fp16 storage precision.

    Afterwards the in-memory model computes exactly what the packed model will load. `device`:
    where the codes of plain (uncalibrated) layers are fitted, one layer at a time (default: where
    the weights lie). A GPU rounds differently from the CPU: a few codes at ties may differ.
    `fold`: o_proj's input rotation goes into v_proj's weights where it can (tqc.folding; opt-in: it
    costs GPTQ builds quality, docs/format.md).
    """
    layers = linear_layers(model)
    check_plan_against_model(plan, linear_shapes(model))
    specs = {
        name: LayerSpec(entry.quant_option, entry.group_size, layers[name].in_features, layers[name].out_features,
                        layers[name].bias is not None, plan.layer_activations(entry.quant_option))
        for name, entry in plan.layers.items()
        if entry.quant_option.is_quantized
    }
    if fold:
        specs = fold_value_rotations(model, specs, plan.seed)
    calibrated = set()
    if plan.quantizer is not None and plan.quantizer.method != "plain":  # tuned to calibration data (docs/gptq.md)
        from .calibration.gptq import quantize_calibrated  # noqa: PLC0415

        calibrated = quantize_calibrated(model, plan, specs, progress)
    todo = [name for name in specs if name not in calibrated]
    for name in tqdm(todo, desc="quantize", unit="layer", disable=not progress or not todo):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(layers[name], specs[name], rotation_seed(plan.seed, name), device))
    untie_quantized_head(model, specs)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(STORAGE_DTYPE).to(param.dtype))
    return specs


def untie_quantized_head(model: nn.Module, specs: dict[str, LayerSpec]) -> None:
    """A quantized lm_head no longer shares the embedding: record that in the config."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantizedLinear):
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


def _storage_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: quantized buffers as they are, float parameters in fp16, no tied copies."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue  # a tied weight (lm_head sharing the embedding) is stored once
        seen.add(key)
        is_quantized_buffer = isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear)
        if tensor.is_floating_point() and not is_quantized_buffer:
            tensor = tensor.to(STORAGE_DTYPE)
        state[name] = tensor.contiguous()
    return state


def build(plan: Plan, output: str | Path, progress: bool = True, model: nn.Module | None = None,
          device: torch.device | str | None = None, fold: bool = False) -> nn.Module:
    """Quantize the plan's model and write the packed directory; return the in-memory quantized model.
    `device`: where the codes are fitted, `fold`: o_proj's rotation into v_proj (quantize_model)."""
    output = Path(output)
    _check_replaceable(output)
    source = resolve_model(plan.model.name)
    if plan.model.sha256 and plan.model.sha256 != source.sha256():
        raise PlanError(f"plan was made for different weights of '{plan.model.name}' (sha256 differs)")
    check_plan_against_model(plan, linear_shapes(empty_model(load_config(source))))
    model = model if model is not None else load_for_build(source, plan)
    specs = quantize_model(model, plan, progress, device, fold)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        # One metadata entry: safetensors writes several in a random order (0.8.0), and the
        # same plan must give the same bytes. The format version is in the manifest.
        save_file(_storage_state(model), staging / WEIGHTS_FILE, metadata={"format": "tqc"})
        config = model.config
        config.save_pretrained(staging)
        load_tokenizer(source).save_pretrained(staging)
        (staging / PLAN_FILE).write_text(plan_to_text(plan))
        files = {
            path.name: FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
            for path in sorted(staging.iterdir())
        }
        manifest = Manifest(
            source=ModelRef(name=plan.model.name, sha256=plan.model.sha256),
            layers={name: LayerEntry.of(spec) for name, spec in specs.items()},
            files=files,
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model


def load_for_build(source: SourceModel, plan: Plan) -> nn.Module:
    """The source model to quantize. A Hugging Face checkpoint in bf16 or fp16 with plain codes
    loads in that dtype, everything but the layers to quantize then widened to float32: the same
    values as a float32 load (the quantizer widens each weight itself), in about half the memory,
    so the same packed bytes (tests/test_packed.py). GGUF and calibrated (GPTQ) builds load in
    float32: a GGUF's dequantized values need it, calibration runs the model forward."""
    calibrated = plan.quantizer is not None and plan.quantizer.method != "plain"
    dtype = None if source.gguf_file or calibrated else _checkpoint_dtype(source)
    if dtype not in (torch.bfloat16, torch.float16):
        return load_model(source)
    model = load_model(source, dtype=dtype)
    quantized = {f"{name}.weight" for name, entry in plan.layers.items() if entry.quant_option.is_quantized}
    for name, param in model.named_parameters():
        if name not in quantized:
            param.data = param.data.float()
    return model


def _checkpoint_dtype(source: SourceModel) -> torch.dtype | None:
    dtype = load_config(source).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_replaceable(output: Path) -> None:
    """Refuse, before any work, to replace what is not an earlier build (or an empty directory)."""
    if output.is_dir() and ((output / MANIFEST_FILE).is_file() or not any(output.iterdir())):
        return
    if output.exists():
        raise PackedModelError(f"{output}: exists and is not a packed model directory; not replacing it")


def _replace_dir(staging: Path, output: Path) -> None:
    """Move a finished directory into place; an old one at `output` is removed only afterwards."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


# ------------------------------------------------------------------------------------------ load


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise PackedModelError(f"{directory}: no such packed model directory")
    if not path.is_file():
        raise PackedModelError(f"{directory}: not a tqc packed model ({MANIFEST_FILE} is missing)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValidationError as err:
        first = err.errors()[0]
        raise PackedModelError(f"{path}: corrupt manifest: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is present with its size and sha256."""
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise PackedModelError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise PackedModelError(f"{path}: {size} bytes, the manifest says {entry.bytes} (truncated or modified)")
        if sha256_file(path) != entry.sha256:
            raise PackedModelError(f"{path}: sha256 does not match the manifest (corrupt or tampered)")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise PackedModelError(f"{path}: cannot read safetensors ({str(err).splitlines()[0]})") from None


def load_packed(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True,
    fuse: bool = True, fragments: bool | None = None,
) -> nn.Module:
    """Build the model on the meta device, swap in quantized layers, load the packed tensors in place.

    `fuse`: siblings that read one input (q/k/v, gate/up) run as one matmul (tqc.fusion).
    `fragments`: on CUDA, whether layers run the Gluon fragment family (None: where the GPU can;
    tqc.kernels.attach).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    model = empty_model(load_config(_config_source(directory)))
    linears = linear_layers(model)
    for name, entry in manifest.layers.items():
        if name not in linears:
            raise PackedModelError(f"{directory}: manifest names layer '{name}', which the model does not have")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, empty_quantized_linear(entry.spec(), device="meta"))
    state = _load_state(directory / WEIGHTS_FILE)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - _tied_names(model))
    if missing:
        raise PackedModelError(f"{directory / WEIGHTS_FILE}: tensor '{missing[0]}' is missing")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise PackedModelError(f"{directory / WEIGHTS_FILE}: unexpected tensor '{unexpected[0]}'")
    for name, tensor in state.items():
        want = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        if tuple(tensor.shape) != tuple(want.shape):
            raise PackedModelError(f"{directory / WEIGHTS_FILE}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, TurboQuantLinear):
            module.refresh_signs()
    if fuse:
        fuse_siblings(model)
    model.to(device)
    _attach_kernels(model, fragments)
    return model.eval()


def _config_source(directory: Path):
    from .models import SourceModel  # noqa: PLC0415

    return SourceModel(str(directory), directory)


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that are tied to another tensor (the lm_head sharing the embedding)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    names = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    return names


def _attach_kernels(model: nn.Module, fragments: bool | None = None) -> None:
    """On CUDA, give each quantized layer its generated Triton kernel (tqc.kernels), if available;
    where they cannot be imported (no Triton), say so: the layers then run the reference path."""
    try:
        from .kernels import attach  # noqa: PLC0415
    except ImportError as err:
        if any(t.is_cuda for t in model.buffers()):
            warnings.warn(f"tqc: generated kernels unavailable ({err}); quantized layers run the slower reference path",
                          stacklevel=3)
        return
    attach(model, fragments=fragments)
