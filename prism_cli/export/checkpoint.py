"""Streaming safetensors checkpoints: read one tensor at a time, write bounded shards.

Export never holds a whole model: it reads source tensors lazily (memory-mapped by safetensors) and
flushes output shards once they reach ``max_shard_bytes``, so peak memory is about one shard plus
one expert, whatever the model's size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_cli.errors import PrismError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (single file or sharded)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        index = self.directory / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise PrismError(f"{index} is not a valid safetensors index") from None
            self._file_of = {k: self.directory / f for k, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise PrismError(
                    f"{self.directory} has no safetensors weights; re-save the model with save_pretrained() to export it"
                )
            self._file_of = {}
            for f in files:
                for key in self._open(f).keys():
                    self._file_of[key] = f

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type on corrupt files
                raise PrismError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self._file_of[key]).get_tensor(key)
        except KeyError:
            raise PrismError(f"tensor {key} is missing from {self.directory}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (nothing is read)."""
        try:
            return tuple(self._open(self._file_of[key]).get_slice(key).get_shape())
        except KeyError:
            raise PrismError(f"tensor {key} is missing from {self.directory}") from None

    def metadata(self) -> dict[str, str]:
        first = next(iter(self._file_of.values()))
        return self._open(first).metadata() or {}


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
        save_file(self._pending, str(path), metadata={"format": "pt"})
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
