"""Quality of a quantized model against its source: perplexity, KL divergence, top-1 agreement.

Windows are fixed so that numbers compare run to run: the evaluation file is read whole, its
paragraphs joined with newlines, tokenised once, and cut into consecutive non-overlapping windows
of `seq_len` tokens from the start; the first `windows` of them are scored. Every position but the
last of a window predicts the next token. KL divergence is KL(P_source || P_quantized) of the
next-token distributions, averaged over those positions; top-1 agreement is the share of positions
where both models rank the same token first.
"""

from __future__ import annotations

import math
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


@torch.no_grad()
def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits[:, :-1].float().cpu()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def evaluate(model: nn.Module, source: nn.Module, ids: torch.Tensor, progress: bool = True) -> Metrics:
    """Score `model` against `source` on the windows `ids` [count, seq_len], one window at a time."""
    nll = source_nll = kld = agree = 0.0
    count = 0
    for window in tqdm(ids, desc="eval", unit="window", disable=not progress):
        window = window[None]
        targets = window[:, 1:].reshape(-1)
        logp = _log_probs(model, window).flatten(0, 1)
        ref = _log_probs(source, window).flatten(0, 1)
        nll += F.nll_loss(logp, targets, reduction="sum").item()
        source_nll += F.nll_loss(ref, targets, reduction="sum").item()
        kld += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
        count += targets.numel()
    return Metrics(
        perplexity=math.exp(nll / count),
        source_perplexity=math.exp(source_nll / count),
        kl_divergence=kld / count,
        top1_agreement=agree / count,
        tokens=count,
    )
