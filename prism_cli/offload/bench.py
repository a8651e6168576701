"""``prism offload-bench``: sub-expert offloading against whole-expert offloading at the same budget and quality.

Two modes share the cache, policy and link code:

* **live** (an export, no ``--shape``): the export runs with its sub-experts offloaded and its source
  model with its whole experts offloaded, in the same process and budget. Decode steps of batch 1 over
  the evaluation text (teacher-forced after a prefill of ``context`` tokens) are timed round-robin over
  every configuration, one token at a time in a seeded shuffled order, so a shared machine's drift hits
  all of them alike. On CUDA copies are real; otherwise compute is measured and every copy is charged
  at the stated link (``SimulatedLink`` on a ``StallClock``: the wall clock plus the simulated stalls,
  charged, not waited out). Quality: perplexity of every point on the calibration split (used to pair
  points) and on the evaluation split (reported).
* **replay** (``--shape NAME``): a real model's dimensions without its weights (``replay.py``); routing
  from a trace recorded from the export (or ``--trace FILE``), mapped to the shape (``--routing trace``)
  or a load-balanced routing calibrated on it (``--routing balanced``); compute from a compute model.

**Pairs** (the comparison at the same quality): for every elastic point ``P``, its *equal-compute*
baseline (``original:K/N`` when ``K`` is a multiple of ``N``) and its *quality-floor* baseline: the
cheapest ``original:k`` whose calibration perplexity is at most ``P``'s (live), or ``original:ceil(K/N)``
(replay, where quality is not measured: the floor that ``P`` meets and fewer whole experts would not,
the paper's premise). The gain splits in two steps through ``linear:N*k``, which routes exactly like
``original:k`` but caches sub-experts: baseline -> ``linear:N*k`` is the change from caching pieces
instead of whole experts (packing; on a CPU also the cost of computing pieces one by one),
``linear:N*k`` -> ``P`` the change from needing fewer, hotter bytes.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_cli.environment import environment
from prism_cli.errors import BudgetNotMet, PrismError, check_distinct
from prism_cli.evaluation.timing import median_ci
from prism_cli.offload.cache import CACHE_POLICIES
from prism_cli.offload.config import Budget, LinkSpec, OffloadConfig, format_size, parse_reserve
from prism_cli.operating_points import OperatingPoint, parse_operating_point
from prism_cli.report import ResultTable

ROUTINGS = ("trace", "balanced")


@dataclass
class OffloadBenchSettings:
    budgets: list[Budget]
    points: list[str]
    policies: list[str] = field(default_factory=lambda: ["lru"])
    pins: list[float] = field(default_factory=lambda: [0.0])
    link: LinkSpec = field(default_factory=LinkSpec)
    reserve: str = "5%"
    device: str = "cpu"
    dtype: str = "float32"
    context: int = 128
    warmup: int = 32
    tokens: int = 128
    quality_tokens: int = 8192
    seed: int = 0
    shape: str | None = None
    trace: str | None = None
    routing: str = "trace"
    compute: str = "gpu"
    trace_tokens: int = 4096
    replay_warmup: int = 512

    def validate(self) -> None:
        from prism_cli.offload.replay import COMPUTE_MODELS

        for option, values in (("--device-memory", self.budgets), ("--points", self.points), ("--policy", self.policies),
                               ("--pin", self.pins)):
            if not values:
                raise PrismError(f"{option} needs at least one value")
        # A value given twice would run every configuration of it twice and repeat its rows.
        first: dict[object, str] = {}  # 4GB and 4000MB are one budget: named as first given
        check_distinct([first.setdefault(_budget_key(b), b.text) for b in self.budgets], "--device-memory")
        check_distinct(self.points, "--points")
        check_distinct(self.policies, "--policy")
        check_distinct([f"{p:g}" for p in self.pins], "--pin")
        for policy in self.policies:
            CACHE_POLICIES.get(policy)
        if any(not 0 <= p < 1 for p in self.pins):
            raise PrismError(f"--pin takes fractions of the cache in [0, 1), got {self.pins}")
        if self.context < 1 or self.warmup < 0 or self.tokens < 2:
            raise PrismError("--context and --tokens must be positive (at least 2 timed tokens), --warmup not negative")
        if self.quality_tokens < 2:
            raise PrismError(f"--quality-tokens must be at least 2, got {self.quality_tokens}")
        if self.routing not in ROUTINGS:
            raise PrismError(f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        COMPUTE_MODELS.get(self.compute)
        if parse_reserve(self.reserve).fraction is None and self.shape is not None:
            raise PrismError("replays take --reserve as a share of the budget (e.g. 5%)")
        if self.shape is None and self.trace is not None:
            raise PrismError("--trace drives a replay: give --shape too")
        if self.shape is None and self.routing != "trace":
            raise PrismError("--routing balanced is for replays at a real shape (--shape)")
        if self.shape is not None:
            from prism_cli.offload.shapes import SHAPES

            if self.shape != "source":
                SHAPES.get(self.shape)
            if self.trace is not None and Path(self.trace).is_dir():
                raise PrismError(f"trace file {self.trace} is a folder, not an .npz routing trace")
            if self.trace is not None and not Path(self.trace).is_file():
                raise PrismError(f"trace file {self.trace} does not exist")
        if self.trace_tokens <= self.replay_warmup:
            raise PrismError(f"--trace-tokens ({self.trace_tokens}) must exceed the replay warm-up ({self.replay_warmup})")

    def check_positions(self, config: Any) -> None:
        """A live run feeds prefill, warm-up and timed tokens as one sequence: refuse more than the model's positions."""
        limit = getattr(config, "max_position_embeddings", None)
        need = self.context + self.warmup + self.tokens
        if self.shape is not None or not isinstance(limit, int) or need <= limit:
            return
        room = limit - self.warmup - self.tokens
        fix = f"use --context {room} or less" if room >= 1 else "lower --warmup and --tokens"
        raise PrismError(f"--context {self.context} + --warmup {self.warmup} + --tokens {self.tokens} = {need:,} tokens, "
                         f"longer than the model's {limit:,} positions (max_position_embeddings); {fix}")


def _budget_key(budget: Budget) -> object:
    return budget.nbytes if budget.nbytes is not None else ("share", budget.expert_fraction)


@dataclass(frozen=True)
class RunKey:
    budget: str
    policy: str
    pin: float
    point: str
    cache: str  # "sub-experts" or "whole experts"


@dataclass
class RunResult:
    key: RunKey
    latencies: list[float]
    hit_rate: float
    bytes_per_token: float
    stall_per_token: float
    bookkeeping_fraction: float
    prediction_precision: float
    prediction_recall: float
    slots: int
    budget_bytes: int
    device_bytes: int  # weights on the device (non-expert and cache slots) + KV cache, or measured peak on CUDA
    peak_measured: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    def spread(self) -> tuple[float, float]:
        return median_ci(self.latencies)


@dataclass
class Pair:
    kind: str  # "equal compute" or "quality floor"
    elastic: str
    baseline: str
    middle: str  # linear:N*k: the baseline's routing, cached as pieces


@dataclass
class OffloadReport:
    mode: str  # "live" or "replay"
    settings: OffloadBenchSettings
    runs: list[RunResult]
    pairs: list[Pair]
    quality: dict[str, dict[str, float]]  # point -> {"calibration": ppl, "eval": ppl}
    notes: list[str]
    environment: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self, budget: str, policy: str, pin: float, point: str) -> RunResult | None:
        for r in self.runs:
            if (r.key.budget, r.key.policy, r.key.pin, r.key.point) == (budget, policy, pin, point):
                return r
        return None


def run_offload_bench(target: str, settings: OffloadBenchSettings,
                      on_stage: Callable[[str, int], Callable[[float], None]] | None = None) -> OffloadReport:
    """Benchmark ``target`` (a prism export) as the module docstring says."""
    settings.validate()
    if settings.shape is not None:
        return _replay_bench(target, settings, on_stage)
    return _live_bench(target, settings, on_stage)


# ---- pairing ------------------------------------------------------------------------------------
def _asked_points(specs: list[str], gate: str | None, n_sub: int, top_k: int) -> list[OperatingPoint]:
    """The points to measure; layered points are refused in one line (pairs and replays take one K for every layer)."""
    points = [parse_operating_point(p, gate, n_sub, top_k) for p in specs]
    check_distinct([str(p) for p in points], "--points")  # topk:4 and topk:04
    layered = [str(p) for p in points if p.policy == "layered"]
    if layered:
        raise PrismError(f"offload-bench does not take layered points ({layered[0]}): it measures one K in every layer; "
                         "measure the linear points on either side")
    return points


def _elastic_points(points: list[OperatingPoint]) -> list[OperatingPoint]:
    return [p for p in points if p.policy != "original"]


def _pairs(points: list[OperatingPoint], n_sub: int, top_k: int,
           floor_baseline: Callable[[OperatingPoint], int | None]) -> list[Pair]:
    pairs = []
    for p in _elastic_points(points):
        k_equal = int(p.value) // n_sub if p.policy in ("linear", "topk", "pattern") and isinstance(p.value, int) \
            and int(p.value) % n_sub == 0 else None
        if k_equal is not None and 1 <= k_equal <= top_k:
            pairs.append(Pair("equal compute", str(p), f"original:{k_equal}", f"linear:{n_sub * k_equal}"))
        k_floor = floor_baseline(p)
        if k_floor is not None and k_floor != k_equal:
            pairs.append(Pair("quality floor", str(p), f"original:{k_floor}", f"linear:{n_sub * k_floor}"))
    return pairs


def _ceil_floor(n_sub: int, top_k: int) -> Callable[[OperatingPoint], int | None]:
    def rule(p: OperatingPoint) -> int | None:
        if p.policy not in ("linear", "topk") or not isinstance(p.value, int):
            return None
        k = math.ceil(int(p.value) / n_sub)
        return k if k <= top_k else None

    return rule


# ---- live ----------------------------------------------------------------------------------------
@dataclass
class _Live:
    key: RunKey
    model: Any
    op: OperatingPoint
    controller: Any
    cache: Any = None  # the KV cache
    latencies: list[float] = field(default_factory=list)
    kv_bytes: int = 0


def _live_bench(target: str, settings: OffloadBenchSettings,
                on_stage: Callable[[str, int], Callable[[float], None]] | None) -> OffloadReport:
    from prism_cli.data import split_text
    from prism_cli.data.windows import token_windows
    from prism_cli.evaluation.perplexity import perplexity
    from prism_cli.export.format import inexact_linear_gate
    from prism_cli.models.loading import load_config, load_model
    from prism_cli.offload.executor import absolute_budget, attach_offload, budget_sizes
    from prism_cli.runtime.elastic import attach_elastic_state, export_meta, load_elastic_model, set_operating_point
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    meta = export_meta(target)
    if meta is None:
        raise PrismError(f"{target} is not a prism export: offload-bench compares an export's sub-experts with its "
                         "source model's whole experts")
    settings.check_positions(load_config(target))
    elastic = load_elastic_model(target, dtype=settings.dtype, device="cpu")
    state = elastic.model.prism_state
    n_sub, top_k = state.n_sub, state.source_top_k
    asked = _asked_points(settings.points, state.gate, n_sub, top_k)
    try:
        source = load_model(meta["source"]["model"], dtype=settings.dtype, device="cpu",
                            experts_implementation=EXPERTS_IMPLEMENTATION)
    except PrismError as exc:
        raise PrismError(f"the export's source model is the baseline but could not be loaded: {exc}") from None
    attach_elastic_state(source.model, None)
    # Every budget resolved and checked for both models now, not after the quality stage.
    # A relative budget is solved for both models and the larger kept: 100% caches every sub-expert and
    # every whole expert, at the same bytes.
    budgets = [absolute_budget(source.model, b, settings.reserve, elastic.model) for b in settings.budgets]
    checked = []
    for budget in budgets:
        cfg = OffloadConfig(budget, reserve=settings.reserve, device=settings.device)
        for sizes in sorted((budget_sizes(m, cfg) for m in (source.model, elastic.model)), key=lambda s: -s.least_budget):
            sizes.check(cfg)  # the model that needs more first: its error names the budget both need
            checked.append(sizes)
    _check_kv_room(source.model, checked, settings)

    # Quality of every point that can appear (asked, baselines, the decomposition's linear points).
    originals = [OperatingPoint("original", k) for k in range(1, top_k + 1)]
    linear_full = [OperatingPoint("linear", n_sub * k) for k in range(1, top_k + 1)]
    candidates = list(dict.fromkeys([*asked, *originals, *linear_full]))
    quality: dict[str, dict[str, float]] = {str(p): {} for p in candidates}
    total = 2 * len(candidates) * settings.quality_tokens
    advance = on_stage("quality", total) if on_stage else None
    for split in ("calibration", "eval"):
        windows = token_windows(elastic.tokenizer, split_text(split), min(256, settings.quality_tokens), settings.quality_tokens)
        for p in candidates:
            model = source.model if p.policy == "original" else elastic.model
            set_operating_point(model, p)
            quality[str(p)][split] = perplexity(model, windows, batch_size=8).perplexity
            if advance:
                advance(settings.quality_tokens)

    def floor(p: OperatingPoint) -> int | None:
        ok = [k for k in range(1, top_k + 1) if quality[f"original:{k}"]["calibration"] <= quality[str(p)]["calibration"]]
        return min(ok) if ok else None

    pairs = _pairs(asked, n_sub, top_k, floor)
    wanted = list(dict.fromkeys([*map(str, asked), *(p.baseline for p in pairs), *(p.middle for p in pairs)]))

    # One controller per (budget, policy, pin, point), all on the two models (simulated device). A relative
    # budget is solved for both models and the larger kept (``absolute_budget``): both get the same bytes.
    runs: list[_Live] = []
    device = torch.device(settings.device)
    for budget in budgets:
        for policy in settings.policies:
            for pin in settings.pins:
                for name in wanted:
                    op = parse_operating_point(name, None if name.startswith("original") else state.gate, n_sub, top_k)
                    model = source.model if op.policy == "original" else elastic.model
                    # A simulated link's stalls advance the link's clock, which times the steps: a slow
                    # link costs simulated time, not real time (at 1 B/s a copy would take days).
                    cfg = OffloadConfig(budget, policy=policy, reserve=settings.reserve, pin=pin, link=settings.link,
                                        device=settings.device, stall_clock=True)
                    key = RunKey(str(budget), policy, pin, name, "whole experts" if op.policy == "original" else "sub-experts")
                    runs.append(_Live(key, model, op, None if device.type == "cuda" else attach_offload(model, cfg)))
                    if device.type == "cuda":
                        runs[-1].controller = cfg  # attached when its turn comes (one pool on the GPU at a time)
    ids = token_windows(elastic.tokenizer, split_text("eval"), settings.context + settings.warmup + settings.tokens + 1,
                        settings.context + settings.warmup + settings.tokens + 1)[0:1]
    steps = settings.warmup + settings.tokens
    progress = on_stage("decode", len(runs) * steps) if on_stage else None
    rng = random.Random(settings.seed)
    if device.type == "cuda":
        results = _time_sequential(runs, ids, settings, progress)
    else:
        results = _time_interleaved(runs, ids, settings, progress, rng)
    for run in runs:
        if device.type != "cuda":
            run.controller.deactivate()
    notes = [_link_note(settings), f"decode steps of batch 1 after a prefill of {settings.context} tokens of the evaluation "
             f"text, {settings.warmup} warm-up tokens, {settings.tokens} timed; quality: perplexity over "
             f"{settings.quality_tokens:,} tokens per split (calibration pairs the points, evaluation is reported)"]
    if caveat := inexact_linear_gate(meta):
        notes.append(f"{caveat}: linear:N*k routes only approximately like the baseline, so 'saved by pieces' is not "
                     "at the same routing")
    extra = {"source": meta["source"]["model"], "n_sub": n_sub, "top_k": top_k}
    return OffloadReport("live", settings, results, pairs, quality, notes, environment(device), extra)


def _run_step(run: _Live, token: torch.Tensor, sync: bool) -> float:
    from prism_cli.offload.replay import cache_keyword
    from prism_cli.runtime.elastic import set_operating_point

    if run.model.prism_state.point != run.op:
        set_operating_point(run.model, run.op)
    if sync:
        torch.cuda.synchronize()
    link = getattr(run.controller, "link", None)
    clock = link.clock.now if getattr(link, "simulated", False) else time.perf_counter  # wall time + stalls
    t0 = clock()
    out = run.model(input_ids=token, **{cache_keyword(run.model): run.cache}, use_cache=True)
    if sync:
        torch.cuda.synchronize()
    elapsed = clock() - t0
    run.cache = out.past_key_values
    return elapsed


def _prefill(run: _Live, ids: torch.Tensor, context: int) -> None:
    from prism_cli.runtime.elastic import set_operating_point

    set_operating_point(run.model, run.op)
    run.cache = run.model(input_ids=ids[:, :context], use_cache=True).past_key_values


def _check_kv_room(model: Any, sizes: list[Any], settings: OffloadBenchSettings) -> None:
    """Refuse, before the quality and timing stages, a budget whose room beside the cached pieces (the reserve
    and what whole pieces leave of the cache) cannot hold the KV cache the run fills: ``--context`` plus every
    decode step. That run ends over its budget (exit 3) whatever it measures. Models with sliding-window
    layers keep fewer positions than they were given: not estimated, the run's own measure decides."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "sliding_window", None) is not None or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return
    with torch.inference_mode():
        one = _kv_bytes(model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).past_key_values)
    positions = settings.context + settings.warmup + settings.tokens
    need = one * positions
    for size in sizes:
        room = size.budget_bytes - size.non_expert_bytes - size.slots * size.piece_bytes
        if need > room:
            raise PrismError(
                f"--device-memory {format_size(size.budget_bytes)} leaves {format_size(room)} beside the cached "
                f"{size.piece_name}s, less than the KV cache of {positions:,} positions (--context {settings.context} + "
                f"--warmup {settings.warmup} + --tokens {settings.tokens}: {format_size(need)}); give a larger --reserve "
                f"(at least {format_size(need)}) or fewer positions")


def _kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def _time_interleaved(runs: list[_Live], ids: torch.Tensor, settings: OffloadBenchSettings,
                      progress: Callable[[float], None] | None, rng: random.Random) -> list[RunResult]:
    for run in runs:
        run.controller.deactivate()
    for run in runs:
        run.controller.activate()
        _prefill(run, ids.to(settings.device), settings.context)
        run.controller.deactivate()
    order = list(range(len(runs)))
    for step in range(settings.warmup + settings.tokens):
        if step == settings.warmup:
            for run in runs:
                run.controller.cache.reset_stats()
                run.controller.link.reset_stats()
        pos = settings.context + step
        token = ids[:, pos : pos + 1].to(settings.device)
        rng.shuffle(order)
        for i in order:
            run = runs[i]
            run.controller.activate()
            elapsed = _run_step(run, token, sync=False)
            run.controller.deactivate()
            if step >= settings.warmup:
                run.latencies.append(elapsed)
            if progress:
                progress(1)
    out = []
    for run in runs:
        run.kv_bytes = _kv_bytes(run.cache)
        out.append(_live_result(run, run.controller, run.controller.device_bytes + run.kv_bytes, False))
    return out


@torch.inference_mode()
def _time_sequential(runs: list[_Live], ids: torch.Tensor, settings: OffloadBenchSettings,
                     progress: Callable[[float], None] | None) -> list[RunResult]:
    """CUDA: one configuration at a time (one slot pool on the device), its peak memory measured."""
    from prism_cli.offload.executor import attach_offload, detach_offload

    out = []
    for run in runs:
        cfg = run.controller
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        controller = attach_offload(run.model, cfg)
        run.controller = controller
        _prefill(run, ids.to(settings.device), settings.context)
        for step in range(settings.warmup + settings.tokens):
            if step == settings.warmup:
                controller.cache.reset_stats()
                controller.link.reset_stats()
            pos = settings.context + step
            elapsed = _run_step(run, ids[:, pos : pos + 1].to(settings.device), sync=True)
            if step >= settings.warmup:
                run.latencies.append(elapsed)
            if progress:
                progress(1)
        out.append(_live_result(run, controller, int(torch.cuda.max_memory_allocated(controller.device)), True))
        run.cache = None
        detach_offload(run.model, keep_placement=True)
    return out


def _live_result(run: _Live, controller: Any, device_bytes: int, measured: bool) -> RunResult:
    stats, link = controller.cache.stats, controller.link.stats
    n = len(run.latencies)
    return RunResult(
        run.key, run.latencies, stats.hit_rate, link.bytes / n, link.stall_s / n,
        stats.bookkeeping_s / sum(run.latencies), stats.prediction_precision, stats.prediction_recall,
        controller.capacity, controller.budget_bytes, device_bytes, measured)


def _link_note(settings: OffloadBenchSettings) -> str:
    if settings.device.startswith("cuda"):
        return "copies measured on CUDA (pinned host memory, side stream)"
    return f"simulated link: {settings.link}; compute measured on this machine, copies charged at the link"


# ---- replay --------------------------------------------------------------------------------------
def _replay_bench(target: str, settings: OffloadBenchSettings,
                  on_stage: Callable[[str, int], Callable[[float], None]] | None) -> OffloadReport:
    from prism_cli.offload.replay import COMPUTE_MODELS, ReplayGeometry, replay, shape_from_model
    from prism_cli.offload.shapes import SHAPES
    from prism_cli.offload.trace import TraceMapping, balanced_trace

    trace, trace_note = _trace_for(target, settings, on_stage)
    if settings.shape == "source":
        from prism_cli.models.loading import load_config

        shape = shape_from_model(f"{trace.meta.get('source') or target} (source shape)", load_config(target))
    else:
        shape = SHAPES.get(settings.shape)
    n_sub = trace.n_sub
    if settings.routing == "balanced":
        trace = balanced_trace(trace, shape.num_experts, shape.top_k, shape.moe_layers, settings.trace_tokens,
                               settings.seed)
        syn = trace.meta["synthetic"]
        trace_note += (f"; routing: load-balanced synthetic model calibrated on it (every expert equally popular, "
                       f"consecutive-token reuse {syn['reuse']:.2f}, prediction hit rate {syn['prediction_hit']:.2f})")
    else:
        trace_note += "; routing: the recorded routing mapped to the shape (trace.py)"
    mapping = TraceMapping(trace, shape.num_experts, shape.top_k, shape.moe_layers, settings.seed)
    asked = _asked_points(settings.points, "neurons", n_sub, shape.top_k)
    pairs = _pairs(asked, n_sub, shape.top_k, _ceil_floor(n_sub, shape.top_k))
    wanted = list(dict.fromkeys([*map(str, asked), *(p.baseline for p in pairs), *(p.middle for p in pairs)]))
    compute = COMPUTE_MODELS.get(settings.compute)(shape)
    geometry = ReplayGeometry(shape, n_sub)
    reserve_fraction = parse_reserve(settings.reserve).fraction or 0.0
    runs = []
    total = len(settings.budgets) * len(settings.policies) * len(settings.pins) * len(wanted)
    advance = on_stage("replay", total) if on_stage else None
    for budget in settings.budgets:
        for policy in settings.policies:
            for pin in settings.pins:
                for name in wanted:
                    op = parse_operating_point(name, None if name.startswith("original") else "neurons", n_sub, shape.top_k)
                    whole = op.policy == "original"
                    res = replay(mapping, geometry, compute, settings.link, budget, policy, op, whole, pin,
                                 reserve_fraction, settings.replay_warmup, settings.trace_tokens - settings.replay_warmup)
                    key = RunKey(str(budget), policy, pin, name, "whole experts" if whole else "sub-experts")
                    runs.append(RunResult(key, res.latencies, res.hit_rate, res.bytes_per_token, res.stall_per_token,
                                          res.bookkeeping_fraction, res.prediction_precision, res.prediction_recall,
                                          res.slots, res.budget_bytes, res.device_bytes))
                    if advance:
                        advance(1)
    notes = [f"simulated link: {settings.link}", f"{compute.describe()}", trace_note,
             f"replay at {shape.name} shapes ({shape.moe_layers} MoE layers, {shape.num_experts} experts, top-{shape.top_k}, "
             f"N = {n_sub}, bf16), {settings.replay_warmup} warm-up tokens, "
             f"{settings.trace_tokens - settings.replay_warmup} timed; quality not measured (quality-floor pairs assume "
             "the paper's premise that K sub-experts meet a floor that ceil(K/N) - 1 whole experts miss)"]
    extra = {"shape": shape.describe(), "compute": compute.describe(), "trace": trace.meta,
             "device_memory_note": "device bytes = non-expert weights + cache slots (the reserve holds the KV cache)"}
    return OffloadReport("replay", settings, runs, pairs, {}, notes, environment(), extra)


def _trace_for(target: str, settings: OffloadBenchSettings,
               on_stage: Callable[[str, int], Callable[[float], None]] | None) -> tuple[Any, str]:
    from prism_cli.offload.trace import RoutingTrace, record_trace

    if settings.trace is not None:
        trace = RoutingTrace.load(settings.trace)
        return trace, f"trace file {settings.trace} ({trace.tokens} tokens of {trace.meta.get('source')})"
    from prism_cli.data import split_text
    from prism_cli.data.windows import token_windows
    from prism_cli.runtime.elastic import load_elastic_model

    loaded = load_elastic_model(target, dtype="float32", device="cpu")
    windows = token_windows(loaded.tokenizer, split_text("eval"), 256, 256 * math.ceil(settings.trace_tokens / 256))
    if windows.numel() < settings.trace_tokens:
        raise PrismError(f"the evaluation text gives {windows.numel()} tokens, fewer than --trace-tokens {settings.trace_tokens}")
    advance = on_stage("trace", windows.numel()) if on_stage else None
    trace = record_trace(loaded.model, windows, text="builtin:eval", on_batch=advance)
    return trace, f"routing recorded from {target} on {trace.tokens} tokens of the evaluation text"


# ---- tables ----------------------------------------------------------------------------------------
def _ms(seconds: float) -> float:
    return seconds * 1e3


def runs_table(report: OffloadReport) -> ResultTable:
    cols = ["device memory", "policy", "pin", "point", "cache", "slots", "ms/token median", "ms/token 95% CI",
            "ms/token p10-p90", "hit rate", "MB moved/token", "stall ms/token", "bookkeeping %", "prefetch precision",
            "prefetch recall", "device memory used", "within budget", "ppl calibration", "ppl eval"]
    table = ResultTable(f"offloaded decode ({report.mode}): per-token latency, batch 1", cols, notes=list(report.notes))
    for r in report.runs:
        lo, hi = r.spread()
        xs = np.asarray(r.latencies)
        q = report.quality.get(r.key.point, {})
        table.add(r.key.budget, r.key.policy, f"{r.key.pin:.0%}", r.key.point, r.key.cache, r.slots, _ms(r.median),
                  f"{_ms(lo):.3g}-{_ms(hi):.3g}", f"{_ms(np.percentile(xs, 10)):.3g}-{_ms(np.percentile(xs, 90)):.3g}",
                  r.hit_rate, r.bytes_per_token / 1e6, _ms(r.stall_per_token), 100 * r.bookkeeping_fraction,
                  _nan(r.prediction_precision), _nan(r.prediction_recall),
                  f"{format_size(r.device_bytes)} of {format_size(r.budget_bytes)}" + (" (peak)" if r.peak_measured else ""),
                  r.device_bytes <= r.budget_bytes, q.get("calibration"), q.get("eval"))
    return table


def _nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def paired_gain(elastic: RunResult, baseline: RunResult) -> tuple[float, float, float]:
    """1 - median per-token latency ratio (tokens are paired: same text position, timed together), with
    its 95 % interval; replays pair the same way (their clock is simulated, but it also charges the cache's
    bookkeeping as measured, so two replays of one trace differ by that much)."""
    ratios = [a / b for a, b in zip(elastic.latencies, baseline.latencies, strict=True)]
    lo, hi = median_ci(ratios)
    return 1 - statistics.median(ratios), 1 - hi, 1 - lo


def pairs_table(report: OffloadReport) -> ResultTable:
    cols = ["device memory", "policy", "pin", "pair", "elastic", "baseline", "ppl eval elastic", "ppl eval baseline",
            "ms/token elastic", "ms/token baseline", "gain", "gain 95% CI", "MB/token elastic", "MB/token baseline",
            "hit rate elastic", "hit rate baseline", "saved by pieces (same routing)", "saved by fewer bytes", "meets 15%"]
    table = ResultTable("sub-experts against whole experts at the same budget and quality", cols,
                        notes=[*report.notes,
                               "gain = 1 - median over tokens of (elastic / baseline latency), paired by token; split "
                               "through linear:N*k (the baseline's routing, cached as sub-experts): 'saved by pieces' = "
                               "baseline -> linear:N*k (packing, and the cost of more, smaller copies and computations), "
                               "'saved by fewer bytes' = linear:N*k -> elastic (median ms per token; in brackets the "
                               "share of the whole saving, when that is at least 2 % of the baseline)"])
    budgets = dict.fromkeys(r.key.budget for r in report.runs)
    combos = dict.fromkeys((r.key.policy, r.key.pin) for r in report.runs)
    for budget in budgets:
        for policy, pin in combos:
            for pair in report.pairs:
                e = report.run(budget, policy, pin, pair.elastic)
                b = report.run(budget, policy, pin, pair.baseline)
                m = report.run(budget, policy, pin, pair.middle)
                if e is None or b is None:
                    continue
                gain, lo, hi = paired_gain(e, b)
                pieces = _step(b.median, m.median if m else None, b.median - e.median, b.median)
                fewer = _step(m.median if m else None, e.median, b.median - e.median, b.median)
                qe, qb = report.quality.get(pair.elastic, {}), report.quality.get(pair.baseline, {})
                table.add(budget, policy, f"{pin:.0%}", pair.kind, pair.elastic, pair.baseline, qe.get("eval"), qb.get("eval"),
                          _ms(e.median), _ms(b.median), f"{100 * gain:.1f}%", f"{100 * lo:.1f}% .. {100 * hi:.1f}%",
                          e.bytes_per_token / 1e6, b.bytes_per_token / 1e6, e.hit_rate, b.hit_rate, pieces, fewer,
                          gain >= 0.15)
    return table


def _step(before: float | None, after: float | None, total: float, baseline: float) -> str | None:
    """A step of the decomposition: milliseconds saved, and its share of the whole saving when that is
    at least 2 % of the baseline (a share of a difference within the noise means nothing)."""
    if before is None or after is None:
        return None
    saved = before - after
    share = f" ({100 * saved / total:.0f}%)" if abs(total) >= 0.02 * baseline else ""
    return f"{_ms(saved):+.3g} ms{share}"


def report_json(report: OffloadReport) -> dict[str, Any]:
    settings = asdict(report.settings)
    settings["budgets"] = [str(b) for b in report.settings.budgets]
    settings["link"] = str(report.settings.link)
    return {"mode": report.mode, "settings": settings, "quality": report.quality,
            "pairs": [asdict(p) for p in report.pairs],
            "runs": [{**asdict(r.key), "median_ms": _ms(r.median), "latencies_ms": [round(_ms(x), 4) for x in r.latencies],
                      "hit_rate": _nan(r.hit_rate), "bytes_per_token": r.bytes_per_token,
                      "stall_ms_per_token": _ms(r.stall_per_token), "bookkeeping_fraction": r.bookkeeping_fraction,
                      "prediction_precision": _nan(r.prediction_precision), "prediction_recall": _nan(r.prediction_recall),
                      "slots": r.slots, "budget_bytes": r.budget_bytes, "device_bytes": r.device_bytes,
                      "device_bytes_measured": r.peak_measured} for r in report.runs],
            "environment": report.environment, **report.extra}


def over_budget(report: OffloadReport) -> list[str]:
    return [f"{r.key.point} at {r.key.budget} ({r.key.policy}): {format_size(r.device_bytes)} > {format_size(r.budget_bytes)}"
            for r in report.runs if r.device_bytes > r.budget_bytes]


def check_budgets(report: OffloadReport) -> None:
    failures = over_budget(report)
    if failures:
        raise BudgetNotMet("device memory over the budget: " + "; ".join(failures))
