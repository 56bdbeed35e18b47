"""tqc.generation.StaticDecoder against transformers' generate, on a packed tiny Llama (the CPU's
reference path; the GPU's CUDA-graph path is in test_kernels_accuracy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import IDS, make_tiny_model, plan_for

from tqc.generation import StaticDecoder, pad_after_eos
from tqc.kv_cache import chunked_logits, full_length_static_cache
from tqc.packed import build, load_packed

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory, tokenizer_dir) -> torch.nn.Module:
    root = tmp_path_factory.mktemp("generation")
    source = make_tiny_model(root / "src", "llama", tokenizer_dir)
    build(plan_for(str(source), "3+2"), root / "packed", progress=False)
    return load_packed(root / "packed")


def hf_greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def test_greedy_decoding_gives_generates_tokens_for_prompts_in_turn(packed_model):
    """One decoder, two prompts of different lengths, new tokens checked for EOS in chunks of 5:
    each continuation is the one transformers' greedy `generate` gives."""
    decoder = StaticDecoder(packed_model, max_length=64)
    for ids in (IDS[:1], IDS[:1, :5]):
        expected = hf_greedy(packed_model, ids, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert torch.equal(decoder.generate(ids, NEW_TOKENS, check_every=5), expected)


def test_a_batch_stops_at_eos_and_pads_as_generate_does(packed_model):
    """Two sequences, an EOS that the first emits early: it is padded after it while the second
    goes on, and decoding stops where generate stops."""
    ids = torch.cat([IDS[:1], IDS[:1].flip(1)])
    free = hf_greedy(packed_model, ids, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])
    assert eos not in free[1, ids.shape[1]:].tolist()  # else the check below proves less; pick another
    expected = hf_greedy(packed_model, ids, eos_token_id=eos, pad_token_id=3)  # 3: no prompt token (generate masks pads)
    got = StaticDecoder(packed_model, max_length=64, batch_size=2).generate(ids, NEW_TOKENS, eos_token_id=eos,
                                                                           pad_token_id=3, check_every=4)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 3).all()


def test_new_tokens_after_eos_are_padded_and_cut_where_the_last_sequence_ends():
    tokens = torch.tensor([[5, 9, 1, 2, 5, 3, 4], [9, 5, 1, 1, 1, 5, 2]])  # prompts of 2, EOS 5 in them too
    assert pad_after_eos(tokens, 2, eos_token_id=5, pad_token_id=0).tolist() == [[5, 9, 1, 2, 5, 0],
                                                                                  [9, 5, 1, 1, 1, 5]]
    assert pad_after_eos(tokens[:1], 2, eos_token_id=4, pad_token_id=0).tolist() == [[5, 9, 1, 2, 5, 3, 4]]
    assert pad_after_eos(tokens, 2, eos_token_id=3, pad_token_id=0).tolist() == [[5, 9, 1, 2, 5, 3, 0],
                                                                                  [9, 5, 1, 1, 1, 5, 2]]


def test_sampling_is_seeded_and_top_1_is_greedy(packed_model):
    decoder = StaticDecoder(packed_model, max_length=64)
    ids = IDS[:1]
    greedy = decoder.generate(ids, NEW_TOKENS)
    hot = [decoder.generate(ids, NEW_TOKENS, temperature=5.0, seed=seed) for seed in (1, 1, 2)]
    assert torch.equal(hot[0], hot[1])
    assert not torch.equal(hot[0], hot[2])
    assert not torch.equal(hot[0], greedy)
    assert torch.equal(decoder.generate(ids, NEW_TOKENS, temperature=5.0, top_k=1, seed=3), greedy)


@pytest.mark.parametrize(("ids", "new", "message"), [
    (IDS[:1, :10], 60, "exceed the decoder's max_length 64"),
    (IDS.repeat(2, 1), 4, "input_ids must be [1, tokens]"),
    (IDS[:1], 0, "max_new_tokens must be at least 1"),
])
def test_what_the_decoder_cannot_take_is_one_line(packed_model, ids, new, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        StaticDecoder(packed_model, max_length=64).generate(ids, new)


def test_cuda_graphs_need_a_model_on_cuda(packed_model):
    with pytest.raises(ValueError, match="CUDA graphs need a model on CUDA"):
        StaticDecoder(packed_model, max_length=64, graphs=True)


def gemma3_with_a_window(window: int | None) -> torch.nn.Module:
    """A random two-layer Gemma 3, its first layer attending to the last `window` positions (None:
    to all), its second to all."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, vocab_size=1024,
                              sliding_window=window or 64, layer_types=["sliding_attention" if window else
                                                                        "full_attention", "full_attention"])
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_a_sliding_layer_holding_every_position_attends_as_transformers_rolling_one_does():
    """kv_cache.full_length_static_cache keeps a sliding layer's every position and leaves the
    window to the mask: past the window (8 tokens, a window of 3) the logits are those of
    transformers' StaticCache, which rolls the layer's positions, and not those without a window."""
    from transformers import StaticCache

    model = gemma3_with_a_window(3)
    full = full_length_static_cache(model.config, 16)
    assert [type(layer).__name__ for layer in full.layers] == ["StaticLayer"] * 2
    rolling = StaticCache(config=model.config, max_cache_len=16)
    assert type(rolling.layers[0]).__name__ == "StaticSlidingWindowLayer"
    got = chunked_logits(model, IDS, full, chunk=1)
    torch.testing.assert_close(got, chunked_logits(model, IDS, rolling, chunk=1))
    unwindowed = gemma3_with_a_window(None)
    assert not torch.allclose(got, chunked_logits(unwindowed, IDS, full_length_static_cache(unwindowed.config, 16), 1))


def test_the_decoder_continues_past_a_sliding_window_as_generate_does():
    """A Gemma 3 whose first layer attends to 3 positions, a prompt of 5 and 12 new tokens: the
    decoder's tokens are greedy `generate`'s."""
    model = gemma3_with_a_window(3)
    ids = IDS[:1, :5]
    expected = hf_greedy(model, ids, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert torch.equal(StaticDecoder(model, max_length=32).generate(ids, NEW_TOKENS), expected)


def test_the_decoder_continues_gemma_3_270m_past_its_window_as_generate_does(train_text):
    """The real Gemma-3-270M (sliding window 512 in five layers of six): 12 new tokens after a
    1024-token prompt of WikiText training text, greedy, are the tokens transformers' `generate`
    gives. (With the window ignored they are not; 520 tokens were too few to tell.)"""
    from tqc.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("gemma3-270m")
    model = load_model(source).eval()
    window = model.config.get_text_config().sliding_window
    ids = load_tokenizer(source)(train_text.read_text()[:40000], return_tensors="pt").input_ids[:, : 2 * window]
    assert ids.shape[1] == 2 * window
    expected = hf_greedy(model, ids, min_new_tokens=NEW_TOKENS)
    assert torch.equal(StaticDecoder(model, max_length=ids.shape[1] + NEW_TOKENS).generate(ids, NEW_TOKENS), expected)
