"""Benchmark: is the distinct-stable count a property of the model or of one lucky timing run?

    python -m prism_cli.pipeline.stability --config configs/builtin.yaml --runs 3 --out results/bench_stability

Exports the table's committed partition (``tables/<name>/partition.h5``) once, measures quality once,
then times every operating point ``--runs`` times with the table's bench settings (each run is a
complete timing sweep: all batch sizes, round-robin, adaptive repeats). Writes, per run and batch: the
distinct stable points counted on the one frontier (``pareto.py``), how many are elastic, the
original's own count and the ratio; and the side-by-side step-time ratios of the same computation
(``linear:N*k'`` over ``original:k'``, ``topk:K`` over ``linear:K``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from prism_cli.evaluation.bench import BenchReport, run_bench
from prism_cli.evaluation.bench_tables import same_routing_table
from prism_cli.pipeline.tables import TableConfig, bench_settings, table_export
from prism_cli.report import ResultTable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/builtin.yaml"))
    ap.add_argument("--tables", type=Path, default=Path("tables"), help="where the committed partition is")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/bench_stability"))
    args = ap.parse_args()

    config = TableConfig.load(args.config, profiles=False)  # the committed partition is reused
    settings, text = bench_settings(config)
    reports: list[BenchReport] = []
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"
        table_export(config, args.tables / config.name / "partition.h5", export_dir)
        quality = None
        for run in range(args.runs):
            report = run_bench(str(export_dir), text, settings, quality=quality)
            quality = {p.point: p.quality for p in report.points}
            reports.append(report)
            for b, c in report.counts.items():
                print(f"run {run + 1}, batch {b}: {len(c.counted)} counted ({c.elastic} elastic), "
                      f"original alone {len(c.original_alone)}, ratio {c.ratio}", flush=True)

    counts = ResultTable(f"distinct stable points of {config.name}, {args.runs} timing runs",
                         ["run", "batch", "counted", "elastic", "original alone", "ratio", "counted points"])
    for run, report in enumerate(reports, 1):
        for b, c in report.counts.items():
            counts.add(run, b, len(c.counted), c.elastic, len(c.original_alone), c.ratio, ", ".join(c.counted))
    ratios = ResultTable("same computation side by side: step-time ratio per run (median over runs last)",
                         ["point", "reference", "batch", *[f"run {r}" for r in range(1, args.runs + 1)], "median"])
    per_run = [same_routing_table(r) for r in reports]
    if per_run[0] is not None:
        for i, row in enumerate(per_run[0].records()):
            for b in settings.batches:
                values = [t.records()[i][f"ratio b={b}"] for t in per_run]
                ratios.add(row["point"], row["reference"], b, *values, statistics.median(values))
    env = reports[0].environment | {"command": f"python -m prism_cli.pipeline.stability --config {args.config} --runs {args.runs}"}
    counts.notes.append(f"{settings.mode} step, seq-len {settings.seq_len}, measured on {env['processor']}, "
                        f"{env['torch_threads']} threads; quality measured once, timing {args.runs} times")
    counts.save(args.out, extra={"environment": env, "side_by_side": ratios.records()})
    ratios.save(args.out.with_name(args.out.name + "_ratios"))
    print(counts.markdown())
    print(ratios.markdown())


if __name__ == "__main__":
    main()
