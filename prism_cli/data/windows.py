"""Token windows: text cut into equal sequences for profiling, tuning and evaluation (data preparation,
below every pipeline stage)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


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
