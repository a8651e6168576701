"""Benchmark: the cost of profiling relative to a plain forward pass, and its memory bound.

    python -m prism_cli.profiling.benchmark --out results/bench_profile.json

Time: both runs use the same model, token windows and batch size. The plain pass uses transformers'
default experts implementation; the profiling pass records every expert's activations and writes the
HDF5 file (its wall time includes the write). Each is timed ``--repeats`` times; the medians are compared.

Memory: ``prism profile`` runs in a fresh process at each of ``--rss-tokens`` with the same row cap,
and the process's peak RSS is recorded: it must not grow with the token count once the reservoirs
are full.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prism_cli.data import split_text
from prism_cli.data.windows import batched, token_windows
from prism_cli.environment import environment
from prism_cli.io import write_json
from prism_cli.models.loading import load_model, model_label
from prism_cli.profiling.profiler import ProfileSettings, profile_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-tokens", default="16384,131072", help="token counts for the peak-RSS runs")
    ap.add_argument("--out", type=Path, default=Path("results/bench_profile.json"))
    args = ap.parse_args()

    loaded = load_model(args.model)
    text = split_text("calibration")
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.tokens)
    settings = ProfileSettings(tokens=windows.numel(), seq_len=args.seq_len, batch_size=args.batch_size)
    default_impl = loaded.model.config._experts_implementation

    def plain() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batched(windows, args.batch_size):
                loaded.model(input_ids=batch, use_cache=False)
        return time.perf_counter() - start

    def profiled() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            profile_model(loaded, text, "builtin:calibration", settings, Path(tmp) / "profile.h5")
            return time.perf_counter() - start

    plain(), profiled()  # warm-up: first-call allocations, tokenizer caches
    plain_s = [plain() for _ in range(args.repeats)]
    profile_s = [profiled() for _ in range(args.repeats)]
    result = {
        "model": model_label(loaded.name),
        "tokens": windows.numel(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "plain_forward_experts_implementation": default_impl,
        "plain_forward_seconds": plain_s,
        "profile_seconds": profile_s,
        "ratio": statistics.median(profile_s) / statistics.median(plain_s),
        "peak_rss_mib": {t: _peak_rss_mib(args.model, t, args.batch_size) for t in map(int, args.rss_tokens.split(","))},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"profiling / plain forward = {result['ratio']:.3f} over {result['tokens']:,} tokens")
    print("peak RSS of `prism profile` by --tokens: " + ", ".join(f"{t:,}: {m:.0f} MiB" for t, m in result["peak_rss_mib"].items()))
    print(f"written {args.out}")


_RSS_CHILD = """
import resource, sys
from prism_cli.app import main
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(model: str, tokens: int, batch_size: int) -> float:
    """Peak RSS (MiB) of ``prism profile --tokens tokens`` in a fresh process (ru_maxrss is in KiB on Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["prism", "profile", model, "--tokens", str(tokens), "--batch-size", str(batch_size), "--out", f"{tmp}/p.h5"]
        done = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {argv!r}" + _RSS_CHILD],
                              capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


if __name__ == "__main__":
    main()
