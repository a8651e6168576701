"""The engine's decode step over its reserved KV cache against the concatenating cache it replaced.

    python scripts/bench_kv_cache.py --export runs/serving/export --out results/kv_cache
    (make bench-kv-cache)

``runtime/kvcache.py`` keeps each layer's keys and values in buffers with spare columns, so a decode step
writes its token in place; transformers' ``DynamicLayer``, which the engine used before, concatenates and
so copies the whole cache every step. Both run side by side here through the serving executor
(``ModelExecutor.decode``, the engine's own step: left-padded rows, a 2-D mask, per-row positions): one
prefill per case, its cache copied into a plain ``DynamicCache`` for the other side, then the two sides'
steps alternate, each growing its own cache by one column. The greedy tokens of the two sides must be the
same (the column "same tokens"). Writes <out>.md/.csv/.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from transformers import DynamicCache

from prism_cli.console import console
from prism_cli.environment import environment, machine_label
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import export_meta
from prism_cli.serving.engine import Batch
from prism_cli.serving.executor import KVRows, ModelExecutor, load_served_model
from prism_cli.serving.requests import Request, SamplingParams

BATCHES = [1, 8, 16, 32]
WIDTHS = [128, 256]
STEPS, WARMUP = 40, 5


def _concatenating(kv: KVRows) -> KVRows:
    """The same rows in transformers' own cache, whose every step concatenates (the engine before)."""
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in kv.cache.layers]
    return KVRows(DynamicCache(ddp_cache_data=layers), kv.mask.clone(), kv.seen.clone(), kv.last.clone())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, default=Path("runs/serving/export"))
    ap.add_argument("--points", default="linear:2,linear:8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/kv_cache"))
    args = ap.parse_args()
    meta = export_meta(str(args.export)) if args.export.is_dir() else None
    if meta is None:
        raise SystemExit(f"error: {args.export} is not a prism export folder (make serving-export builds the default one)")
    served = load_served_model(str(args.export))
    executor = ModelExecutor(served, seed=args.seed)
    vocab = served.model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    table = ResultTable("decode step of the engine: reserved KV cache against a concatenating one (ms, median)",
                        ["point", "batch", "cache width", "concatenating", "reserved", "reserved / concatenating",
                         "same tokens"])
    for name in args.points.split(","):
        point = served.space.parse(name)
        for width in WIDTHS:
            for batch_size in BATCHES:
                requests = [Request(torch.randint(0, vocab, (width,), generator=generator).tolist(),
                                    SamplingParams(temperature=0.0), point, 0.0) for _ in range(batch_size)]
                kv, _, _ = executor.prefill(requests, [point] * batch_size)
                sides = {"concatenating": Batch(requests, _concatenating(kv)), "reserved": Batch(requests, kv)}
                times: dict[str, list[float]] = {side: [] for side in sides}
                tokens: dict[str, list[list[int]]] = {side: [] for side in sides}
                for step in range(WARMUP + STEPS):
                    for side, batch in sides.items():
                        out, ms = executor.decode(batch, [point] * batch_size)
                        tokens[side].append(out)
                        if step >= WARMUP:
                            times[side].append(ms)
                old, new = (statistics.median(times[s]) for s in ("concatenating", "reserved"))
                table.add(name, batch_size, width, old, new, new / old,
                          "yes" if tokens["concatenating"] == tokens["reserved"] else "NO")
                console.print(f"{name} width {width} batch {batch_size}: {old:.2f} -> {new:.2f} ms")
    env = environment()
    table.notes += [
        f"Export {args.export}, float32, measured on {machine_label(env)}, CPU allocator {env['cpu_allocator']}; "
        f"cache width: the prompt's tokens at the first of {WARMUP} untimed and {STEPS} timed steps per side, the "
        "sides' steps alternating; the time of the forward pass only (ModelExecutor.decode), which is where the "
        "cache is updated.",
        f"Command: python scripts/bench_kv_cache.py --export {args.export} --out {args.out} (make bench-kv-cache).",
    ]
    table.publish(args.out)


if __name__ == "__main__":
    main()
