"""Bounded safetensors shards for the export (the reader is ``prism_cli.models.checkpoint``).

Export never holds a whole model: it reads source tensors lazily (memory-mapped by safetensors) and
flushes output shards once they reach ``max_shard_bytes``, so peak memory is about one shard plus
one expert, whatever the model's size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from prism_cli.io import save_tensors
from prism_cli.models.checkpoint import INDEX, SINGLE


class ShardWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes``."""

    def __init__(self, directory: Path, max_shard_bytes: int = 4 * 2**30) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_tensors(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, name the shards, write the index when there is more than one."""
        if self._pending:
            self._flush()
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.directory / SINGLE)
            return [SINGLE]
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            os.replace(path, self.directory / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        (self.directory / INDEX).write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
        )
        return names
