"""Token windows: text cut into equal sequences for profiling, tuning and evaluation (data preparation,
below every pipeline stage)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def window_phrase(seq_len: int, seq_len_option: str | None = "--seq-len", kind: str = "window") -> str:
    """``one window (--seq-len 64)``, or where no option sets the length, ``one quality window (256 tokens)``."""
    return f"one {kind} ({seq_len_option} {seq_len})" if seq_len_option else f"one {kind} ({seq_len} tokens)"


def check_window_tokens(max_tokens: int | None, seq_len: int, *, tokens_option: str | None = "--tokens",
                        seq_len_option: str | None = "--seq-len", kind: str = "window") -> None:
    """ValueError (one line) if a cap of ``max_tokens`` tokens leaves not even one window of ``seq_len``:
    checkable before any text is read or model loaded."""
    if max_tokens is not None and max_tokens < seq_len:
        what = f"{tokens_option} {max_tokens}" if tokens_option else f"{max_tokens} tokens"
        raise ValueError(f"{what} is less than {window_phrase(seq_len, seq_len_option, kind)}")


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None, *,
                  tokens_option: str | None = "--tokens", seq_len_option: str | None = "--seq-len",
                  kind: str = "window") -> torch.Tensor:
    """Tokenize ``text`` and cut it into ``[n, seq_len]`` windows (the tail that does not fill one is dropped).

    ``max_tokens`` caps the number of tokens used (rounded down to whole windows). Fewer tokens than one
    window is a one-line ValueError that says what limited them: the cap (named as ``tokens_option``, the
    option that set it, where there is one) or the text; its advice names only options the command has
    (``seq_len_option``: the option that sets ``seq_len``, None where the length is fixed). ``kind`` names
    the window in the message (``"quality window"``).
    """
    if seq_len < 2:
        raise ValueError(f"sequence length must be at least 2, got {seq_len}")
    check_window_tokens(max_tokens, seq_len, tokens_option=tokens_option, seq_len_option=seq_len_option, kind=kind)
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
    if n == 0:  # the cap is at least one window (checked above): the text is what falls short
        shorter = f" or a shorter {seq_len_option}" if seq_len_option else ""
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than {window_phrase(seq_len, seq_len_option, kind)}; "
                         f"give more text{shorter}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batched(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive batches of windows."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]
