import pytest
import torch
from torch import nn

from tqc.layout import LayerSpec
from tqc.linear import TurboQuantLinear, concatenate, load_packed_tensors, quantize_linear
from tqc.options import QuantOption


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(256, 80, bias=True)
    layer.weight.data.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("option", ["2", "3", "4", "4+2", "4+4", "rtn4"])
def test_forward_approximates_the_original(linear, option):
    spec = LayerSpec(QuantOption.parse(option), 64, 256, 80, has_bias=True)
    quantized = quantize_linear(linear, spec, seed=9)
    x = torch.randn(3, 5, 256)
    expected = linear(x)
    got = quantized(x)
    assert got.shape == expected.shape
    rel = ((got - expected).pow(2).sum() / expected.pow(2).sum()).item()
    assert rel < {"2": 0.15, "3": 0.05, "4": 0.015}.get(option, 0.012)


def test_module_holds_no_full_precision_weight(linear):
    spec = LayerSpec(QuantOption.parse("4+4"), 64, 256, 80, has_bias=True)
    quantized = quantize_linear(linear, spec, seed=9)
    float_sizes = [t.numel() for t in quantized.state_dict().values() if t.dtype == torch.float32]
    assert all(size < 256 * 80 for size in float_sizes)
    assert not hasattr(quantized, "weight")


def test_loading_checks_the_layout(linear):
    spec = LayerSpec(QuantOption.parse("3"), 64, 256, 80, has_bias=True)
    tensors = {k: v.clone() for k, v in quantize_linear(linear, spec, seed=1).state_dict().items()}
    empty = TurboQuantLinear(spec)
    broken = dict(tensors, scales=tensors["scales"][:, :2])
    with pytest.raises(ValueError, match="'scales'"):
        load_packed_tensors(empty, broken)
    del tensors["seed"]
    with pytest.raises(ValueError, match="missing"):
        load_packed_tensors(empty, tensors)


@pytest.mark.parametrize("option", ["3", "4+2", "rtn4"])
def test_concatenated_layer_computes_the_separate_outputs(option):
    torch.manual_seed(1)
    sources = [nn.Linear(256, n, bias=True) for n in (64, 32, 48)]
    spec = lambda n: LayerSpec(QuantOption.parse(option), 64, 256, n, has_bias=True)  # noqa: E731
    layers = [quantize_linear(source, spec(source.out_features), seed=5) for source in sources]
    fused = concatenate(layers)
    x = torch.randn(3, 256)
    assert fused.out_features == 144
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), rtol=1e-5, atol=1e-5)


def test_concatenate_refuses_layers_that_read_the_input_differently(linear):
    spec = LayerSpec(QuantOption.parse("4"), 64, 256, 80, has_bias=True)
    with pytest.raises(ValueError, match="rotation seeds"):
        concatenate([quantize_linear(linear, spec, seed=1), quantize_linear(linear, spec, seed=2)])
    other = LayerSpec(QuantOption.parse("3"), 64, 256, 80, has_bias=True)
    with pytest.raises(ValueError, match="must match"):
        concatenate([quantize_linear(linear, spec, seed=1), quantize_linear(linear, other, seed=1)])
