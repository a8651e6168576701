"""The engine: continuous batching of generation requests, one scheduling decision per iteration.

An iteration (``Engine.step``):

1. takes in the requests that arrived (an inbox other threads may feed, or a pre-timed workload),
   and drops cancelled and finished ones (their KV rows are freed);
2. asks the policy which waiting requests to launch into which batch, and prefills them (one forward
   per launch, at the points the policy gives their rows; each gets its first token) before their
   KV rows join the batch;
3. runs one decode step of one batch (batches take turns), at the points the policy gives its rows.

A batch is a set of requests sharing one KV cache (left-padded, so every row's next token is at the
end); requests join it and leave it at their own lengths. What runs the forward passes is an
``Executor``: ``ModelExecutor`` (the real model, in ``executor.py``) or the simulator's, which
advances a virtual clock by the cost model. Every row of every step is checked against its floor
here, independently of the policy; a row served below its floor is counted as a violation.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.floors import Ladder
from prism_cli.serving.policies import Launch, SchedulingPolicy
from prism_cli.serving.queue import WaitingQueue
from prism_cli.serving.requests import Request
from prism_cli.serving.workload import MAX_ARRIVAL


@dataclass(frozen=True)
class Limits:
    max_batch: int = 16  # rows of one forward
    max_running: int = 32  # requests holding a KV cache at once
    t_max: float = 10.0  # seconds a request may wait before it forces a launch (prism, fullbatch)

    def validate(self) -> None:
        if self.max_batch < 1 or self.max_running < self.max_batch:
            raise PrismError(f"need --max-batch >= 1 and --max-running >= --max-batch, got {self.max_batch}, {self.max_running}")
        # Bounded as a trace's arrivals are: the simulator waits out t_max on its clock in seconds, which
        # stands still once a step's milliseconds no longer change it (--t-max inf or 1e300 ran for ever).
        if not (math.isfinite(self.t_max) and 0 < self.t_max <= MAX_ARRIVAL):
            raise PrismError(f"--t-max must be a finite number of seconds > 0 and at most {MAX_ARRIVAL:g}, got {self.t_max:g}")


@dataclass(eq=False)
class Batch:
    rows: list[Request]
    kv: Any = None  # the executor's state of these rows: a KV cache (the simulator: its width, ``SimKV``)
    turn: int = 0  # iteration of its last decode step (batches take turns)
    #: The point a policy keeps this batch at (``prism``: the floors it admits are those this point meets).
    target: OperatingPoint | None = None
    _floors: frozenset[OperatingPoint] | None = field(default=None, repr=False)

    def floors(self) -> frozenset[OperatingPoint]:
        """The distinct floors of its rows, kept until ``add`` or ``keep_rows`` changes them (a policy reads
        them in every decision; the rows change only every few)."""
        if self._floors is None:
            self._floors = frozenset(r.floor for r in self.rows)
        return self._floors

    def add(self, requests: list[Request]) -> None:
        self.rows.extend(requests)
        self._floors = None

    def keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self._floors = None


@dataclass
class StepRecord:
    """One forward pass, for the report (what the cost model predicted against what it took)."""

    kind: str  # "prefill" or "decode"
    rows: int
    tokens: int
    points: tuple[str, ...]
    ms: float


@dataclass
class ExecutorTimes:
    """Where an executor's time went (the simulator's: what it charged)."""

    forward_s: float = 0.0
    kv_s: float = 0.0  # joining, selecting and trimming caches
    sample_s: float = 0.0
    per_row_steps: int = 0


class Executor(ABC):
    """Runs the forward passes of an engine and keeps its clock."""

    #: Token decoder and end-of-sequence ids, for stop strings and EOS (None / empty in the simulator).
    decode_text: Callable[[list[int]], str] | None = None
    eos: set[int] = set()

    @abstractmethod
    def now(self) -> float:
        """Seconds on the engine's clock."""

    @abstractmethod
    def prefill(self, requests: list[Request], points: list[OperatingPoint]) -> tuple[Any, list[int], float]:
        """Prefill the prompts; returns (the KV state of these rows, each row's first token, ms)."""

    @abstractmethod
    def join(self, batch: Batch, kv: Any) -> None:
        """Append the rows of ``kv`` (from ``prefill``) to ``batch``'s KV state."""

    @abstractmethod
    def decode(self, batch: Batch, points: list[OperatingPoint]) -> tuple[list[int], float]:
        """One decode step of every row of ``batch``; returns each row's next token and ms."""

    @abstractmethod
    def keep(self, batch: Batch, rows: list[int]) -> None:
        """Keep only these rows of ``batch``'s KV state (the others finished or were cancelled)."""

    @abstractmethod
    def idle(self, until: float | None, wake: threading.Event) -> None:
        """Nothing to run: wait until ``until`` (engine clock), ``wake`` or a short while."""


@dataclass
class EngineStats:
    decisions: int = 0  # iterations that asked the policy (waiting requests and a free slot)
    decision_s: float = 0.0
    decision_times: MutableSequence[float] = field(default_factory=list)
    steps: MutableSequence[StepRecord] = field(default_factory=list)
    violations: int = 0  # rows served below their floor, summed over steps


def _history(limit: int | None) -> MutableSequence[Any]:
    """Every record (a workload's report reads them all), or the last ``limit`` (a server that runs for
    days: its memory must not grow with the requests it has served)."""
    return [] if limit is None else deque(maxlen=limit)


class Engine:
    def __init__(self, executor: Executor, policy: SchedulingPolicy, ladder: Ladder, limits: Limits,
                 cost_model: Any = None, history: int | None = None) -> None:
        """``history``: keep only the last this many finished requests, step records and decision times
        (counters still count everything); None keeps them all."""
        limits.validate()
        self.executor = executor
        self.policy = policy
        self.ladder = ladder
        self.limits = limits
        self.cost_model = cost_model
        self.waiting = WaitingQueue()
        self.batches: list[Batch] = []
        self.stats = EngineStats(decision_times=_history(history), steps=_history(history))
        self.finished: MutableSequence[Request] = _history(history)
        self._inbox: deque[Request] = deque()
        self._scheduled: deque[Request] = deque()  # a pre-timed workload, released at its arrival times
        self._launching: list[Request] = []  # out of the waiting queue, not yet in a batch (``abort`` ends them too)
        self._wake = threading.Event()
        self._cancels = False  # a request was cancelled since the waiting queue was last swept for them
        self._iteration = 0

    # --- input -------------------------------------------------------------------------------
    def now(self) -> float:
        return self.executor.now()

    def submit(self, request: Request) -> None:
        """Thread-safe: queue a request (its ``arrival`` should be ``now()``)."""
        if not request.prompt_ids:
            raise PrismError("a request needs at least one prompt token")
        self._inbox.append(request)
        self._wake.set()

    def schedule(self, requests: list[Request]) -> None:
        """A workload whose requests enter at their ``arrival`` times (sorted)."""
        self._scheduled.extend(sorted(requests, key=lambda r: r.arrival))

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """Thread-safe: drop ``request`` at the next iteration (waiting: from the queue; running: its KV rows).
        Only then is the waiting queue swept, not at every step (a simulation keeps thousands waiting)."""
        request.cancelled = True
        self._cancels = True  # after the request's flag: a sweep that misses it is followed by another
        self._wake.set()

    # --- state -------------------------------------------------------------------------------
    def running(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    def free_slots(self) -> int:
        return self.limits.max_running - self.running()

    def pending(self) -> int:
        """Requests not finished yet (waiting, running, or still to arrive)."""
        return len(self.waiting) + self.running() + len(self._inbox) + len(self._scheduled)

    # --- one iteration -----------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; returns False when there was nothing to run (the engine idled)."""
        self._iteration += 1
        self._take_arrivals()
        self._retire()
        launches: list[Launch] = []
        if len(self.waiting) and self.free_slots() > 0:  # a decision to make (else the iteration only decodes)
            t0 = time.perf_counter()
            launches = self.policy.admit(self)
            spent = time.perf_counter() - t0
            self.stats.decision_s += spent
            self.stats.decision_times.append(spent)
            self.stats.decisions += 1
        for launch in launches:
            self._launch(launch.batch, launch.requests)
        if launches:
            self._retire()  # a request can end with its first token
        batch = min((b for b in self.batches if any(not r.finished for r in b.rows)), key=lambda b: b.turn, default=None)
        if batch is not None:
            self._decode(batch)
        elif not launches:
            events = [self._scheduled[0].arrival] if self._scheduled else []
            oldest = self.waiting.oldest()
            if oldest is not None:  # a waiting request forces a launch once it is older than t_max
                events.append(oldest.arrival + self.limits.t_max + 1e-6)
            self.executor.idle(min(events, default=None), self._wake)
            self._wake.clear()
            return False
        return True

    def run(self) -> None:
        """Iterate until every request (submitted or scheduled) has finished."""
        while self.pending():
            self.step()
        self.finish()

    def abort(self, reason: str) -> None:
        """End every request not finished yet (the engine cannot go on)."""
        now = self.now()
        pending = [*self._inbox, *self._scheduled, *self.waiting, *self._launching, *(r for b in self.batches for r in b.rows)]
        for r in pending:
            r.finish(reason, now)

    def finish(self) -> None:
        """Move the requests that ended in the last step to ``finished``."""
        self._retire()

    # --- internals ---------------------------------------------------------------------------
    def _take_arrivals(self) -> None:
        now = self.now()
        while self._scheduled and self._scheduled[0].arrival <= now:
            self.waiting.push(self._scheduled.popleft())
        # Read before the inbox is emptied: a request submitted and cancelled meanwhile is then either in the
        # queue for this sweep or leaves the flag set for the next one.
        cancels, self._cancels = self._cancels, False
        while self._inbox:
            self.waiting.push(self._inbox.popleft())
        if cancels:
            for r in self.waiting.drop_cancelled():
                r.finish("cancelled", now)
                self.finished.append(r)

    def _retire(self) -> None:
        now = self.now()
        for batch in list(self.batches):
            keep = []
            for i, r in enumerate(batch.rows):
                if r.cancelled and not r.finished:
                    r.finish("cancelled", now)
                if r.finished:
                    self.finished.append(r)
                else:
                    keep.append(i)
            if not keep:
                self.batches.remove(batch)
            elif len(keep) < len(batch.rows):
                self.executor.keep(batch, keep)
                batch.keep_rows(keep)

    def _check(self, rows: list[Request], points: list[OperatingPoint]) -> None:
        for r, p in zip(rows, points, strict=True):
            r.served_at.add(str(p))
            if not self.ladder.meets(p, r.floor):
                r.below_floor_steps += 1
                self.stats.violations += 1

    def _launch(self, batch: Batch | None, requests: list[Request]) -> None:
        if not requests:
            return
        if len(requests) + (len(batch.rows) if batch else 0) > self.limits.max_batch or len(requests) > self.free_slots():
            raise RuntimeError(f"policy {self.policy.name} launched past the limits")  # a bug in the policy
        self.waiting.remove(requests)
        self._launching = requests
        points = self.policy.points(self, requests)
        self._check(requests, points)
        kv, tokens, ms = self.executor.prefill(requests, points)
        self.stats.steps.append(StepRecord("prefill", len(requests), sum(r.prompt_len for r in requests),
                                           tuple(map(str, points)), ms))
        if batch is None:
            batch = Batch([], turn=self._iteration)
            self.batches.append(batch)
        self.executor.join(batch, kv)
        batch.add(requests)
        self._launching = []
        now = self.now()
        for r, t in zip(requests, tokens, strict=True):
            r.append(t, now, self.executor.decode_text, self.executor.eos)

    def _decode(self, batch: Batch) -> None:
        rows = batch.rows
        points = self.policy.points(self, rows)
        self._check(rows, points)
        tokens, ms = self.executor.decode(batch, points)
        self.stats.steps.append(StepRecord("decode", len(rows), len(rows), tuple(map(str, points)), ms))
        batch.turn = self._iteration
        now = self.now()
        for r, t in zip(rows, tokens, strict=True):
            r.append(t, now, self.executor.decode_text, self.executor.eos)
