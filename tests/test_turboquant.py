import pytest
import torch

from tqc import rtn, turboquant
from tqc.codebook import gaussian_distortion, high_byte_codebook
from tqc.layout import LayerSpec, layer_bytes, tensor_layout
from tqc.options import QuantOption


def _spec(option: str, k: int = 256, n: int = 96, group_size: int = 128) -> LayerSpec:
    return LayerSpec(QuantOption.parse(option), group_size, k, n)


def _relative_error(weight: torch.Tensor, spec: LayerSpec, scheme=turboquant) -> float:
    tensors = scheme.quantize(weight, spec, seed=11)
    approx = scheme.dequantize(tensors, spec)
    if scheme is turboquant:
        signs = turboquant.random_signs(11, spec.in_features)
        weight = turboquant.rotate(weight, signs, spec.group_size)
    return ((approx - weight).pow(2).sum() / weight.pow(2).sum()).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gaussian_weights_reach_lloyd_max_distortion(bits):
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    error = _relative_error(weight, _spec(str(bits), k=1024, n=256))
    # The fitted per-group scale can only beat the theoretical N(0,1) distortion (finite groups).
    assert gaussian_distortion(bits) * 0.8 < error < gaussian_distortion(bits) * 1.02


def test_option_3g_decodes_onto_the_grid_codebook():
    """Option 3g: every value is a level of codebook.high_byte_codebook(3) times its group's scale, at the grid's
    theoretical error on Gaussian weights (1% above Lloyd-Max's, so above option 3's); int8 activations refuse it
    (their tables hold Lloyd-Max's levels)."""
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    spec = _spec("3g", k=1024, n=256)
    tensors = turboquant.quantize(weight, spec, seed=11)
    normalized = turboquant.dequantize(tensors, spec).reshape(256, 8, 128) / tensors["scales"].float()[..., None]
    assert torch.isclose(normalized[..., None], high_byte_codebook(3)[0], rtol=1e-5).any(-1).all()
    error = _relative_error(weight, spec)
    assert gaussian_distortion(3, "grid") * 0.8 < error < gaussian_distortion(3, "grid") * 1.02
    assert error > _relative_error(weight, _spec("3", k=1024, n=256))
    with pytest.raises(ValueError, match="int8"):
        LayerSpec(QuantOption.parse("3g"), 128, 1024, 256, activations="int8")


@pytest.mark.parametrize("base,residual", [(4, 2), (4, 4), (3, 2), (2, 2)])
def test_residual_stage_shrinks_the_error(base, residual):
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    plain = _relative_error(weight, _spec(str(base), k=512, n=64))
    staged = _relative_error(weight, _spec(f"{base}+{residual}", k=512, n=64))
    assert staged < plain * gaussian_distortion(residual) * 1.6


@pytest.mark.parametrize("bits", [2, 3])
def test_turboquant_beats_rtn_on_heavy_tailed_weights(bits):
    # Student-t weights with outliers: the rotation spreads them, min/max RTN suffers.
    weight = torch.distributions.StudentT(3.0).sample((128, 512)) * 0.02
    tq = _relative_error(weight, _spec(str(bits), k=512, n=128))
    baseline = _relative_error(weight, _spec(f"rtn{bits}", k=512, n=128), scheme=rtn)
    assert tq < baseline


@pytest.mark.parametrize("option", ["2", "3+2", "4+4", "rtn3", "rtn8"])
def test_quantizer_output_matches_the_layout(option):
    spec = _spec(option)
    scheme = turboquant if spec.option.scheme == "turboquant" else rtn
    tensors = scheme.quantize(torch.randn(96, 256), spec, seed=3)
    layout = tensor_layout(spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == layout
    assert sum(v.numel() * v.element_size() for v in tensors.values()) == layer_bytes(spec)


def test_quantization_is_deterministic():
    weight = torch.randn(32, 256)
    a = turboquant.quantize(weight, _spec("3+2", n=32), seed=5)
    b = turboquant.quantize(weight, _spec("3+2", n=32), seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the benchmark device)")
@pytest.mark.parametrize("option", ["4", "3+2", "rtn4"])
def test_codes_fitted_on_a_gpu_match_the_cpu(option):
    """`tqc build --device cuda`: the same codes but for a few at rounding ties, the same scales."""
    spec = _spec(option, k=1024, n=512)
    scheme = turboquant if spec.option.scheme == "turboquant" else rtn
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(2))
    on_cpu = scheme.quantize(weight, spec, seed=7)
    on_gpu = {name: t.cpu() for name, t in scheme.quantize(weight.cuda(), spec, seed=7).items()}
    assert on_gpu.keys() == on_cpu.keys()
    for name in on_cpu:
        if "codes" in name:
            assert (on_gpu[name] != on_cpu[name]).float().mean() < 1e-3, name
        else:
            torch.testing.assert_close(on_gpu[name].float(), on_cpu[name].float(), rtol=2e-3, atol=0)
