"""Moving pieces from host memory into cache slots, and what that costs.

Two links with one interface (``copy`` a piece into a slot, ``wait`` until a slot may be read):

* ``CudaLink``: real asynchronous copies from pinned host memory on a side stream; each slot's last
  copy records an event, and the compute stream waits on that event (not on the whole side stream),
  so the copies of a step's misses overlap the compute of its hits and of the pieces that arrived.
  Before a batch of copies the side stream waits for the compute stream: a slot is only overwritten
  after the kernels that read its previous piece have run.
* ``SimulatedLink``: no transfer hardware. A copy is charged at a stated bandwidth and latency per copy
  call (``LinkSpec``), serially, like one DMA engine; ``wait`` holds the caller until the slot's
  simulated arrival. With a real-time clock (``RealClock``, a spin on ``perf_counter``) every wall-clock
  timer of the model sees the simulated transfers as they would stall a device, and the compute
  measured between them is real; with a ``StallClock`` (``offload-bench`` live runs) compute is real
  too but a stall advances the clock instead of waiting it out; with a ``VirtualClock`` (trace
  replays) compute is charged too.

``SlotPool`` is the storage: a tensor per weight, one row per slot (on CUDA, and on a simulated device
when ``materialize``), or references to the host copies (a simulated device by default: the same
numbers, no CPU memcpy to distort the compute being measured).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from prism_cli.offload.config import LinkSpec


class Clock(ABC):
    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def wait_until(self, t: float) -> None: ...


class RealClock(Clock):
    """Wall clock; waits spin (a sleep overshoots by tens of microseconds, a copy takes a few)."""

    def now(self) -> float:
        return time.perf_counter()

    def wait_until(self, t: float) -> None:
        remaining = t - time.perf_counter()
        if remaining > 2e-3:  # long waits sleep most of the way (a shared machine needs its cores)
            time.sleep(remaining - 1e-3)
        while time.perf_counter() < t:
            pass


class StallClock(Clock):
    """Wall clock plus the simulated stalls so far: a wait moves this clock ahead instead of holding the
    caller, so compute is measured in real time and a stall is charged exactly, however long (a link of
    1 B/s stalls for days of simulated time, not of real time). Whoever times the model must read this
    clock (``offload-bench`` does), not the wall clock."""

    def __init__(self) -> None:
        self.stalled = 0.0

    def now(self) -> float:
        return time.perf_counter() + self.stalled

    def wait_until(self, t: float) -> None:
        self.stalled += max(0.0, t - self.now())


class VirtualClock(Clock):
    """Simulated time only: compute is charged with ``advance``, waits jump ahead."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class LinkStats:
    copies: int = 0
    bytes: int = 0
    stall_s: float = 0.0  # time spent waiting for a slot (simulated links only)


class SlotPool:
    """Device storage of the cache slots for the weights of one piece shape."""

    def __init__(self, capacity: int, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device,
                 materialize: bool, layouts: list[torch.Tensor] | None = None) -> None:
        """``layouts``: one piece's source tensors, whose memory layout each slot then takes (else contiguous
        slots, as the CUDA kernels read them). A slot laid out as its source (an export's ``down_proj`` is
        stored transposed) goes through the same matmul as the source, whose rounding differs from the
        other layout's on some CPUs: a piece's result then does not depend on whether it was copied."""
        self.materialized = materialize
        if not materialize:
            self.tensors = []
        elif layouts is None:
            self.tensors = [torch.empty((capacity, *s), dtype=dtype, device=device) for s in shapes]
        else:
            self.tensors = [_empty_laid_out(capacity, like, dtype, device) for like in layouts]
        self._refs: list[tuple[torch.Tensor, ...] | None] = [None] * capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def destination(self, slot: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[slot] for t in self.tensors)

    def bind(self, slot: int, sources: tuple[torch.Tensor, ...]) -> None:
        self._refs[slot] = sources

    def weights(self, slot: int) -> tuple[torch.Tensor, ...]:
        if self.materialized:
            return tuple(t[slot] for t in self.tensors)
        refs = self._refs[slot]
        assert refs is not None, "read of a slot nothing was copied into"
        return refs


def _empty_laid_out(capacity: int, like: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[capacity, *like.shape]``, each row laid out in memory as ``like`` is (its dimensions in the same order)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # outermost dimension first
    storage = torch.empty((capacity, *(like.shape[d] for d in order)), dtype=dtype, device=device)
    return storage.permute(0, *(1 + order.index(d) for d in range(like.dim())))


class Link(ABC):
    simulated: bool

    def __init__(self) -> None:
        self.stats = LinkStats()

    def begin(self) -> None:  # noqa: B027 - an optional hook: most links need nothing here
        """Before a batch of copies."""

    @abstractmethod
    def copy(self, pool: SlotPool, slot: int, sources: tuple[torch.Tensor, ...]) -> None: ...

    @abstractmethod
    def wait(self, slot: int) -> None: ...

    def pause(self) -> None:  # noqa: B027 - an optional hook
        """Another model takes the machine (interleaved timing): freeze in-flight transfers."""

    def resume(self) -> None:  # noqa: B027 - an optional hook
        """... and give them back their remaining time."""

    def reset_stats(self) -> LinkStats:
        old, self.stats = self.stats, LinkStats()
        return old


class SimulatedLink(Link):
    """Copies charged at ``spec`` on ``clock`` (see the module docstring)."""

    simulated = True

    def __init__(self, spec: LinkSpec, clock: Clock | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.clock = clock or RealClock()
        self._free_at = 0.0  # when the link finishes its last queued copy
        self._ready: dict[int, float] = {}
        self._paused_at: float | None = None

    def copy(self, pool: SlotPool, slot: int, sources: tuple[torch.Tensor, ...]) -> None:
        if pool.materialized:
            for dst, src in zip(pool.destination(slot), sources, strict=True):
                dst.copy_(src)
        else:
            pool.bind(slot, sources)
        self.charge(slot, sum(s.numel() * s.element_size() for s in sources), len(sources))

    def charge(self, slot: int, nbytes: int, copies: int = 1) -> float:
        """Queue ``copies`` transfers of ``nbytes`` in all into ``slot``; returns the arrival time."""
        start = max(self.clock.now(), self._free_at)
        self._free_at = start + self.spec.seconds(nbytes, copies)
        self._ready[slot] = self._free_at
        self.stats.copies += copies
        self.stats.bytes += nbytes
        return self._free_at

    def wait(self, slot: int) -> None:
        ready = self._ready.pop(slot, None)
        if ready is None:
            return
        now = self.clock.now()
        if ready > now:
            self.stats.stall_s += ready - now
            self.clock.wait_until(ready)

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self.clock.now()

    def resume(self) -> None:
        if self._paused_at is None:
            return
        shift = self.clock.now() - self._paused_at
        self._paused_at = None
        if self._free_at > 0:
            self._free_at += shift
        for slot in self._ready:
            self._ready[slot] += shift


class CudaLink(Link):
    """Asynchronous host-to-device copies on a side stream, one event per slot's latest copy."""

    simulated = False

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._events: dict[int, torch.cuda.Event] = {}

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, pool: SlotPool, slot: int, sources: tuple[torch.Tensor, ...]) -> None:
        with torch.cuda.stream(self.stream):
            for dst, src in zip(pool.destination(slot), sources, strict=True):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[slot] = event
        self.stats.copies += len(sources)
        self.stats.bytes += sum(s.numel() * s.element_size() for s in sources)

    def wait(self, slot: int) -> None:
        event = self._events.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
