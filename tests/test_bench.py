"""prism bench: budget parsing, Pareto frontiers and distinct stable points, the summary tables, and an
end-to-end run on a tiny export (files, budget and quality picks, exit codes, determinism)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export import FULL, N_SUB, assert_one_line_failure, random_neurons_export

from prism_cli.errors import PrismError
from prism_cli.evaluation.bench import BenchReport, BenchSettings, PointResult, parse_budget, summary_tables
from prism_cli.evaluation.pareto import CostQuality, distinct_stable, pareto_front
from prism_cli.evaluation.quality import PointQuality
from prism_cli.evaluation.timing import Latency

POINTS = "topk:1;topk:8;linear:8;threshold:0.8"
TINY = ("--batch", "2", "--seq-len", "16", "--tokens", "512", "--repeats", "2", "--warmup", "0")
QUALITY_FIELDS = ("perplexity", "kl", "top1_agreement", "active", "tokens")


# ---------------------------------------------------------------------------------------------
# Budgets.


@pytest.mark.parametrize(
    ("text", "ms"),
    [("50ms", 50.0), ("0.05s", 50.0), ("50", 50.0), ("500us", 0.5), ("500µs", 0.5), (" 2.5 ms ", 2.5), ("1e-1s", 100.0)],
)
def test_parse_budget_accepts(text, ms):
    assert parse_budget(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["fast", "-1", "", "0", "0ms", "50 minutes", "ms", "1,5ms"])
def test_parse_budget_refuses(text):
    with pytest.raises(PrismError):
        parse_budget(text)


# ---------------------------------------------------------------------------------------------
# Pareto frontier and distinct stable points, against the definitions in pareto.py's docstring.


def reference_front(points: list[CostQuality]) -> set[int]:
    """Points no other point beats on both axes (strictly better on one, no worse on the other);
    of exact duplicates, only the first counts."""
    front = set()
    for i, p in enumerate(points):
        beaten = any(
            (q.latency <= p.latency and q.perplexity <= p.perplexity and (q.latency, q.perplexity) != (p.latency, p.perplexity))
            or ((q.latency, q.perplexity) == (p.latency, p.perplexity) and j < i)
            for j, q in enumerate(points) if j != i
        )
        if not beaten:
            front.add(i)
    return front


def reference_distinct(points: list[CostQuality], full: float, ratio=1.5, gap=0.03, spread=1.15) -> list[int]:
    front = sorted(reference_front(points), key=lambda i: points[i].latency)
    kept: list[int] = []
    for i in front:
        p = points[i]
        usable = p.perplexity <= ratio * full
        steady = p.p90 <= spread * p.latency
        distinct = not kept or p.latency >= (1 + gap) * points[kept[-1]].latency
        if usable and steady and distinct:
            kept.append(i)
    return kept


def cq(latency: float, perplexity: float, p90: float | None = None) -> CostQuality:
    return CostQuality(latency, latency if p90 is None else p90, perplexity)


def test_pareto_front_by_hand():
    points = [cq(1.0, 10.0), cq(2.0, 8.0), cq(3.0, 9.0), cq(4.0, 5.0), cq(2.0, 8.0), cq(1.0, 12.0), cq(5.0, 5.0)]
    # 2 is beaten by 1; 4 duplicates 1; 5 ties 0 on latency but is worse; 6 ties 3 on quality but is slower
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front([]) == []
    assert pareto_front([cq(1.0, 1.0)]) == [0]


def test_distinct_stable_by_hand():
    full = 10.0
    points = [
        cq(1.00, 20.0),             # 0: on the front but unusable (perplexity > 1.5 x full)
        cq(2.00, 14.0, p90=2.5),    # 1: usable but unsteady (p90 > 1.15 x median)
        cq(2.50, 13.0),             # 2: counted
        cq(2.55, 12.5),             # 3: less than 3 % slower than 2: not distinct
        cq(2.60, 12.0),             # 4: 4 % slower than 2: counted
        cq(3.00, 12.5),             # 5: beaten by 4: off the front
        cq(4.00, 10.0, p90=4.6),    # 6: p90 exactly 1.15 x median: steady, counted
    ]
    assert pareto_front(points) == [0, 1, 2, 3, 4, 6]
    assert distinct_stable(points, full) == [2, 4, 6]
    assert distinct_stable(points, full, quality_ratio=2.0) == [0, 2, 4, 6]
    assert distinct_stable(points, full, min_gap=0.0) == [2, 3, 4, 6]


def test_pareto_and_distinct_match_the_definitions_on_random_sets():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        points = []
        for _ in range(n):  # coarse values so that ties happen
            latency = rng.choice([1.0, 1.02, 1.05, 1.5, 2.0, 3.0])
            points.append(CostQuality(latency, latency * rng.choice([1.0, 1.1, 1.2]), rng.choice([9.0, 10.0, 12.0, 15.0, 16.0])))
        front = pareto_front(points)
        assert set(front) == reference_front(points)
        assert [points[i].latency for i in front] == sorted(points[i].latency for i in front)
        assert all(points[a].perplexity > points[b].perplexity for a, b in itertools.pairwise(front))
        assert distinct_stable(points, 10.0) == reference_distinct(points, 10.0)


# ---------------------------------------------------------------------------------------------
# Summary tables from a hand-made report (no model).


def _point(name: str, kind: str, ppl: float, ms: float, active: float) -> PointResult:
    return PointResult(name, kind, PointQuality(ppl, 0.0, 1.0, active, 100), {1: Latency(ms, ms, 1.0 / ms, 1.0, 3, ms / 2)}, 1.0, 2.0)


def test_summary_tables_equal_compute_cells():
    points = [
        _point("topk:2", "elastic", 12.0, 1.0, 2), _point("topk:4", "elastic", 10.5, 1.5, 4),
        _point("pattern:4,0", "elastic", 10.8, 1.5, 4), _point("linear:4", "elastic", 11.5, 1.4, 4),
        _point("topk:8", "elastic", 10.0, 2.0, 8), _point("linear:8", "elastic", 10.0, 1.9, 8),
        _point("original:1", "original", 11.0, 1.3, 4), _point("original:2", "original", 10.0, 1.8, 8),
    ]
    report = BenchReport(N_SUB, "x", "src", None, "prism", BenchSettings(batches=[1]), 10.0, points,
                         {1: {"elastic": [], "original": []}}, {1: {"elastic": ["topk:2"], "original": ["original:1"]}}, {})
    tables = {t.title.split(":")[0]: t for t in summary_tables(report)}
    cells = tables["equal compute"].records()
    assert len(cells) == 1
    row = cells[0]
    assert (row["k'"], row["K"], row["original"]) == (1, 4, 11.0)
    assert (row["topk"], row["pattern"], row["linear"]) == (10.5, 10.8, 11.5)
    assert row["best elastic wins"] is True
    elasticity = next(t for t in summary_tables(report) if t.title.startswith("elasticity"))
    assert [r["point"] for r in elasticity.records()] == ["topk:2", "topk:4", "linear:4", "topk:8", "linear:8"]
    # a K with no elastic point measured is not a loss
    report.points = [p for p in points if p.point not in ("topk:4", "pattern:4,0", "linear:4")]
    cells = next(t for t in summary_tables(report) if t.title.startswith("equal compute")).records()
    assert cells[0]["best elastic wins"] is None


# ---------------------------------------------------------------------------------------------
# End to end on a tiny export.


@pytest.fixture(scope="module")
def bench_export(tiny_model_dir, tmp_path_factory) -> Path:
    return random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("bench"), seed=21)


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory) -> dict[str, Any]:
    """Results of the bench runs, kept for the module: each is run once, by the first test needing it."""
    return {"root": tmp_path_factory.mktemp("bench-out")}


def bench_run(cli, runs: dict[str, Any], name: str, target: Path, *extra: str) -> tuple[Any, dict[str, Any] | None, Path, list[str]]:
    if name not in runs:
        out = runs["root"] / name
        args = ["bench", str(target), *TINY, "--out", str(out), *extra]
        result = cli(*args)
        data = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
        runs[name] = (result, data, out, args)
    return runs[name]


def _budget_run(cli, runs, bench_export):
    return bench_run(cli, runs, "budget", bench_export, "--points", POINTS, "--budget", "100000ms", "--min-quality", "1e9")


def _tight_run(cli, runs, bench_export):
    return bench_run(cli, runs, "tight", bench_export, "--points", POINTS, "--budget", "0.0001ms", "--min-quality", "1.0")


def test_bench_end_to_end_files(cli, bench_runs, bench_export):
    result, data, out, args = _budget_run(cli, bench_runs, bench_export)
    assert result.code == 0, result
    for name in ("bench.md", "bench.csv", "bench.json", "bench_summary.md", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    import matplotlib.image

    assert matplotlib.image.imread(out / "bench.png").shape[:2] == (600, 960)
    names = [p["point"] for p in data["points"]]
    assert names == ["topk:1", f"topk:{FULL}", f"linear:{FULL}", "threshold:0.8", "original:1", "original:2"]
    assert data["environment"]["command"] == " ".join(["prism", *args])
    for key in ("python", "torch", "transformers", "platform", "processor", "torch_threads"):
        assert data["environment"][key] not in (None, "")
    assert data["settings"]["batches"] == [2] and data["source"] and data["note"] is None
    by_name = {p["point"]: p for p in data["points"]}
    assert by_name["original:2"]["kl"] == 0.0 and by_name["original:2"]["top1_agreement"] == 1.0
    assert by_name[f"topk:{FULL}"]["perplexity"] == pytest.approx(data["full_perplexity"], rel=1e-5)
    assert [by_name[n]["active"] for n in ("topk:1", f"topk:{FULL}", f"linear:{FULL}", "original:1", "original:2")] == [1, 8, 8, 4, 8]
    assert 1 <= by_name["threshold:0.8"]["active"] <= FULL
    for p in data["points"]:
        assert set(p["latency"]) == {"2"} and p["latency"]["2"]["repeats"] == 2
    csv_lines = (out / "bench.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(names) and csv_lines[0].startswith("point,kind")
    assert "distinct stable operating points" in (out / "bench_summary.md").read_text()
    assert "topk:1" in (out / "bench.md").read_text()


def test_bench_budget_and_quality_picks(cli, bench_runs, bench_export):
    result, data, _, _ = _budget_run(cli, bench_runs, bench_export)
    assert result.code == 0, result
    pts = data["points"]
    budget = min(pts, key=lambda p: (p["perplexity"], p["latency"]["2"]["median_ms"]))
    cheapest = min(pts, key=lambda p: (p["latency"]["2"]["median_ms"], p["perplexity"]))
    assert data["selection"]["budget"] == budget["point"]
    assert data["selection"]["quality"] == cheapest["point"]
    assert "best point within the budget" in result.out and budget["point"] in result.out
    assert "cheapest point with perplexity" in result.out and cheapest["point"] in result.out


def test_bench_budget_not_met_exits_3(cli, bench_runs, bench_export):
    result, data, _, _ = _tight_run(cli, bench_runs, bench_export)
    assert result.code == 3, result
    message = result.err.strip().splitlines()[-1]
    assert "Traceback" not in result.err
    fastest = min(data["points"], key=lambda p: p["latency"]["2"]["median_ms"])
    best = min(data["points"], key=lambda p: p["perplexity"])
    assert "no operating point meets 0.0001 ms" in message and f"the fastest is {fastest['point']}" in message
    assert "no operating point reaches perplexity 1" in message and f"the best is {best['point']}" in message
    assert data["selection"] == {"budget": None, "fastest": fastest["point"], "quality": None, "best_quality": best["point"]}


def test_bench_quality_is_deterministic(cli, bench_runs, bench_export):
    _, first, _, _ = _budget_run(cli, bench_runs, bench_export)
    _, second, _, _ = _tight_run(cli, bench_runs, bench_export)
    assert first["full_perplexity"] == second["full_perplexity"]
    for a, b in zip(first["points"], second["points"], strict=True):
        assert a["point"] == b["point"]
        assert {k: a[k] for k in QUALITY_FIELDS} == {k: b[k] for k in QUALITY_FIELDS}, a["point"]


def test_bench_plain_model_runs_its_original_range(cli, bench_runs, tiny_model_dir):
    result, data, _, _ = bench_run(cli, bench_runs, "plain", tiny_model_dir("olmoe"))
    assert result.code == 0, result
    assert [p["point"] for p in data["points"]] == ["original:1", "original:2"]
    assert "plain MoE model" in result.out and "plain MoE model" in data["note"]
    assert data["source"] is None


def test_bench_batch_too_large_names_the_largest_that_fits(cli, tmp_path, bench_export, monkeypatch):
    """An out-of-memory step (simulated above batch 2) is one line naming the largest batch that fits."""
    from prism_cli.evaluation import timing

    real_step = timing.StepTimer._step

    def step(self):
        if self.batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(self)

    monkeypatch.setattr(timing.StepTimer, "_step", step)
    args = ("--points", "topk:1", "--batch", "8", "--seq-len", "16", "--tokens", "256", "--repeats", "1", "--warmup", "1")
    result = cli("bench", bench_export, *args, "--out", tmp_path / "o")
    # The quality sweep ran (its progress bar is on stderr too); the failure is one line at the end.
    assert result.code == 2 and "Traceback" not in result.err, result
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: batch 8") and "the largest batch that fits is 2" in last, last
    assert not (tmp_path / "o").exists()


def test_bench_other_experts_implementation(cli, bench_runs, bench_export):
    result, data, _, _ = bench_run(cli, bench_runs, "eager", bench_export, "--experts-impl", "eager", "--points", "topk:2;2;pattern:4")
    assert result.code == 0, result
    by_name = {p["point"]: p for p in data["points"]}
    assert list(by_name) == ["topk:2", "pattern:4,0", "original:1", "original:2"]  # "2" is topk:2, measured once
    assert data["experts_implementation"] == "eager"
    # all sub-experts of the best expert, weighted by its routing weight, is the original at top-1
    assert by_name["pattern:4,0"]["perplexity"] == pytest.approx(by_name["original:1"]["perplexity"], rel=1e-5)
    assert by_name["pattern:4,0"]["active"] == by_name["original:1"]["active"] == N_SUB


def test_bench_refuses_listed_threshold_points_without_prism_experts(cli, tmp_path, bench_export):
    result = cli("bench", bench_export, *TINY, "--experts-impl", "eager", "--points", "topk:2;threshold:0.5", "--out", tmp_path / "o")
    assert_one_line_failure(result, "threshold:0.5", "--experts-impl prism")
