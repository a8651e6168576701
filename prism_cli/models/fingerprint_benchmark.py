"""Benchmark: the cost of the weights fingerprint on a large checkpoint, against hashing whole files.

    python -m prism_cli.models.fingerprint_benchmark --size-gb 8 --out results/bench_fingerprint

Builds a synthetic safetensors checkpoint with the *tensor layout* of Qwen3-30B-A3B (61 GB in
bfloat16: 48 layers x 128 experts x 3 projections, 18,867 tensors, the same names, router, attention
and embedding shapes), with the experts' width shrunk so the whole fits ``--size-gb`` (sharded in
4 GB files like hub checkpoints; the bytes are random). The fingerprint reads the same number of
bytes at the same number of places as on the real 61 GB checkpoint (whole routers and small tensors,
4 x 4 KiB of every other tensor, all of which are larger than that sample on both), so its measured
time is the estimate for the 61 GB model; only the distance between the samples is smaller here.
For comparison the files are also hashed whole (SHA-256, what a "content hash" of the files costs),
which scales with the bytes: that time is extrapolated linearly to 60 GB.

Cold runs first evict the checkpoint's pages from the page cache (``fsync`` + ``POSIX_FADV_DONTNEED``
on its files only), so they read from the disk (in a virtual machine: from its virtual disk, which the
host may cache); warm runs read from memory. Medians of ``--repeats``, with the process's CPU time and
the load average, since wall times on a busy machine include waiting for a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_cli.environment import environment
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint_files import CHUNK_BYTES, INDEX, SAMPLE_CHUNKS, checkpoint_tensors
from prism_cli.models.loading import weights_fingerprint
from prism_cli.report import ResultTable

#: Qwen3-30B-A3B (hub config): the layout the synthetic checkpoint copies.
LAYOUT = dict(layers=48, experts=128, hidden=2048, width=768, vocab=151_936, heads=32, kv_heads=4, head_dim=128, top_k=8)
REAL_BYTES = 61.1e9  # its bf16 safetensors, as listed on the hub
BF16 = 2


def tensor_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the layout (hub names), with the experts' width set to ``width``."""
    c = LAYOUT
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab"], h), "lm_head.weight": (c["vocab"], h),
                                          "model.norm.weight": (h,)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                   f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                   f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                   f"{p}.self_attn.q_norm.weight": (c["head_dim"],), f"{p}.self_attn.k_norm.weight": (c["head_dim"],),
                   f"{p}.mlp.gate.weight": (c["experts"], h)}
        for e in range(c["experts"]):
            for proj, shape in (("gate_proj", (width, h)), ("up_proj", (width, h)), ("down_proj", (h, width))):
                shapes[f"{p}.mlp.experts.{e}.{proj}.weight"] = shape
    return shapes


def _nbytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * BF16


def width_for(size_bytes: float) -> int:
    """The largest expert width whose checkpoint stays within ``size_bytes``."""
    fixed = sum(_nbytes(s) for n, s in tensor_shapes(1).items() if ".experts." not in n)
    per_width = sum(_nbytes(s) for n, s in tensor_shapes(1).items() if ".experts." in n)
    width = int((size_bytes - fixed) // per_width)
    if width < 8:  # 8 x 2048 x 2 bytes = 32 KiB: still larger than the 16 KiB sample
        raise SystemExit(f"--size-gb {size_bytes / 1e9:g} is too small for this layout; use at least 4")
    return width


def write_checkpoint(directory: Path, width: int, shard_bytes: float = 4e9) -> int:
    """Write the synthetic checkpoint (random bytes, bf16 headers) and its config; returns its size."""
    shapes = tensor_shapes(width)
    pool = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size + _nbytes(shape) > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(shape)
    weight_map, total, cursor = {}, 0, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            n = _nbytes(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(directory / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for name in names:
                left = _nbytes(shapes[name])
                while left:
                    start = cursor % (len(pool) - 1)
                    chunk = pool[start : start + min(left, len(pool) - start)]
                    fh.write(chunk)
                    left -= len(chunk)
                    cursor += len(chunk) + 4099  # a new phase for every chunk: no two tensors alike
            fh.flush()
            os.fsync(fh.fileno())
        total += offset + 8 + len(blob)
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    c = LAYOUT
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": c["hidden"],
              "num_hidden_layers": c["layers"], "num_experts": c["experts"], "num_experts_per_tok": c["top_k"],
              "moe_intermediate_size": width, "intermediate_size": 6144, "num_attention_heads": c["heads"],
              "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"], "vocab_size": c["vocab"]}
    (directory / "config.json").write_text(json.dumps(config))
    return total


def evict(directory: Path) -> None:
    """Drop this checkpoint's pages from the page cache (its files only; they are clean after fsync)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hash_files(directory: Path) -> str:
    """SHA-256 of every weights file, read whole in 8 MiB blocks (the cost of files' content hashes)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as fh:
            while block := fh.read(8 * 2**20):
                digest.update(block)
    return digest.hexdigest()


def timed(fn, directory: Path, cold: bool, repeats: int) -> dict[str, list[float]]:
    """Wall seconds, CPU seconds of this process (all threads) and the 1-minute load average of each run."""
    runs: dict[str, list[float]] = {"wall_s": [], "cpu_s": [], "load_average": []}
    for _ in range(repeats):
        if cold:
            evict(directory)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        runs["wall_s"].append(time.perf_counter() - start)
        runs["cpu_s"].append(time.process_time() - cpu)
        runs["load_average"].append(os.getloadavg()[0])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=8.0, help="size of the synthetic checkpoint (GB, 1e9 bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint is written")
    ap.add_argument("--out", type=Path, default=Path("results/bench_fingerprint"))
    args = ap.parse_args()

    width = width_for(args.size_gb * 1e9)
    directory = Path(tempfile.mkdtemp(prefix="prism-fingerprint-", dir=args.work))
    try:
        start = time.perf_counter()
        size = write_checkpoint(directory, width)
        write_s = time.perf_counter() - start
        from transformers import AutoConfig

        adapter = adapter_for_config(AutoConfig.from_pretrained(directory))
        tensors = checkpoint_tensors(directory)
        routers = {n for n in tensors if adapter.key_patterns().router.match(n)}
        sampled = {n for n, t in tensors.items() if n not in routers and t.nbytes > SAMPLE_CHUNKS * CHUNK_BYTES}
        read_bytes = (sum(t.nbytes for n, t in tensors.items() if n not in sampled)
                      + len(sampled) * SAMPLE_CHUNKS * CHUNK_BYTES)

        def fingerprint() -> str:
            return weights_fingerprint(directory, adapter)

        fp_cold = timed(fingerprint, directory, True, args.repeats)
        fp_warm = timed(fingerprint, directory, False, args.repeats)
        full_cold = timed(lambda: hash_files(directory), directory, True, args.repeats)
        full_warm = timed(lambda: hash_files(directory), directory, False, args.repeats)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    def med(runs: dict[str, list[float]], key: str = "wall_s") -> float:
        return statistics.median(runs[key])

    scale = 60e9 / size
    table = ResultTable(
        f"weights fingerprint on a {size / 1e9:.2f} GB synthetic checkpoint with Qwen3-30B-A3B's tensor layout "
        f"({len(tensors):,} tensors)",
        ["method", "bytes read (GB)", "cold s (measured)", "warm s (measured)", "warm CPU s (measured)",
         "60 GB cold s (estimate)", "60 GB warm s (estimate)"],
    )
    table.add("prism fingerprint (routers whole, 4 x 4 KiB of every other tensor)", read_bytes / 1e9,
              med(fp_cold), med(fp_warm), med(fp_warm, "cpu_s"), med(fp_cold), med(fp_warm))
    table.add("SHA-256 of the whole files", size / 1e9, med(full_cold), med(full_warm), med(full_warm, "cpu_s"),
              med(full_cold) * scale, med(full_warm) * scale)
    loads = [x for runs in (fp_cold, fp_warm, full_cold, full_warm) for x in runs["load_average"]]
    table.notes += [
        f"measured: medians of {args.repeats} runs; cold = this checkpoint's pages evicted from the page cache first "
        f"(fsync + POSIX_FADV_DONTNEED), warm = read from memory; CPU s = this process's CPU time (all threads); "
        f"writing the checkpoint took {write_s:.0f} s",
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the runs "
        "(wall times on a busy machine include waiting for a CPU)",
        "estimate for 60 GB: the fingerprint does the same reads on the real 61 GB Qwen3-30B-A3B (same tensors, all "
        "non-router tensors larger than the sample on both), so its estimate is the measured time (on a disk that seeks, "
        "the real model's samples lie further apart); the whole-file hash scales with bytes: measured x 60 GB / "
        f"{size / 1e9:.2f} GB",
        f"expert width {width} here (768 in the real model); {len(routers)} router tensors hashed whole, "
        f"{len(sampled):,} tensors sampled",
    ]
    data = {"size_bytes": size, "tensors": len(tensors), "expert_width": width, "read_bytes": read_bytes,
            "fingerprint_cold_s": fp_cold, "fingerprint_warm_s": fp_warm, "full_hash_cold_s": full_cold,
            "full_hash_warm_s": full_warm, "write_s": write_s, "layout": LAYOUT, "real_bytes": REAL_BYTES,
            "environment": environment(torch.device("cpu"))}
    paths = table.save(args.out, extra=data)
    print(table.markdown())
    print("written " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
