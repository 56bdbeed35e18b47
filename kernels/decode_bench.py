"""End-to-end decode benchmark: an 8B-shaped Llama decoder with random weights, bf16 against a plan.

A compact Llama-3-8B-shaped decoder (RMSNorm, grouped-query attention over a fixed-length KV cache,
SwiGLU MLP, a vocabulary-sized head; rotary embeddings omitted, they move no weights) built twice:
with bf16 nn.Linear layers and with TurboQuantLinear layers running the generated kernels. One
decode step (one token, batch 1) is captured in a CUDA graph and replayed; tokens/s = 1 / step.

Both models get what a serving engine does for them: projections that read the same input run as
one matmul (q/k/v, gate/up; for the plan only where the projections share an option, the
quantized layers then share one rotation seed and one rotation), and with `compile_glue` the
elementwise work between matmuls (residual add + RMSNorm, SiLU x up) runs as torch.compile'd
fused kernels. With `rotate_in_glue` the quantized layers' input rotation runs inside those steps
(kernels/glue.py), for every layer but o_proj (its input comes from attention; with `fold` it arrives rotated, and with
TQC_DIRECT_INPUTS=1 o_proj's output is zeroed by the q/k/v norm's launch, registry.DIRECT_INPUTS).
Attention of a decode step is torch's scaled_dot_product_attention after index_copy_ into the
cache, or with `attention="triton"` one launch that does both, under programmatic dependent
launch (kernels/attention.py); both models run the same attention. Where o_proj's input is rotated
in a launch of its own (the plan's, with `rotate_in_glue`), that launch combines the attention's
slices instead of the attention's last program (glue.attention_linear).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DecodeAttention
from .bench import DECODER_SHAPES
from .glue import attention_linear as fused_attention_linear
from .glue import norm_linear as fused_norm_linear
from .glue import swiglu_linear as fused_swiglu_linear

LLAMA3_8B = DECODER_SHAPES["llama3-8b"][0]
# About 3.5 bits per weight: attention and down_proj at 4 bits, gate/up at 3, the head at 4.
MIXED_PLAN = {"q_proj": "4", "k_proj": "4", "v_proj": "4", "o_proj": "4", "gate_proj": "3", "up_proj": "3",
              "down_proj": "4", "lm_head": "4"}
PLANS = {"mixed": MIXED_PLAN,  # and the same with its 3-bit layers on the grid codebook (option 3g)
         "mixed-3g": {name: "3g" if option == "3" else option for name, option in MIXED_PLAN.items()}}
GROUP_SIZE = 128
RMS_EPS = 1e-5  # Llama-3's rms_norm_eps

# linear(names, sizes, in_features) -> a module whose output concatenates the named projections'
LinearFactory = Callable[[tuple[str, ...], tuple[int, ...], int], nn.Module]


def residual_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding `delta`, and its RMS-normalised copy."""
    h = h + delta
    return h, F.rms_norm(h, h.shape[-1:], weight, RMS_EPS)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Glue:
    """The elementwise steps between matmuls, eager or torch.compile'd; with `rotate`, a quantized
    layer's input rotation runs inside the step that makes the input (kernels/glue.py)."""

    def __init__(self, compiled: bool, rotate: bool = False):
        self.residual_norm = torch.compile(residual_norm) if compiled else residual_norm
        self.swiglu = torch.compile(swiglu) if compiled else swiglu
        self.rotate = rotate

    def norm_linear(self, layer: nn.Module, h: torch.Tensor, delta: torch.Tensor,
                    weight: torch.Tensor, then: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, layer(rms_norm(h + delta) * weight)); `then`: glue.fused_linear's."""
        if self.rotate and (fused := fused_norm_linear(layer, h, delta, weight, RMS_EPS, then=then)) is not None:
            return fused
        h, x = self.residual_norm(h, delta, weight)
        return h, layer(x)

    def swiglu_linear(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """layer(silu(gate) * up)."""
        if self.rotate and (fused := fused_swiglu_linear(layer, gate_up)) is not None:
            return fused
        return layer(self.swiglu(gate_up))


def projections(cfg: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], int]]:
    """A decoder layer's matmuls: attribute -> (projection names, their output sizes, input size)."""
    h, i, d = cfg["hidden"], cfg["intermediate"], cfg["head_dim"]
    q, kv = cfg["heads"] * d, cfg["kv_heads"] * d
    return {"qkv": (("q_proj", "k_proj", "v_proj"), (q, kv, kv), h), "o_proj": (("o_proj",), (h,), q),
            "gate_up": (("gate_proj", "up_proj"), (i, i), h), "down_proj": (("down_proj",), (h,), i)}


def fused(plan: dict[str, str], names: tuple[str, ...], fuse: bool) -> bool:
    """Whether the projections `names` run as one quantized layer under `plan`."""
    return fuse and len({plan[name] for name in names}) == 1


class Block(nn.Module):
    """One decoder layer; `linear` makes its projections."""

    def __init__(self, linear: LinearFactory, cfg: dict, glue: Glue, device: str,
                 decode_attention: DecodeAttention | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.glue = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], glue
        self.decode_attention = decode_attention
        for attribute, (names, sizes, k) in projections(cfg).items():
            setattr(self, attribute, linear(names, sizes, k))
        self.norms = nn.Parameter(torch.ones(2, cfg["hidden"], device=device, dtype=torch.bfloat16))

    def forward(self, h: torch.Tensor, delta: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor):
        """(residual stream, pending delta) -> the same after this layer, for T tokens at cache
        positions `pos`; cache is (2, 1, kv, context, d)."""
        h, qkv = self.glue.norm_linear(self.qkv, h, delta, self.norms[0], then=self.o_proj)
        h, gate_up = self.glue.norm_linear(self.gate_up, h, self.attention_linear(qkv, cache, pos), self.norms[1])
        return h, self.glue.swiglu_linear(self.down_proj, gate_up)

    def attention_linear(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """o_proj(attention): a decode step on the one-launch attention, its slices combined in
        o_proj's rotation where the glue rotates (glue.attention_linear); else torch's attention."""
        if qkv.shape[0] > 1 or self.decode_attention is None:
            return self.o_proj(sdpa_attention(qkv, cache, pos, self.heads, self.kv_heads, self.head_dim))
        if self.glue.rotate and (fused := fused_attention_linear(self.o_proj, self.decode_attention, qkv, cache,
                                                                 pos)) is not None:
            return fused
        return self.o_proj(self.decode_attention(qkv, cache, pos))


def sdpa_attention(qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """The tokens' keys and values written into the cache (index_copy_), then torch's attention: one
    token attends to the whole cache (a decode step); several attend causally to positions 0..T-1
    (a prefill). qkv: [T, (heads + 2 kv_heads) head_dim] -> [T, heads head_dim]."""
    tokens, q_width = qkv.shape[0], heads * head_dim
    kv = qkv[:, q_width:].view(tokens, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    cache.index_copy_(3, pos, kv.unsqueeze(1))
    q = qkv[:, :q_width].view(tokens, heads, head_dim).transpose(0, 1).unsqueeze(0)
    if tokens == 1:
        attn = F.scaled_dot_product_attention(q, cache[0], cache[1], enable_gqa=True)
    else:
        attn = F.scaled_dot_product_attention(q, cache[0, :, :, :tokens], cache[1, :, :, :tokens], is_causal=True,
                                              enable_gqa=True)
    return attn.squeeze(0).transpose(0, 1).reshape(tokens, q_width)


class Decoder(nn.Module):
    def __init__(self, linear: LinearFactory, cfg: dict, layers: int, context: int, device: str = "cuda",
                 compile_glue: bool = False, rotate_in_glue: bool = False, attention: str = "sdpa"):
        super().__init__()
        self.glue = Glue(compile_glue, rotate_in_glue)
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"], device=device, dtype=torch.bfloat16)
        decode_attention = None  # one workspace for every layer: they run one after another
        if attention == "triton":
            decode_attention = DecodeAttention(cfg["heads"], cfg["kv_heads"], cfg["head_dim"], context, device)
        self.blocks = nn.ModuleList(Block(linear, cfg, self.glue, device, decode_attention) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(cfg["hidden"], device=device, dtype=torch.bfloat16))
        self.lm_head = linear(("lm_head",), (cfg["vocab"],), cfg["hidden"])
        shape = (layers, 2, 1, cfg["kv_heads"], context, cfg["head_dim"])
        self.cache = torch.randn(shape, device=device, dtype=torch.bfloat16)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(token)
        delta = torch.zeros_like(h)
        for block, cache in zip(self.blocks, self.cache):
            h, delta = block(h, delta, cache, pos)
        return self.glue.norm_linear(self.lm_head, h[-1:], delta[-1:], self.norm)[1]  # the next token's logits


class Concatenated(nn.Module):
    """Separate projections of one input, their outputs concatenated (the unfused fallback)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def bf16_factory(device: str = "cuda") -> LinearFactory:
    """bf16 projections, always fused into one nn.Linear (what a serving engine runs)."""
    def linear(names: tuple[str, ...], sizes: tuple[int, ...], k: int) -> nn.Module:
        layer = nn.Linear(k, sum(sizes), bias=False, device=device, dtype=torch.bfloat16)
        nn.init.normal_(layer.weight, std=0.02)
        return layer

    return linear


def quantized_factory(plan: dict[str, str], registry=None, device: str = "cuda", fuse: bool = True,
                      fold: bool = False) -> LinearFactory:
    """Random TurboQuant projections under `plan`; those sharing an option (and `fuse`) become one layer.

    With a registry the layers are repacked for, and run, its kernels; without one (CPU) they run
    the reference path. `fold`: o_proj on fp16 activations takes its input rotated, as `tqc build
    --fold` makes it (tqc.folding; the weights are random, so v_proj needs no change).
    """
    from tqc.linear import concatenate  # noqa: PLC0415

    from .bench import bench_spec  # noqa: PLC0415
    from .registry import prepare  # noqa: PLC0415
    from .synthetic import random_turboquant_linear  # noqa: PLC0415

    def one_layer(layers: list) -> nn.Module:
        layer = layers[0] if len(layers) == 1 else concatenate(layers)
        if registry is not None:
            kernel = registry.kernel_for(layer.spec)
            prepare(layer, kernel.layout)
            layer.use_kernel(kernel)
        return layer

    def linear(names: tuple[str, ...], sizes: tuple[int, ...], k: int) -> nn.Module:
        specs = [bench_spec(plan[name], GROUP_SIZE, k, n) for name, n in zip(names, sizes)]
        if fold and names == ("o_proj",) and specs[0].activations == "fp16":
            specs = [dataclasses.replace(specs[0], input_rotated=True)]
        layers = [random_turboquant_linear(spec, device, seed=k + i) for i, spec in enumerate(specs)]
        if fused(plan, names, True):  # siblings that could fuse share a rotation seed, as tqc build gives them
            for layer in layers:
                layer.seed.copy_(layers[0].seed)
                layer.refresh_signs()
        if fused(plan, names, fuse):
            return one_layer(layers)
        return Concatenated([one_layer([layer]) for layer in layers])

    return linear


def step_seconds(model: Decoder, tokens: int = 1) -> float:
    """Median seconds of one graph-captured forward of `tokens` tokens (1: a decode step)."""
    from triton.testing import do_bench_cudagraph  # noqa: PLC0415

    token = torch.arange(1, tokens + 1, device="cuda")
    pos = torch.arange(tokens, device="cuda") + (7 if tokens == 1 else 0)
    with torch.no_grad():
        model(token, pos)  # tune every kernel outside the graph
        model(token, pos)  # compile what runs once the layers are tuned (rotation in the glue)
        torch.cuda.synchronize()
        return do_bench_cudagraph(lambda: model(token, pos), rep=500, return_mode="median") / 1e3


def linear_weight_bytes(model: Decoder) -> int:
    from tqc.linear import QuantizedLinear  # noqa: PLC0415

    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            total += sum(t.numel() * t.element_size() for t in module.buffers() if t.dtype != torch.float32)
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def decoder_keys(plan: dict[str, str], fuse: bool, shape: dict = LLAMA3_8B, registry=None) -> list:
    """The lookup-kernel keys of the decoder's layers under a plan (what precompile builds): all of
    them, or those of the layers `registry` gives to the lookup families."""
    from .bench import bench_spec  # noqa: PLC0415
    from .registry import KERNEL_LAYOUT, KernelKey  # noqa: PLC0415

    groups = [*projections(shape).values(), (("lm_head",), (shape["vocab"],), shape["hidden"])]
    specs = []
    for names, sizes, k in groups:
        if fused(plan, names, fuse):
            specs.append(bench_spec(plan[names[0]], GROUP_SIZE, k, sum(sizes)))
        else:
            specs += [bench_spec(plan[name], GROUP_SIZE, k, n) for name, n in zip(names, sizes)]
    keys = [KernelKey.of(spec) if registry is None else registry.kernel_for(spec).key for spec in specs]
    return [key for key in keys if key.codes == KERNEL_LAYOUT]


def int8_name(option: str, activations: str) -> str:
    """A plan option's benchmark name (bench.bench_spec): '@int8' appended where it runs on int8."""
    from tqc.activations import takes_int8  # noqa: PLC0415
    from tqc.options import QuantOption  # noqa: PLC0415

    return f"{option}@int8" if takes_int8(QuantOption.parse(option), activations) else option


def plan_options(plan: str, activations: str = "fp16", int8_layers: Iterable[str] | None = None) -> dict[str, str]:
    """The benchmark names of the projections' options: `plan` is one of PLANS ('mixed', 'mixed-3g') or one
    option for all; with int8 activations, `int8_layers` (default: all) take them where the option allows."""
    options = PLANS[plan] if plan in PLANS else dict.fromkeys(MIXED_PLAN, plan)
    int8_layers = set(MIXED_PLAN if int8_layers is None else int8_layers)
    if unknown := int8_layers - MIXED_PLAN.keys():
        raise ValueError(f"--int8-layers: no projection {', '.join(sorted(unknown))} (one of {', '.join(MIXED_PLAN)})")
    return {name: int8_name(option, activations if name in int8_layers else "fp16") for name, option in options.items()}


def run_decode_bench(plan: str, context: int, layers: int, cache_dir=None, verbose: bool = False,
                     activations: str = "fp16", fuse: bool = True, compile_glue: bool = True, rotate_in_glue: bool = True,
                     tokens: int = 1, int8_layers: tuple[str, ...] | None = None, shape: dict = LLAMA3_8B,
                     fragments: str | None = None, fold: bool = False, attention: str = "triton") -> dict:
    """tokens/s of bf16 and of the plan, measured one after the other in this process: of decode
    steps (tokens = 1) or of a prefill of `tokens` tokens, in a decoder of `shape` (DECODER_SHAPES).
    With int8 activations, `int8_layers` names the projections that take them (default: every one
    the option allows). `fragments`: "checked", "all", "lookups" or None (bench_registry; the
    result records the family that ran). `fold`: o_proj's rotation folded away (quantized_factory).
    `attention`: a decode step's, "sdpa" or "triton" (Decoder), the same for both models."""
    from .bench import bench_registry, compile_and_report  # noqa: PLC0415

    torch.manual_seed(0)
    options = plan_options(plan, activations, int8_layers)
    context = max(context, tokens)
    results = {"plan": options, "context": context, "layers": layers, "tokens": tokens, "shape": shape,
               "fuse": fuse, "compile_glue": compile_glue, "rotate_in_glue": rotate_in_glue, "fold": fold,
               "attention": attention}
    registry, results["fragments"] = bench_registry("tqc bench decode", cache_dir, verbose, fragments)
    compile_and_report(decoder_keys(options, fuse, shape, registry), [tokens])
    for label, linear in (("bf16", bf16_factory()), ("tqc", quantized_factory(options, registry, fuse=fuse, fold=fold))):
        model = Decoder(linear, shape, layers, context, compile_glue=compile_glue, rotate_in_glue=rotate_in_glue,
                        attention=attention)
        seconds = step_seconds(model, tokens)
        results[label] = {"step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
                          "linear_bytes": linear_weight_bytes(model)}
        if label == "tqc":  # what the tuner chose, so that runs can be compared key by key
            results[label]["configs"] = {key.name: kernel.tuned(tokens).model_dump()
                                         for key, kernel in registry.kernels.items() if kernel.tuned(tokens)}
        print(f"{label:>5}: {tokens / seconds:8.1f} tokens/s ({seconds * 1e3:.2f} ms per {tokens} token(s)), "
              f"linear weights {results[label]['linear_bytes'] / 1e9:.2f} GB", flush=True)
        del model
        torch.cuda.empty_cache()
    results["speedup"] = results["tqc"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    print(f"speedup x{results['speedup']:.2f}")
    return results
