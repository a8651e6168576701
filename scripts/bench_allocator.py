"""Step time under glibc's default allocator and under prism's ``reuse`` setting (prism_cli/allocator.py).

    python scripts/bench_allocator.py --export runs/builtin/export --out results/allocator
    (make bench-allocator)

Runs ``prism bench`` twice on one export, ``--cpu-allocator system`` then ``reuse``, each in its own
process (the setting is process-wide and glibc cannot undo it), with the same points, batches and
seed, and writes per point and batch both medians, their ratio and both p90 / median spreads to
<out>.md/.csv/.json. The two runs are minutes apart, not interleaved: compare them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from prism_cli.report import ResultTable

POINTS = "linear:2;linear:4;linear:8;topk:4"


def run(export: Path, mode: str, out: Path, args: argparse.Namespace) -> dict:
    subprocess.run([sys.executable, "-m", "prism_cli", "bench", str(export), "--mode", "prefill", "--batch", args.batch,
                    "--seq-len", "256", "--tokens", "2048", "--points", args.points, "--repeats", "20",
                    "--max-repeats", "30", "--cpu-allocator", mode, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/builtin/export"))
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--points", default=POINTS)
    ap.add_argument("--out", type=Path, default=Path("results/allocator"))
    args = ap.parse_args()
    ResultTable.check_writable(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        reports = {mode: run(args.export, mode, Path(tmp) / mode, args) for mode in ("system", "reuse")}
    table = ResultTable(
        "prefill step time under glibc's default allocator and prism's reuse setting",
        ["point", "batch", "ms system", "ms reuse", "reuse / system", "p90 / median system", "p90 / median reuse"],
    )
    by_mode = {mode: {p["point"]: p for p in r["points"]} for mode, r in reports.items()}
    for name, system in by_mode["system"].items():
        for batch, lat in system["latency"].items():
            other = by_mode["reuse"][name]["latency"][batch]
            table.add(name, int(batch), lat["median_ms"], other["median_ms"], other["median_ms"] / lat["median_ms"],
                      lat["p90_ms"] / lat["median_ms"], other["p90_ms"] / other["median_ms"])
    env = reports["reuse"]["environment"]
    table.notes += [
        f"export {args.export}, prefill 256 tokens per sequence, float32, {env['processor']}, {env['torch_threads']} threads; "
        f"reuse = {env['cpu_allocator']}",
        "each setting in its own `prism bench` process, the original's points included; the two runs follow each other",
        "Command: python scripts/bench_allocator.py (make bench-allocator).",
    ]
    table.save(args.out, extra={"environment": env})
    print(table.markdown())


if __name__ == "__main__":
    main()
