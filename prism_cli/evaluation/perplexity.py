"""Held-out perplexity: the one quality evaluator every command reuses.

Text is tokenized once and cut into consecutive, non-overlapping windows of ``seq_len`` tokens; the
perplexity is ``exp`` of the mean next-token negative log-likelihood over every predicted position
(``seq_len - 1`` per window). Windows are evaluated in order, so the number is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prism_cli.data.windows import batched
from prism_cli.errors import PrismError


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of one perplexity run."""

    perplexity: float
    nll: float
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood ``[b, seq_len - 1]`` of each next token, in float32."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(logits.device), reduction="none"
    )


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM over ``windows``; ``on_batch(tokens)`` is called after every batch. NaN
    outputs (a damaged checkpoint) are an error, not a number to report."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    for batch in batched(windows, batch_size):
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        nll = next_token_nll(logits, batch)
        total_nll += float(nll.double().sum())
        total_tokens += nll.numel()
        if on_batch is not None:
            on_batch(batch.numel())
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    if math.isnan(mean):
        raise PrismError("the model's outputs are NaN: its weights are damaged (a NaN or infinite weight)")
    return PerplexityResult(perplexity=math.exp(mean) if mean < 700 else math.inf, nll=mean, tokens=total_tokens,
                            seconds=seconds)
