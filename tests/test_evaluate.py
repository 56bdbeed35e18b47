"""Evaluation on real text: batching and sharing the source forward change no metric."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tqc.evaluate import Windows, batch_size_for, evaluate, evaluate_many, token_windows
from tqc.models import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def windows(tokenizer, test_text) -> torch.Tensor:
    return token_windows(tokenizer, Windows(str(test_text), seq_len=48, count=3))


def _tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _perturbed(model: LlamaForCausalLM, noise: float, seed: int) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return other


def test_windows_are_consecutive_slices_of_the_text(tokenizer, windows, test_text):
    longer = token_windows(tokenizer, Windows(str(test_text), seq_len=48, count=5))
    assert windows.shape == (3, 48)
    assert torch.equal(longer[:3], windows)


def test_a_model_against_itself_has_no_divergence(windows):
    source = _tiny_model(0)
    metrics = evaluate(source, source, windows, progress=False)
    assert metrics.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert metrics.top1_agreement == 1.0
    assert metrics.perplexity == pytest.approx(metrics.source_perplexity)
    assert metrics.tokens == 3 * 47


def test_batching_and_sharing_the_source_change_no_metric(windows):
    source = _tiny_model(0)
    small, large = _perturbed(source, 0.05, 1), _perturbed(source, 0.5, 2)
    alone = [evaluate(m, source, windows, progress=False, batch_size=1) for m in (small, large)]
    shared = evaluate_many([small, large], source, windows, batch_size=2, progress=False)
    for one, other in zip(alone, shared):
        assert other.kl_divergence == pytest.approx(one.kl_divergence, rel=1e-4)
        assert other.perplexity == pytest.approx(one.perplexity, rel=1e-5)
        assert other.top1_agreement == pytest.approx(one.top1_agreement, abs=1 / one.tokens)
    assert 0 < shared[0].kl_divergence < shared[1].kl_divergence
    assert shared[0].top1_agreement > shared[1].top1_agreement


def test_a_larger_vocabulary_gets_fewer_windows_per_batch():
    assert batch_size_for(262144, 512) < batch_size_for(49152, 512)
    assert batch_size_for(10**9, 512) == 1
