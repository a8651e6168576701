"""``prism bench``: quality, latency and memory of every operating point, Pareto frontiers, a budget pick.

The sweep covers the export's operating points and, as the baseline, its source model at top-1..top-k
(or only the latter for a plain MoE model). Quality is measured once for all points in one pass over
the held-out data (``quality.evaluate_points``), against the source model at its own top-k; latency
per point and batch size with ``timing.StepTimer``.
"""

from __future__ import annotations

import math
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from prism_cli import __version__
from prism_cli.cuda import get_ops
from prism_cli.cuda import reference as torch_reference
from prism_cli.errors import PrismError
from prism_cli.evaluation.pareto import CostQuality, distinct_stable, pareto_front
from prism_cli.evaluation.perplexity import token_windows
from prism_cli.evaluation.quality import ActiveCounter, PointQuality, evaluate_points
from prism_cli.evaluation.timing import Latency, StepTimer, largest_fitting_batch
from prism_cli.models.loading import LoadedModel, load_model
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import ElasticState, attach_elastic_state, export_meta, load_elastic_model, set_operating_point
from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION
from prism_cli.runtime.operating_points import parse_operating_point

IMPLEMENTATIONS = (EXPERTS_IMPLEMENTATION, "grouped_mm", "eager")


def parse_budget(text: str) -> float:
    """A latency budget in milliseconds: ``50ms``, ``0.05s``, ``50`` (ms) or ``500us``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s|us|µs)?\s*", str(text))
    if not m:
        raise PrismError(f"cannot read the budget {text!r}: give a time like 50ms, 0.05s or 50 (milliseconds)")
    value = float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}[m.group(2)]
    if value <= 0:
        raise PrismError(f"the budget must be positive, got {text!r}")
    return value


@dataclass
class BenchSettings:
    device: str = "cpu"
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_len: int = 256
    mode: str = "decode"
    tokens: int = 32_768
    quality_seq_len: int = 256
    quality_batch: int = 8
    repeats: int = 20
    warmup: int = 3
    points: list[str] | None = None
    experts_impl: str = EXPERTS_IMPLEMENTATION
    seed: int = 0
    quality_only: bool = False

    def validate(self) -> None:
        if self.quality_only:
            self.batches = []
        elif not self.batches or any(b < 1 or b > 1_000_000 for b in self.batches):
            raise PrismError(f"--batch sizes must be between 1 and 1000000, got {self.batches}")
        if not 1 <= self.seq_len <= 1_048_576:
            raise PrismError(f"--seq-len must be between 1 and 1048576, got {self.seq_len}")
        if self.mode not in ("decode", "prefill"):
            raise PrismError(f"--mode must be decode or prefill, got {self.mode!r}")
        if self.tokens < 2 or self.repeats < 1 or self.warmup < 0:
            raise PrismError("--tokens must be at least 2, --repeats at least 1 and --warmup at least 0")
        if self.experts_impl not in IMPLEMENTATIONS:
            raise PrismError(f"--experts-impl must be one of {', '.join(IMPLEMENTATIONS)}, got {self.experts_impl!r}")


@dataclass
class PointResult:
    point: str
    kind: str  # "elastic" or "original"
    quality: PointQuality
    latency: dict[int, Latency]
    active_params: float
    flops_per_token: float


@dataclass
class BenchReport:
    n_sub: int
    target: str
    source: str | None
    note: str | None
    implementation: str
    settings: BenchSettings
    full_perplexity: float
    points: list[PointResult]
    frontier: dict[int, dict[str, list[str]]]
    distinct: dict[int, dict[str, list[str]]]
    environment: dict[str, Any]

    def ratio(self, batch: int) -> float | None:
        orig = len(self.distinct[batch]["original"])
        return len(self.distinct[batch]["elastic"]) / orig if orig else None


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "prism": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(["prism", *sys.argv[1:]]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_label(env: dict[str, Any]) -> str:
    """Short description of where latencies were measured, for column labels."""
    return env.get("gpu") or f"{env['processor']}, {env['torch_threads']} threads"


def active_parameters(model: Any, state: ElasticState, policy: str, active: float, unit: float) -> float:
    """Parameters a token touches: everything but the routed experts and the embedding table, plus
    ``active`` sub-expert units of ``unit`` parameters per MoE layer, plus the gate-neuron rows read
    by the training-free gate (``k * N * s`` rows of W_gate and W_up per layer)."""
    dense = sum(p.numel() for name, p in model.named_parameters()
                if ".experts." not in name and not name.endswith("embed_tokens.weight"))
    per_layer = active * unit
    if policy in ("topk", "pattern", "threshold"):
        router = state.gate_routers[0]
        per_layer += state.top_k * (router.gate_w.numel() + router.up_w.numel()) / state.num_experts
    return float(dense + per_layer * len(state.layers))


def run_bench(
    target: str,
    text: str,
    settings: BenchSettings,
    on_stage: Callable[[str, int], Callable[[int], None]] | None = None,
) -> BenchReport:
    """Benchmark ``target`` (an export or a plain MoE model); ``on_stage(name, total)`` gives a progress callback."""
    settings.validate()
    device = torch.device(settings.device)
    meta = export_meta(target) if Path(target).is_dir() else None
    note = None
    elastic: LoadedModel | None = None
    if meta is not None:
        elastic = load_elastic_model(target, device=settings.device)
        elastic.model.set_experts_implementation(settings.experts_impl)
        source_name = meta["source"]["model"]
        try:
            source = load_model(source_name, device=settings.device, experts_implementation=settings.experts_impl)
        except PrismError as exc:
            raise PrismError(f"the export's source model is needed as the baseline but could not be loaded: {exc}") from None
    else:
        source_name = target
        source = load_model(target, device=settings.device, experts_implementation=settings.experts_impl)
        note = (f"{target} is a plain MoE model, not a prism export: "
                f"only its original top-1..top-{source.adapter.top_k} range is benchmarked")
    assert source.adapter is not None
    source_state = attach_elastic_state(source.model, None)
    n_sub = int(meta["sub_experts"]) if meta else 1
    top_k = source_state.top_k

    runners: list[tuple[str, str, Any, ElasticState, Callable[[], Any]]] = []
    if elastic is not None:
        state: ElasticState = elastic.model.prism_state
        names = settings.points or [str(p) for p in state.points()]
        skipped: list[str] = []
        for spec in names:
            op = parse_operating_point(spec, state.gate, state.n_sub, state.top_k)
            if any(name == str(op) for name, *_ in runners):
                continue  # "8" and "topk:8" are one point: measure it once
            if op.policy == "threshold" and settings.experts_impl != EXPERTS_IMPLEMENTATION:
                # Variable compute needs sentinel slots, which only prism's implementation takes. A point
                # the user listed is refused rather than silently left out of the report.
                if settings.points:
                    raise PrismError(f"operating point {op} needs --experts-impl {EXPERTS_IMPLEMENTATION}: threshold "
                                     "points leave unused (sentinel) slots, which only prism's implementation takes")
                skipped.append(str(op))
                continue
            runners.append((str(op), "elastic", elastic.model, state, lambda op=op: _at(elastic.model, op)))
        if skipped:
            note = f"threshold points ({', '.join(skipped)}) need --experts-impl {EXPERTS_IMPLEMENTATION} and were skipped"
    for k in range(1, top_k + 1):
        op = parse_operating_point(f"original:{k}", None, 1, top_k)
        runners.append((str(op), "original", source.model, source_state, lambda op=op: _at(source.model, op)))

    # --- quality: one pass, every point against the source model at its full top-k ---
    counter = ActiveCounter()
    handles = _hook_routers(counter, elastic, source_state, n_sub)
    try:
        windows = token_windows(source.tokenizer, text, settings.quality_seq_len, settings.tokens)
    except ValueError as exc:
        raise PrismError(str(exc)) from None
    reference_op = parse_operating_point(f"original:{top_k}", None, 1, top_k)
    progress = on_stage("quality", windows.numel()) if on_stage else None
    quality = evaluate_points(
        _Reference(source.model, reference_op),
        [(name, prepare, counter) for name, _, _, _, prepare in runners],
        windows,
        settings.quality_batch,
        on_batch=progress,
    )
    for h in handles:
        h.remove()
    full_ppl = quality[str(reference_op)].perplexity

    # --- latency: per point and batch size ---
    unit = 3.0 * source.adapter.hidden_size * source.adapter.width / n_sub  # one sub-expert's parameters
    vocab = source.model.config.vocab_size
    latencies: dict[str, dict[int, Latency]] = {name: {} for name, *_ in runners}
    progress = on_stage("latency", len(runners) * len(settings.batches)) if on_stage else None
    for batch in settings.batches:
        timers: dict[int, StepTimer] = {}
        samples: dict[str, list] = {name: [] for name, *_ in runners}
        try:
            for _name, _, model, state, prepare in runners:  # build each model's context once, warm every point
                prepare()
                if id(model) not in timers:
                    timers[id(model)] = StepTimer(model, batch, settings.seq_len, settings.mode, vocab, settings.seed,
                                                  [layer.block for layer in state.layers])
                for _ in range(settings.warmup):
                    timers[id(model)].sample()
            for _ in range(settings.repeats):  # round-robin: one step of every point per round
                for name, _, model, _, prepare in runners:
                    prepare()
                    samples[name].append(timers[id(model)].sample())
                if progress:
                    progress(len(runners) / settings.repeats)
        except MemoryError:
            fits = largest_fitting_batch(runners[0][2], batch, settings.seq_len, settings.mode, vocab)
            raise PrismError(
                f"batch {batch} x seq-len {settings.seq_len} ({settings.mode}) does not fit in memory on {device}; "
                + (f"the largest batch that fits is {fits}" if fits else "not even batch 1 fits: use a shorter --seq-len")
            ) from None
        for name, _, model, _, _ in runners:
            latencies[name][batch] = timers[id(model)].summarize(samples[name])
        for timer in timers.values():
            timer.close()

    points: list[PointResult] = []
    for name, kind, model, state, _ in runners:
        q = quality[name]
        params = active_parameters(model, state, name.split(":")[0], q.active or 0.0, unit)
        points.append(PointResult(name, kind, q, latencies[name], params, 2.0 * params))

    frontier: dict[int, dict[str, list[str]]] = {}
    distinct: dict[int, dict[str, list[str]]] = {}
    for batch in settings.batches:
        frontier[batch], distinct[batch] = {}, {}
        for kind in ("elastic", "original"):
            subset = [p for p in points if p.kind == kind]
            cq = [CostQuality(p.latency[batch].median_ms, p.latency[batch].p90_ms, p.quality.perplexity) for p in subset]
            frontier[batch][kind] = [subset[i].point for i in pareto_front(cq)]
            distinct[batch][kind] = [subset[i].point for i in distinct_stable(cq, full_ppl)]
    ops = get_ops(device) if settings.experts_impl == EXPERTS_IMPLEMENTATION else None
    implementation = (
        settings.experts_impl if ops is None
        else "prism (torch reference)" if ops is torch_reference else "prism (compiled CUDA kernels)"
    )
    return BenchReport(n_sub, target, source_name if meta else None, note, implementation, settings, full_ppl, points,
                       frontier, distinct, environment(device))


class _Reference(torch.nn.Module):
    """The source model pinned at its full top-k, whatever point the shared model was left at."""

    def __init__(self, model: Any, op: Any) -> None:
        super().__init__()
        self.model = model
        self.op = op

    def forward(self, **kwargs: Any) -> Any:
        return _at(self.model, self.op)(**kwargs)


def _at(model: Any, op: Any) -> Any:
    if model.prism_state.point != op:
        set_operating_point(model, op)
    return model


def _hook_routers(counter: ActiveCounter, elastic: LoadedModel | None, source_state: ElasticState, n_sub: int) -> list:
    """Count active sub-experts: flat routers count 1 each, gate routers skip sentinels, original experts count N."""
    handles = [r.register_forward_hook(counter.hook(per_expert=n_sub)) for r in source_state.flat_routers]
    if elastic is not None:
        state: ElasticState = elastic.model.prism_state
        handles += [r.register_forward_hook(counter.hook()) for r in state.flat_routers]
        sentinel = state.num_experts * state.n_sub
        handles += [r.register_forward_hook(counter.hook(sentinel=sentinel)) for r in state.gate_routers]
    return handles


def best_under_budget(report: BenchReport, batch: int, budget_ms: float | None, max_ppl: float | None) -> dict[str, Any]:
    """The budget pick (best quality within the latency) and the quality pick (cheapest within the ceiling)."""
    out: dict[str, Any] = {}
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
    def point(p: PointResult) -> dict[str, Any]:
        return {
            "point": p.point,
            "kind": p.kind,
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(p.quality).items()},
            "active_params": p.active_params,
            "flops_per_token": p.flops_per_token,
            "latency": {str(b): asdict(lat) for b, lat in p.latency.items()},
        }

    return {
        "target": report.target,
        "source": report.source,
        "note": report.note,
        "experts_implementation": report.implementation,
        "settings": asdict(report.settings),
        "full_perplexity": report.full_perplexity,
        "points": [point(p) for p in report.points],
        "frontier": {str(b): v for b, v in report.frontier.items()},
        "distinct_stable": {str(b): v for b, v in report.distinct.items()},
        "distinct_stable_ratio": {str(b): report.ratio(b) for b in report.settings.batches},
        "environment": report.environment,
    }


def _equal_compute_name(policy: str, total: int, n_sub: int, top_k: int) -> str:
    """The name a point of ``policy`` with ``total`` sub-experts has in a report.

    Pattern points are named by their per-rank counts (``pattern:4,0``), never by the total, so the
    total is expanded the way ``parse_operating_point`` expands it (front-loaded).
    """
    if policy == "pattern":
        return str(parse_operating_point(f"pattern:{total}", "neurons", n_sub, top_k))
    return f"{policy}:{total}"


def summary_tables(report: BenchReport) -> list[ResultTable]:
    """Distinct stable points per batch, equal-compute quality cells and MoE-layer elasticity."""
    tables = []
    counts = ResultTable("distinct stable operating points", ["batch", "elastic", "original", "ratio"])
    for b in report.settings.batches:
        counts.add(b, len(report.distinct[b]["elastic"]), len(report.distinct[b]["original"]), report.ratio(b))
    counts.notes.append("Pareto-optimal, perplexity <= 1.5x full, p90 <= 1.15x median, >= 3% latency apart")
    tables.append(counts)

    by_name = {p.point: p for p in report.points}
    orig = sorted((p for p in report.points if p.kind == "original"), key=lambda p: int(p.point.split(":")[1]))
    n_sub = report.n_sub
    if n_sub > 1 and len(orig) > 1:
        policies = [pol for pol in ("topk", "pattern", "linear") if any(p.point.startswith(pol + ":") for p in report.points)]
        cells = ResultTable("equal compute: perplexity of K = N*k' sub-experts against the original at top-k'",
                            ["k'", "K", "original", *policies, "best elastic wins"])
        for p in orig[:-1]:
            k = int(p.point.split(":")[1])
            vals = [by_name.get(_equal_compute_name(pol, n_sub * k, n_sub, len(orig))) for pol in policies]
            elastic = [v.quality.perplexity for v in vals if v is not None]
            cells.add(k, n_sub * k, p.quality.perplexity, *[v.quality.perplexity if v else None for v in vals],
                      min(elastic) < p.quality.perplexity if elastic else None)
        tables.append(cells)

    if report.settings.batches:
        b0 = report.settings.batches[0]
        full_k = n_sub * int(orig[-1].point.split(":")[1]) if orig else 0
        elastic_pts = [p for p in report.points if p.kind == "elastic" and p.point.split(":")[0] in ("topk", "linear")]
        fulls = {pol: by_name.get(f"{pol}:{full_k}") for pol in ("topk", "linear")}
        if any(f is not None and f.latency[b0].moe_ms for f in fulls.values()):
            el = ResultTable(f"elasticity of the MoE layers (batch {b0}): time at K over the same policy's time at K = {full_k}",
                             ["point", "K / (N*k)", "MoE ms", "MoE time ratio", "elasticity (ratio / ideal)", "step ms"])
            for p in elastic_pts:
                policy, k = p.point.split(":")[0], int(p.point.split(":")[1])
                full = fulls[policy]
                moe = p.latency[b0].moe_ms
                ratio = moe / full.latency[b0].moe_ms if moe and full is not None and full.latency[b0].moe_ms else None
                el.add(p.point, k / full_k, moe, ratio, ratio / (k / full_k) if ratio else None, p.latency[b0].median_ms)
            el.notes.append("1.0 = MoE time exactly proportional to the sub-experts computed; above 1 = fixed overhead")
            tables.append(el)
    return tables
