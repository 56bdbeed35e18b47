"""Quality of a quantized model against its source: perplexity, KL divergence, top-1 agreement.

Windows are fixed so that numbers compare run to run: the evaluation file is read whole, its
paragraphs joined with newlines, tokenised once, and cut into consecutive non-overlapping windows
of `seq_len` tokens from the start; the first `windows` of them are scored. Every position but the
last of a window predicts the next token. KL divergence is KL(P_source || P_quantized) of the
next-token distributions, averaged over those positions; top-1 agreement is the share of positions
where both models rank the same token first.

Speed: windows go through a model several per forward (as many as `LOGIT_BUDGET` of logits
allows), and `evaluate_many` scores several quantized models against one source forward per batch,
so n rows cost n + 1 forwards instead of 2n. Neither changes which tokens are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 40


@dataclass(frozen=True)
class Windows:
    data: str
    seq_len: int = DEFAULT_SEQ_LEN
    count: int = DEFAULT_WINDOWS


@dataclass
class Metrics:
    perplexity: float
    source_perplexity: float
    kl_divergence: float
    top1_agreement: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, windows: Windows) -> torch.Tensor:
    """The evaluation token ids, [count, seq_len]; fails if the file is too short."""
    text = "\n".join(line.strip() for line in Path(windows.data).read_text().splitlines() if line.strip())
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // windows.seq_len
    if available < windows.count:
        raise ValueError(f"{windows.data}: {ids.numel()} tokens make {available} windows of {windows.seq_len}, {windows.count} asked")
    return ids[: windows.count * windows.seq_len].view(windows.count, windows.seq_len)


LOGIT_BUDGET = 2**28  # float32 logits held per model per batch (1 GiB): bounds the batch size


def batch_size_for(vocab_size: int, seq_len: int, budget: int = LOGIT_BUDGET, most: int = 8) -> int:
    """Windows per forward: as many as the logit budget allows (Gemma's 262k vocabulary gets fewer)."""
    return max(1, min(most, budget // (vocab_size * seq_len)))


class _Totals:
    """Running sums for one model: NLL, KL to the source, top-1 agreement."""

    def __init__(self) -> None:
        self.nll = self.kld = self.agree = 0.0

    def add(self, logits: torch.Tensor, ref_logp: torch.Tensor, ref_top: torch.Tensor, targets: torch.Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=-1)
        self.nll += F.nll_loss(logp, targets, reduction="sum").item()
        self.kld += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        self.agree += (logp.argmax(-1) == ref_top).sum().item()


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [batch, seq_len - 1, vocab] on CPU (float32 or the model's dtype)."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[:, :-1].cpu()


@torch.no_grad()
def evaluate_many(
    models: Sequence[nn.Module], source: nn.Module, ids: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> list[Metrics]:
    """Score every model against `source` on the windows `ids` [count, seq_len].

    Windows go through each model `batch_size` at a time; the source runs once per batch for all
    models. Log-softmax and KL are taken one window at a time, so memory stays at the batch's
    logits. Batching changes only float rounding, never which tokens are scored.
    """
    totals = [_Totals() for _ in models]
    source_nll = 0.0
    bar = tqdm(total=len(ids), desc="eval", unit="window", disable=not progress)
    for batch in ids.split(batch_size):
        targets = batch[:, 1:]
        ref_logits = _logits(source, batch)
        ref = [F.log_softmax(window.float(), dim=-1) for window in ref_logits]
        del ref_logits
        source_nll += sum(F.nll_loss(r, t, reduction="sum").item() for r, t in zip(ref, targets))
        ref_top = [r.argmax(-1) for r in ref]
        for model, total in zip(models, totals):
            for i, window in enumerate(_logits(model, batch)):
                total.add(window, ref[i], ref_top[i], targets[i])
        bar.update(len(batch))
    bar.close()
    count = targets.shape[1] * len(ids)
    return [
        Metrics(
            perplexity=math.exp(total.nll / count),
            source_perplexity=math.exp(source_nll / count),
            kl_divergence=total.kld / count,
            top1_agreement=total.agree / count,
            tokens=count,
        )
        for total in totals
    ]


def evaluate(model: nn.Module, source: nn.Module, ids: torch.Tensor, progress: bool = True, batch_size: int = 1) -> Metrics:
    """Score one `model` against `source` on the windows `ids` [count, seq_len]."""
    return evaluate_many([model], source, ids, batch_size, progress)[0]
