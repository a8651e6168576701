"""The waiting requests of an engine, one FIFO per floor, so that a virtual queue (every request whose
floor a point meets, oldest first) is a merge of a few FIFOs, not a scan of every waiting request."""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterator, Set

from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.requests import Request

_seq = operator.attrgetter("seq")


class WaitingQueue:
    def __init__(self) -> None:
        self._by_floor: dict[OperatingPoint, deque[Request]] = {}
        self._count = 0
        self._order = itertools.count()

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Request]:
        return heapq.merge(*self._by_floor.values(), key=_seq)

    def floors(self) -> dict[OperatingPoint, int]:
        """The floors waiting, with how many requests of each."""
        return {f: len(q) for f, q in self._by_floor.items() if q}

    def push(self, request: Request) -> None:
        request.seq = next(self._order)  # the queue's order is the order of entry
        self._by_floor.setdefault(request.floor, deque()).append(request)
        self._count += 1

    def oldest(self, accepts: Callable[[OperatingPoint], bool] | None = None, skip: Set[int] = frozenset()) -> Request | None:
        """The oldest request whose floor ``accepts`` admits (any floor without it) and whose ``id`` is not in
        ``skip``: the head of each floor's FIFO past the skipped, not a walk over every waiting request."""
        heads = []
        for floor, q in self._by_floor.items():
            if q and (accepts is None or accepts(floor)):
                head = next((r for r in q if id(r) not in skip), None) if skip else q[0]
                if head is not None:
                    heads.append(head)
        return min(heads, key=_seq) if heads else None

    def peek(self, accepts: Callable[[OperatingPoint], bool], n: int) -> list[Request]:
        """The ``n`` oldest requests whose floor ``accepts`` admits (a virtual queue), without removing them:
        the oldest of the first ``n`` of each floor's FIFO (``n`` is a few free slots, the FIFOs long)."""
        heads = [r for f, q in self._by_floor.items() if q and accepts(f) for r in itertools.islice(q, n)]
        heads.sort(key=_seq)
        return heads[:n]

    def heads(self, n: int) -> list[Request]:
        """The first ``n`` requests of each floor's FIFO, oldest first: the first ``n`` of every virtual queue
        (and the oldest of every set of floors) are among them."""
        heads = [r for q in self._by_floor.values() for r in itertools.islice(q, n)]
        heads.sort(key=_seq)
        return heads

    def remove(self, requests: list[Request]) -> None:
        """Take ``requests`` (waiting ones) out. A launch takes mostly the heads of the FIFOs: those are popped,
        and only a FIFO with one left past its head is rebuilt (rebuilding every FIFO at every launch made a
        simulation with thousands waiting slow down with the square of the requests)."""
        left = {id(r): r for r in requests}
        self._count -= len(left)
        for r in requests:
            q = self._by_floor[r.floor]
            while q and id(q[0]) in left:
                del left[id(q.popleft())]
        for floor in {r.floor for r in left.values()}:
            self._by_floor[floor] = deque(r for r in self._by_floor[floor] if id(r) not in left)

    def drop_cancelled(self) -> list[Request]:
        dropped = [r for q in self._by_floor.values() for r in q if r.cancelled]
        if dropped:
            self.remove(dropped)
        return dropped
