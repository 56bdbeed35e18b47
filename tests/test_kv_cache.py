import pytest
import torch

from tqc.codebook import gaussian_distortion
from tqc.kv_cache import TurboQuantCache, cache_argument, dequantize_states, kv_divergence, quantize_states
from tqc.models import load_model, resolve_model
from tqc.rotation import random_signs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_state_round_trip_error_matches_the_codebook(bits):
    states = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(bits)) * 3
    signs = random_signs(1, 64)
    q = quantize_states(states, bits, signs)
    assert q.codes.dtype == torch.int32 and q.codes.shape == (2, 3, 50, 64 * bits // 32)
    error = (dequantize_states(q, signs) - states).pow(2).sum() / states.pow(2).sum()
    assert error < gaussian_distortion(bits) * 1.05


@pytest.fixture(scope="module")
def smollm2():
    return load_model(resolve_model("smollm2"))


def test_generate_with_a_quantized_cache(smollm2):
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 12, 71, 30, 9]])
    cache = TurboQuantCache(smollm2.config, residual_length=4)
    out = smollm2.generate(ids, **cache_argument(smollm2, cache), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.shape == (1, 20)
    assert cache.get_seq_length() == 19
    assert cache.layers[0]._quantized_keys.bits == 3 and cache.layers[0]._quantized_values.bits == 2


def test_more_bits_mean_less_divergence(smollm2, test_text):
    from tqc.evaluate import Windows, token_windows
    from tqc.models import load_tokenizer

    ids = token_windows(load_tokenizer(resolve_model("smollm2")), Windows(str(test_text), 96, 1))
    low = kv_divergence(smollm2, ids, 2, 2)["kl_divergence"]
    default = kv_divergence(smollm2, ids, 3, 2)["kl_divergence"]
    high = kv_divergence(smollm2, ids, 4, 4)["kl_divergence"]
    assert high < default < low
    assert high < 0.05
