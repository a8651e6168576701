"""``prism profile``: run calibration text through an MoE model and record its experts' activations.

A run keeps a memory budget (``budget.py``): reservoir rows are buffered and written to a work folder
next to the output (``<out>.partial/``, ``spill.py``) at checkpoints, and when even the layers' counters
would not fit, the layers are profiled in several passes over the data. The work folder is what a
killed or interrupted run leaves behind; ``resume=True`` continues from its last checkpoint and gives
the file an uninterrupted run gives. Each reservoir's generator depends on (seed, layer, expert, kind)
only and every piece of state is restored exactly, so neither the passes nor a resume change a
single row. The profile (HDF5) is assembled from the work folder at the end, written atomically, and
the work folder removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil
import torch

from prism_cli import __version__
from prism_cli.data import text_hash
from prism_cli.data.windows import token_windows
from prism_cli.errors import Interrupted, PrismError
from prism_cli.io import atomic_path, check_replaceable, check_writable, open_work_dir
from prism_cli.layers import format_layers
from prism_cli.models.adapters import MoELayer
from prism_cli.models.loading import LoadedModel, checkpoint_dir, config_fingerprint, load_config, model_label, weights_fingerprint
from prism_cli.profiling.budget import MemoryPlan, ProfileGeometry, check_buffer_fits, format_size, forward_bytes, plan_memory
from prism_cli.profiling.format import FORMAT, FORMAT_VERSION
from prism_cli.profiling.heap import limit_kernel_cache, release_free_heap
from prism_cli.profiling.recorder import (
    KINDS,
    PROFILE_IMPLEMENTATION,
    ActivationRecorder,
    LayerRecord,
    Reservoir,
    reservoir_rng,
)
from prism_cli.profiling.spill import LayerSpill, RowBuffer, check_work_layer

ROW_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Share of the available RAM (after the model is loaded) that the default budget takes.
DEFAULT_BUDGET_SHARE = 0.5
_PARTIAL_FORMAT = "prism-profile-partial"


@dataclass
class ProfileSettings:
    """What to profile, how much to keep, and within which memory budget."""

    tokens: int = 131_072
    seq_len: int = 256
    batch_size: int = 8
    max_rows: int = 5_120
    holdout_fraction: float = 0.2
    seed: int = 0
    layers: list[int] | None = None
    row_dtype: str = "float16"
    #: Host memory for the profiler's state and row buffer, in bytes (None: half the available RAM).
    max_memory: int | None = None
    #: Longest time between two checkpoints of the work folder (what a kill can lose).
    checkpoint_seconds: float = 120.0

    def validate(self) -> None:
        if self.tokens <= 0:
            raise PrismError(f"--tokens must be positive, got {self.tokens}")
        if self.seq_len < 2 or self.seq_len > 1_048_576:
            raise PrismError(f"--seq-len must be between 2 and 1048576, got {self.seq_len}")
        if self.batch_size <= 0 or self.batch_size > 65_536:
            raise PrismError(f"--batch-size must be between 1 and 65536, got {self.batch_size}")
        if self.max_rows < 2 or self.max_rows > 10_000_000:
            raise PrismError(f"--max-rows must be between 2 and 10000000, got {self.max_rows}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise PrismError(f"--holdout must be strictly between 0 and 1, got {self.holdout_fraction}")
        if self.row_dtype not in ROW_DTYPES:
            raise PrismError(f"--row-dtype must be one of {', '.join(ROW_DTYPES)}, got {self.row_dtype!r}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise PrismError(f"--max-memory must be positive, got {self.max_memory}")
        if not self.checkpoint_seconds > 0:
            raise PrismError(f"--checkpoint-every must be positive, got {self.checkpoint_seconds}")


@dataclass
class ProfilePlan:
    """What a run will do and take, known before its first batch (the estimate ``prism profile`` prints)."""

    geometry: ProfileGeometry
    memory: MemoryPlan
    budget_source: str
    tokens: int
    batches: int
    layers: list[int]
    model_bytes: int
    profile_bytes: int
    work_bytes: int
    work_dir: Path
    resumed: bool = False  # continues the work folder of an interrupted run

    @property
    def total_tokens(self) -> int:
        """Progress units: calibration tokens times passes."""
        return self.tokens * self.memory.passes

    def describe(self) -> list[str]:
        """Two lines: the memory and the disk the run is expected to take."""
        m = self.memory
        passes = "one pass" if m.passes == 1 else f"{m.passes} passes of {m.layers_per_pass} layers"
        return [
            f"memory (estimate): model {format_size(self.model_bytes)} + runtime + profiler at most {format_size(m.budget)} "
            f"(--max-memory: {self.budget_source}; {passes}; forward pass {format_size(self.geometry.forward_bytes)}, "
            f"row buffer {format_size(m.buffer_bytes)})",
            f"disk (estimate): profile {format_size(self.profile_bytes)}; work folder {self.work_dir} up to "
            f"{format_size(self.work_bytes)}, removed at the end",
        ]


@dataclass
class ProfileSummary:
    """What a profiling run did, for the summary table (and what it measured)."""

    tokens: int
    seconds: float
    layers: list[int]
    plan: ProfilePlan
    routed: dict[int, list[int]] = field(default_factory=dict)
    fit_rows: dict[int, list[int]] = field(default_factory=dict)
    heldout_rows: dict[int, list[int]] = field(default_factory=dict)
    profile_bytes: int = 0
    work_peak_bytes: int = 0
    checkpoints: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class _StopForward(Exception):
    """Raised after the last profiled layer of a pass: the rest of the network is not needed."""


def select_layers(all_layers: list[MoELayer], wanted: list[int] | None) -> list[MoELayer]:
    if not wanted:
        return all_layers
    known = {layer.index: layer for layer in all_layers}
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise PrismError(f"--layers {format_layers(missing)} are not MoE layers of this model (MoE layers: {format_layers(known)})")
    return [known[i] for i in sorted(set(wanted))]


def holdout_mask(n_windows: int, fraction: float, seed: int) -> np.ndarray:
    """Which calibration sequences feed the held-out reservoirs: a seeded share, at least one of each kind."""
    if n_windows < 2:
        raise PrismError(
            f"the calibration data gives only {n_windows} sequence(s); profiling needs at least 2 "
            "(one to fit partitions, one held out): give more text or a shorter --seq-len"
        )
    rng = np.random.default_rng([seed, 0x70726F66])
    mask = rng.random(n_windows) < fraction
    if mask.all() or not mask.any():
        mask[:] = False
        mask[rng.integers(n_windows)] = True
    return mask


def work_dir_for(out_path: Path) -> Path:
    """The work folder of a run writing ``out_path``: what an interrupted run leaves for ``--resume``."""
    return out_path.with_name(out_path.name + ".partial")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the loaded model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def folder_bytes(folder: Path) -> int:
    """Disk blocks a folder's files take (sparse files count what is written, not their length)."""
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


@contextlib.contextmanager
def recording(model: torch.nn.Module, layers: list[MoELayer], recorder: ActivationRecorder) -> Iterator[None]:
    """Route the model's experts through the recording implementation for the duration of the block,
    and stop each forward pass after the last of ``layers``."""
    previous = model.config._experts_implementation
    model.set_experts_implementation(PROFILE_IMPLEMENTATION)
    for layer in layers:
        layer.experts._prism_recorder = recorder
        layer.experts._prism_layer = layer.index

    def stop(*_: Any) -> None:
        raise _StopForward

    handle = layers[-1].block.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()
        for layer in layers:
            del layer.experts._prism_recorder, layer.experts._prism_layer
        model.set_experts_implementation(previous)


def _identity(meta: dict[str, Any], settings: ProfileSettings, loaded: LoadedModel) -> dict[str, Any]:
    """What must match for a run to continue another's work folder."""
    keys = ("prism_version", "model", "model_type", "config_hash", "weights_hash", "data", "data_hash", "tokens", "seq_len", "seed",
            "max_rows", "holdout_fraction", "row_dtype", "layers")
    return {**{k: meta[k] for k in keys}, "batch_size": settings.batch_size,
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "device": loaded.device.type}


def default_budget() -> tuple[int, str]:
    """Half the memory available now (the model is already loaded), and how it was chosen."""
    available = psutil.virtual_memory().available
    return int(available * DEFAULT_BUDGET_SHARE), f"default, half of the {format_size(available)} available"


class _Pass:
    """The layers profiled together, their spills and records, and the checkpoints that bound memory."""

    def __init__(self, layers: list[MoELayer], positions: dict[int, int], geometry: ProfileGeometry,
                 settings: ProfileSettings, work: Path, device: torch.device, buffer_bytes: int) -> None:
        self.settings = settings
        self.work = work
        row_dtype = ROW_DTYPES[settings.row_dtype]
        e, width = geometry.num_experts, geometry.width
        self.records: dict[int, LayerRecord] = {}
        self.checkpoints = 0
        self.work_peak = 0
        try:
            for layer in layers:
                spill = LayerSpill(work, layer.index, e, geometry.caps, width, row_dtype)
                reservoirs = [
                    [Reservoir(cap, reservoir_rng(settings.seed, positions[layer.index], e, x, kind)) for x in range(e)]
                    for kind, cap in enumerate(geometry.caps)
                ]
                rec = LayerRecord(
                    layer=layer.index,
                    routed=torch.zeros(e, dtype=torch.long, device=device),
                    weight_sum=torch.zeros(e, dtype=torch.float64, device=device),
                    l1_mass=torch.zeros(e, width, dtype=torch.float64, device=device),
                    hot_count=torch.zeros(e, width, dtype=torch.long, device=device),
                    reservoirs=reservoirs,
                    spill=spill,
                )
                self.records[layer.index] = rec
                state = spill.load()
                if state is not None:
                    rec.restore(state)
        except BaseException:
            self.close()
            raise
        # Each buffered row also keeps its slot index (8 bytes); room for a whole reservoir at least.
        rows = max(geometry.max_rows, buffer_bytes // (geometry.row_size + 8))
        try:
            self.buffer = RowBuffer(rows, width, row_dtype)
        except (RuntimeError, MemoryError) as exc:  # torch's CPU allocator raises RuntimeError
            self.close()
            if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
                raise
            raise PrismError(f"cannot allocate the row buffer of {format_size(rows * geometry.row_size)} that "
                             "--max-memory leaves: this machine cannot map that much; give a smaller --max-memory") from None
        self.recorder = ActivationRecorder(self.records, width, buffer=self.buffer, reserve=self.reserve)
        self._last = time.monotonic()

    def batches_done(self) -> int:
        """Batches every layer of the pass has recorded."""
        return min(rec.batch for rec in self.records.values())

    def reserve(self, n_rows: int) -> None:
        if n_rows > self.buffer.free_rows():
            self.checkpoint()

    def checkpoint(self) -> None:
        for rec in self.records.values():
            rec.spill.checkpoint(rec.state())
        self.buffer.release()
        self.checkpoints += 1
        self.work_peak = max(self.work_peak, folder_bytes(self.work))
        self._last = time.monotonic()

    def maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last >= self.settings.checkpoint_seconds:
            self.checkpoint()

    def close(self) -> None:
        for rec in self.records.values():
            rec.spill.close()


def profile_model(
    loaded: LoadedModel,
    text: str,
    data_name: str,
    settings: ProfileSettings,
    out_path,
    *,
    resume: bool = False,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[ProfilePlan], None] | None = None,
) -> ProfileSummary:
    """Profile ``loaded`` on ``text`` and write the profile to ``out_path`` (atomically).

    ``on_start(plan)`` is called once every check has passed (data tokenized, checkpoint fingerprinted,
    budget planned, work folder checked), just before the first batch; ``on_batch(tokens)`` after each
    batch of each pass. ``resume`` continues the work folder an interrupted run left.
    """
    settings.validate()
    limit_kernel_cache()
    out_path = Path(out_path)
    check_writable(out_path)
    check_replaceable(out_path, FORMAT, "profile")
    adapter = loaded.adapter
    assert adapter is not None
    all_layers = adapter.moe_layers(loaded.model)
    positions = {layer.index: i for i, layer in enumerate(all_layers)}
    layers = select_layers(all_layers, settings.layers)
    try:
        windows = token_windows(loaded.tokenizer, text, settings.seq_len, settings.tokens)
    except ValueError as exc:
        raise PrismError(str(exc)) from None
    held_windows = holdout_mask(windows.shape[0], settings.holdout_fraction, settings.seed)
    total = windows.numel()
    # Everything that can refuse this run (fingerprints read from the checkpoint files included) is
    # done before the first batch, so a refusal never comes after a long profiling run.
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prism_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_label(loaded.name),
        "model_type": adapter.model_type,
        "config_hash": config_fingerprint(load_config(loaded.name)),
        "weights_hash": weights_fingerprint(checkpoint_dir(loaded.name), adapter),
        "data": data_name,
        "data_hash": text_hash(text),
        "tokens": total,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "max_rows": settings.max_rows,
        "holdout_fraction": settings.holdout_fraction,
        "row_dtype": settings.row_dtype,
        "num_experts": adapter.num_experts,
        "expert_width": adapter.width,
        "hidden_size": adapter.hidden_size,
        "top_k": adapter.top_k,
        "layers": [layer.index for layer in layers],
    }
    geometry = ProfileGeometry(
        num_experts=adapter.num_experts, width=adapter.width, top_k=adapter.top_k, n_layers=len(layers),
        max_rows=settings.max_rows, holdout_fraction=settings.holdout_fraction,
        row_bytes=torch.empty(0, dtype=ROW_DTYPES[settings.row_dtype]).element_size(),
        forward_bytes=forward_bytes(settings.batch_size, settings.seq_len, adapter.hidden_size,
                                    int(loaded.model.config.num_attention_heads),
                                    next(loaded.model.parameters()).element_size()),
    )
    budget, source = (settings.max_memory, "given") if settings.max_memory else default_budget()
    memory = plan_memory(geometry, budget)
    check_buffer_fits(memory, psutil.virtual_memory().total)  # before the banner and the work folder
    work = work_dir_for(out_path)
    resumed = open_work_dir(work, _PARTIAL_FORMAT, _identity(meta, settings, loaded), resume=resume, what="profiling")
    if resumed:  # every layer, not only the first pass's: a damaged later layer is refused now too
        for layer in layers:
            check_work_layer(work, layer.index, geometry.caps, geometry.row_size)
    passes = [layers[i : i + memory.layers_per_pass] for i in range(0, len(layers), memory.layers_per_pass)]
    n_batches = -(-windows.shape[0] // settings.batch_size)
    plan = ProfilePlan(
        geometry=geometry, memory=memory, budget_source=source, tokens=total, batches=n_batches,
        layers=meta["layers"], model_bytes=model_bytes(loaded.model), profile_bytes=geometry.profile_bytes(total),
        work_bytes=geometry.work_bytes(total, memory.buffer_bytes), work_dir=work, resumed=resumed,
    )
    if on_start is not None:
        on_start(plan)
    summary = ProfileSummary(tokens=total, seconds=0.0, layers=meta["layers"], plan=plan)
    start = time.perf_counter()
    try:
        for group in passes:
            _run_pass(loaded, windows, held_windows, group, positions, geometry, settings, work, memory, summary, on_batch)
        summary.seconds = time.perf_counter() - start
        with atomic_path(out_path) as tmp:
            write_profile(tmp, meta, work, geometry, ROW_DTYPES[settings.row_dtype], summary)
    except KeyboardInterrupt:
        raise Interrupted(
            f"progress up to the last checkpoint is kept in {work}; rerun the same command with --resume to continue"
        ) from None
    except PrismError:
        if not resumed and summary.checkpoints == 0:  # nothing saved that --resume could continue
            shutil.rmtree(work, ignore_errors=True)
        raise
    summary.profile_bytes = out_path.stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _run_pass(loaded: LoadedModel, windows: torch.Tensor, held_windows: np.ndarray, group: list[MoELayer],
              positions: dict[int, int], geometry: ProfileGeometry, settings: ProfileSettings, work: Path,
              memory: MemoryPlan, summary: ProfileSummary, on_batch: Callable[[int], None] | None) -> None:
    """Profile the layers of one pass over every batch, from wherever their last checkpoint left them."""
    device = loaded.device
    n_batches = -(-windows.shape[0] // settings.batch_size)
    run = _Pass(group, positions, geometry, settings, work, device, memory.buffer_bytes)
    try:
        done = run.batches_done()
        if done >= n_batches:  # finished by an earlier run
            if on_batch is not None:
                on_batch(windows.numel())
            return
        with recording(loaded.model, group, run.recorder), torch.inference_mode():
            for b, first in enumerate(range(0, windows.shape[0], settings.batch_size)):
                batch = windows[first : first + settings.batch_size]
                if b < done:  # recorded by an earlier run
                    if on_batch is not None:
                        on_batch(batch.numel())
                    continue
                held = torch.from_numpy(np.repeat(held_windows[first : first + batch.shape[0]], settings.seq_len))
                run.recorder.begin_batch(b, first * settings.seq_len, held.to(device))
                try:
                    loaded.model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                release_free_heap()
                if on_batch is not None:
                    on_batch(batch.numel())
                run.maybe_checkpoint()
        run.checkpoint()
    finally:
        run.close()
        summary.checkpoints += run.checkpoints
        summary.work_peak_bytes = max(summary.work_peak_bytes, run.work_peak)


def _checksummed(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """A dataset with HDF5's Fletcher-32 checksum per chunk: a flipped byte in a profile (a bad disk or
    copy) fails the read, which ``ProfileFile`` reports as corrupt, instead of partitioning wrong rows.
    Empty datasets cannot be chunked and hold nothing to check."""
    group.create_dataset(name, data=data, fletcher32=bool(np.size(data)))


def write_profile(path: Path, meta: dict[str, Any], work: Path, geometry: ProfileGeometry, row_dtype: torch.dtype,
                  summary: ProfileSummary) -> None:
    """Write the layout documented in ``prism_cli.profiling.format`` from the work folder's checkpoints."""
    with h5py.File(path, "w") as h5:
        for key, value in meta.items():
            h5.attrs[key] = value
        for layer in meta["layers"]:
            spill = LayerSpill(work, layer, geometry.num_experts, geometry.caps, geometry.width, row_dtype)
            try:
                state = spill.load()
                assert state is not None, f"layer {layer} has no checkpoint"
                group = h5.create_group(f"layers/{layer}")
                _checksummed(group, "tokens_routed", state["routed"])
                _checksummed(group, "router_weight_sum", state["weight_sum"])
                _checksummed(group, "l1_mass", state["l1_mass"])
                _checksummed(group, "hot_count", state["hot_count"])
                for e in range(geometry.num_experts):
                    eg = group.create_group(f"experts/{e}")
                    for kind, prefix in enumerate(KINDS):
                        count = int(state[f"{prefix}_count"][e])
                        _checksummed(eg, f"{prefix}_rows", spill.read_rows(kind, e, count))
                        _checksummed(eg, f"{prefix}_token", state[f"{prefix}_tokens"][e][:count])
                        _checksummed(eg, f"{prefix}_weight", state[f"{prefix}_weights"][e][:count])
            finally:
                spill.close()
            summary.routed[layer] = state["routed"].tolist()
            summary.fit_rows[layer] = state["fit_count"].tolist()
            summary.heldout_rows[layer] = state["heldout_count"].tolist()
        summary.work_peak_bytes = max(summary.work_peak_bytes, folder_bytes(work))
