"""Siblings that read one input (q/k/v, gate/up) share a rotation seed and load as one matmul."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IDS, logits, make_tiny_model, plan_for

from tqc.fusion import FusedSiblings, SiblingSlice, fuse_siblings
from tqc.layout import LayerSpec, rotation_seed
from tqc.linear import QuantizedLinear, concatenate, quantize_linear
from tqc.options import QuantOption
from tqc.packed import build, load_packed


def test_siblings_share_a_rotation_seed_and_nothing_else_does():
    def of(name: str, plan_seed: int = 0) -> int:
        return rotation_seed(plan_seed, f"model.layers.{name}")

    assert of("0.self_attn.q_proj") == of("0.self_attn.k_proj") == of("0.self_attn.v_proj")
    assert of("0.mlp.gate_proj") == of("0.mlp.up_proj")
    others = [of("0.self_attn.q_proj"), of("0.self_attn.o_proj"), of("0.mlp.gate_proj"), of("0.mlp.down_proj"),
              of("1.self_attn.q_proj"), rotation_seed(0, "lm_head"), of("0.self_attn.q_proj", plan_seed=1)]
    assert len(set(others)) == len(others)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """A tiny Llama built uniform 3+2, and a copy with k_proj at 4 bits."""
    root = tmp_path_factory.mktemp("fusion")
    source = make_tiny_model(root / "src", "llama", tokenizer_dir)
    build(plan_for(str(source), "3+2"), root / "uniform", progress=False)
    mixed = plan_for(str(source), "3+2", overrides={"*.k_proj": QuantOption.parse("4")})
    build(mixed, root / "mixed", progress=False)
    return root


@pytest.fixture(scope="module")
def packed_gemma(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """A tiny Gemma 3 built uniform 3+2."""
    return build_uniform(tmp_path_factory, tokenizer_dir, "gemma3_text")


@pytest.fixture(scope="module")
def packed_qwen3(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """A tiny Qwen3 (q/k norms on the projections' outputs) built uniform 3+2."""
    return build_uniform(tmp_path_factory, tokenizer_dir, "qwen3")


def build_uniform(tmp_path_factory, tokenizer_dir, family: str):
    root = tmp_path_factory.mktemp(f"fusion_{family}")
    source = make_tiny_model(root / "src", family, tokenizer_dir)
    build(plan_for(str(source), "3+2"), root / "uniform", progress=False)
    return root


def quantized_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


def test_loaded_siblings_run_as_one_matmul(packed):
    fused, separate = load_packed(packed / "uniform"), load_packed(packed / "uniform", fuse=False)
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attention.q_proj, SiblingSlice) and isinstance(mlp.up_proj, SiblingSlice)
    assert attention.qkv_fused.layer.out_features == sum(p.out_features for p in (attention.q_proj, attention.k_proj,
                                                                                 attention.v_proj))
    assert len(quantized_layers(fused)) == len(quantized_layers(separate)) - 3 * len(fused.model.layers)
    torch.testing.assert_close(logits(fused, IDS), logits(separate, IDS), rtol=1e-5, atol=1e-5)
    state = fused.state_dict()
    assert not any(".q_proj." in key or ".up_proj." in key for key in state)  # the slices hold no tensors
    seeds_saved = 3 * len(fused.model.layers)  # one seed for q/k/v, one for gate/up, per layer
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in separate.state_dict().values()) - seeds_saved


def test_siblings_with_another_option_or_seed_stay_separate(packed):
    model = load_packed(packed / "mixed")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.k_proj, QuantizedLinear)  # 4 bits among 3+2
    assert attention.qkv_fused.names == ["q_proj", "v_proj"]
    torch.testing.assert_close(logits(model, IDS), logits(load_packed(packed / "mixed", fuse=False), IDS),
                               rtol=1e-5, atol=1e-5)

    old = load_packed(packed / "uniform", fuse=False)  # as a build that drew one seed per layer
    mlp = old.model.layers[0].mlp
    mlp.up_proj.seed += 1
    mlp.up_proj.refresh_signs()
    expected = logits(old, IDS)
    fuse_siblings(old)
    assert isinstance(mlp.up_proj, QuantizedLinear) and not hasattr(mlp, "gate_up_fused")
    assert torch.equal(logits(old, IDS), expected)


def test_a_sibling_never_reads_a_stale_output():
    torch.manual_seed(0)
    spec = LayerSpec(QuantOption.parse("3"), 64, 128, 96)
    layers = [quantize_linear(torch.nn.Linear(128, 96), spec, seed=7) for _ in range(2)]
    fused = FusedSiblings(concatenate(layers), ["a", "b"])
    a, b = SiblingSlice(fused, "a", 0, 96), SiblingSlice(fused, "b", 96, 192)
    calls = []
    fused.layer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(b(x), layers[1](x))  # any order
        torch.testing.assert_close(a(x), layers[0](x))
        assert len(calls) == 1  # one matmul for both
        torch.testing.assert_close(b(x), layers[1](x))  # after both read it, the output is let go
        x.mul_(-2)  # changed in place after b read it
        torch.testing.assert_close(a(x), layers[0](x))
        torch.testing.assert_close(b(x.clone()), layers[1](x))  # another tensor, equal values
        assert len(calls) == 4


class StandInKernel:
    """Plays a layer's generated kernel with the reference path, so that a model "on kernels" runs
    without a GPU; never tuned, so the fused glue (kernels/glue.py) always falls back."""

    def __init__(self):
        self.calls = []

    def __call__(self, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        self.calls.append(layer.out_features)
        return torch.nn.functional.linear(layer.prepare_input(x), layer.dequantized_weight(x.dtype))

    def tuned(self, tokens: int) -> None:
        return None


def on_stand_in_kernels(model) -> StandInKernel:
    kernel = StandInKernel()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernel(kernel)
    return kernel


def test_a_model_on_kernels_compiles_whole_and_runs_each_fused_kernel_once(packed):
    """torch.compile sees each generated kernel as one op (tqc::kernel_linear) and the fused layer's
    cache as it runs eagerly: no graph break, one kernel call per fused set, the eager logits."""
    model = load_packed(packed / "uniform")
    expected = logits(model, IDS)
    kernel = on_stand_in_kernels(model)
    compiled = torch.compile(model, fullgraph=True)  # any graph break raises
    logits(compiled, IDS)
    kernel.calls.clear()
    torch.testing.assert_close(logits(compiled, IDS), expected, rtol=1e-4, atol=1e-4)
    assert len(kernel.calls) == len(quantized_layers(model))  # q/k/v once, gate/up once, per layer


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_norms_and_mlps_replaced_for_the_fused_rotation_compute_what_hugging_face_does(family, request, monkeypatch):
    """kernels/hf_glue.py replaces a loaded model's norms and MLPs where the fused layers run
    kernels, and the decoder layer's forward (the residual add in the norm's step). Where the
    fused path does not apply (here: never tuned) they compute Hugging Face's formulas bit for bit
    and the state dict keeps its names. torch.compile keeps each fused step one custom op, without
    a graph break, still one kernel call per fused set; with COMPILED off it traces the formulas."""
    from tqc.kernels import hf_glue

    packed = request.getfixturevalue({"gemma3": "packed_gemma", "qwen3": "packed_qwen3"}.get(family, "packed"))
    model = load_packed(packed / "uniform")
    expected, keys = logits(model, IDS), list(model.state_dict())
    weight = model.model.layers[0].input_layernorm.weight
    kernel = on_stand_in_kernels(model)
    assert hf_glue.install(model) == 4 * len(model.model.layers)  # two norms, the MLP and the forward
    layer = model.model.layers[0]
    assert layer.forward.__func__ is hf_glue.RESIDUAL_FORWARDS[type(layer).__name__]
    assert isinstance(layer.input_layernorm, hf_glue.RotatingRMSNorm) and isinstance(layer.mlp, hf_glue.SwiGLU)
    before_mlp = layer.pre_feedforward_layernorm if family == "gemma3" else layer.post_attention_layernorm
    assert isinstance(before_mlp, hf_glue.RotatingRMSNorm) and before_mlp._consumer[0] is layer.mlp.gate_up_fused
    if family == "gemma3":  # its post-attention norm feeds the residual add, not a quantized layer
        assert not isinstance(layer.post_attention_layernorm, hf_glue.RotatingRMSNorm)
    assert layer.input_layernorm.weight is weight  # the same parameter, not a copy
    assert not isinstance(model.model.norm, hf_glue.RotatingRMSNorm)  # the head reads a slice of its output
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model, IDS), expected)
    steps = []  # the fused steps run (each falls back to the formulas inside)
    for cls, method in ((hf_glue.RotatingRMSNorm, "norm_linear"), (hf_glue.SwiGLU, "swiglu_linear")):
        own = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *args, own=own, method=method: steps.append(method) or own(self, *args))
    every_step = sorted(["norm_linear", "norm_linear", "swiglu_linear"] * len(model.model.layers))
    for compiled_steps in (True, False):
        monkeypatch.setattr(hf_glue, "COMPILED", compiled_steps)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        logits(compiled, IDS)
        kernel.calls.clear(), steps.clear()
        torch.testing.assert_close(logits(compiled, IDS), expected, rtol=1e-4, atol=1e-4)
        assert len(kernel.calls) == len(quantized_layers(model))
        assert sorted(steps) == (every_step if compiled_steps else [])
    steps.clear()
    logits(model, IDS)
    assert sorted(steps) == every_step


HF_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_the_norms_and_mlps_hf_glue_replaces_compute_its_formulas(family):
    """kernels/hf_glue.py replaces modules by class name (NORMS, MLPS, ACTIVATIONS); this
    transformers' classes must compute what the replacements fall back to, bit for bit."""
    import importlib

    import transformers

    from tqc.kernels import hf_glue

    prefix = HF_FAMILIES[family]
    classes = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config_class = getattr(transformers, f"{prefix}TextConfig" if family == "gemma3" else f"{prefix}Config")
    torch.manual_seed(0)
    norm = getattr(classes, f"{prefix}RMSNorm")(64, eps=1e-5)
    mlp = getattr(classes, f"{prefix}MLP")(config_class(hidden_size=64, intermediate_size=96))
    torch.nn.init.normal_(norm.weight)
    norm, mlp = norm.to(torch.bfloat16), mlp.to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    gemma, gelu = hf_glue.NORMS[type(norm).__name__], hf_glue.ACTIVATIONS[type(mlp.act_fn).__name__]
    assert type(mlp).__name__ in hf_glue.MLPS and gemma == gelu == (family == "gemma3")
    act = (lambda g: torch.nn.functional.gelu(g, approximate="tanh")) if gelu else torch.nn.functional.silu
    with torch.no_grad():
        assert torch.equal(norm(x), hf_glue.rms_norm(x, norm.weight, 1e-5, gemma))
        assert torch.equal(mlp(x), mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x)))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_the_decoder_layers_hf_glue_rewires_compute_their_own_forward(family):
    """hf_glue.RESIDUAL_FORWARDS replaces the forward of decoder layers; with the norm before the
    MLP adding the residual and running gate/up (add_norm_linear), and the MLP going on from
    gate/up's output (from_gate_up, adding the residual after it where given it), each gives this
    transformers' logits bit for bit."""
    import types

    import transformers

    from tqc.kernels import hf_glue

    prefix = HF_FAMILIES[family]
    config = getattr(transformers, f"{prefix}TextConfig" if family == "gemma3" else f"{prefix}Config")(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(torch.bfloat16).eval()
    for param in model.parameters():  # Gemma's norms start at weight 0 (a scale of 1): make them count
        torch.nn.init.normal_(param, std=0.1)
    expected = logits(model, IDS % 128)
    for layer in model.model.layers:
        norms = hf_glue.DECODER_LAYERS[type(layer).__name__]
        norm, mlp = getattr(layer, next(name for name, (reader, _) in norms.items() if reader == "mlp")), layer.mlp

        def add_norm_linear(h, delta, norm=norm, mlp=mlp):
            normed = norm(h + delta)
            return h + delta, torch.cat([mlp.gate_proj(normed), mlp.up_proj(normed)], dim=-1)

        def from_gate_up(gate_up, onto=None, mlp=mlp):
            gate, up = gate_up.chunk(2, dim=-1)
            out = mlp.down_proj(mlp.act_fn(gate) * up)
            return out if onto is None else onto + out

        norm.add_norm_linear, mlp.from_gate_up = add_norm_linear, from_gate_up
        layer.forward = types.MethodType(hf_glue.RESIDUAL_FORWARDS[type(layer).__name__], layer)
    assert torch.equal(logits(model, IDS % 128), expected)
