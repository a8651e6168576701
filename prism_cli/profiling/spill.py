"""Reservoir rows on disk while profiling runs: bounded memory, and checkpoints that survive a kill.

Each MoE layer gets a raw row file in the run's work folder (``<out>.partial/``) with a fixed region
per reservoir (expert e: ``fit_cap`` fit rows, then ``heldout_cap`` held-out rows; the file is sparse,
so regions that are never filled take no disk). Rows a reservoir keeps are buffered in memory (one
``RowBuffer`` block, the budget's share) and written at the next checkpoint, which the profiler
calls when the buffer is full, at a time interval, and at the end.

A checkpoint must never leave the rows on disk out of step with the saved state (a kill can come at
any instruction). Rows for slots that were empty at the previous checkpoint are written in place at
once: the saved state does not reference them. Rows that *replace* a saved slot go through a
write-ahead journal: they are written to ``layer<L>.journal<n>``, then the state (reservoir contents,
generator positions, counters, cursor, and the journal's target rows) replaces the old one by an atomic
rename, and only then are they copied into the row file. A resumed run replays the journal named by
the state it loads (replaying twice writes the same bytes), so it always sees the rows of exactly
the state it resumes. It first checks that the row file still reaches the last row that state holds
(``check_rows_length``): a file cut short is refused, not extended with zero rows.

HDF5 is not used for this: a file open for writing when its process dies is routinely unreadable.
The profile itself is written as HDF5 once every layer is done (``profiler.write_profile``).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from prism_cli.errors import PrismError

#: Journal rows replayed per read on resume (bounds the memory of a replay).
_REPLAY_BLOCK_ROWS = 4096


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_runs(fd: int, keys: np.ndarray, rows: np.ndarray, row_bytes: int) -> None:
    """Write ``rows[i]`` at row ``keys[i]`` of the file, one ``pwrite`` per run of consecutive rows."""
    if keys.size == 0:
        return
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    breaks = np.nonzero(np.diff(keys) != 1)[0] + 1
    for run_keys, run_rows in zip(np.split(keys, breaks), np.split(rows, breaks), strict=True):
        data = np.ascontiguousarray(run_rows)
        offset = int(run_keys[0]) * row_bytes
        view = memoryview(data).cast("B")
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written


class RowBuffer:
    """Rows waiting for the next checkpoint, in one block allocated once.

    Buffered rows are views into the block, handed out in order and all released at a checkpoint,
    so the buffer takes exactly its size: thousands of small row tensors allocated and freed
    between the forward pass's temporaries would leave the allocator's heap fragmented, and the
    process well above the budget.
    """

    def __init__(self, rows: int, width: int, dtype: torch.dtype) -> None:
        self.block = torch.empty(rows, width, dtype=dtype)
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.block.shape[0]

    def free_rows(self) -> int:
        return self.capacity - self.used

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` rows of the block (the caller fills them)."""
        if n > self.free_rows():
            raise RuntimeError(f"row buffer overflow: {n} rows asked, {self.free_rows()} free")
        view = self.block[self.used : self.used + n]
        self.used += n
        return view

    def release(self) -> None:
        """Every buffered row has been written: the block is free again."""
        self.used = 0


def _damaged(folder: Path, layer: int, exc: Exception) -> PrismError:
    # numpy's refusal of a pickle suggests loading it unsafely: never the advice for a file of unknown origin
    why = "it holds pickled objects, which prism never writes" if "pickle" in str(exc) else str(exc).splitlines()[0]
    return PrismError(f"cannot resume from {folder}: the checkpoint of layer {layer} is damaged ({why}); "
                      "delete the folder to start over")


def check_rows_length(folder: Path, layer: int, counts: np.ndarray, caps: tuple[int, int], row_bytes: int,
                      length: int) -> None:
    """Refuse a row file of ``length`` bytes that ends before the last row its checkpoint (``counts``:
    fit and held-out rows per expert) holds: cut short by a full disk or by hand. Opening the file
    extends it with zeros, so the lost rows would otherwise come back as zero rows. A longer file is
    fine: rows past a reservoir's count are unwritten slots."""
    ends = [e * sum(caps) + (caps[0] if kind else 0) + int(n)
            for kind, row in enumerate(counts) for e, n in enumerate(row) if n > 0]
    needed = max(ends, default=0)
    if length < needed * row_bytes:
        raise PrismError(
            f"cannot resume from {folder}: layer{layer}.rows holds {length // row_bytes:,} rows, but the checkpoint "
            f"of layer {layer} records {needed:,}; the file was cut short, delete the folder to start over"
        )


def check_work_layer(folder: Path, layer: int, caps: tuple[int, int], row_bytes: int) -> None:
    """Check a layer's checkpoint and row file in a work folder without opening (and so extending) the
    file: a resumed run refuses a damaged layer before its first batch, not when the layer's pass begins."""
    state_path = folder / f"layer{layer}.state.npz"
    if not state_path.exists():
        return
    try:
        with np.load(state_path) as npz:
            counts = np.stack([npz["fit_count"], npz["heldout_count"]])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(folder, layer, exc) from None
    rows_path = folder / f"layer{layer}.rows"
    length = rows_path.stat().st_size if rows_path.exists() else 0
    check_rows_length(folder, layer, counts, caps, row_bytes, length)


class LayerSpill:
    """One layer's reservoir rows: a sparse raw file, a buffer of pending writes, journaled checkpoints."""

    def __init__(self, folder: Path, layer: int, num_experts: int, caps: tuple[int, int], width: int,
                 row_dtype: torch.dtype) -> None:
        self.folder = folder
        self.layer = layer
        self.num_experts = num_experts
        self.caps = caps
        self.width = width
        self.row_dtype = row_dtype
        self.np_dtype = torch.empty(0, dtype=row_dtype).numpy().dtype
        self.row_bytes = width * self.np_dtype.itemsize
        self.rows_path = folder / f"layer{layer}.rows"
        self.state_path = folder / f"layer{layer}.state.npz"
        self._fd = os.open(self.rows_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._size = num_experts * sum(caps) * self.row_bytes
        if not self.state_path.exists():  # a checkpointed file is checked first (``load``), then extended
            self._extend()
        self._pending: list[tuple[int, int, np.ndarray, torch.Tensor]] = []
        self.pending_rows = 0
        self._saved_count = np.zeros((2, num_experts), dtype=np.int64)
        self._serial = 0

    # ---- layout --------------------------------------------------------------------------------
    def first_row(self, kind: int, expert: int) -> int:
        """Row index, in the file, of slot 0 of a reservoir."""
        return expert * (self.caps[0] + self.caps[1]) + (self.caps[0] if kind else 0)

    def journal_path(self, serial: int) -> Path:
        return self.folder / f"layer{self.layer}.journal{serial}"

    def _extend(self) -> None:
        if os.fstat(self._fd).st_size < self._size:
            os.ftruncate(self._fd, self._size)  # sparse: blocks are allocated as rows are written

    # ---- recording -----------------------------------------------------------------------------
    def write(self, kind: int, expert: int, slots: np.ndarray, rows: torch.Tensor) -> None:
        """Buffer rows (a view into the pass's ``RowBuffer``) for the given slots of a reservoir."""
        self._pending.append((kind, expert, slots.astype(np.int64, copy=False), rows))
        self.pending_rows += rows.shape[0]

    def checkpoint(self, state: dict[str, np.ndarray]) -> None:
        """Write the buffered rows and ``state`` so that a kill at any point leaves a consistent pair."""
        keys_all = [self.first_row(k, e) + slots for k, e, slots, _ in self._pending]
        winners = self._last_writers(keys_all)
        serial = self._serial + 1
        journal_keys: list[np.ndarray] = []
        replay: list[tuple[int, np.ndarray, np.ndarray]] = []  # (chunk, its winners, which of them replace)
        with open(self.journal_path(serial), "wb") as journal:
            for i, (kind, expert, slots, rows) in enumerate(self._pending):
                win = winners[i]
                if not win.any():
                    continue
                keys, data = keys_all[i][win], rows.numpy()[win]
                saved = slots[win] < self._saved_count[kind, expert]
                write_runs(self._fd, keys[~saved], data[~saved], self.row_bytes)  # empty at the last checkpoint
                if saved.any():
                    journal.write(memoryview(np.ascontiguousarray(data[saved])).cast("B"))
                    journal_keys.append(keys[saved])
                    replay.append((i, win, saved))
            journal.flush()
            os.fsync(journal.fileno())
        os.fsync(self._fd)
        keys = np.concatenate(journal_keys) if journal_keys else np.empty(0, dtype=np.int64)
        tmp = self.state_path.with_suffix(".tmp.npz")
        with open(tmp, "wb") as fh:
            np.savez(fh, serial=np.array(serial), journal_keys=keys, **state)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)
        fsync_dir(self.folder)
        # The new state is durable: apply its journal, then the previous journal is no longer needed.
        for i, win, saved in replay:
            rows = self._pending[i][3]
            write_runs(self._fd, keys_all[i][win][saved], rows.numpy()[win][saved], self.row_bytes)
        os.fsync(self._fd)
        with contextlib.suppress(FileNotFoundError):
            self.journal_path(self._serial).unlink()
        if not keys.size:
            self.journal_path(serial).unlink()
        self._serial = serial
        self._saved_count = np.stack([state["fit_count"], state["heldout_count"]])
        self._pending.clear()
        self.pending_rows = 0

    @staticmethod
    def _last_writers(keys: list[np.ndarray]) -> list[np.ndarray]:
        """Per pending chunk, which of its rows are the last write to their slot."""
        if not keys:
            return []
        flat = np.concatenate(keys)
        _, first_rev = np.unique(flat[::-1], return_index=True)
        win = np.zeros(flat.size, dtype=bool)
        win[flat.size - 1 - first_rev] = True
        return np.split(win, np.cumsum([k.size for k in keys])[:-1])

    # ---- resuming and reading back ---------------------------------------------------------------
    def load(self) -> dict[str, np.ndarray] | None:
        """The last checkpointed state (its journal replayed into the row file), or None if there is none."""
        if not self.state_path.exists():
            self._extend()
            return None
        try:
            with np.load(self.state_path) as npz:
                state = {key: npz[key] for key in npz.files}
            serial, keys = int(state.pop("serial")), state.pop("journal_keys")
            counts = np.stack([state["fit_count"], state["heldout_count"]])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise _damaged(self.folder, self.layer, exc) from None
        check_rows_length(self.folder, self.layer, counts, self.caps, self.row_bytes, os.fstat(self._fd).st_size)
        self._extend()
        try:
            if keys.size:
                with open(self.journal_path(serial), "rb") as journal:
                    for start in range(0, keys.size, _REPLAY_BLOCK_ROWS):
                        block = keys[start : start + _REPLAY_BLOCK_ROWS]
                        data = np.frombuffer(journal.read(block.size * self.row_bytes), dtype=self.np_dtype)
                        if data.size != block.size * self.width:
                            raise ValueError("truncated journal")
                        write_runs(self._fd, block, data.reshape(block.size, self.width), self.row_bytes)
                os.fsync(self._fd)
        except (OSError, ValueError) as exc:
            raise _damaged(self.folder, self.layer, exc) from None
        self._serial = serial
        self._saved_count = counts
        return state

    def read_rows(self, kind: int, expert: int, count: int) -> np.ndarray:
        """The first ``count`` rows of a reservoir, as checkpointed."""
        nbytes = count * self.row_bytes
        data = os.pread(self._fd, nbytes, self.first_row(kind, expert) * self.row_bytes)
        if len(data) != nbytes:
            raise OSError(f"{self.rows_path} is truncated")
        return np.frombuffer(data, dtype=self.np_dtype).reshape(count, self.width)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
