"""prism bench: budget parsing, Pareto frontiers and distinct stable points, the summary tables, and an
end-to-end run on a tiny export (files, budget and quality picks, exit codes, determinism)."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FULL, N_SUB, assert_one_line_failure, random_neurons_export

from prism_cli.errors import PrismError
from prism_cli.evaluation.bench import BenchReport, BenchSettings, PointResult, best_under_budget, count_points, parse_budget
from prism_cli.evaluation.bench_tables import summary_tables
from prism_cli.evaluation.pareto import CostQuality, CountRule, distinct_stable, pareto_front
from prism_cli.evaluation.quality import PointQuality
from prism_cli.evaluation.timing import Latency

POINTS = "topk:1;topk:8;linear:8;threshold:0.8"
TINY = ("--batch", "2", "--seq-len", "16", "--tokens", "512", "--repeats", "2", "--max-repeats", "2", "--warmup", "0")
QUALITY_FIELDS = ("perplexity", "kl", "top1_agreement", "active", "tokens")


# ---------------------------------------------------------------------------------------------
# Budgets.


@pytest.mark.parametrize(
    ("text", "ms"),
    [("50ms", 50.0), ("0.05s", 50.0), ("50", 50.0), ("500us", 0.5), ("500µs", 0.5), (" 2.5 ms ", 2.5), ("1e-1s", 100.0),
     ("1e+3ms", 1000.0), ("1E3", 1000.0), ("2.5e+0s", 2500.0)],
)
def test_parse_budget_accepts(text, ms):
    assert parse_budget(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["fast", "-1", "", "0", "0ms", "1e400ms", "50 minutes", "ms", "1,5ms"])
def test_parse_budget_refuses(text):
    """Each refusal names the budget it could not use: unreadable text, or a time that is not positive and finite
    (``1e400`` overflows to infinity: every point met it)."""
    expected = (f"the budget must be a positive, finite time, got '{text}'" if text in ("0", "0ms", "1e400ms")
                else f"cannot read the budget '{text}'")
    with pytest.raises(PrismError, match=re.escape(expected)):
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


def reference_distinct(points: list[CostQuality], full: float, ratio=1.5, gap=0.03, gain=0.005, spread=1.15) -> list[int]:
    """Straight from the definition: drop unusable and unsteady points, take the frontier of the rest by
    brute force, walk it from the fastest keeping points 3 % slower and 0.5 % better than the last kept."""
    ok = [i for i, p in enumerate(points) if p.perplexity <= ratio * full and p.p90 <= spread * p.latency]
    sub = [points[i] for i in ok]
    front = sorted((ok[j] for j in reference_front(sub)), key=lambda i: points[i].latency)
    kept: list[int] = []
    for i in front:
        p = points[i]
        if not kept or (p.latency >= (1 + gap) * points[kept[-1]].latency
                        and p.perplexity <= (1 - gain) * points[kept[-1]].perplexity):
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
        cq(1.00, 20.0),             # 0: fastest but unusable (perplexity > 1.5 x full): dropped first
        cq(2.00, 14.0, p90=2.5),    # 1: usable but unsteady (p90 > 1.15 x median): dropped first
        cq(2.50, 13.0),             # 2: the fastest usable point: counted
        cq(2.55, 12.5),             # 3: better, but less than 3 % slower than 2: not counted
        cq(2.60, 12.0),             # 4: 4 % slower and 7.7 % better than 2: counted
        cq(3.00, 12.5),             # 5: beaten by 4: off the frontier
        cq(3.20, 11.99),            # 6: 23 % slower but only 0.08 % better than 4 (same quality): not counted
        cq(4.00, 10.0, p90=4.6),    # 7: p90 exactly 1.15 x median: steady, counted
        cq(1.50, 15.1, p90=1.5),    # 8: just above 1.5 x full: dropped
    ]
    assert pareto_front(points) == [0, 8, 1, 2, 3, 4, 6, 7]
    assert distinct_stable(points, full) == [2, 4, 7]
    assert distinct_stable(points, full, CountRule(quality_ratio=2.0)) == [0, 8, 2, 4, 7]
    assert distinct_stable(points, full, CountRule(min_gap=0.0)) == [2, 3, 4, 7]
    assert distinct_stable(points, full, CountRule(min_gain=0.0)) == [2, 4, 6, 7]
    # the original beating an elastic point on both axes removes it from the one frontier
    assert distinct_stable([cq(1.0, 10.0), cq(1.1, 10.0)], full) == [0]


def test_pareto_and_distinct_match_the_definitions_on_random_sets():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 9)
        points = []
        for _ in range(n):  # coarse values so that ties and near-ties happen
            latency = rng.choice([1.0, 1.02, 1.05, 1.5, 2.0, 3.0])
            ppl = rng.choice([9.0, 9.02, 10.0, 12.0, 15.0, 16.0])
            points.append(CostQuality(latency, latency * rng.choice([1.0, 1.1, 1.2]), ppl))
        front = pareto_front(points)
        assert set(front) == reference_front(points)
        assert [points[i].latency for i in front] == sorted(points[i].latency for i in front)
        assert all(points[a].perplexity > points[b].perplexity for a, b in itertools.pairwise(front))
        assert distinct_stable(points, 10.0) == reference_distinct(points, 10.0)


# ---------------------------------------------------------------------------------------------
# Summary tables from a hand-made report (no model).


def _point(name: str, kind: str, ppl: float, ms: float, active: float) -> PointResult:
    return PointResult(name, kind, PointQuality(ppl, 0.0, 1.0, active, 100), {1: Latency(ms, ms, 1.0 / ms, 1.0, 3, ms / 2)},
                       1.0, 2.0, {1: "prism:grouped"})


def _report(points: list[PointResult]) -> BenchReport:
    counts = {1: count_points(points, 1, 10.0)}
    return BenchReport(N_SUB, "x", "src", None, BenchSettings(batches=[1]), 10.0, points, counts, {})


def test_summary_tables_by_hand():
    points = [
        _point("topk:2", "elastic", 12.0, 1.0, 2), _point("topk:4", "elastic", 10.5, 1.5, 4),
        _point("pattern:4,0", "elastic", 10.8, 1.5, 4), _point("linear:4", "elastic", 11.5, 1.4, 4),
        _point("linear:2", "elastic", 13.0, 0.8, 2),
        _point("topk:8", "elastic", 10.0, 2.0, 8), _point("linear:8", "elastic", 10.0, 1.9, 8),
        _point("original:1", "original", 11.0, 1.3, 4), _point("original:2", "original", 10.0, 1.8, 8),
    ]
    report = _report(points)
    # One frontier: linear:2 (0.8), topk:2 (1.0), original:1 (1.3; beats linear:4), topk:4 (1.5), original:2 (1.8)
    assert report.counts[1].frontier == ["linear:2", "topk:2", "original:1", "topk:4", "original:2"]
    assert report.counts[1].counted == ["linear:2", "topk:2", "original:1", "topk:4", "original:2"]
    assert report.counts[1].original_alone == ["original:1", "original:2"]
    assert (report.counts[1].elastic, report.counts[1].ratio) == (3, 2.5)
    tables = {t.title.split(":")[0].split(" (")[0]: t for t in summary_tables(report)}
    count = tables["distinct stable operating points"].records()[0]
    assert (count["counted"], count["elastic"], count["original alone"], count["ratio"]) == (5, 3, 2, 2.5)
    cells = tables["equal compute"].records()
    assert len(cells) == 1
    row = cells[0]
    assert (row["k'"], row["K"], row["original"]) == (1, 4, 11.0)
    assert (row["topk"], row["pattern"], row["linear"]) == (10.5, 10.8, 11.5)
    assert row["best elastic wins"] is True
    same = {(r["point"], r["reference"]): r["ratio b=1"] for r in tables["same computation side by side"].records()}
    assert same == {("linear:4", "original:1"): pytest.approx(1.4 / 1.3), ("linear:8", "original:2"): pytest.approx(1.9 / 1.8),
                    ("topk:2", "linear:2"): pytest.approx(1.0 / 0.8), ("topk:4", "linear:4"): pytest.approx(1.5 / 1.4),
                    ("topk:8", "linear:8"): pytest.approx(2.0 / 1.9)}
    elasticity = tables["elasticity of the MoE layers"]
    assert [r["point"] for r in elasticity.records()] == ["topk:2", "topk:4", "linear:4", "linear:2", "topk:8", "linear:8"]
    # a K with no elastic point measured is not a loss
    report.points = [p for p in points if p.point not in ("topk:4", "pattern:4,0", "linear:4")]
    cells = next(t for t in summary_tables(report) if t.title.startswith("equal compute")).records()
    assert cells[0]["best elastic wins"] is None
    # the same routing as the original, equal but for the last digits: a tie, not a win
    report.points = [p for p in points if p.point not in ("topk:4", "pattern:4,0", "linear:4")]
    report.points.append(_point("linear:4", "elastic", 11.0 * (1 - 1e-11), 1.4, 4))
    cells = next(t for t in summary_tables(report) if t.title.startswith("equal compute")).records()
    assert cells[0]["best elastic wins"] is False


def test_the_same_routing_claim_follows_the_exports_exactness():
    """An export written with --allow-inexact: its linear:N*k' does not route like original:k', and the
    side-by-side table no longer says it does."""
    points = [_point("linear:4", "elastic", 11.0, 1.4, 4), _point("original:1", "original", 11.0, 1.3, 4)]
    report = _report(points)

    def claim() -> str:
        table = next(t for t in summary_tables(report) if t.title.startswith("same computation"))
        return " ".join(table.notes)

    assert "routes exactly like original:k'" in claim()
    report.linear_exact = False
    assert "only approximately" in claim() and "exactly" not in claim()


def test_a_layered_point_is_timed_against_the_linear_gate_at_its_mean_k():
    """``layered:2+2`` over 4 layers computes 2.5 sub-experts a token: its ideal MoE time is 2.5/8 of ``linear:8``'s."""
    points = [_point("linear:8", "elastic", 10.0, 2.0, 8), _point("layered:2+2", "elastic", 12.0, 0.9, 2.5),
              _point("original:1", "original", 11.0, 1.3, 4), _point("original:2", "original", 10.0, 1.8, 8)]
    tables = summary_tables(_report(points))
    elasticity = next(t for t in tables if t.title.startswith("elasticity")).records()
    row = next(r for r in elasticity if r["point"] == "layered:2+2")
    assert row["K / (N*k)"] == pytest.approx(2.5 / 8)
    assert row["MoE time ratio"] == pytest.approx(0.45 / 1.0)  # MoE ms is half the step in these hand-made points
    assert row["elasticity (ratio / ideal)"] == pytest.approx(0.45 / (2.5 / 8))
    # counted: layered:2+2 (0.9 ms), original:1 (1.3), original:2 (1.8); without it the original's two
    count = next(t for t in tables if t.title.startswith("distinct stable")).records()[0]
    assert (count["counted"], count["counted without layered points"]) == (3, 2)
    assert "counted without layered points" not in next(t for t in summary_tables(_report(points[:1] + points[2:]))
                                                        if t.title.startswith("distinct stable")).columns


def test_best_under_budget_by_hand():
    points = [_point("linear:2", "elastic", 13.0, 0.8, 2), _point("topk:3", "elastic", 11.5, 1.2, 3),
              _point("original:1", "original", 11.0, 1.3, 4), _point("linear:8", "elastic", 10.0, 1.9, 8)]
    report = _report(points)
    picks = best_under_budget(report, 1, 1.25, 12.0)  # budget between topk:3 (1.2 ms) and original:1 (1.3 ms)
    assert picks["budget"].point == "topk:3"
    assert picks["quality"].point == "topk:3"  # the cheapest with perplexity <= 12
    assert best_under_budget(report, 1, 1.3, 11.0)["budget"].point == "original:1"
    assert best_under_budget(report, 1, 1.3, 11.0)["quality"].kind == "original"
    none = best_under_budget(report, 1, 0.5, 9.0)
    assert none["budget"] is None and none["fastest"].point == "linear:2"
    assert none["quality"] is None and none["best_quality"].point == "linear:8"


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
        if p["kind"] == "elastic":  # counted at dispatch: prism's grouped executor ran every step
            assert p["implementation"] == {"2": "prism:grouped"} and p["alternatives"] == {}
        else:  # the original runs with prism's and transformers' default experts; the faster counts
            alts = p["alternatives"]["2"]
            assert set(alts) == {"prism:grouped", "grouped_mm"}
            fastest = min(alts, key=lambda name: alts[name]["median_ms"])
            assert p["implementation"]["2"] == fastest and p["latency"]["2"] == alts[fastest]
    csv_lines = (out / "bench.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(names) and csv_lines[0].startswith("point,kind")
    assert "distinct stable operating points" in (out / "bench_summary.md").read_text()
    assert "topk:1" in (out / "bench.md").read_text()


def test_bench_budget_and_quality_picks(cli, bench_runs, bench_export):
    result, data, out, _ = _budget_run(cli, bench_runs, bench_export)
    assert result.code == 0, result
    pts = data["points"]
    budget = min(pts, key=lambda p: (p["perplexity"], p["latency"]["2"]["median_ms"]))
    cheapest = min(pts, key=lambda p: (p["latency"]["2"]["median_ms"], p["perplexity"]))
    selection = data["selection"]
    assert selection["batch"] == 2 and selection["budget_ms"] == 100000 and selection["max_perplexity"] == 1e9
    for key, want in (("budget", budget), ("quality", cheapest)):
        assert selection[key] == {"point": want["point"], "kind": want["kind"], "perplexity": want["perplexity"],
                                  "median_ms": want["latency"]["2"]["median_ms"]}
    assert "best point within the budget" in result.out and budget["point"] in result.out
    assert "cheapest point with perplexity" in result.out and cheapest["point"] in result.out
    # The picks are in the Markdown table too, naming the kind: a table read later says what was chosen.
    md = (out / "bench.md").read_text()
    assert f"best point within the budget of 100000 ms per decode step at batch 2: {budget['point']} ({budget['kind']})" in md
    assert f"cheapest point with perplexity <= 1e+09: {cheapest['point']} ({cheapest['kind']})" in md


def test_bench_budget_not_met_exits_3(cli, bench_runs, bench_export):
    result, data, out, _ = _tight_run(cli, bench_runs, bench_export)
    assert result.code == 3, result
    message = result.err.strip().splitlines()[-1]
    assert "Traceback" not in result.err
    fastest = min(data["points"], key=lambda p: p["latency"]["2"]["median_ms"])
    best = min(data["points"], key=lambda p: p["perplexity"])
    assert "no operating point meets 0.0001 ms" in message and f"the fastest is {fastest['point']}" in message
    assert "no operating point reaches perplexity 1" in message and f"the best is {best['point']}" in message
    named = {k: (v["point"] if isinstance(v, dict) else v) for k, v in data["selection"].items()}
    assert named == {"batch": 2, "budget_ms": 0.0001, "max_perplexity": 1.0, "budget": None, "fastest": fastest["point"],
                     "quality": None, "best_quality": best["point"]}
    md = (out / "bench.md").read_text()
    assert "not met: no operating point meets 0.0001 ms" in md and "not met: no operating point reaches perplexity 1" in md


def test_bench_quality_is_deterministic(cli, bench_runs, bench_export, tmp_path):
    """The same quality columns from a second, separate process (no cache, seed or state shared)."""
    import os
    import subprocess
    import sys

    _, first, _, _ = _budget_run(cli, bench_runs, bench_export)
    out = tmp_path / "again"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "prism_cli", "bench", str(bench_export), *TINY, "--points", POINTS,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    second = json.loads((out / "bench.json").read_text())
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


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_bench_batch_too_large_names_the_largest_that_fits(error, cli, tmp_path, bench_export, monkeypatch):
    """An out-of-memory step (simulated above batch 2, in CUDA's words and in torch's CPU allocator's)
    is one line naming the largest batch that fits."""
    from prism_cli.evaluation import timing

    real_step = timing.StepTimer._step

    def step(self):
        if self.batch > 2:
            raise error
        real_step(self)

    monkeypatch.setattr(timing.StepTimer, "_step", step)
    args = ("--points", "topk:1", "--batch", "8", "--seq-len", "16", "--tokens", "256", "--repeats", "1", "--warmup", "1")
    result = cli("bench", bench_export, *args, "--out", tmp_path / "o")
    # The quality sweep ran (its progress bar is on stderr too); the failure is one line at the end.
    assert result.code == 2 and "Traceback" not in result.err, result
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: batch 8") and "the largest batch that fits is 2" in last, last
    assert not (tmp_path / "o").exists()


def test_cache_bytes_per_sequence_by_hand(tiny_model_dir):
    """The tiny OLMoE: 2 layers x (keys, values) x 2 KV heads x head dim 64 / 4 x float32, over the
    prompt's 16 columns and the cache's 64 spare ones."""
    from transformers import AutoModelForCausalLM

    from prism_cli.evaluation.timing import cache_bytes_per_sequence
    from prism_cli.runtime.kvcache import RESERVE

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("olmoe")).eval()
    assert cache_bytes_per_sequence(model, 16, model.config.vocab_size) == 2 * 2 * 2 * (16 + RESERVE) * 16 * 4


def test_a_prompt_cache_built_in_chunks_is_the_whole_batch_one(tiny_model_dir, monkeypatch):
    """Prompts of 16 tokens, 2 sequences per forward, 5 sequences: the cache and the decode step's
    logits equal those of transformers' own cache filled by one forward over all 5 (float32, 1e-5)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from prism_cli.evaluation import timing

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("olmoe")).eval()
    monkeypatch.setattr(timing, "PROMPT_CHUNK_TOKENS", 32)
    shapes: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    timer = timing.StepTimer(model, 5, 16, "decode", model.config.vocab_size)
    hook.remove()
    assert shapes == [(2, 16), (2, 16), (1, 16), (5, 1)]  # three prompt chunks, then the untimed decode step
    with torch.inference_mode():
        reference = model(input_ids=timer.ids[:, :16], use_cache=True, cache=DynamicCache(config=model.config)).past_key_values
        for ours, theirs in zip(timer.cache.layers, reference.layers, strict=True):
            assert ours.keys.shape == theirs.keys.shape == (5, 2, 16, 16)
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
        step = model(input_ids=timer.ids[:, 16:], use_cache=True, cache=timer.cache).logits
        expected = model(input_ids=timer.ids[:, 16:], use_cache=True, cache=reference).logits
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    timer.close()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_bench_refuses_a_batch_that_cannot_fit_before_the_quality_pass(mode, cli, tmp_path, bench_export, monkeypatch):
    """Batch 8 x 16 needs at least 8 x 17 token ids (8 B each) and one hidden state 8 x 16 x 64 x 4 B
    (33,856 B), plus, to decode, 8 sequences' caches (8 x 40,960 B, above) for each of the two models
timed (the source and the export): with 40,000 B available,
    decode is refused and prefill is not; with 30,000 B both are, before any quality pass."""
    from prism_cli.evaluation import bench

    args = ("--mode", mode, "--points", "topk:1", "--batch", "8", "--seq-len", "16", "--tokens", "256",
            "--repeats", "1", "--warmup", "1", "--out", tmp_path / "o")
    ran: list[int] = []
    monkeypatch.setattr(bench, "_quality", lambda *a, **k: ran.append(1) or (_ for _ in ()).throw(SystemExit(9)))
    for free, refused in ((30_000, True), (40_000, mode == "decode")):
        monkeypatch.setattr(bench, "available_memory", lambda device, free=free: free)
        result = cli("bench", bench_export, *args)
        if refused:
            assert result.code == 2 and not ran, result
            last = result.err.strip().splitlines()[-1]
            assert last.startswith(f"error: batch 8 x seq-len 16 ({mode}) does not fit in memory"), last
            assert ("KV cache" in last) == (mode == "decode"), last
        else:
            assert result.code == 9 and ran, result  # went on to the quality pass
    assert not (tmp_path / "o").exists()


def test_bench_other_experts_implementation(cli, bench_runs, bench_export):
    result, data, _, _ = bench_run(cli, bench_runs, "eager", bench_export, "--experts-impl", "eager", "--points", "topk:2;2,pattern:4,0")
    assert result.code == 0, result
    by_name = {p["point"]: p for p in data["points"]}
    assert list(by_name) == ["topk:2", "pattern:4,0", "original:1", "original:2"]  # "2" is topk:2, measured once
    elastic = [p for p in data["points"] if p["kind"] == "elastic"]
    assert len(elastic) == 2 and all(p["implementation"]["2"] == "eager" for p in elastic)
    # all sub-experts of the best expert, weighted by its routing weight, is the original at top-1
    assert by_name["pattern:4,0"]["perplexity"] == pytest.approx(by_name["original:1"]["perplexity"], rel=1e-5)
    assert by_name["pattern:4,0"]["active"] == by_name["original:1"]["active"] == N_SUB


def test_bench_refuses_listed_threshold_points_without_prism_experts(cli, tmp_path, bench_export):
    result = cli("bench", bench_export, *TINY, "--experts-impl", "eager", "--points", "topk:2;threshold:0.5", "--out", tmp_path / "o")
    assert_one_line_failure(result, "threshold:0.5", "--experts-impl prism")


def test_median_ci_by_hand():
    from prism_cli.evaluation.timing import median_ci, relative_ci

    # n = 20: ranks 6 and 15 (the textbook 95 % interval of the median)
    samples = [float(v) for v in range(20, 0, -1)]
    assert median_ci(samples) == (6.0, 15.0)
    assert relative_ci(samples) == pytest.approx((15.0 - 6.0) / 2 / 10.5)
    assert median_ci([3.0]) == (3.0, 3.0)
    assert relative_ci([5.0] * 7) == 0.0


def test_every_timed_step_follows_settle_untimed_steps_of_its_own_point(monkeypatch):
    """Runners a, a', b (two points of model A, then model B): in every round each runner runs ``settle``
    untimed steps, then its timed one, so no timed step follows a step of another point."""
    from types import SimpleNamespace

    from prism_cli.evaluation import bench as bench_module

    steps: list[tuple[str, bool]] = []  # (point, timed) in the order they ran
    timing: dict[str, Any] = {"on": False, "point": None}

    class FakeTimer:
        def __init__(self, model, *_args, **_kwargs):
            self.model = model

        def sample(self):
            steps.append((timing["point"], timing["on"]))
            return 1.0, None, 0.0

        def summarize(self, samples):
            return Latency(1.0, 1.0, 1.0, 0.0, len(samples), None, 0.0)

        def close(self):
            pass

    monkeypatch.setattr(bench_module, "StepTimer", FakeTimer)
    models = {name: SimpleNamespace(name=name) for name in "AB"}
    state = SimpleNamespace(layers=[])

    def runner(point, model):
        def prepare():
            timing["on"], timing["point"] = False, point
            return models[model]
        return SimpleNamespace(model=models[model], state=state, prepare=prepare, implementation="prism")

    for settle in (0, 1, 6):
        steps.clear()
        settings = BenchSettings(batches=[1], repeats=3, max_repeats=3, warmup=2, settle=settle)
        settings.validate()
        # The timed step is the one between the two calls that collect its dispatch counts.
        monkeypatch.setattr(bench_module, "reset_dispatch_counts", lambda: timing.__setitem__("on", not timing["on"]) or {})
        bench_module._latency([runner("a", "A"), runner("a'", "A"), runner("b", "B")], 1, settings, 10, None)
        warm = [("a", False)] * 2 + [("a'", False)] * 2 + [("b", False)] * 2  # the warm-up steps of each runner
        round_ = [step for p in ("a", "a'", "b") for step in [(p, False)] * settle + [(p, True)]]
        assert steps == warm + round_ * 3, settle


def test_bench_refuses_a_negative_settle(cli, tmp_path, bench_export):
    result = cli("bench", bench_export, *TINY, "--settle", "-1", "--out", tmp_path / "o")
    assert_one_line_failure(result, "--settle")


def test_one_sample_has_no_spread_and_the_precision_loop_repeats_on(monkeypatch):
    """``--repeats 1``: the median of one sample is not known within any precision (its interval is the
    sample itself), so the loop times a second round before it stops; with ``--max-repeats 1`` the spread
    is reported as unknown, not as 0."""
    from types import SimpleNamespace

    from prism_cli.evaluation import bench as bench_module
    from prism_cli.evaluation.timing import StepTimer, relative_ci

    assert relative_ci([3.0]) is None

    class FakeTimer:  # a step of exactly 1 ms: any two samples give a spread of 0
        summarize = StepTimer.summarize

        def __init__(self, model, *_args, **_kwargs):
            self.batch, self.seq_len, self.mode = 1, 4, "decode"

        def sample(self):
            return 1.0, None, 0.0

        def close(self):
            pass

    monkeypatch.setattr(bench_module, "StepTimer", FakeTimer)
    monkeypatch.setattr(bench_module, "reset_dispatch_counts", lambda: {})
    runner = SimpleNamespace(model=SimpleNamespace(), state=SimpleNamespace(layers=[]), prepare=lambda: runner.model,
                             implementation="prism")
    for max_repeats, expected in ((10, 2), (1, 1)):
        settings = BenchSettings(batches=[1], repeats=1, max_repeats=max_repeats, warmup=0, settle=0)
        settings.validate()
        latency, _ = bench_module._latency([runner], 1, settings, 10, None)[0]
        assert latency.repeats == expected, max_repeats
        assert latency.median_ci == (0.0 if expected > 1 else None)


def test_bench_replaces_an_earlier_bench_result(cli, bench_runs, bench_export, tmp_path):
    """A second run into the folder of an earlier one replaces its files (only a user's own files are refused)."""
    import shutil

    _, _, first, _ = _budget_run(cli, bench_runs, bench_export)
    out = tmp_path / "again"
    shutil.copytree(first, out)
    before = {name: (out / name).read_bytes() for name in ("bench.md", "bench.csv", "bench.json", "bench_summary.md")}
    result = cli("bench", bench_export, *TINY, "--points", "topk:1", "--out", out)
    assert result.code == 0, result
    after = {name: (out / name).read_bytes() for name in before}
    assert all(after[name] != before[name] for name in before)
    assert [p["point"] for p in json.loads(after["bench.json"])["points"]][0] == "topk:1"


@pytest.mark.parametrize("earlier", [False, True], ids=["new folder", "over an earlier result"])
def test_bench_interrupted_while_writing_leaves_no_empty_folder_and_no_stale_file(cli, bench_runs, bench_export, tmp_path,
                                                                                   monkeypatch, earlier):
    """A Ctrl-C once the sweep is done, while the files are written: a folder the run created is not left
    empty, and over an earlier result no file of that result is left beside the new ones (the earlier plot
    had stayed with the new tables). A fuzz round stopped runs in that window."""
    import shutil

    import prism_cli.evaluation.plot as plot

    out = tmp_path / "res"
    if earlier:
        _, _, first, _ = _budget_run(cli, bench_runs, bench_export)
        shutil.copytree(first, out)

    def stopped(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    if earlier:
        monkeypatch.setattr(plot, "plot_frontiers", stopped)  # the last file
    else:
        monkeypatch.setattr("prism_cli.report.ResultTable.save", stopped)  # the first file
    result = cli("bench", bench_export, *TINY, "--points", "topk:1", "--out", out)
    assert result.code == 130, result
    if earlier:  # the new tables, written before the plot; the earlier plot is gone, not kept beside them
        assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "bench.md", "bench_summary.md"]
        assert [p["point"] for p in json.loads((out / "bench.json").read_text())["points"]] == ["topk:1", "original:1", "original:2"]
        assert "4 outputs were written before" in result.err
    else:
        assert not out.exists() and "this run left no output" in result.err
