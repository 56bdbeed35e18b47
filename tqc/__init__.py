"""tqc: compile a causal language model into a mixed-precision TurboQuant model that fits a budget."""

__version__ = "0.1.0"


def load(directory, device="cpu", verify: bool = True, fuse: bool = True, static_cache: bool = True):
    """Load a packed model directory written by `tqc build`, ready for `generate`.

    `fuse`: q/k/v and gate/up projections that share an option run as one matmul (tqc.fusion).
    `static_cache`: on a GPU, `generate` decodes through a static KV cache, which transformers
    compiles and replays from CUDA graphs (tqc.packed.use_static_cache); False keeps its default.
    """
    from .packed import load_packed  # noqa: PLC0415  (keeps `import tqc` light)

    return load_packed(directory, device=device, verify=verify, fuse=fuse, static_cache=static_cache)


__all__ = ["__version__", "load"]
