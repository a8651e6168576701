"""A checkpoint's safetensors files read from their headers: the tensor index, integrity, fingerprint.

Nothing here loads a tensor. A safetensors file is an 8-byte little-endian header length, a JSON
header (``name -> dtype, shape, data_offsets``) and the tensors' bytes; the header alone tells
whether a file is complete, what shapes it holds (``prism_cli.export.validate``) and where to read
the samples the weights fingerprint hashes.

**Weights fingerprint.** Profiles, partitions and exports record ``weights_fingerprint``, and export
refuses a partition whose fingerprint is not its model's. It hashes every tensor of the checkpoint in
name order: its name, dtype and shape, then the whole of every MoE router tensor (small, and the one
that decides routing) and, of every other tensor, ``SAMPLE_CHUNKS`` chunks of ``CHUNK_BYTES`` at fixed
relative positions (first and last bytes included); a tensor smaller than the sample is hashed whole.
Bytes are read as stored (so the dtype a model is later loaded in does not matter, and a re-sharded
copy has the same fingerprint). Cost: ``SAMPLE_CHUNKS`` reads per tensor, whatever the model's size
(``make bench-fingerprint``). Limit: a change confined to bytes outside every sample of a non-router
tensor goes unnoticed; a fine-tune, a merge or a re-quantisation changes every sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prism_cli.errors import PrismError

INDEX = "model.safetensors.index.json"
#: Samples hashed per non-router tensor, and their size.
SAMPLE_CHUNKS = 4
CHUNK_BYTES = 4096
#: Threads issuing the reads: a disk (SSD, network storage) serves many small reads at once.
_READERS = 16
#: safetensors refuses headers above 100 MB; so does prism (a larger one is a corrupt length field).
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file[start:end]`` (absolute offsets), and what they hold."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, after checking that the file is exactly as long as its
    header says (a truncated download is the usual failure)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise PrismError(f"weights file {path} is truncated ({size} bytes): download or save the model again")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise PrismError(f"weights file {path} is truncated or not safetensors (header length {length}, "
                                 f"file {size} bytes): download or save the model again")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise PrismError(f"cannot read weights file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrismError(f"weights file {path} has a corrupt header: download or save the model again") from None
    if not isinstance(header, dict):
        raise PrismError(f"weights file {path} has a corrupt header: download or save the model again")
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    end = base
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            entry = TensorEntry(name, path, str(info["dtype"]), tuple(int(d) for d in info["shape"]), base + begin, base + stop)
        except (KeyError, TypeError, ValueError):
            raise PrismError(f"weights file {path} has a corrupt header entry for {name}") from None
        entries[name] = entry
        end = max(end, entry.end)
    if size < end:
        raise PrismError(f"weights file {path} is truncated: {size:,} bytes where its header needs {end:,}; "
                         "download or save the model again")
    if size > end:
        raise PrismError(f"weights file {path} is corrupt: {size - end:,} bytes past its last tensor; "
                         "download or save the model again")
    return entries


def checkpoint_tensors(directory: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint folder (sharded with an index, or top-level files)."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError):
            raise PrismError(f"{index} is not a valid safetensors index: download or save the model again") from None
        for f in files:
            if not f.is_file():
                raise PrismError(f"weights file {f} named in {INDEX} is missing: download or save the model again")
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise PrismError(f"{directory} has no safetensors weights; re-save the model with save_pretrained()")
    tensors: dict[str, TensorEntry] = {}
    for f in files:
        tensors.update(read_header(f))
    if index.exists():
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise PrismError(f"{index} lists {absent[0]} but no weights file holds it: download or save the model again")
    return tensors


def check_checkpoint_files(directory: str | Path) -> None:
    """Refuse a truncated or corrupt safetensors checkpoint in one line (a folder of other weight
    formats is left to transformers)."""
    directory = Path(directory)
    if (directory / INDEX).exists() or any(directory.glob("*.safetensors")):
        checkpoint_tensors(directory)


def _sample(entry: TensorEntry, whole: bool) -> list[tuple[int, int]]:
    """``(offset, size)`` reads that the fingerprint hashes for one tensor."""
    if whole or entry.nbytes <= SAMPLE_CHUNKS * CHUNK_BYTES:
        return [(entry.start, entry.nbytes)]
    span = entry.nbytes - CHUNK_BYTES
    return [(entry.start + span * i // (SAMPLE_CHUNKS - 1), CHUNK_BYTES) for i in range(SAMPLE_CHUNKS)]


def tensors_fingerprint(tensors: dict[str, TensorEntry], is_router: Callable[[str], bool]) -> str:
    """The fingerprint described in the module docstring, of the tensors listed."""
    fds: dict[Path, int] = {}

    def digest(entry: TensorEntry) -> tuple[str, bytes]:
        h = hashlib.sha256(f"{entry.name}\0{entry.dtype}\0{entry.shape}\0".encode())
        for offset, size in _sample(entry, is_router(entry.name)):
            data = os.pread(fds[entry.file], size, offset)
            if len(data) != size:
                raise PrismError(f"weights file {entry.file} is truncated: download or save the model again")
            h.update(data)
        return entry.name, h.digest()

    try:
        for path in sorted({t.file for t in tensors.values()}):
            fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # scattered small reads: no read-ahead of whole megabytes
                os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_RANDOM)
        # Reads in file order (near-sequential on disk) and in parallel (a disk serves many small reads
        # at once; pread and sha256 release the GIL); digests combined in name order, so the result
        # does not depend on how the tensors are sharded.
        entries = sorted(tensors.values(), key=lambda t: (str(t.file), t.start))
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            digests = dict(pool.map(digest, entries))
    except OSError as exc:
        raise PrismError(f"cannot read weights: {exc.strerror} ({exc.filename or ''})") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    total = hashlib.sha256()
    for name in sorted(digests):
        total.update(digests[name])
    return total.hexdigest()[:16]
