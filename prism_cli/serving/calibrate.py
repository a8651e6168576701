"""Engine-shaped costs: the real engine's decode steps and KV-cache copies, timed through its executor.

``prism bench --mode decode`` times a step the way a benchmark does: every row at the same length, no
padding, no attention mask. The engine runs left-padded batches with a 2-D mask and per-row positions
over caches that grow as requests decode, and between forward passes it copies caches as rows join and
leave. Both cost time the bench does not see (measured: a real decode step at a mean batch of 15 was
30 % slower than the bench at batch 16, and the copies took 13 % of the engine's time). These costs are
measured here with the serving executor itself (``ModelExecutor``), per operating point, batch and cache
width: a prefill of prompts of mixed lengths padded to the width, then decode steps, each followed by a
row leaving and one joining, as in a busy engine. The simulator charges them by the width it tracks for each batch.

Around its forward passes the engine spends time of its own: sampling, the policy's decision, each row's
bookkeeping (its token, stop strings, retiring), the next step's inputs. In busy real runs that was about
7 % of the time (0.6-0.8 ms per forward pass), which a simulator charging forward passes and copies only
did not see: it ran 2-14 % fast for every policy. ``measure_step_overhead`` runs the real engine on a burst
and takes what its passes and copies do not account for, per pass.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.costmodel import EngineCosts
from prism_cli.serving.engine import Batch, Engine, Limits
from prism_cli.serving.floors import Ladder
from prism_cli.serving.policies import SCHEDULING_POLICIES
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


def measure_step_overhead(executor: Any, space: Any, point: OperatingPoint, vocab: int, limits: Limits, *,
                          requests: int = 96, context: int = 2048, seed: int = 0) -> float:
    """Milliseconds per forward pass that the engine spends outside its passes and KV copies: the real
    ``Engine`` (FIFO) serves a burst of greedy requests at ``point`` within ``limits`` (prompts of 8-64
    tokens, 8-40 new tokens, less where the context is shorter: rows join and leave as in a busy engine),
    and the run's wall time less the executor's forward and copy times is divided by its passes."""
    generator = torch.Generator().manual_seed(seed)
    longest_prompt, most_new = max(2, min(64, context // 2)), max(2, min(40, context // 4))
    prompts = torch.randint(min(8, longest_prompt), longest_prompt + 1, (requests,), generator=generator).tolist()
    outputs = torch.randint(min(8, most_new), most_new + 1, (requests,), generator=generator).tolist()
    burst = [Request(torch.randint(0, vocab, (n,), generator=generator).tolist(), SamplingParams(max_tokens=m, temperature=0.0),
                     point, 0.0) for n, m in zip(prompts, outputs, strict=True)]
    engine = Engine(executor, SCHEDULING_POLICIES.get("fifo")(), Ladder(space, None, limits.max_batch), limits)
    forward, kv = executor.times.forward_s, executor.times.kv_s
    executor.reset_clock()
    started = time.perf_counter()
    engine.schedule(burst)
    engine.run()
    wall = time.perf_counter() - started
    outside = wall - (executor.times.forward_s - forward) - (executor.times.kv_s - kv)
    return max(outside, 0.0) * 1e3 / len(engine.stats.steps)


def calibrate_engine(directory: str, points: dict[str, str], rows: list[int], widths: list[int], *, repeats: int = 6,
                     seed: int = 0, on_start: Callable[[int], None] | None = None,
                     on_step: Callable[[], None] | None = None, served: dict[str, Any] | None = None,
                     limits: Limits | None = None) -> EngineCosts:
    """``measure_engine_costs`` for the export at ``directory`` at ``points`` (``{name: kind}``, kind
    ``"elastic"`` or ``"original"``: the source model, served as ``--original`` serves it), then the
    engine's time around its passes (``measure_step_overhead``, on the first point, within ``limits``:
    the engine's, default ``Limits()``). ``served`` (``{kind: ServedModel}``) reuses models already
    loaded, else they are loaded here."""
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
    costs = measure_engine_costs({name: executors[kind] for name, kind in points.items()}, parsed, rows, widths, vocab,
                                 repeats=repeats, seed=seed, on_step=on_step)
    first, kind = next(iter(points.items()))
    costs.step_overhead_ms = measure_step_overhead(executors[kind], served[kind].space, parsed[first], vocab,
                                                   limits or Limits(), context=served[kind].context, seed=seed)
    return costs
