"""Held-out perplexity: the one quality evaluator every command reuses.

Text is tokenized once and cut into consecutive, non-overlapping windows of ``seq_len`` tokens; the
perplexity is ``exp`` of the mean next-token negative log-likelihood over every predicted position
(``seq_len - 1`` per window). Windows are evaluated in order, so the number is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` and cut it into ``[n, seq_len]`` windows (the tail that does not fill one is dropped).

    ``max_tokens`` caps the number of tokens used (rounded down to whole windows).
    """
    if seq_len < 2:
        raise ValueError(f"sequence length must be at least 2, got {seq_len}")
    # Tokenizing a large file to use its first few thousand tokens is wasteful: try a prefix first
    # (generous: English BPE averages 3-5 characters per token), the whole text if that falls short.
    ids: list[int] = []
    if max_tokens is not None and len(text) > 16 * max_tokens:
        ids = tokenizer(text[: 16 * max_tokens], add_special_tokens=False)["input_ids"]
    if max_tokens is None or len(ids) < max_tokens:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"the text gives {len(ids)} tokens, fewer than one window of {seq_len}; give more text or a shorter --seq-len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batched(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive batches of windows."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


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
    """Perplexity of a causal LM over ``windows``; ``on_batch(tokens)`` is called after every batch."""
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
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, seconds=seconds)
