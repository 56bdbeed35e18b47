"""End-to-end decode benchmark: an 8B-shaped Llama decoder with random weights, bf16 against a plan.

A compact Llama-3-8B-shaped decoder (RMSNorm, grouped-query attention over a fixed-length KV cache,
SwiGLU MLP, a vocabulary-sized head; rotary embeddings omitted, they move no weights) built twice:
with bf16 nn.Linear layers and with TurboQuantLinear layers running the generated kernels. One
decode step (one token, batch 1) is captured in a CUDA graph and replayed; tokens/s = 1 / step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "vocab": 128256}
# About 3.5 bits per weight: attention and down_proj at 4 bits, gate/up at 3, the head at 4.
MIXED_PLAN = {"q_proj": "4", "k_proj": "4", "v_proj": "4", "o_proj": "4", "gate_proj": "3", "up_proj": "3",
              "down_proj": "4", "lm_head": "4"}
GROUP_SIZE = 128


class Block(nn.Module):
    """One decoder layer; `linear(name, out, in)` makes its projections."""

    def __init__(self, linear, cfg: dict):
        super().__init__()
        h, i, d = cfg["hidden"], cfg["intermediate"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = cfg["heads"], cfg["kv_heads"], d
        self.q_proj, self.o_proj = linear("q_proj", self.heads * d, h), linear("o_proj", h, self.heads * d)
        self.k_proj, self.v_proj = linear("k_proj", self.kv_heads * d, h), linear("v_proj", self.kv_heads * d, h)
        self.gate_proj, self.up_proj, self.down_proj = linear("gate_proj", i, h), linear("up_proj", i, h), linear("down_proj", h, i)
        self.norms = nn.Parameter(torch.ones(2, h, device="cuda", dtype=torch.bfloat16))

    def forward(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(h, h.shape[-1:], self.norms[0])
        q = self.q_proj(x).view(1, self.heads, 1, self.head_dim)
        k_cache.index_copy_(2, pos, self.k_proj(x).view(1, self.kv_heads, 1, self.head_dim))
        v_cache.index_copy_(2, pos, self.v_proj(x).view(1, self.kv_heads, 1, self.head_dim))
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        h = h + self.o_proj(attn.reshape(1, -1))
        x = F.rms_norm(h, h.shape[-1:], self.norms[1])
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Decoder(nn.Module):
    def __init__(self, linear, cfg: dict, layers: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"], device="cuda", dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(linear, cfg) for _ in range(layers))
        self.lm_head = linear("lm_head", cfg["vocab"], cfg["hidden"])
        shape = (layers, 2, 1, cfg["kv_heads"], context, cfg["head_dim"])
        self.cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(token)
        for block, cache in zip(self.blocks, self.cache):
            h = block(h, cache[0], cache[1], pos)
        return self.lm_head(h)


def bf16_linear(name: str, n: int, k: int) -> nn.Module:
    layer = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def quantized_linear_factory(plan: dict[str, str], registry):
    from tqc.layout import LayerSpec  # noqa: PLC0415
    from tqc.options import QuantOption  # noqa: PLC0415

    from .registry import prepare  # noqa: PLC0415
    from .synthetic import random_turboquant_linear  # noqa: PLC0415

    def linear(name: str, n: int, k: int) -> nn.Module:
        spec = LayerSpec(QuantOption.parse(plan[name]), GROUP_SIZE, k, n)
        module = random_turboquant_linear(spec, "cuda", seed=n + k)
        prepare(module)
        module.kernel = registry.kernel_for(spec)
        return module

    return linear


def step_seconds(model: Decoder) -> float:
    """Median seconds of one graph-captured decode step."""
    from triton.testing import do_bench_cudagraph  # noqa: PLC0415

    token = torch.tensor([1], device="cuda")
    pos = torch.tensor([7], device="cuda")
    with torch.no_grad():
        model(token, pos)  # tune every kernel outside the graph
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


def decoder_keys(options: dict[str, str]) -> list:
    """The kernel keys of the decoder's layers under a plan."""
    from .bench import layer_key  # noqa: PLC0415

    cfg = LLAMA3_8B
    h, i, d = cfg["hidden"], cfg["intermediate"], cfg["head_dim"]
    shapes = {"q_proj": (cfg["heads"] * d, h), "k_proj": (cfg["kv_heads"] * d, h), "v_proj": (cfg["kv_heads"] * d, h),
              "o_proj": (h, cfg["heads"] * d), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
              "lm_head": (cfg["vocab"], h)}
    return [layer_key(options[name], n, k, GROUP_SIZE) for name, (n, k) in shapes.items()]


def run_decode_bench(plan: str, context: int, layers: int, cache_dir=None, verbose: bool = False) -> dict:
    """tokens/s of bf16 and of the plan, measured one after the other in this process."""
    from .bench import compile_and_report  # noqa: PLC0415
    from .registry import KernelRegistry  # noqa: PLC0415
    from .tuning import Tuner  # noqa: PLC0415

    torch.manual_seed(0)
    options = MIXED_PLAN if plan == "mixed" else dict.fromkeys(MIXED_PLAN, plan)
    results = {"plan": options, "context": context, "layers": layers, "shape": LLAMA3_8B}
    registry = KernelRegistry(Tuner.for_device(cache_dir=cache_dir, verbose=verbose))
    compile_and_report(decoder_keys(options), [1])
    for label, linear in (("bf16", bf16_linear), ("tqc", quantized_linear_factory(options, registry))):
        model = Decoder(linear, LLAMA3_8B, layers, context)
        seconds = step_seconds(model)
        results[label] = {"step_ms": seconds * 1e3, "tokens_per_s": 1 / seconds, "linear_bytes": linear_weight_bytes(model)}
        print(f"{label:>5}: {1 / seconds:8.1f} tokens/s ({seconds * 1e3:.2f} ms/token), "
              f"linear weights {results[label]['linear_bytes'] / 1e9:.2f} GB", flush=True)
        del model
        torch.cuda.empty_cache()
    results["speedup"] = results["tqc"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    print(f"speedup x{results['speedup']:.2f}")
    return results
