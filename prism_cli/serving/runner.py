"""``prism schedule``: a workload through the real engine or the simulator, and the metrics of the run.

Throughput counts every request of the workload served to the end: requests/s is the number served
over the time from the first arrival to the last completion (as vLLM's serving benchmark reports it),
so a policy cannot gain by leaving expensive requests unserved when the run stops.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.engine import Engine, Limits
from prism_cli.serving.floors import FloorSpec, Ladder, PointSpace, floor_spec, parse_mix
from prism_cli.serving.policies import SCHEDULING_POLICIES
from prism_cli.serving.requests import Request, SamplingParams, check_context
from prism_cli.serving.workload import MAX_ARRIVAL, LengthSettings, RequestSpec, poisson_workload, read_trace

#: The most requests a Poisson workload may expect (rate x duration): each is held in memory and served, and
#: the workload is built before the first is (a million took minutes without a word, even simulated).
MAX_REQUESTS = 100_000


def check_load(rate: float, duration: float, flag: str = "--rate") -> None:
    """Refuse an arrival rate and duration that are not finite and positive, or that would expect more
    than ``MAX_REQUESTS`` requests."""
    if not (math.isfinite(rate) and rate > 0):
        raise PrismError(f"{flag} must be a finite positive number (requests per second), got {rate}")
    if not (math.isfinite(duration) and 0 < duration <= MAX_ARRIVAL):  # arrivals as late as a trace's may be
        raise PrismError(f"--duration must be a positive number of seconds, at most {MAX_ARRIVAL:g}, got {duration}")
    if rate * duration > MAX_REQUESTS:
        raise PrismError(f"{rate:g} requests/s for --duration {duration:g} s would be {rate * duration:.3g} requests; "
                         f"one run serves at most {MAX_REQUESTS:,}: give a shorter --duration or a lower rate")


@dataclass
class ScheduleSettings:
    policy: str = "prism"
    rate: float = 4.0
    duration: float = 60.0
    floors: str = "linear:2=0.5,linear:6=0.3,linear:8=0.2"
    sim: bool = False
    original: bool = False  # serve the export's source model (points original:1..k) instead
    point: str | None = None  # the static policy's point (default: the highest floor)
    trace: str | None = None
    data: str | None = None  # text the lengths come from (default the evaluation split)
    seed: int = 0
    device_memory: str | None = None  # offload the routed experts behind a device cache of this size (real engine)
    cache_policy: str | None = None
    limits: Limits = field(default_factory=Limits)
    lengths: LengthSettings = field(default_factory=LengthSettings)

    def validate(self) -> None:
        SCHEDULING_POLICIES.get(self.policy)
        if self.seed < 0:
            raise PrismError(f"--seed must be >= 0, got {self.seed}")
        if self.trace is None:
            check_load(self.rate, self.duration)
        if self.point is not None and self.policy != "static":
            raise PrismError(f"--point {self.point} is the static policy's point; the {self.policy} policy chooses its own: "
                             "give --policy static, or leave --point out")
        self.limits.validate()
        self.lengths.validate()
        if self.sim and self.device_memory is not None:
            raise PrismError("--device-memory runs the real engine with offloaded experts; the simulator's costs come "
                             "from the cost model: build it from `prism bench --device-memory ...` instead")
        self.offload()  # an unreadable budget or unknown cache policy fails before any work

    def offload(self) -> Any:
        """The ``OffloadConfig`` behind ``device_memory`` / ``cache_policy`` (None without a budget)."""
        from prism_cli.offload.config import offload_config

        return offload_config(self.device_memory, self.cache_policy)


def resolve_floor(spec: FloorSpec | None, space: PointSpace, ladder: Ladder, cost_model: CostModel | None) -> OperatingPoint:
    """The point of the served model that a floor asks for: the cheapest meeting it (for the original
    model, the cheapest ``original:k`` that meets the export's point); a perplexity ceiling goes to the
    cheapest point of the served model within it, through the bench table."""
    if spec is None:
        return space.full()
    if spec.ceiling is not None:
        if cost_model is None:
            raise PrismError(f"floor {spec} is a perplexity ceiling: it needs a cost model (prism schedule cost-model)")
        kind = "original" if space.gate is None else "elastic"
        ok = [space.parse(p.point) for p in cost_model.points.values()
              if p.kind == kind and p.perplexity is not None and p.perplexity <= spec.ceiling]
        if not ok:
            best = min((p for p in cost_model.points.values() if p.kind == kind and p.perplexity is not None),
                       key=lambda p: p.perplexity, default=None)
            ceiling, nearest = _distinct(spec.ceiling, best.perplexity) if best else (f"{spec.ceiling:g}", "")
            raise PrismError(f"no operating point reaches perplexity {ceiling}"
                             + (f"; the best is {best.point} at {nearest}" if best else ""))
        return ladder.order(ok)[0]
    assert spec.point is not None
    if space.gate is None and spec.point.policy != "original":
        candidates = [OperatingPoint("original", k) for k in range(1, space.top_k + 1)]
        return ladder.order(p for p in candidates if space.meets(p, spec.point))[0]
    return spec.point


def _distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest significant digits (at least 4) that tell them apart: a ceiling of 40.27
    and a best of 40.27008 printed both as 40.27."""
    for digits in range(4, 18):
        if f"{a:.{digits}g}" != f"{b:.{digits}g}" or a == b:
            return f"{a:.{digits}g}", f"{b:.{digits}g}"
    return repr(a), repr(b)


@dataclass
class ScheduleResult:
    settings: dict[str, Any]
    model: str
    mode: str  # "real" or "sim"
    metrics: dict[str, Any]
    requests: list[dict[str, Any]]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean())}


def summarize(requests: list[Request], engine: Engine) -> dict[str, Any]:
    done = [r for r in requests if r.finish_reason in ("length", "stop")]
    start = min(r.arrival for r in requests)
    end = max((r.finished_at for r in done), default=start)
    span = max(end - start, 1e-9)
    decode_ms = [s.ms for s in engine.stats.steps if s.kind == "decode"]
    decisions = engine.stats.decision_times
    step_ms = float(np.median(decode_ms)) if decode_ms else None
    decision_us = float(np.mean(decisions)) * 1e6 if decisions else 0.0
    points: dict[str, int] = {}
    for s in engine.stats.steps:
        for p in s.points:
            points[p] = points.get(p, 0) + (1 if s.kind == "decode" else 0)
    return {
        "requests": len(requests),
        "completed": len(done),
        "span_s": span,
        "requests_per_s": len(done) / span,
        "output_tokens_per_s": sum(len(r.output_ids) for r in done) / span,
        "ttft_s": _percentiles([r.first_token_at - r.arrival for r in done]),
        "tpot_s": _percentiles([(r.finished_at - r.first_token_at) / (len(r.output_ids) - 1) for r in done if len(r.output_ids) > 1]),
        "e2e_s": _percentiles([r.finished_at - r.arrival for r in done]),
        "floor_violations": sum(1 for r in requests if r.below_floor_steps),
        "rows_below_floor": engine.stats.violations,
        "decode_steps": len(decode_ms),
        "prefills": sum(1 for s in engine.stats.steps if s.kind == "prefill"),
        "mean_decode_batch": float(np.mean([s.rows for s in engine.stats.steps if s.kind == "decode"])) if decode_ms else 0.0,
        "decode_step_ms_median": step_ms,
        "scheduler_us_per_decision": decision_us,
        "scheduler_us_per_decision_p99": float(np.percentile(decisions, 99)) * 1e6 if decisions else 0.0,
        "scheduler_share_of_decode_step": (decision_us / 1e3) / step_ms if step_ms else None,
        "decode_rows_by_point": dict(sorted(points.items())),
    }


def run_settings(settings: ScheduleSettings) -> dict[str, Any]:
    """The settings a result records: a trace run's without the Poisson workload's, which the trace replaced."""
    flat = {**{k: v for k, v in asdict(settings).items() if k not in ("limits", "lengths")}, **asdict(settings.limits),
            **asdict(settings.lengths)}
    replaced = ("rate", "duration", "floors", "data", *asdict(settings.lengths)) if settings.trace is not None else ()
    return {k: v for k, v in flat.items() if k not in replaced}


def build_workload(settings: ScheduleSettings, tokenizer: Any, export_space: PointSpace) -> list[RequestSpec]:
    from prism_cli.data import load_text

    if settings.trace is not None:
        return read_trace(Path(settings.trace), tokenizer, lambda value: floor_spec(value, export_space))
    mix = parse_mix(settings.floors, export_space)
    text, _ = load_text(settings.data, "eval")
    return poisson_workload(text, tokenizer, settings.rate, settings.duration, mix, settings.seed, settings.lengths)


def run_schedule(
    directory: str, settings: ScheduleSettings, cost_model: CostModel | None,
    served: Any = None, on_progress: Callable[[int, int], None] | None = None,
) -> ScheduleResult:
    """One run. ``served`` (a ``ServedModel``) is loaded if not given (the real engine needs it)."""
    from prism_cli.runtime.elastic import read_export_meta
    from prism_cli.serving.executor import ModelExecutor, load_served_model
    from prism_cli.serving.simulate import SimExecutor

    settings.validate()
    meta = read_export_meta(directory)
    export_space = PointSpace.of_export(meta)
    space = PointSpace(None, export_space.n_sub, export_space.top_k) if settings.original else export_space
    plans_with_costs = settings.sim or SCHEDULING_POLICIES.get(settings.policy).plans_with_costs
    if plans_with_costs and cost_model is None:
        raise PrismError(f"{'--sim' if settings.sim else f'the {settings.policy} policy'} needs a cost model: build one with "
                         "`prism schedule cost-model` or pass --cost-model")
    if served is None and not settings.sim:
        served = load_served_model(directory, original=settings.original, offload=settings.offload())
    if served is not None:
        tokenizer, context = served.tokenizer, served.context
    else:
        from prism_cli.models.loading import load_tokenizer

        tokenizer = load_tokenizer(directory)  # refused as the real engine refuses a folder without one
        config = json.loads((Path(directory) / "config.json").read_text())
        context = int(config.get("max_position_embeddings") or 2048)
    ladder = Ladder(space, cost_model, settings.limits.max_batch)
    specs = build_workload(settings, tokenizer, export_space)

    def costed(point: OperatingPoint) -> OperatingPoint:
        if cost_model is not None and not cost_model.has(point) and plans_with_costs:
            raise PrismError(f"the cost model has no timing of {point}; bench it and rebuild the cost model")
        return point

    def admitted(s: RequestSpec) -> OperatingPoint:
        """The floor of one request once the model is known, its length checked; a trace line is named."""
        try:
            check_context(len(s.prompt_ids), s.max_tokens, context)
        except PrismError as exc:  # a trace's line, or the lengths the options drew
            raise PrismError(f"{s.origin}: {exc}" if s.origin else f"{exc}: lower --max-prompt, --min-output or --max-output") from None
        try:
            return costed(resolve_floor(s.floor, space, ladder, cost_model))
        except PrismError as exc:
            if not s.origin:
                raise
            raise PrismError(f"{s.origin}: {exc}") from None

    floors = [admitted(s) for s in specs]
    fixed = None
    if settings.policy == "static":
        try:
            fixed = costed(space.parse(settings.point) if settings.point else ladder.cheapest_meeting(floors))
        except PrismError as exc:
            raise PrismError(f"--point {settings.point}: {exc}" if settings.point else str(exc)) from None
    policy = SCHEDULING_POLICIES.get(settings.policy)(fixed) if fixed is not None else SCHEDULING_POLICIES.get(settings.policy)()
    requests = [Request(list(s.prompt_ids), SamplingParams(max_tokens=s.max_tokens, temperature=0.0, ignore_eos=True),
                        floor, s.arrival) for s, floor in zip(specs, floors, strict=True)]
    if settings.sim:
        from prism_cli.models.adapters import adapter_for_config
        from prism_cli.models.loading import load_config
        from prism_cli.runtime.elastic import export_linear_mode

        # Rows at different linear points compute whole blocks where the export routes by blocks.
        router_sorted = adapter_for_config(load_config(directory)).router_sorted
        blocks = not settings.original and export_linear_mode(meta, router_sorted) == "blocks"
        executor: Any = SimExecutor(cost_model, export_space.n_sub if blocks else None)
    else:
        executor = ModelExecutor(served, seed=settings.seed)
        _warm_up(served, executor)
        executor.reset_clock()
    engine = Engine(executor, policy, ladder, settings.limits, cost_model)
    engine.schedule(requests)
    total = len(requests)
    while engine.pending():
        engine.step()
        if on_progress is not None:
            on_progress(len(engine.finished), total)
    engine.finish()
    metrics = summarize(requests, engine)
    t = executor.times  # the simulator's: what it charged on its clock (the scheduler's time is real either way)
    metrics["engine_time_s"] = {"forward": t.forward_s, "kv_cache_copies": t.kv_s, "sampling": t.sample_s,
                                "scheduler": engine.stats.decision_s}
    check_finite(metrics)
    return ScheduleResult(
        settings=run_settings(settings),
        model="original" if settings.original else "export",
        mode="sim" if settings.sim else "real",
        metrics=metrics,
        requests=[{"arrival": r.arrival, "prompt_tokens": r.prompt_len, "output_tokens": len(r.output_ids),
                   "floor": str(r.floor), "served_at": sorted(r.served_at), "ttft": _sub(r.first_token_at, r.arrival),
                   "e2e": _sub(r.finished_at, r.arrival), "finish": r.finish_reason} for r in requests],
    )


def check_finite(metrics: dict[str, Any], where: str = "") -> None:
    """Refuse metrics holding NaN or an infinity, naming the first: JSON has no such numbers (a writer would put
    bare ``NaN`` in the file), and a time that overflowed means nothing. The cost model's bounds
    (``costmodel.MAX_MS``) keep a run from reaching one; this is the guard behind them."""
    for key, value in metrics.items():
        name = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            check_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise PrismError(f"the run's metric {name} is {value}: its times overflowed; check the cost model's times")


def _sub(a: float | None, b: float) -> float | None:
    return None if a is None else a - b


def _warm_up(served: Any, executor: Any) -> None:
    """One short generation at the full point, so the run does not time lazy initialisation."""
    import torch

    from prism_cli.runtime.elastic import set_operating_point

    set_operating_point(served.model, served.space.full())
    with torch.inference_mode():
        served.model(input_ids=torch.ones((2, 8), dtype=torch.long, device=executor.device))
