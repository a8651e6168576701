"""The tables of a bench report: one builder each, shared by ``prism bench``, ``prism tables`` and README.

* ``points_table``: every point (quality columns, latency per batch, the implementation that ran);
* ``quality_table``: the quality columns only (what reproduces exactly under the seed);
* ``summary_tables``: the distinct-stable count per batch, the same-routing comparisons with the
  original (``linear:N*k'`` against ``original:k'``, ``topk:K`` against ``linear:K``), the
  equal-compute quality cells and the MoE-layer elasticity.
"""

from __future__ import annotations

from prism_cli.environment import machine_label
from prism_cli.evaluation.bench import BenchReport, PointResult, count_points
from prism_cli.evaluation.pareto import COUNT_RULE
from prism_cli.operating_points import parse_operating_point
from prism_cli.report import ResultTable

QUALITY_COLUMNS = ("point", "kind", "active sub-experts", "perplexity", "KL", "top-1 agree")


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def quality_table(report: BenchReport) -> ResultTable:
    """Quality columns only: what must reproduce exactly under the seed."""
    table = ResultTable(f"operating points of {report.target}: quality", list(QUALITY_COLUMNS))
    for p in report.points:
        table.add(p.point, p.kind, _round(p.quality.active), _round(p.quality.perplexity), _round(p.quality.kl),
                  _round(p.quality.top1_agreement))
    return table


def points_table(report: BenchReport) -> ResultTable:
    """Every point: quality, then per batch the median and p90 step time, MoE time and what ran."""
    label = machine_label(report.environment)
    batches = report.settings.batches
    table = ResultTable(
        f"operating points of {report.source or report.target} ({report.settings.mode}, seq-len {report.settings.seq_len})",
        [*QUALITY_COLUMNS, *[f"ms b={b}" for b in batches], *[f"p90 ms b={b}" for b in batches],
         *[f"median +/- b={b}" for b in batches], *[f"MoE ms b={b}" for b in batches],
         *[f"counted b={b}" for b in batches], "experts implementation", "active params", "GFLOPs/token"],
    )
    for p, q in zip(report.points, quality_table(report).rows, strict=True):
        impls = sorted({p.implementation[b] for b in batches})
        table.add(*q, *[p.latency[b].median_ms for b in batches], *[p.latency[b].p90_ms for b in batches],
                  *[p.latency[b].median_ci for b in batches], *[p.latency[b].moe_ms for b in batches],
                  *[p.point in report.counts[b].counted for b in batches], ", ".join(impls),
                  p.active_params, p.flops_per_token / 1e9)
    table.notes += [
        f"latency: {report.settings.mode} step ({report.settings.dtype}), measured on {label}; median +/- is the half-width "
        f"of its 95% interval over the median; the original is timed with each experts implementation it has and "
        f"the faster counts (bench.json keeps both)" + _allocator_note(report.environment),
        f"quality: {report.points[0].quality.tokens:,} held-out tokens against the source model at its full top-k "
        f"(perplexity {report.full_perplexity:.4f}); KL in nats per token; active sub-experts per token and MoE layer "
        "in units of 1/N expert (the original at top-k' counts N*k')",
        f"counted: a distinct stable point ({COUNT_RULE.describe()})",
    ]
    if report.note:
        table.notes.append(report.note)
    return table


def screen_table(report: BenchReport) -> ResultTable:
    """The columns that fit a terminal; the files carry every column."""
    b0 = report.settings.batches[0]
    table = ResultTable(
        f"operating points ({report.settings.mode}, batch {b0}, seq-len {report.settings.seq_len})",
        ["point", "active", "perplexity", "KL", "ms", "+/-", "ran", "counted"],
    )
    for p in report.points:
        table.add(p.point, p.quality.active, p.quality.perplexity, p.quality.kl, p.latency[b0].median_ms,
                  p.latency[b0].median_ci, p.implementation[b0], p.point in report.counts[b0].counted)
    return table


def count_table(report: BenchReport) -> ResultTable:
    """The count per batch; with layered points in the run, also what the count would be without them."""
    plain = [p for p in report.points if not p.point.startswith("layered:")]
    layered = len(plain) < len(report.points)
    table = ResultTable("distinct stable operating points (one frontier over elastic and original points)",
                        ["batch", "counted", "elastic", "original alone", "ratio", "counted points",
                         *(["counted without layered points"] if layered else [])])
    for b in report.settings.batches:
        c = report.counts[b]
        without = [len(count_points(plain, b, report.full_perplexity).counted)] if layered else []
        table.add(b, len(c.counted), c.elastic, len(c.original_alone), c.ratio, ", ".join(c.counted), *without)
    table.notes.append(COUNT_RULE.describe() + "; ratio = counted / the original's own count")
    return table


def _k(point: PointResult) -> int:
    return int(point.point.split(":")[1])


def _originals(report: BenchReport) -> list[PointResult]:
    return sorted((p for p in report.points if p.kind == "original"), key=_k)


def same_routing_table(report: BenchReport) -> ResultTable | None:
    """Side by side in one run: ``linear:N*k'`` against ``original:k'`` (the same routing, the same
    computation) and ``topk:K`` against ``linear:K`` (the training-free gate's cost)."""
    n, batches = report.n_sub, report.settings.batches
    rows = []
    for orig in _originals(report):
        flat = report.point(f"linear:{n * _k(orig)}")
        if flat is not None:
            rows.append((flat, orig))
    for p in report.points:
        if p.point.startswith("topk:") and _k(p) >= 2 and report.point(f"linear:{_k(p)}") is not None:
            rows.append((p, report.point(f"linear:{_k(p)}")))
    if n == 1 or not rows or not batches:
        return None
    table = ResultTable("same computation side by side: step time of a point over its reference",
                        ["point", "reference", *[f"ratio b={b}" for b in batches], *[f"ms b={b}" for b in batches]])
    for p, ref in rows:
        table.add(p.point, ref.point, *[p.latency[b].median_ms / ref.latency[b].median_ms for b in batches],
                  *[p.latency[b].median_ms for b in batches])
    table.notes.append("1.0 = as fast as the reference; linear:N*k' routes " + (
        "exactly like original:k'" if report.linear_exact else "like original:k' only approximately (inexact linear gate)"))
    return table


def _equal_compute_name(policy: str, total: int, n_sub: int, top_k: int) -> str:
    """The name a point of ``policy`` with ``total`` sub-experts has in a report (pattern points are
    named by their per-rank counts, expanded the way ``parse_operating_point`` expands a total)."""
    if policy == "pattern":
        return str(parse_operating_point(f"pattern:{total}", "neurons", n_sub, top_k))
    return f"{policy}:{total}"


#: Relative perplexity difference below which the elastic and the original point tie (``linear:N*k``
#: computes what the original does, in another order: they differ in the last digits, not in quality).
TIE = 1e-6


def equal_compute_table(report: BenchReport) -> ResultTable | None:
    orig = _originals(report)
    n_sub = report.n_sub
    if n_sub == 1 or len(orig) < 2:
        return None
    policies = [pol for pol in ("topk", "pattern", "linear") if any(p.point.startswith(pol + ":") for p in report.points)]
    cells = ResultTable("equal compute: perplexity of K = N*k' sub-experts against the original at top-k'",
                        ["k'", "K", "original", *policies, "best elastic wins"])
    for p in orig[:-1]:
        k = _k(p)
        vals = [report.point(_equal_compute_name(pol, n_sub * k, n_sub, len(orig))) for pol in policies]
        elastic = [v.quality.perplexity for v in vals if v is not None]
        cells.add(k, n_sub * k, p.quality.perplexity, *[v.quality.perplexity if v else None for v in vals],
                  min(elastic) < p.quality.perplexity * (1 - TIE) if elastic else None)
    return cells


def elasticity_table(report: BenchReport) -> ResultTable | None:
    """MoE-layer time at K over the same policy's time at N*k, against the ideal K/(N*k) (CPU: timed by hooks);
    layered points against the linear gate's, at their mean K (the sub-experts their tokens computed)."""
    if not report.settings.batches:
        return None
    b0 = report.settings.batches[0]
    orig = _originals(report)
    full_k = report.n_sub * _k(orig[-1]) if orig else 0
    fulls = {pol: report.point(f"{pol}:{full_k}") for pol in ("topk", "linear")}
    if not any(f is not None and f.latency[b0].moe_ms for f in fulls.values()):
        return None
    table = ResultTable(f"elasticity of the MoE layers (batch {b0}): time at K over the same policy's time at K = {full_k}",
                        ["point", "K / (N*k)", "MoE ms", "MoE time ratio", "elasticity (ratio / ideal)", "step ms"])
    for p in report.points:
        policy = p.point.split(":")[0]
        layered = policy == "layered"  # the linear gate at K in some layers, K+1 in others: its mean K
        policy = "linear" if layered else policy
        if policy not in fulls or fulls[policy] is None:
            continue
        moe, full = p.latency[b0].moe_ms, fulls[policy].latency[b0].moe_ms
        ratio = moe / full if moe and full else None
        ideal = (p.quality.active if layered else _k(p)) / full_k
        table.add(p.point, ideal, moe, ratio, ratio / ideal if ratio else None, p.latency[b0].median_ms)
    table.notes.append("1.0 = MoE time exactly proportional to the sub-experts computed; above 1 = fixed overhead")
    return table


def summary_tables(report: BenchReport) -> list[ResultTable]:
    tables = [count_table(report)] if report.settings.batches else []
    tables += [t for t in (same_routing_table(report), equal_compute_table(report), elasticity_table(report)) if t is not None]
    return tables


def _allocator_note(env: dict) -> str:
    """Which host allocator CPU steps ran under (``prism_cli.allocator``); nothing for GPU runs or old reports."""
    return f"; CPU allocator: {env['cpu_allocator']}" if env.get("cpu_allocator") and "gpu" not in env else ""
