"""Benchmark: the cost of profiling relative to a plain forward pass over the same tokens.

    python -m prism_cli.profiling.benchmark --out results/bench_profile.json

Both runs use the same model, token windows and batch size. The plain pass uses transformers' default
experts implementation; the profiling pass records every expert's activations and writes the HDF5
file (its wall time includes the write). Each is timed ``--repeats`` times; the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prism_cli.data import split_text
from prism_cli.evaluation.bench import environment
from prism_cli.evaluation.perplexity import batched, token_windows
from prism_cli.io import write_json
from prism_cli.models.loading import load_model
from prism_cli.profiling.profiler import ProfileSettings, profile_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
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
        "model": loaded.name,
        "tokens": windows.numel(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "plain_forward_experts_implementation": default_impl,
        "plain_forward_seconds": plain_s,
        "profile_seconds": profile_s,
        "ratio": statistics.median(profile_s) / statistics.median(plain_s),
        "target_ratio": 1.5,
        "environment": environment(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"profiling / plain forward = {result['ratio']:.3f} (target <= 1.5) over {result['tokens']:,} tokens; written {args.out}")


if __name__ == "__main__":
    main()
