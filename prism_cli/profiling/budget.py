"""How much memory and disk a profiling run takes, and how it stays within ``--max-memory``.

What ``--max-memory`` bounds is everything a profiling run holds besides the model's weights and
the Python runtime:

* the forward pass's activations (``forward_bytes``: an estimate from the batch shape);
* per profiled layer, its *state*: the counters (``l1_mass``, ``hot_count`` ``[E, I]`` float64 / int64,
  tokens routed and router weights ``[E]``), each reservoir's slot tokens and weights (12 bytes per
  slot, all ``max_rows`` slots of every expert) and its generator (about 1 KiB);
* a buffer of rows waiting for the next checkpoint (``spill.py``), and while a checkpoint runs, a
  copy of at most one expert's reservoir.

So the budget needs at least the activations, one layer's state and two expert reservoirs of rows
(``minimum``). Layers are profiled in as many passes as it takes for their states to fit in half the
budget; the rest is the row buffer. At the default budget every model prism supports takes one pass
(a layer of DeepSeek-V3 keeps about 25 MiB of state); the row buffer is what a small budget shrinks.

Disk: the profile holds, per expert, ``min(cap, rows routed)`` fit and held-out rows; the estimate
assumes uniform routing (``tokens * top_k / E`` per expert), so it is an upper bound when routing is
skewed. While the run is in progress the work folder holds the same rows, so the peak is about twice
the profile, reached while the profile is assembled at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prism_cli.errors import PrismError
from prism_cli.io import format_size

#: Host memory of one reservoir's generator and bookkeeping objects (measured: about 1 KiB each).
RESERVOIR_OBJECT_BYTES = 1536
#: HDF5 bytes per stored dataset besides its data (object header, B-tree node): measured order of magnitude.
H5_DATASET_OVERHEAD = 1024
#: Slot bookkeeping that travels with each buffered or stored row (token int64 + weight float32).
SLOT_BYTES = 12

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(text: str | int, option: str = "--max-memory") -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5GB"``, ``"2000000"`` -> bytes (K/M/G/T and KiB... are powers of 1024)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise PrismError(f"{option} must be a size such as 8G, 512MiB or 1.5GB, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise PrismError(f"{option} must be positive, got {text!r}")
    return value


def reservoir_caps(max_rows: int, holdout_fraction: float) -> tuple[int, int]:
    """(fit, held-out) row caps of one expert: they add up to ``max_rows``."""
    heldout = int(round(max_rows * holdout_fraction))
    return max_rows - heldout, heldout


@dataclass(frozen=True)
class ProfileGeometry:
    """The sizes that decide a profiling run's memory and disk."""

    num_experts: int
    width: int
    top_k: int
    n_layers: int
    max_rows: int
    holdout_fraction: float
    row_bytes: int  # bytes of one stored activation value (2 for float16)
    forward_bytes: int = 0  # activations of one forward pass (``forward_bytes``)

    @property
    def caps(self) -> tuple[int, int]:
        return reservoir_caps(self.max_rows, self.holdout_fraction)

    @property
    def row_size(self) -> int:
        """Bytes of one activation row."""
        return self.width * self.row_bytes

    @property
    def reservoir_bytes(self) -> int:
        """Rows of one expert's full fit and held-out reservoirs."""
        return self.max_rows * self.row_size

    @property
    def layer_state_bytes(self) -> int:
        """Counters, slot tokens and weights, and generators of one layer."""
        counters = self.num_experts * (16 + 16 * self.width)
        slots = self.num_experts * self.max_rows * SLOT_BYTES
        return counters + slots + 2 * self.num_experts * RESERVOIR_OBJECT_BYTES

    @property
    def minimum_budget(self) -> int:
        return self.forward_bytes + self.layer_state_bytes + 2 * self.reservoir_bytes

    def expected_rows(self, tokens: int) -> tuple[float, float]:
        """Expected fit and held-out rows kept per expert under uniform routing."""
        routed = tokens * self.top_k / self.num_experts
        fit_cap, held_cap = self.caps
        return min(fit_cap, routed * (1 - self.holdout_fraction)), min(held_cap, routed * self.holdout_fraction)

    def profile_bytes(self, tokens: int) -> int:
        """Expected size of the profile file."""
        fit, held = self.expected_rows(tokens)
        rows = (fit + held) * (self.row_size + SLOT_BYTES)
        per_expert = rows + 6 * H5_DATASET_OVERHEAD
        counters = self.num_experts * (16 + 16 * self.width) + 4 * H5_DATASET_OVERHEAD
        return int(self.n_layers * (self.num_experts * per_expert + counters))

    def work_bytes(self, tokens: int, buffer_bytes: int) -> int:
        """Peak size of the work folder: the rows, every layer's saved state and the journals, two at a
        checkpoint (the last is kept until the new one is durable). A journal holds at most the row buffer,
        and the two together never more than every row the run routes (a budget of terabytes over a small
        run planned terabytes of disk)."""
        fit, held = self.expected_rows(tokens)
        rows = self.n_layers * self.num_experts * (fit + held) * self.row_size
        routed = self.n_layers * tokens * self.top_k * self.row_size
        return int(rows + self.n_layers * self.layer_state_bytes + min(2 * buffer_bytes, routed))


def forward_bytes(batch_size: int, seq_len: int, hidden_size: int, heads: int, dtype_bytes: int) -> int:
    """Memory one profiling forward pass takes at its peak: 24 copies of the batch's hidden states
    (residual, norms, projections, the experts' output and the allocator's slack around them) and three
    of the attention scores in float32. The routed activations take little: the recording path
    computes one expert at a time. At OLMoE-1B-7B's shape (8 x 256 tokens, bfloat16) this gives
    0.29 GiB; the first batch measured 0.25 GiB above the model and the buffered rows."""
    tokens = batch_size * seq_len
    return 24 * tokens * hidden_size * dtype_bytes + 3 * batch_size * heads * seq_len**2 * 4


@dataclass(frozen=True)
class MemoryPlan:
    """How a run keeps its budget: layers per pass and the row buffer."""

    budget: int
    layers_per_pass: int
    passes: int
    buffer_bytes: int


def plan_memory(geometry: ProfileGeometry, budget: int) -> MemoryPlan:
    """Layers per pass (their states within half the budget, at least one) and the row buffer (the rest)."""
    if budget < geometry.minimum_budget:
        raise PrismError(
            f"--max-memory {format_size(budget)} is below the minimum for this model and --max-rows: "
            f"{format_size(geometry.minimum_budget)} (a forward pass's activations, two expert reservoirs of "
            f"{geometry.max_rows:,} rows x {geometry.width:,} neurons and one layer's counters); raise --max-memory, "
            "or lower --max-rows or --batch-size"
        )
    per_layer = geometry.layer_state_bytes
    layers = max(1, min(geometry.n_layers, ((budget - geometry.forward_bytes) // 2) // per_layer))
    passes = math.ceil(geometry.n_layers / layers)
    layers = math.ceil(geometry.n_layers / passes)  # the same number of layers in every pass
    # One expert's reservoir is kept free for the copy a checkpoint makes.
    buffer = budget - geometry.forward_bytes - layers * per_layer - geometry.reservoir_bytes
    return MemoryPlan(budget=budget, layers_per_pass=layers, passes=passes, buffer_bytes=buffer)


def check_buffer_fits(memory: MemoryPlan, total_memory: int) -> None:
    """Refuse a budget whose row buffer is larger than the machine's memory: the allocation would fail once
    the run has begun (``prism plan`` refuses it as ``prism profile`` does)."""
    if memory.buffer_bytes > total_memory:
        raise PrismError(f"--max-memory {format_size(memory.budget)} sizes a row buffer of {format_size(memory.buffer_bytes)}, "
                         f"more than this machine's {format_size(total_memory)} of memory; give less (default: half the "
                         "available memory)")
