"""tqc: compile a causal language model into a mixed-precision TurboQuant model that fits a budget."""

__version__ = "0.1.0"


def load(directory, device="cpu", verify: bool = True, fuse: bool = True, fragments: bool | None = None):
    """Load a packed model directory written by `tqc build`, ready for `generate`.

    `fuse`: q/k/v and gate/up projections that share an option run as one matmul (tqc.fusion).
    On a GPU, decode with `tqc.StaticDecoder(model, max_length).generate(...)`: one CUDA graph replay
    a token (an 8B-shaped Llama on an H100: 2.25 ms a token against bf16's 7.03, docs/performance-history.md
    run 175), or with `model.generate(..., cache_implementation="static")`, which transformers
    compiles and replays from CUDA graphs around its own loop (3.9 ms; 22.2 with the default dynamic
    cache). One token attends in one launch (tqc.kernels.hf_attention, the attention "tqc_decode";
    `TQC_HF_ATTENTION=0` keeps "sdpa"), which in Llama's, Mistral's, Qwen's and Gemma 3's attention
    through a static cache also applies the rotary embedding and writes the cache.
    `fragments`: the layers run the Gluon fragment family where the GPU can (Hopper; None, the
    default), always (True: a warning where it cannot) or never (False: the lookup kernels);
    tqc.kernels.attach.
    """
    from .packed import load_packed  # noqa: PLC0415  (keeps `import tqc` light)

    return load_packed(directory, device=device, verify=verify, fuse=fuse, fragments=fragments)


def __getattr__(name: str):
    """`tqc.StaticDecoder` (tqc.generation), imported on first use."""
    if name == "StaticDecoder":
        from .generation import StaticDecoder  # noqa: PLC0415

        return StaticDecoder
    raise AttributeError(f"module 'tqc' has no attribute {name!r}")


__all__ = ["StaticDecoder", "__version__", "load"]
