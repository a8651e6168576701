"""Engine-shaped costs: the real engine's decode steps and KV-cache copies, timed through its executor.

``prism bench --mode decode`` times a step the way a benchmark does: every row at the same length, no
padding, no attention mask. The engine runs left-padded batches with a 2-D mask and per-row positions
over caches that grow as requests decode, and between forward passes it copies caches as rows join and
leave. Both cost time the bench does not see (measured: a real decode step at a mean batch of 15 was
30 % slower than the bench at batch 16, and the copies took 13 % of the engine's time). These costs are
measured here with the serving executor itself (``ModelExecutor``), per operating point, batch and cache
width: a prefill of prompts of mixed lengths padded to the width, then decode steps, each followed by a
row leaving and one joining, as in a busy engine. The simulator charges them by the width it tracks for each batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.costmodel import EngineCosts
from prism_cli.serving.engine import Batch
from prism_cli.serving.requests import Request, SamplingParams


def _requests(rows: int, width: int, vocab: int, generator: torch.Generator) -> list[Request]:
    """``rows`` greedy requests; the first prompt fills ``width``, the others are between half and all of it
    (a padded batch, as the engine's are)."""
    lengths = [width] + torch.randint(max(1, width // 2), width + 1, (rows - 1,), generator=generator).tolist()
    return [Request(torch.randint(0, vocab, (n,), generator=generator).tolist(), SamplingParams(temperature=0.0),
                    OperatingPoint("linear", 1), 0.0) for n in lengths]


def measure_engine_costs(
    executors: dict[str, Any],
    points: dict[str, OperatingPoint],
    rows: list[int],
    widths: list[int],
    vocab: int,
    *,
    repeats: int = 6,
    warmup: int = 2,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> EngineCosts:
    """For every point (``executors[point]`` serves it) and every (rows, width): a prefill of prompts
    padded to ``width``, then cycles of what a busy engine does between arrivals: a decode step, the
    widest row leaving (a trim of the padding) and a new row joining. Decode, prefill and copies are timed
    in that churn (fresh cache tensors every step, as in serving), not in a loop over one warm cache;
    copies are pooled over the points (they do not depend on the point). Steps of one measurement grow
    the cache by ``warmup + repeats`` columns: widths are those at its start."""
    generator = torch.Generator().manual_seed(seed)
    decode: dict[str, dict[int, dict[int, float]]] = {}
    prefill: dict[str, dict[int, dict[int, float]]] = {}
    copies: dict[str, dict[int, dict[int, list[float]]]] = {"join": {}, "keep": {}}
    for name, point in points.items():
        executor = executors[name]
        for width in widths:
            for n in rows:
                requests = _requests(n, width, vocab, generator)
                executor.prefill(requests, [point] * n)  # warm-up
                kv, _, prefill_ms = executor.prefill(requests, [point] * n)
                spare = executor.prefill(_requests(1, width, vocab, generator), [point])[0]
                batch = Batch(requests, kv)
                steps = []
                for i in range(warmup + repeats):
                    steps.append(executor.decode(batch, [point] * n)[1])
                    if n < 2:
                        continue
                    for kind in ("keep", "join"):
                        before = executor.times.kv_s
                        if kind == "keep":
                            executor.keep(batch, list(range(1, n)))
                        else:
                            executor.join(batch, spare)
                        if i >= warmup:
                            copies[kind].setdefault(width, {}).setdefault(n, []).append((executor.times.kv_s - before) * 1e3)
                decode.setdefault(name, {}).setdefault(width, {})[n] = statistics.median(steps[warmup:])
                prefill.setdefault(name, {}).setdefault(width, {})[n] = prefill_ms
                if on_step:
                    on_step()
    join, keep = ({w: {n: statistics.median(v) for n, v in by.items()} for w, by in copies[k].items()} for k in ("join", "keep"))
    return EngineCosts(decode, prefill, join, keep)


def calibrate_engine(directory: str, points: dict[str, str], rows: list[int], widths: list[int], *, repeats: int = 6,
                     seed: int = 0, on_start: Callable[[int], None] | None = None,
                     on_step: Callable[[], None] | None = None, served: dict[str, Any] | None = None) -> EngineCosts:
    """``measure_engine_costs`` for the export at ``directory`` at ``points`` (``{name: kind}``, kind
    ``"elastic"`` or ``"original"``: the source model, served as ``--original`` serves it). ``served``
    (``{kind: ServedModel}``) reuses models already loaded, else they are loaded here."""
    from prism_cli.errors import PrismError
    from prism_cli.operating_points import parse_operating_point
    from prism_cli.serving.executor import ModelExecutor, load_served_model

    if not rows or min(rows) < 1 or not widths or min(widths) < 2:
        raise PrismError(f"engine calibration needs rows >= 1 and widths >= 2, got rows {rows} and widths {widths}")
    kinds = sorted(set(points.values()))
    served = {kind: (served or {}).get(kind) or load_served_model(directory, original=kind == "original") for kind in kinds}
    longest = max(widths) + 2 + repeats  # warm-up steps included
    for s in served.values():
        if longest > s.context:
            raise PrismError(f"--widths up to {max(widths)} need a context of {longest} tokens; {s.name} has {s.context}")
    executors = {kind: ModelExecutor(s, seed=seed) for kind, s in served.items()}
    parsed = {}
    for name, kind in points.items():
        space = served[kind].space
        parsed[name] = parse_operating_point(name, space.gate, space.n_sub, space.top_k)
    vocab = int(next(iter(served.values())).model.config.get_text_config().vocab_size)
    if on_start:
        on_start(len(points) * len(widths) * len(rows))
    return measure_engine_costs({name: executors[kind] for name, kind in points.items()}, parsed, rows, widths, vocab,
                                repeats=repeats, seed=seed, on_step=on_step)
