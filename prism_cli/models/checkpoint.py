"""Reading safetensors checkpoints one tensor at a time (single file or sharded), below every stage
that reads weights: loading, profiling, export and tuning."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from prism_cli.errors import PrismError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


#: safetensors' names of the floating-point dtypes.
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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

    def dtype(self, key: str) -> torch.dtype | None:
        """A floating-point tensor's dtype, from the file header (nothing is read); None for other types."""
        try:
            name = self._open(self._file_of[key]).get_slice(key).get_dtype()
        except KeyError:
            raise PrismError(f"tensor {key} is missing from {self.directory}") from None
        return _FLOAT_DTYPES.get(name)

    def release(self) -> None:
        """Close the open files. safetensors memory-maps each file and every page read stays mapped (and
        counted in the process's resident memory) while its handle lives: a caller that walks a large
        checkpoint layer by layer releases after each layer so that only one layer's pages stay mapped.
        The next ``get`` reopens the file."""
        self._handles.clear()

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
