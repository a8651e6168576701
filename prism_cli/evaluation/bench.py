"""``prism bench``: quality, latency and memory of every operating point, one honest frontier, a budget pick.

The sweep covers the export's operating points and, as the baseline in the same run, its source model
at top-1..top-k (only the latter for a plain MoE model). The original is timed with every experts
implementation it has here -- transformers' default for the device and prism's -- and the faster one
counts, as a user would run it. Steps:

1. ``_load``: the export (prism's runtime) and its source model;
2. ``_runners``: one runner per (point, implementation);
3. ``_quality``: one pass over the held-out data, every point against the source model at its full top-k
   (``quality.evaluate_points``);
4. ``_latency``: per batch size, points timed round-robin (one step of each per round; where the
   round moves to the other model, one untimed step of it first) until every
   median is known within ``precision`` (95 % interval, order statistics) or ``max_repeats``; the
   experts executor that ran is counted at dispatch for every step;
5. ``_assemble``: one frontier over elastic and original points and the distinct stable count
   (``pareto.py``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prism_cli.allocator import ALLOCATOR_MODES, configure_cpu_allocator
from prism_cli.data.windows import check_window_tokens, token_windows
from prism_cli.environment import environment
from prism_cli.errors import PrismError
from prism_cli.evaluation.pareto import COUNT_RULE, CostQuality, distinct_stable, pareto_front, usable
from prism_cli.evaluation.quality import ActiveCounter, PointQuality, evaluate_points
from prism_cli.evaluation.timing import (
    Latency,
    StepTimer,
    available_memory,
    cache_bytes_per_sequence,
    largest_fitting_batch,
    step_memory_floor,
)
from prism_cli.export.format import inexact_linear_gate
from prism_cli.models.loading import LoadedModel, load_model
from prism_cli.operating_points import OperatingPoint, parse_operating_point
from prism_cli.profiling.budget import format_size
from prism_cli.runtime.elastic import ElasticState, attach_elastic_state, export_meta, load_elastic_model, set_operating_point
from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION, reset_dispatch_counts

IMPLEMENTATIONS = (EXPERTS_IMPLEMENTATION, "grouped_mm", "eager")
#: What a device can run the model in; the first is the default (the dtype prism's kernels take on CUDA).
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float16", "float32")}


def parse_budget(text: str) -> float:
    """A latency budget in milliseconds: ``50ms``, ``0.05s``, ``50`` (ms) or ``500us``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|us|µs)?\s*", str(text))
    if not m:
        raise PrismError(f"cannot read the budget {text!r}: give a time like 50ms, 0.05s or 50 (milliseconds)")
    value = float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}[m.group(2)]
    if not 0 < value < math.inf:
        raise PrismError(f"the budget must be a positive, finite time, got {text!r}")
    return value


#: Untimed steps of a point right before each of its timed steps in the round-robin. A step runs slower
#: for a while after steps of another point: on the built-in model (Intel Xeon, 2 threads; ``make
#: bench-settle``, results/bench_settle.md) a decode step after the other model ran takes up to 1.3x its
#: steady time and is within 1-2 % of it from about the tenth step, at every batch; one after another point
#: of the same export that reads other weights (``linear:2`` reads part of each expert and another layout
#: of ``down_proj`` than ``linear:4``) up to 1.09x; a prefill step, which reads every weight many times,
#: settles after one. Timed without it, a point paid for whatever ran before it: the original, timed after
#: steps of itself, against export points timed after other points (decode ``linear:4`` / ``original:1``
#: 1.13 at batch 8, 1.06 with six steps of each point, 1.03-1.05 with ten).
SETTLE_STEPS = {"decode": 10, "prefill": 1}


@dataclass
class BenchSettings:
    device: str = "cpu"
    dtype: str | None = None  # None: the device's default (DEVICE_DTYPES)
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_len: int = 256
    mode: str = "decode"
    tokens: int = 32_768
    quality_seq_len: int = 256
    quality_batch: int = 8
    repeats: int = 20  # timed steps per point and batch, at least
    max_repeats: int = 60  # ... and at most, while a median is known less precisely than `precision`
    precision: float = 0.02
    warmup: int = 3
    #: Untimed steps of a point right before each of its timed steps (None: ``SETTLE_STEPS`` of the mode).
    settle: int | None = None
    points: list[str] | None = None
    experts_impl: str = EXPERTS_IMPLEMENTATION
    seed: int = 0
    quality_only: bool = False
    #: A ``prism_cli.offload.OffloadConfig``: the export and its source model both run with their experts
    #: offloaded (sub-experts and whole experts) in the same budget.
    offload: Any = None
    #: The process's allocator for CPU steps (``prism_cli.allocator``); the original runs under the same one.
    cpu_allocator: str = "reuse"

    def validate(self) -> None:
        if self.quality_only:
            self.batches = []
        elif not self.batches or any(b < 1 or b > 1_000_000 for b in self.batches):
            raise PrismError(f"--batch sizes must be between 1 and 1000000, got {self.batches}")
        elif len(set(self.batches)) < len(self.batches):  # each batch size is a column of the tables
            repeated = sorted({b for b in self.batches if self.batches.count(b) > 1})
            raise PrismError(f"--batch repeats {', '.join(map(str, repeated))}; give each batch size once, "
                             f"e.g. {','.join(map(str, dict.fromkeys(self.batches)))}")
        if not 1 <= self.seq_len <= 1_048_576:
            raise PrismError(f"--seq-len must be between 1 and 1048576, got {self.seq_len}")
        if self.mode not in ("decode", "prefill"):
            raise PrismError(f"--mode must be decode or prefill, got {self.mode!r}")
        for option, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0)):
            if value < least:
                raise PrismError(f"{option} must be at least {least}, got {value}")
        try:  # the quality windows have a length of their own: --seq-len is the timing's context
            check_window_tokens(self.tokens, self.quality_seq_len, seq_len_option=None, kind="quality window")
        except ValueError as exc:
            raise PrismError(str(exc)) from None
        if self.settle is None:
            self.settle = SETTLE_STEPS[self.mode]
        elif not 0 <= self.settle <= 1000:
            raise PrismError(f"--settle must be between 0 and 1000 steps, got {self.settle}")
        if self.max_repeats < self.repeats:
            raise PrismError(f"--max-repeats ({self.max_repeats}) must be at least --repeats ({self.repeats})")
        if not 0 < self.precision < 1:
            raise PrismError(f"--precision must be a fraction in (0, 1), e.g. 0.02, got {self.precision}")
        if self.experts_impl not in IMPLEMENTATIONS:
            raise PrismError(f"--experts-impl must be one of {', '.join(IMPLEMENTATIONS)}, got {self.experts_impl!r}")
        if self.offload is not None and self.experts_impl != EXPERTS_IMPLEMENTATION:
            raise PrismError(f"--device-memory runs the experts through prism's offloading: use --experts-impl {EXPERTS_IMPLEMENTATION}")
        if self.cpu_allocator not in ALLOCATOR_MODES:
            raise PrismError(f"--cpu-allocator must be one of {', '.join(ALLOCATOR_MODES)}, got {self.cpu_allocator!r}")
        kind = torch.device(self.device).type
        allowed = DEVICE_DTYPES.get(kind, ("float32",))
        self.dtype = self.dtype or allowed[0]
        if self.dtype not in allowed:
            known = {d for dtypes in DEVICE_DTYPES.values() for d in dtypes}
            what = "does not run on " + kind + " here" if self.dtype in known else "is not a dtype prism runs"
            raise PrismError(f"--dtype {self.dtype} {what}; use one of: {', '.join(allowed)}")


@dataclass
class PointResult:
    point: str
    kind: str  # "elastic" or "original"
    quality: PointQuality
    latency: dict[int, Latency]
    active_params: float
    flops_per_token: float
    #: The experts implementation behind ``latency`` per batch, as counted at dispatch ("prism:grouped", "grouped_mm").
    implementation: dict[int, str] = field(default_factory=dict)
    #: Every implementation timed for this point (the original runs several; the fastest is ``latency``).
    alternatives: dict[int, dict[str, Latency]] = field(default_factory=dict)


@dataclass
class BatchCount:
    """The one frontier of a batch size and its distinct stable points (``pareto.py``)."""

    frontier: list[str]  # usable, steady and Pareto-optimal, fastest first
    counted: list[str]  # the distinct stable points among them
    original_alone: list[str]  # the same rule over the original's points only

    @property
    def elastic(self) -> int:
        return sum(1 for name in self.counted if not name.startswith("original:"))

    @property
    def ratio(self) -> float | None:
        return len(self.counted) / len(self.original_alone) if self.original_alone else None


@dataclass
class BenchReport:
    n_sub: int
    target: str
    source: str | None
    note: str | None
    settings: BenchSettings
    full_perplexity: float
    points: list[PointResult]
    counts: dict[int, BatchCount]
    environment: dict[str, Any]
    linear_exact: bool = True  # the export's linear:N*k' routes exactly as original:k' (the export proved it)

    def point(self, name: str) -> PointResult | None:
        return next((p for p in self.points if p.point == name), None)


@dataclass
class _Runner:
    """One (operating point, experts implementation) to measure."""

    name: str
    kind: str
    model: Any
    state: ElasticState
    op: OperatingPoint
    implementation: str

    def prepare(self) -> Any:
        if self.model.config._experts_implementation != self.implementation:
            self.model.set_experts_implementation(self.implementation)
        if self.state.point != self.op:
            set_operating_point(self.model, self.op)
        return self.model


@dataclass
class _Models:
    elastic: LoadedModel | None
    source: LoadedModel
    source_state: ElasticState
    source_name: str
    meta: dict[str, Any] | None
    default_impl: str  # transformers' own choice for the source model on this device
    note: str | None = None

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


def active_parameters(model: Any, state: ElasticState, policy: str, active: float, unit: float) -> float:
    """Parameters a token touches: everything but the routed experts and the embedding table, plus
    ``active`` sub-expert units of ``unit`` parameters per MoE layer, plus the gate-neuron rows read
    by the training-free gate (``k * N * s`` rows of W_gate and W_up per layer)."""
    dense = sum(p.numel() for name, p in model.named_parameters()
                if ".experts." not in name and not name.endswith("embed_tokens.weight"))
    per_layer = active * unit
    if policy in ("topk", "pattern", "threshold"):
        router = state.gate_routers[0]
        per_layer += state.source_top_k * (router.gate_w.numel() + router.up_w.numel()) / state.source_experts
    return float(dense + per_layer * len(state.layers))


def run_bench(
    target: str,
    text: str,
    settings: BenchSettings,
    on_stage: Callable[[str, int], Callable[[float], None]] | None = None,
    quality: dict[str, PointQuality] | None = None,
) -> BenchReport:
    """Benchmark ``target`` (an export or a plain MoE model); ``on_stage(name, total)`` gives a progress callback.

    ``quality`` (the points' quality from an earlier report of the same export and data) skips the
    quality pass: repeated timing runs need it only once.
    """
    settings.validate()
    if settings.points and not (Path(target).is_dir() and export_meta(target) is not None):
        raise PrismError(f"--points chooses among an export's operating points; {target} is a plain MoE model, "
                         "whose original top-1..top-k are all benchmarked: leave --points out")
    if torch.device(settings.device).type == "cpu":
        configure_cpu_allocator(settings.cpu_allocator)
    models = _load(target, settings)
    runners = _runners(models, settings)
    _check_batches_fit(models.source.model, len({id(r.model) for r in runners}), settings)
    if quality is None:
        quality = _quality(models, runners, text, settings, on_stage)
    top_k = models.source_state.source_top_k
    full_ppl = quality[f"original:{top_k}"].perplexity
    timed: dict[int, dict[int, tuple[Latency, str]]] = {}
    for batch in settings.batches:
        timed[batch] = _latency(runners, batch, settings, models.source.model.config.vocab_size,
                                on_stage(f"latency b={batch}", len(runners)) if on_stage else None)
    points = _assemble_points(models, runners, quality, timed, settings)
    counts = {b: count_points(points, b, full_ppl) for b in settings.batches}
    n_sub = int(models.meta["sub_experts"]) if models.meta else 1
    return BenchReport(n_sub, target, models.source_name if models.meta else None, models.note, settings, full_ppl,
                       points, counts, environment(torch.device(settings.device)),
                       inexact_linear_gate(models.meta) is None)


def _check_batches_fit(model: Any, models: int, settings: BenchSettings) -> None:
    """Refuse at once a batch whose step cannot fit whatever the model does (``step_memory_floor``);
    one that fails later, at its first step, is refused then with the largest batch that fits."""
    device = next(model.parameters()).device
    free = available_memory(device)
    element = next(model.parameters()).element_size()
    cache = (cache_bytes_per_sequence(model, settings.seq_len, model.config.vocab_size)
             if settings.mode == "decode" else 0)
    for batch in settings.batches:
        # Each model timed (the source and the export's) keeps its own cache through the timing.
        need = step_memory_floor(model.config, batch, settings.seq_len, element) + batch * cache * models
        if need > free:
            what = "one hidden state and the KV cache" if cache else "one hidden state"
            raise PrismError(f"batch {batch} x seq-len {settings.seq_len} ({settings.mode}) does not fit in memory on "
                             f"{device}: it needs at least {format_size(need)} ({what}) and {format_size(free)} is "
                             "available; use a smaller --batch or --seq-len")


def _load(target: str, settings: BenchSettings) -> _Models:
    meta = export_meta(target) if Path(target).is_dir() else None
    elastic = None
    # An offloaded model is loaded in host memory and placed by the offloading (experts stay on the host).
    kw = {"device": "cpu" if settings.offload is not None else settings.device, "dtype": settings.dtype}
    if meta is not None:
        elastic = load_elastic_model(target, **kw)
        elastic.model.set_experts_implementation(settings.experts_impl)
        source_name = meta["source"]["model"]
        try:
            source = load_model(source_name, **kw)
        except PrismError as exc:
            raise PrismError(f"the export's source model is needed as the baseline but could not be loaded: {exc}") from None
    else:
        source_name = target
        source = load_model(target, **kw)
    default_impl = source.model.config._experts_implementation
    source.model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    models = _Models(elastic, source, attach_elastic_state(source.model, None), source_name, meta, default_impl)
    if meta is None:
        models.note = (f"{target} is a plain MoE model, not a prism export: "
                       f"only its original top-1..top-{models.source_state.source_top_k} range is benchmarked")
    elif caveat := inexact_linear_gate(meta):
        models.add_note(f"{caveat}: linear points route only approximately like the original")
    if settings.offload is not None:
        from dataclasses import replace

        from prism_cli.offload.executor import absolute_budget, attach_offload  # a later stage, only when asked for

        # A relative budget (45%) is resolved for both models and the larger kept: the same bytes for both,
        # each caching at least that share of its experts (the export's routers are wider than the source's).
        others = [elastic.model] if elastic is not None else []
        offload = replace(settings.offload, device_memory=absolute_budget(source.model, settings.offload.budget,
                                                                          settings.offload.reserve, *others))
        for loaded in (elastic, source):
            if loaded is not None:
                attach_offload(loaded.model, offload)
        # Transformers' own implementations would read the experts where they are: only prism's offloads.
        models.default_impl = EXPERTS_IMPLEMENTATION
        models.add_note(f"experts offloaded: {settings.offload.describe()}")
    return models


def _runners(models: _Models, settings: BenchSettings) -> list[_Runner]:
    runners: list[_Runner] = []
    if models.elastic is not None:
        state: ElasticState = models.elastic.model.prism_state
        skipped: list[str] = []
        for spec in settings.points or [str(p) for p in state.points()]:
            op = parse_operating_point(spec, state.gate, state.n_sub, state.source_top_k)
            if any(r.name == str(op) for r in runners):
                continue  # "8" and "topk:8" are one point: measure it once
            if op.policy == "threshold" and settings.experts_impl != EXPERTS_IMPLEMENTATION:
                # Variable compute needs sentinel slots, which only prism's implementation takes. A point
                # the user listed is refused rather than silently left out of the report.
                if settings.points:
                    raise PrismError(f"operating point {op} needs --experts-impl {EXPERTS_IMPLEMENTATION}: threshold "
                                     "points leave unused (sentinel) slots, which only prism's implementation takes")
                skipped.append(str(op))
                continue
            runners.append(_Runner(str(op), "elastic", models.elastic.model, state, op, settings.experts_impl))
        if skipped:
            models.add_note(f"threshold points ({', '.join(skipped)}) need --experts-impl {EXPERTS_IMPLEMENTATION} and were skipped")
    # The original as a user runs it: with transformers' default and with prism's experts (the faster counts).
    impls = list(dict.fromkeys([settings.experts_impl, models.default_impl]))
    for k in range(1, models.source_state.source_top_k + 1):
        op = parse_operating_point(f"original:{k}", None, 1, models.source_state.source_top_k)
        runners += [_Runner(str(op), "original", models.source.model, models.source_state, op, impl) for impl in impls]
    return runners


def _quality(models: _Models, runners: list[_Runner], text: str, settings: BenchSettings,
             on_stage: Callable[[str, int], Callable[[float], None]] | None) -> dict[str, PointQuality]:
    """Every point once (its first runner), against the source model at its full top-k."""
    first = {r.name: r for r in reversed(runners)}
    ordered = [first[name] for name in dict.fromkeys(r.name for r in runners)]
    counter = ActiveCounter()
    n_sub = int(models.meta["sub_experts"]) if models.meta else 1
    handles = _hook_routers(counter, models.elastic, models.source_state, n_sub)
    try:
        try:
            windows = token_windows(models.source.tokenizer, text, settings.quality_seq_len, settings.tokens,
                                    seq_len_option=None, kind="quality window")  # --seq-len is the timing's context
        except ValueError as exc:
            raise PrismError(str(exc)) from None
        top_k = models.source_state.source_top_k
        reference = _Runner(f"original:{top_k}", "original", models.source.model, models.source_state,
                            parse_operating_point(f"original:{top_k}", None, 1, top_k), EXPERTS_IMPLEMENTATION)
        progress = on_stage("quality", windows.numel()) if on_stage else None
        return evaluate_points(_Pinned(reference), [(r.name, r.prepare, counter) for r in ordered],
                               windows, settings.quality_batch, on_batch=progress)
    finally:
        for h in handles:
            h.remove()


def _latency(runners: list[_Runner], batch: int, settings: BenchSettings, vocab: int,
             progress: Callable[[float], None] | None) -> dict[int, tuple[Latency, str]]:
    """Time every runner at ``batch``: ``{runner index: (latency, implementation that ran)}``.

    Each timed step of a runner follows ``settings.settle`` untimed steps of the same runner
    (``SETTLE_STEPS``), so that every point is timed at its steady speed, what a server running it gets,
    whatever ran before it in the round."""
    timers: dict[int, StepTimer] = {}
    samples: list[list[tuple[float, float | None, float]]] = [[] for _ in runners]
    executors: list[Counter[str]] = [Counter() for _ in runners]
    try:
        for runner in runners:  # build each model's context once, warm every point
            model = runner.prepare()
            if id(model) not in timers:
                timers[id(model)] = StepTimer(model, batch, settings.seq_len, settings.mode, vocab, settings.seed,
                                              [layer.block for layer in runner.state.layers])
            for _ in range(settings.warmup):
                timers[id(model)].sample()
        rounds, last = 0, None
        while rounds < settings.max_repeats:
            for i, runner in enumerate(runners):  # round-robin: drift on a shared machine hits all points alike
                runner.prepare()
                if i != last:  # see the docstring: the point settles before its step is timed
                    for _ in range(settings.settle):
                        timers[id(runner.model)].sample()
                    last = i
                reset_dispatch_counts()
                samples[i].append(timers[id(runner.model)].sample())
                executors[i].update(reset_dispatch_counts())
            rounds += 1
            if progress:
                progress(len(runners) / settings.repeats if rounds <= settings.repeats else 0)
            if rounds >= settings.repeats and all(
                _precise(timers[id(r.model)].summarize(s), settings.precision) for r, s in zip(runners, samples, strict=True)
            ):
                break
    except MemoryError:
        fits = largest_fitting_batch(runners[0].model, batch, settings.seq_len, settings.mode, vocab)
        raise PrismError(
            f"batch {batch} x seq-len {settings.seq_len} ({settings.mode}) does not fit in memory on {settings.device}; "
            + (f"the largest batch that fits is {fits}" if fits else "not even batch 1 fits: use a shorter --seq-len")
        ) from None
    finally:
        for timer in timers.values():
            timer.close()
    return {i: (timers[id(r.model)].summarize(samples[i]), _implementation_label(r.implementation, executors[i]))
            for i, r in enumerate(runners)}


def _precise(latency: Latency, precision: float) -> bool:
    """Whether ``latency``'s median is known within ``precision``; an unknown spread (one sample) is not."""
    return latency.median_ci is not None and latency.median_ci <= precision


def _implementation_label(implementation: str, executors: Counter[str]) -> str:
    """``prism:grouped`` (prism's executors as counted at dispatch, most used first) or transformers' name."""
    if implementation != EXPERTS_IMPLEMENTATION or not executors:
        return implementation
    return f"{EXPERTS_IMPLEMENTATION}:" + "+".join(name for name, _ in executors.most_common())


def _assemble_points(models: _Models, runners: list[_Runner], quality: dict[str, PointQuality],
                     timed: dict[int, dict[int, tuple[Latency, str]]], settings: BenchSettings) -> list[PointResult]:
    n_sub = int(models.meta["sub_experts"]) if models.meta else 1
    adapter = models.source.adapter
    unit = 3.0 * adapter.hidden_size * adapter.width / n_sub  # one sub-expert's parameters
    points: dict[str, PointResult] = {}
    for i, r in enumerate(runners):
        q = quality[r.name]
        if r.name not in points:
            params = active_parameters(r.model, r.state, r.op.policy, q.active or 0.0, unit)
            points[r.name] = PointResult(r.name, r.kind, q, {}, params, 2.0 * params)
        p = points[r.name]
        for batch in settings.batches:
            latency, label = timed[batch][i]
            p.alternatives.setdefault(batch, {})[label] = latency
            if batch not in p.latency or latency.median_ms < p.latency[batch].median_ms:
                p.latency[batch], p.implementation[batch] = latency, label
    for p in points.values():  # one implementation needs no list of alternatives
        p.alternatives = {b: alts for b, alts in p.alternatives.items() if len(alts) > 1}
    return list(points.values())


def count_points(points: list[PointResult], batch: int, full_perplexity: float) -> BatchCount:
    """The frontier and the distinct stable points at ``batch`` (one frontier, ``pareto.py``)."""
    cq = [CostQuality(p.latency[batch].median_ms, p.latency[batch].p90_ms, p.quality.perplexity) for p in points]
    kept = [i for i, c in enumerate(cq) if usable(c, full_perplexity)]
    frontier = [points[kept[j]].point for j in pareto_front([cq[i] for i in kept])]
    counted = [points[i].point for i in distinct_stable(cq, full_perplexity)]
    originals = [i for i, p in enumerate(points) if p.kind == "original"]
    alone = [points[originals[j]].point for j in distinct_stable([cq[i] for i in originals], full_perplexity)]
    return BatchCount(frontier, counted, alone)


class _Pinned(torch.nn.Module):
    """A runner's model pinned at its point, whatever point the shared model was left at (the reference)."""

    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self.model = runner.model  # a submodule: parameters() and device come from it
        self.runner = runner

    def forward(self, **kwargs: Any) -> Any:
        return self.runner.prepare()(**kwargs)


def _hook_routers(counter: ActiveCounter, elastic: LoadedModel | None, source_state: ElasticState, n_sub: int) -> list:
    """Count active sub-experts: flat routers count 1 each, gate routers skip sentinels, original experts count N."""
    handles = [r.register_forward_hook(counter.hook(per_expert=n_sub)) for r in source_state.flat_routers]
    if elastic is not None:
        state: ElasticState = elastic.model.prism_state
        handles += [r.register_forward_hook(counter.hook()) for r in state.flat_routers]
        sentinel = state.source_experts * state.n_sub
        handles += [r.register_forward_hook(counter.hook(sentinel=sentinel)) for r in state.gate_routers]
    return handles


def best_under_budget(report: BenchReport, batch: int, budget_ms: float | None, max_ppl: float | None) -> dict[str, PointResult | None]:
    """Over every point, elastic and original: the budget pick (best quality within the latency) and the
    quality pick (cheapest within the perplexity ceiling), with the fastest / best as fallbacks."""
    out: dict[str, PointResult | None] = {}
    pts = report.points
    if budget_ms is not None:
        ok = [p for p in pts if p.latency[batch].median_ms <= budget_ms]
        out["budget"] = min(ok, key=lambda p: (p.quality.perplexity, p.latency[batch].median_ms)) if ok else None
        out["fastest"] = min(pts, key=lambda p: p.latency[batch].median_ms)
    if max_ppl is not None:
        ok = [p for p in pts if p.quality.perplexity <= max_ppl]
        out["quality"] = min(ok, key=lambda p: (p.latency[batch].median_ms, p.quality.perplexity)) if ok else None
        out["best_quality"] = min(pts, key=lambda p: p.quality.perplexity)
    return out


def report_json(report: BenchReport) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    def point(p: PointResult) -> dict[str, Any]:
        return {
            "point": p.point,
            "kind": p.kind,
            **{k: clean(v) for k, v in asdict(p.quality).items()},
            "active_params": p.active_params,
            "flops_per_token": p.flops_per_token,
            "latency": {str(b): asdict(lat) for b, lat in p.latency.items()},
            "implementation": {str(b): name for b, name in p.implementation.items()},
            "alternatives": {str(b): {name: asdict(lat) for name, lat in alts.items()} for b, alts in p.alternatives.items()},
        }

    return {
        "target": report.target,
        "source": report.source,
        "note": report.note,
        "settings": asdict(report.settings),
        "full_perplexity": report.full_perplexity,
        "points": [point(p) for p in report.points],
        "count_rule": asdict(COUNT_RULE),
        "counts": {str(b): {"frontier": c.frontier, "counted": c.counted, "elastic": c.elastic,
                            "original_alone": c.original_alone, "ratio": c.ratio} for b, c in report.counts.items()},
        "environment": report.environment,
    }
