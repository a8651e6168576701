"""A cache of expert pieces in device memory: fixed slots, a replacement policy, pinning, statistics.

A piece is one sub-expert of one MoE layer (or a whole expert, for the whole-expert baseline: the same
code with one piece per expert). It is named by an integer key, ``layer * G + g`` (``G`` pieces per
layer, ``g = e * N + n``). The cache knows only keys and slots; which bytes a slot holds and how
they get there is the link's business (``link.py``), what is computed on them the executor's.

Every step of a layer ``acquire``-s the keys it needs: hits are locked where they are; each miss gets a
slot (a free one, else the policy's victim among the unlocked, unpinned keys) and is reported so the
caller can copy it in. ``release`` unlocks them after the compute. ``prefetch`` inserts keys that a
later step is likely to need, without locking them. Pinned keys hold their slots for good.

Policies are small classes in ``CACHE_POLICIES`` with four operations (touch, insert, remove, victim),
each O(1) amortised, so that bookkeeping stays a small share of a decode step even with thousands of
slots:

* ``lru``: least recently used (the paper's policy);
* ``lfu``: least frequently used since insertion, ties least recently used (frequency buckets);
* ``prefetch``: LRU, and the executor also runs the next layer's router on the current hidden state and
  fetches the pieces it predicts, so their copies overlap this layer's compute.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import ClassVar

from prism_cli.errors import PrismError
from prism_cli.registry import Registry


class CachePolicy(ABC):
    """Replacement order over the evictable keys of a cache."""

    name: ClassVar[str]
    #: The executor predicts and fetches the next layer's pieces early.
    prefetch: ClassVar[bool] = False

    @abstractmethod
    def insert(self, key: int) -> None: ...

    @abstractmethod
    def touch(self, key: int) -> None: ...

    @abstractmethod
    def remove(self, key: int) -> None: ...

    def touch_many(self, keys: list[int]) -> None:
        for key in keys:
            self.touch(key)

    @abstractmethod
    def victim(self, locked: Collection[int]) -> int | None:
        """The key to evict next, never one in ``locked``; None when every key is locked."""


CACHE_POLICIES: Registry[type[CachePolicy]] = Registry("cache policy")


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    return CACHE_POLICIES.register(cls.name)(cls)


@register_policy
class LRUPolicy(CachePolicy):
    """Least recently used first. Locked keys were touched by the current step, so they sit at the
    recent end and the scan for a victim stops at once."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def insert(self, key: int) -> None:
        self._order[key] = None

    def touch(self, key: int) -> None:
        self._order.move_to_end(key)

    def touch_many(self, keys: list[int]) -> None:
        move = self._order.move_to_end
        for key in keys:
            move(key)

    def remove(self, key: int) -> None:
        del self._order[key]

    def victim(self, locked: Collection[int]) -> int | None:
        for key in self._order:
            if key not in locked:
                return key
        return None


@register_policy
class LFUPolicy(CachePolicy):
    """Least frequently used (uses since the key entered the cache), ties by least recent use.

    Keys live in one insertion-ordered bucket per use count; the smallest non-empty count is tracked,
    so every operation is O(1) amortised (the classic constant-time LFU).
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._buckets: dict[int, OrderedDict[int, None]] = {}
        self._min = 0

    def insert(self, key: int) -> None:
        self._count[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: int) -> None:
        c = self._count[key]
        bucket = self._buckets[c]
        del bucket[key]
        if not bucket:
            del self._buckets[c]
            if self._min == c:
                self._min = c + 1
        self._count[key] = c + 1
        self._buckets.setdefault(c + 1, OrderedDict())[key] = None

    def remove(self, key: int) -> None:
        c = self._count.pop(key)
        bucket = self._buckets[c]
        del bucket[key]
        if not bucket:
            del self._buckets[c]

    def victim(self, locked: Collection[int]) -> int | None:
        if not self._count:
            return None
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        for key in self._buckets[self._min]:
            if key not in locked:
                return key
        for c in sorted(self._buckets):  # the least used are all locked (rare): look further up
            for key in self._buckets[c]:
                if key not in locked:
                    return key
        return None


@register_policy
class PrefetchPolicy(LRUPolicy):
    """LRU replacement; the executor fetches the next layer's predicted pieces ahead of time."""

    name = "prefetch"
    prefetch = True


@dataclass
class CacheStats:
    """Counts since the last ``reset``: requests, hits, misses and what prefetching did."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetched: int = 0  # pieces copied in ahead of time
    prefetch_used: int = 0  # ... of which a later step asked for before they were evicted
    predicted: int = 0  # pieces the predictor named (resident or not)
    predicted_right: int = 0  # ... that the next step really needed
    needed_after_prediction: int = 0  # pieces needed by steps that had a prediction
    bookkeeping_s: float = 0.0  # time inside the cache's own operations

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def prediction_precision(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else float("nan")

    @property
    def prediction_recall(self) -> float:
        return self.predicted_right / self.needed_after_prediction if self.needed_after_prediction else float("nan")


class PieceCache:
    """``capacity`` slots of equal size; keys are pieces (see the module docstring)."""

    def __init__(self, capacity: int, policy: str = "lru", pinned: Iterable[int] = (),
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """``timer`` times the bookkeeping: wall clock for a live model (its steps are wall clock too); a
        replay passes ``time.thread_time``, so that other processes on a shared machine do not count."""
        pinned = list(dict.fromkeys(pinned))
        if capacity < 1:
            raise PrismError("the expert cache needs at least one slot")
        if len(pinned) >= capacity:
            raise PrismError(f"pinning {len(pinned)} pieces leaves no slot of {capacity} for the rest")
        self.capacity = capacity
        self.policy_name = policy
        self.policy = CACHE_POLICIES.get(policy)()
        self.slot_of: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._locked: set[int] = set()
        self._fresh: set[int] = set()  # prefetched and not yet asked for
        self.pinned = frozenset(pinned)
        self.stats = CacheStats()
        self._timer = timer
        for key in pinned:
            self.slot_of[key] = self._free.pop()

    @property
    def evictable_capacity(self) -> int:
        return self.capacity - len(self.pinned)

    def acquire(self, keys: list[int]) -> tuple[list[int], list[int]]:
        """Lock ``keys`` (distinct) in slots: ``(slots, positions of the misses)``; misses must be copied in.

        At most ``evictable_capacity`` unpinned keys at once (the executor splits larger demands).
        """
        t0 = self._timer()
        slots = [self.slot_of.get(k) for k in keys]  # batched: a decode step is a few dozen keys
        misses = [i for i, s in enumerate(slots) if s is None]
        if misses:
            hit_keys = [k for k, s in zip(keys, slots, strict=True) if s is not None]
        else:
            hit_keys = keys
        if self.pinned:
            hit_keys = [k for k in hit_keys if k not in self.pinned]
        self.policy.touch_many(hit_keys)
        if self._fresh:
            used = self._fresh.intersection(hit_keys)
            self._fresh.difference_update(used)
            self.stats.prefetch_used += len(used)
        self._locked.update(keys)
        for i in misses:
            slots[i] = self._allocate(keys[i])
        stats = self.stats
        stats.requests += len(keys)
        stats.misses += len(misses)
        stats.hits += len(keys) - len(misses)
        stats.bookkeeping_s += self._timer() - t0
        return slots, misses

    def release(self, keys: Iterable[int]) -> None:
        t0 = self._timer()
        self._locked.difference_update(keys)
        self.stats.bookkeeping_s += self._timer() - t0

    def prefetch(self, keys: Iterable[int]) -> list[tuple[int, int]]:
        """Insert the non-resident ``keys`` without locking them: ``[(key, slot)]`` to copy in.

        The predicted keys already resident and those this call brings in are never its victims (the next
        step is expected to need them: evicting one to fetch another made a miss of a hit). Stops early
        rather than evict a locked or predicted key.
        """
        t0 = self._timer()
        keys = list(keys)
        keep = self._locked.union(k for k in keys if k in self.slot_of)
        out: list[tuple[int, int]] = []
        for key in keys:
            if key in self.slot_of:
                continue
            if not self._free and self.policy.victim(keep) is None:
                break
            out.append((key, self._allocate(key, keep)))
            keep.add(key)
            self._fresh.add(key)
        self.stats.prefetched += len(out)
        self.stats.bookkeeping_s += self._timer() - t0
        return out

    def _allocate(self, key: int, keep: Collection[int] | None = None) -> int:
        """A slot for ``key``: a free one, else the policy's victim among the keys not in ``keep`` (default:
        the locked ones)."""
        if self._free:
            slot = self._free.pop()
        else:
            victim = self.policy.victim(self._locked if keep is None else keep)
            if victim is None:
                raise PrismError(f"the expert cache of {self.capacity} slots cannot hold one step's pieces")
            self.policy.remove(victim)
            self._fresh.discard(victim)
            slot = self.slot_of.pop(victim)
            self.stats.evictions += 1
        self.slot_of[key] = slot
        self.policy.insert(key)
        return slot

    def note_prediction(self, predicted: Collection[int], needed: Collection[int]) -> None:
        """Score a prediction of a step's pieces against what the step needed (prefetch accuracy)."""
        self.stats.predicted += len(predicted)
        self.stats.needed_after_prediction += len(needed)
        self.stats.predicted_right += len(set(predicted).intersection(needed))

    def reset_stats(self) -> CacheStats:
        old, self.stats = self.stats, CacheStats()
        return old
