"""A generation request inside an engine: its sampling parameters, floor, progress and timings."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling (the OpenAI fields): temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field (the server answers 400 with it)."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens: must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature: must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p: must be in (0, 1]")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop: at most 4 non-empty strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            # torch's manual_seed keeps 63 bits: -1 and 2**63-1 drew the same samples (a larger seed stopped the
            # engine thread); the range of the CLI's --seed
            raise ValueError("seed: must be between 0 and 2**63-1")


#: ``on_update(request)`` is called from the engine thread after every new token and at the end.
UpdateCallback = Callable[["Request"], None]


@dataclass(eq=False)
class Request:
    """A request as the engine tracks it. ``floor`` is already resolved to a point of the served model."""

    prompt_ids: list[int]
    params: SamplingParams
    floor: OperatingPoint
    arrival: float
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    on_update: UpdateCallback | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # "length", "stop", "cancelled"
    served_at: set[str] = field(default_factory=set)
    below_floor_steps: int = 0
    cancelled: bool = False  # set by ``Engine.cancel`` (any thread): the engine drops it at its next iteration
    generator: Any = None  # torch.Generator for a seeded request (real engine only)
    seq: int = 0  # order of entry into the waiting queue (set by it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def finish(self, reason: str, now: float) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.finished_at = reason, now
            if self.on_update is not None:
                self.on_update(self)

    def append(self, token: int, now: float, decode: Callable[[list[int]], str] | None, eos: set[int]) -> None:
        """Take one generated token; finish on EOS, a stop string or ``max_tokens``."""
        if self.finished:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        if token in eos and not self.params.ignore_eos:
            self.finish("stop", now)
            return
        self.output_ids.append(token)
        if decode is not None:
            self.text = decode(self.output_ids)
            for stop in self.params.stop:
                cut = self.text.find(stop)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish("stop", now)
                    return
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish("length", now)
        elif self.on_update is not None:
            self.on_update(self)

    def stream_text(self) -> str:
        """The text that is safe to stream: all of it once finished, else less any tail that may still
        turn into a stop string or is an incomplete character."""
        if self.finished:
            return self.text
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        return self.text[: max(len(self.text) - hold, 0)].rstrip("\ufffd")


def check_context(prompt_len: int, max_tokens: int, context: int) -> None:
    if prompt_len + max_tokens > context:
        raise PrismError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                         f"context of {context} tokens")
