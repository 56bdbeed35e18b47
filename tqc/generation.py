"""Decoding with one host call a token: gpt-fast's loop, for a model from `tqc.load` (or any
Hugging Face causal LM whose forward takes a static cache).

transformers' `generate(cache_implementation="static")` replays a compiled step from a CUDA graph,
yet runs its own loop around it on the host (logits processing, stopping checks, the next input:
54 small launches and a sync a token, and the compiled forward's guards); on an H100 that loop
costs about as much as the quantized model's whole step (docs/performance-history.md, run 161).
StaticDecoder keeps the KV cache, the next token, its position and the tokens so far in fixed
tensors, captures a whole step (the forward, the choice of the next token, the writes that advance
the position) as one CUDA graph, and replays it once a token; the host looks for EOS every
`check_every` tokens.

    decoder = StaticDecoder(model, max_length=2048)
    tokens = decoder.generate(input_ids, max_new_tokens=128)                      # greedy
    tokens = decoder.generate(input_ids, 128, temperature=0.8, top_k=50, seed=0)  # sampled

The prompt's forward is compiled too, with dynamic shapes (gpt-fast's `prefill`), so that prompts of
any length share one compiled graph; eagerly, an 8B-shaped quantized model's 32-token prompt took
12 ms longer, about six of its graphed steps (docs/performance-history.md, run 175). On a CPU both run
eagerly, a token at a time (the reference path). The prompts of a batch have the same length (no
padding mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import cache_argument, full_length_static_cache

MIN_LENGTH = 3  # capturing a step writes tokens 1 and 2 (StaticDecoder._capture)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedily (temperature 0) or sampled from the softmax at
    `temperature`, over the `top_k` most likely tokens if set."""

    temperature: float = 0.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, not {self.top_k}")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each sequence, [batch], from its logits [batch, vocab]. Sampling draws
        with the exponential race (argmax of p / E, E ~ Exp(1)), which a CUDA graph can replay."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


class StaticDecoder:
    """A model decoding through a static KV cache of `max_length` positions (prompt and new tokens)
    for `batch_size` sequences; on CUDA each token is one replay of a CUDA graph of the step
    (`graphs`, default: on CUDA), compiled by torch.compile first unless `compiled` is False, and
    the prompt runs through the model compiled with dynamic shapes unless `compiled_prefill` (default:
    `compiled`) is False. Sliding-window layers (Gemma 3's) keep all `max_length` positions, their
    mask keeping the window (kv_cache.full_length_static_cache). The graph of each Sampling is
    captured on first use and kept: reuse one decoder for many prompts."""

    def __init__(self, model: torch.nn.Module, max_length: int, batch_size: int = 1, graphs: bool | None = None,
                 compiled: bool = True, compiled_prefill: bool | None = None):
        if max_length < MIN_LENGTH:
            raise ValueError(f"max_length must be at least {MIN_LENGTH}, not {max_length}")
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on CUDA, not on {self.device}")
        self.cache = full_length_static_cache(model.config, max_length)  # graphs replay no sliding roll
        self.forward_kwargs = dict(use_cache=True, **cache_argument(model, self.cache))
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # the step's input
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # ... and its position
        self.tokens = torch.zeros(batch_size, max_length, dtype=torch.long, device=self.device)  # all so far
        self._forward = torch.compile(model) if self.graphs and compiled else model
        compiled_prefill = compiled if compiled_prefill is None else compiled_prefill
        self._prefill_forward = torch.compile(model, dynamic=True) if self.graphs and compiled_prefill else model
        self._steps: dict[Sampling, Callable[[], None]] = {}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int | None = None,
                 check_every: int = 32) -> torch.Tensor:
        """The prompts [batch, n] and their continuations, [batch, n + new], as `generate` returns
        them: up to `max_new_tokens` new tokens; with `eos_token_id`, a sequence that emitted it is
        padded with `pad_token_id` (default: the EOS) and decoding stops once every sequence has."""
        sampling = Sampling(temperature, top_k)
        prompt_length = self._check(input_ids, max_new_tokens)
        step = self._steps.get(sampling) or self._capture(sampling)
        if seed is not None:
            torch.manual_seed(seed)
        self._prefill(input_ids.to(self.device), sampling)
        made = 1
        while made < max_new_tokens and not self._finished(prompt_length, made, eos_token_id):
            for _ in range(min(check_every, max_new_tokens - made)):
                step()
            made = min(made + check_every, max_new_tokens)
        tokens = self.tokens[:, : prompt_length + made].clone()
        if eos_token_id is None:
            return tokens
        return pad_after_eos(tokens, prompt_length, eos_token_id, eos_token_id if pad_token_id is None else pad_token_id)

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int) -> int:
        """The prompts' length, after a one-line error for what this decoder cannot take."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [{self.batch_size}, tokens] (the decoder's batch_size), "
                             f"not {list(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the "
                             f"decoder's max_length {self.max_length}")
        return input_ids.shape[1]

    def _prefill(self, input_ids: torch.Tensor, sampling: Sampling) -> None:
        """Run the prompts into the emptied cache and choose the first new token."""
        self.cache.reset()  # transformers 5.25's static cache counts the positions it holds itself
        length = input_ids.shape[1]
        positions = torch.arange(length, device=self.device)
        logits = self._prefill_forward(input_ids=input_ids, cache_position=positions, **self.forward_kwargs).logits[:, -1]
        first = sampling.choose(logits)
        self.tokens[:, :length] = input_ids
        self.tokens[:, length] = first
        self.token.copy_(first[:, None])
        self.position.fill_(length)

    def _step(self, sampling: Sampling) -> None:
        """One token: the forward of `token` at `position`, the next token chosen and stored, the
        position advanced; on tensors only, so that a CUDA graph can replay it."""
        logits = self._forward(input_ids=self.token, cache_position=self.position, **self.forward_kwargs).logits[:, -1]
        chosen = sampling.choose(logits)
        self.tokens.index_copy_(1, self.position + 1, chosen[:, None])
        self.token.copy_(chosen[:, None])
        self.position.add_(1)

    def _capture(self, sampling: Sampling) -> Callable[[], None]:
        """The step of `sampling` as one call: a CUDA graph's replay (compiled and tuned by two
        steps first), else the eager step. Called before a prefill: the eager forward that makes the
        cache and the warm-up steps write cache positions 0 and 1 (and tokens 1 and 2), which the
        prefill and the first step overwrite before anything reads them."""
        if not self.graphs:
            step = self._steps[sampling] = lambda: self._step(sampling)
            return step
        self.token.zero_()
        self.position.zero_()
        self.model(input_ids=self.token, cache_position=self.position, **self.forward_kwargs)  # makes the cache
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(sampling)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(sampling)
        step = self._steps[sampling] = graph.replay
        return step

    def _finished(self, prompt_length: int, made: int, eos_token_id: int | None) -> bool:
        """Whether every sequence has emitted `eos_token_id` among its first `made` new tokens (a sync)."""
        if eos_token_id is None:
            return False
        new = self.tokens[:, prompt_length : prompt_length + made]
        return bool((new == eos_token_id).any(dim=1).all())


def pad_after_eos(tokens: torch.Tensor, prompt_length: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """`tokens` with every new token after a sequence's first EOS set to `pad_token_id`, cut where
    the last sequence to finish emitted its EOS (if all did), as `generate` returns them."""
    new = tokens[:, prompt_length:]
    is_eos = new == eos_token_id
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    new = new.masked_fill(after, pad_token_id)
    if bool(is_eos.any(dim=1).all()):
        new = new[:, : int(is_eos.long().argmax(dim=1).max()) + 1]
    return torch.cat([tokens[:, :prompt_length], new], dim=1)
