"""Workloads for ``prism schedule``: Poisson arrivals with lengths from the evaluation split, or a trace.

Lengths come from the held-out text itself: the split is cut into paragraphs, a request's prompt is
one paragraph (up to ``max_prompt`` tokens) and its output length is the token length of the next
paragraph (clipped to ``min_output..max_output``), so prompt and output lengths follow the corpus.
A trace is JSON Lines, one request a line: ``{"arrival": 0.25, "prompt": "...", "max_tokens": 64,
"floor": "linear:4"}`` (``arrival`` in seconds from the start; ``floor`` optional: the full model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli.errors import PrismError
from prism_cli.io import lone_surrogate
from prism_cli.serving.floors import FloorSpec

#: The latest arrival a trace may give (seconds; about 30 years): far beyond it a clock in seconds no
#: longer resolves the milliseconds of a step, and the simulator would stand still.
MAX_ARRIVAL = 1e9
#: The fields of a trace line (any other is refused: a misspelt ``floor`` served its request at the full model).
TRACE_FIELDS = ("arrival", "prompt", "max_tokens", "floor")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, before it reaches an engine."""

    arrival: float  # seconds from the start of the run
    prompt_ids: tuple[int, ...]
    max_tokens: int
    floor: FloorSpec | None  # None: the full model
    origin: str = ""  # where a trace gave it ("trace t.jsonl line 3"), for errors found once the model is known


@dataclass(frozen=True)
class LengthSettings:
    max_prompt: int = 128
    min_output: int = 4
    max_output: int = 128

    def validate(self) -> None:
        if self.max_prompt < 1 or self.min_output < 1 or self.max_output < self.min_output:
            raise PrismError(f"lengths need --max-prompt >= 1 and 1 <= --min-output <= --max-output, got --max-prompt "
                             f"{self.max_prompt}, --min-output {self.min_output}, --max-output {self.max_output}")


def paragraphs(text: str, tokenizer: Any) -> list[list[int]]:
    """The token ids of every non-empty paragraph (blank-line separated) of ``text``."""
    parts = [p.strip() for p in text.split("\n\n")]
    parts = [p for p in parts if p]
    encoded = tokenizer(parts, add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded if ids]


def poisson_workload(
    text: str, tokenizer: Any, rate: float, duration: float, mix: list[tuple[FloorSpec, float]], seed: int,
    lengths: LengthSettings,
) -> list[RequestSpec]:
    """Poisson arrivals at ``rate`` requests/s over ``duration`` seconds, floors drawn from ``mix``."""
    if not rate > 0:
        raise PrismError(f"--rate must be positive (requests per second), got {rate}")
    if not duration > 0:
        raise PrismError(f"--duration must be positive (seconds), got {duration}")
    lengths.validate()
    paras = paragraphs(text, tokenizer)
    if len(paras) < 2:
        raise PrismError("the length source has fewer than two paragraphs; give a longer text")
    rng = np.random.default_rng(seed)
    specs: list[RequestSpec] = []
    t = float(rng.exponential(1.0 / rate))
    shares = np.array([w for _, w in mix])
    while t < duration:
        i = int(rng.integers(0, len(paras) - 1))
        prompt = tuple(paras[i][: lengths.max_prompt])
        out = int(np.clip(len(paras[i + 1]), lengths.min_output, lengths.max_output))
        floor = mix[int(rng.choice(len(mix), p=shares))][0]
        specs.append(RequestSpec(t, prompt, out, floor))
        t += float(rng.exponential(1.0 / rate))
    if not specs:
        raise PrismError(f"no request arrived in --duration {duration:g} s at {rate:g} requests/s (seed {seed}); "
                         "give a longer --duration or a higher rate")
    return specs


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a line may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_trace(path: Path, tokenizer: Any, parse_floor_text) -> list[RequestSpec]:
    """Requests of a JSON Lines trace; a bad line is reported by its number."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PrismError(f"trace {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PrismError(f"cannot read trace {path}: {exc}") from None
    specs: list[RequestSpec] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"trace {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{where} is not JSON: {exc.msg}") from None
        except RecursionError:  # arrays or objects nested deeper than the parser's recursion limit
            raise PrismError(f"{where} is not JSON that can be read: nested too deeply") from None
        except ValueError as exc:  # an integer past Python's digit limit for str -> int
            raise PrismError(f"{where} is not JSON that can be read: {str(exc).split(';')[0]}") from None
        if not isinstance(row, dict):
            raise PrismError(f"{where}: expected an object with arrival, prompt, max_tokens (and floor)")
        if lone_surrogate(row):
            raise PrismError(f"{where}: not valid Unicode text (a \\u escape spells a lone surrogate, \\ud800-\\udfff)")
        unknown = [k for k in row if k not in TRACE_FIELDS]
        if unknown:
            raise PrismError(f"{where}: unknown field {_short(unknown[0])}; a line has {', '.join(TRACE_FIELDS)} (floor optional)")
        missing = [k for k in ("arrival", "prompt", "max_tokens") if k not in row]
        if missing:
            raise PrismError(f"{where}: missing {', '.join(missing)}")
        arrival, prompt, max_tokens = row["arrival"], row["prompt"], row["max_tokens"]
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not 0 <= arrival <= MAX_ARRIVAL:
            raise PrismError(f"{where}: arrival must be a finite number of seconds, 0 to {MAX_ARRIVAL:g}, got {_short(arrival)}")
        if not isinstance(prompt, str) or not prompt:
            raise PrismError(f"{where}: prompt must be a non-empty string")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise PrismError(f"{where}: max_tokens must be an integer >= 1, got {_short(max_tokens)}")
        try:
            floor = parse_floor_text(row["floor"]) if row.get("floor") is not None else None
        except PrismError as exc:
            raise PrismError(f"{where}: {exc}") from None
        ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise PrismError(f"{where}: the prompt has no tokens")
        specs.append(RequestSpec(float(arrival), ids, max_tokens, floor, where))
    if not specs:
        raise PrismError(f"trace {path} has no requests")
    return sorted(specs, key=lambda s: s.arrival)
