"""Scheduling policies (SPEC 4.2), one small class each in a registry.

Every engine iteration asks the policy two things: which waiting requests to admit into which batch
(``admit``: a list of ``Launch``), and at which operating point(s) a batch's next step runs
(``points``: one per row). The engine enforces the limits (``max_batch`` rows per forward,
``max_running`` requests holding a KV cache) and checks every row of every step against its floor,
independently of the policy.

* ``prism``: the paper's virtual queues. One queue per candidate point K (every floor in the waiting
  set, and the full model); a request is in every queue whose point meets its floor. Launching queue K
  into a batch (a running one, or a new one) is scored by SPEC's utility, generalised to a running
  engine: the tokens per millisecond of a round of decode steps over all batches afterwards (with
  nothing running it is SPEC's ``U_K = tokens(Q_K) / C(|Q_K|, K)``). While there is room the best launch
  goes (the engine never idles with requests waiting); a launch that fills a batch beats one that does
  not, and a request older than ``t_max`` forces a launch that includes it (with the requests whose own
  point is the launch's, not cheaper floors that would pay for the higher point). ``t_max`` bounds how
  long utility may pass a request over. Each running batch is kept at a point (``_batch_points``) and
  admits only the floors it meets, so that batches of cheap floors stay cheap under load; an overdue
  request waits for room in a batch of its own point and raises another batch only where none has it.
* ``fifo``: oldest first into the first batch with room; a batch runs at the cheapest point that
  meets every floor in it (the highest floor, the paper's baseline).
* ``fullbatch``: launches only whole new batches of ``max_batch`` requests (or, with fewer waiting,
  what has waited ``t_max``); no request joins a running batch.
* ``static``: FIFO admission, every step at one fixed point, whatever the floors (violations counted).
* ``mixed``: FIFO admission, every row at its own floor inside the shared batch (per-row points).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.registry import Registry
from prism_cli.serving.requests import Request

if TYPE_CHECKING:
    from prism_cli.serving.engine import Batch, Engine


@dataclass
class Launch:
    """Admit ``requests`` (oldest first) into ``batch``, or into a new batch when it is None."""

    batch: Batch | None
    requests: list[Request]


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    #: Whether ``points`` may give the rows of one step different points (needs the per-row runtime).
    per_row: ClassVar[bool] = False
    #: Whether ``admit`` plans with the cost model: then every point it may run needs a timing there.
    plans_with_costs: ClassVar[bool] = False

    def __init__(self, fixed_point: OperatingPoint | None = None) -> None:
        self.fixed_point = fixed_point

    @abstractmethod
    def admit(self, engine: Engine) -> list[Launch]:
        """The launches of this iteration (may be empty: nothing admitted now)."""

    def points(self, engine: Engine, rows: list[Request]) -> list[OperatingPoint]:
        """The point of every row of the next step; by default one point, the cheapest meeting every floor."""
        point = engine.ladder.cheapest_meeting([r.floor for r in rows])
        return [point] * len(rows)


SCHEDULING_POLICIES: Registry[type[SchedulingPolicy]] = Registry("scheduling policy")


def register(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
    return SCHEDULING_POLICIES.register(cls.name)(cls)


def fifo_launches(engine: Engine, join_running: bool = True) -> list[Launch]:
    """Oldest first: fill the running batches that have room (oldest batch first), then new batches."""
    free = engine.free_slots()
    take = engine.waiting.peek(lambda _f: True, free)
    launches: list[Launch] = []
    targets = [b for b in engine.batches if len(b.rows) < engine.limits.max_batch] if join_running else []
    for batch in targets:
        room = engine.limits.max_batch - len(batch.rows)
        if take and room > 0:
            launches.append(Launch(batch, take[:room]))
            take = take[room:]
    while take:
        launches.append(Launch(None, take[: engine.limits.max_batch]))
        take = take[engine.limits.max_batch :]
    return launches


@register
class FifoPolicy(SchedulingPolicy):
    name = "fifo"

    def admit(self, engine: Engine) -> list[Launch]:
        return fifo_launches(engine)


@register
class FullBatchPolicy(SchedulingPolicy):
    name = "fullbatch"

    def admit(self, engine: Engine) -> list[Launch]:
        size = engine.limits.max_batch
        launches: list[Launch] = []
        free = engine.free_slots()
        waiting = engine.waiting.peek(lambda _f: True, free)
        while len(waiting) >= size and free >= size:
            launches.append(Launch(None, waiting[:size]))
            waiting, free = waiting[size:], free - size
        oldest = waiting[0] if waiting else None
        # t_max is for a queue too short to fill a batch. Where a full batch waits, it waits for room: were
        # each freed slot launched as a batch of its own, a sustained overload would fragment the running set
        # into batches of one row, each a decode step of its own.
        if oldest is not None and len(engine.waiting) < size and engine.now() - oldest.arrival > engine.limits.t_max:
            launches.append(Launch(None, waiting[: min(size, free)]))
        return launches


@register
class StaticPolicy(SchedulingPolicy):
    name = "static"

    def __init__(self, fixed_point: OperatingPoint | None = None) -> None:
        if fixed_point is None:
            raise PrismError("the static policy needs a point (--point, e.g. linear:8)")
        super().__init__(fixed_point)

    def admit(self, engine: Engine) -> list[Launch]:
        return fifo_launches(engine)

    def points(self, engine: Engine, rows: list[Request]) -> list[OperatingPoint]:
        return [self.fixed_point] * len(rows)  # type: ignore[list-item]


@register
class MixedPolicy(SchedulingPolicy):
    name = "mixed"
    per_row = True

    def admit(self, engine: Engine) -> list[Launch]:
        return fifo_launches(engine)

    def points(self, engine: Engine, rows: list[Request]) -> list[OperatingPoint]:
        return [engine.ladder.own_point(r.floor) for r in rows]


@register
class PrismPolicy(SchedulingPolicy):
    name = "prism"
    plans_with_costs = True

    # A decision runs between two forward passes and is charged to every request, so floors are bits of an
    # int here (``Ladder.bit``): the floors a point meets are one mask, a set of floors one int, and a batch is
    # planned by its number of rows and the bits of their floors (its point depends on nothing else).

    @staticmethod
    def _batch_points(engine: Engine, plan: list[_Planned], waiting: Iterable[int], reach: int) -> tuple[list[int], int]:
        """The floors each running batch admits now (a ``Ladder.mask``; -1: any floor), and how many batches may run.

        A batch that took every floor would run at the highest one for as long as it runs, and under load it
        runs for ever (each freed slot is refilled at once): every step at the full model, whatever the mix.
        So each batch keeps the point of its rows when first seen (``Batch.target``) and admits only the
        floors that point meets; its higher rows drain as they finish. With no room for another batch, a
        floor that no batch's point meets re-points the batch whose rows already run highest (up), and a
        floor whose own point is below every batch's re-points one batch down to it (``_point_down``); a
        batch whose point no waiting request fits takes any floor for now. At most ``max_running /
        max_batch`` batches. ``plan``: the running batches; ``waiting``: the bits of the floors waiting;
        ``reach``: those bits together."""
        ladder, limits = engine.ladder, engine.limits
        batches = [p.batch for p in plan]
        for p in plan:
            if p.batch.target is None and p.rows:
                p.batch.target = ladder.cheapest_of(p.bits)[0]

        def masks() -> list[int]:
            return [ladder.mask(b.target) if b.target is not None else 0 for b in batches]

        meets = masks()
        most = -(-limits.max_running // limits.max_batch)
        if len(batches) >= most and batches:
            covered = 0
            for m in meets:
                covered |= m
            homeless = reach & ~covered
            if homeless:
                b = max(plan, key=lambda p: ladder.cheapest_of(p.bits)[2]).batch
                b.target = ladder.cheapest_of(ladder.bit(b.target) | homeless)[0]
                meets = masks()
            elif PrismPolicy._point_down(engine, batches, meets, waiting, reach):
                meets = masks()
        return [m if m & reach else -1 for m in meets], most

    @staticmethod
    def _point_down(engine: Engine, batches: list[Batch], meets: list[int], waiting: Iterable[int], reach: int) -> bool:
        """Where a waiting floor's own point is below every batch's, re-point one batch down to it (True if one was).

        Batches that opened high (a burst of high floors) would otherwise stay high for as long as the load
        lasts: a point only ever rises, and a cheap floor joins the high batches and pays their price. The
        batch re-pointed is one whose old point no waiting floor needs (the other batches still meet every
        floor waiting), the one with the fewest rows above the new point (it drains soonest); its rows
        finish at the point they run at, and it admits only floors the new point meets meanwhile. ``meets``:
        each batch's ``Ladder.mask``."""
        ladder = engine.ladder
        if len(batches) < 2:
            return False  # one batch re-pointed down would turn the higher floors away until it drained
        lowest = min(ladder.rank(b.target) for b in batches)
        below = [(rank, point) for point, _, rank in map(ladder.cheapest_of, waiting) if rank < lowest]  # own points
        if not below:
            return False
        low = min(below, key=lambda own: (own[0], str(own[1])))[1]
        spare = []
        for i, b in enumerate(batches):
            others = 0
            for j, m in enumerate(meets):
                if j != i:
                    others |= m
            if not reach & ~others:
                spare.append(b)
        if not spare:
            return False
        b = min(spare, key=lambda b: (sum(not ladder.meets(low, r.floor) for r in b.rows), len(b.rows)))
        b.target = low
        return True

    def admit(self, engine: Engine) -> list[Launch]:
        if engine.cost_model is None:
            raise PrismError("the prism policy plans with a cost model: build one with `prism schedule cost-model` "
                             "or pass --cost-model")
        limits, ladder, waiting = engine.limits, engine.ladder, engine.waiting
        cheapest_of, step_cost, max_batch = ladder.cheapest_of, ladder.step_cost, limits.max_batch
        plan = [_Planned(b, len(b.rows), ladder.bits_of(b.floors())) for b in engine.batches]
        counts = waiting.floors()
        bit_of = {f: ladder.bit(f) for f in counts}
        sizes = [(bit_of[f], n) for f, n in counts.items()]
        reach = sum(bit_of.values())  # every floor waiting (distinct bits)
        # Floors (as bits) of the waiting requests this iteration has placed already: still in the waiting queue
        # until the engine launches them, they are rows of a planned batch, not requests that may fill one.
        placed: dict[int, int] = {}
        queued: dict[int, int] = {}  # the size of a point's virtual queue by its mask (fixed within a decision)

        def planned(rows: int, bits: int, joining: Sequence[int] = ()) -> float:
            # A batch is priced per row at the size its queue can fill it to (its rows plus the waiting
            # requests its point meets, up to max_batch): SPEC's C(|Q_K|, K) over the whole queue. With
            # nothing waiting that is today's size; under load a batch that the queue will fill is worth
            # opening now, which pricing it at one row would never show. ``joining``: the bits of the
            # waiting requests among its rows (a candidate launch's members).
            if not rows:
                return 0.0
            point, meets, _ = cheapest_of(bits)
            size = queued.get(meets)
            if size is None:
                size = queued[meets] = sum(n for b, n in sizes if meets & b)
            for b, n in placed.items():
                if meets & b:
                    size -= n
            for b in joining:
                if meets & b:
                    size -= 1
            size = min(max_batch, rows + size)
            return step_cost(point, rows, max(size, rows))

        for p in plan:
            p.cost = planned(p.rows, p.bits)
        admits, most_batches = self._batch_points(engine, plan, bit_of.values(), reach)

        own_rank = {b: cheapest_of(b)[2] for b in bit_of.values()}  # the rank of a floor's own point
        owned: dict[OperatingPoint, int] | None = None  # the waiting floors' bits by their own point (once one is overdue)
        free = engine.free_slots()
        launched: list[Launch] = []
        taken: set[int] = set()
        now = engine.now()
        while free > 0:
            # Every virtual queue's first ``n`` requests are among the first ``n`` of each floor's FIFO.
            n = free + len(taken)
            window = [(r, bit_of[r.floor]) for r in waiting.heads(n)]
            # The floors that may launch: those with room in one of their own batches (those that admit them)
            # or in a new one, and those with no batch of their own at all (then one may raise another
            # batch's point, so that ``t_max`` still bounds their wait).
            if len(plan) < most_batches:
                launchable = -1
            else:
                owned_by_any, with_room = 0, 0
                for i, m in enumerate(admits):
                    owned_by_any |= m
                    if plan[i].rows < max_batch:
                        with_room |= m
                launchable = ~owned_by_any | with_room
            oldest = next((r for r, b in window if b & launchable and id(r) not in taken), None)
            if oldest is None:
                break
            overdue = oldest if now - oldest.arrival > limits.t_max else None
            late = bit_of[oldest.floor] if overdue is not None else 0
            homeless = overdue is not None and len(plan) >= most_batches and not any(m & late for m in admits)
            rows = sum(p.rows for p in plan)
            total = sum(p.cost for p in plan)
            best = None  # ((forced, full, utility, -overpay), plan index, members, its rows, floors and cost after)
            for k, accepted in ladder.queues(reach):  # the virtual queue of point k: the floors k meets
                if overdue is not None and not accepted & late:
                    continue
                if overdue is not None:
                    # A forced launch takes the overdue request with the requests that k is the own point of:
                    # filling it with cheaper floors would make them pay k's price for a launch they did not win.
                    if owned is None:
                        owned = {}
                        for b in bit_of.values():
                            own = cheapest_of(b)[0]
                            owned[own] = owned.get(own, 0) | b
                    accepted = late | owned.get(k, 0)
                candidates = [c for c in window if c[1] & accepted][:n]
                if taken:
                    candidates = [c for c in candidates if id(c[0]) not in taken]
                if not candidates:
                    continue
                for index in range(len(plan) + (1 if len(plan) < most_batches else 0)):
                    entry = plan[index] if index < len(plan) else _Planned(None, 0, 0)
                    room = min(free, max_batch - entry.rows)
                    if room <= 0:
                        continue
                    admitted = -1 if homeless or index >= len(admits) else admits[index]
                    pool = candidates if admitted == -1 else [c for c in candidates if c[1] & admitted]
                    if not pool:
                        continue
                    members = pool[:room]
                    joining = [b for _, b in members]
                    new_rows, new_bits = entry.rows + len(members), entry.bits
                    for b in joining:
                        new_bits |= b
                    new_cost = planned(new_rows, new_bits, joining)
                    utility = (rows + len(members)) / (total - entry.cost + new_cost)
                    full = new_rows == max_batch
                    forced = overdue is not None and any(r is overdue for r, _ in members)
                    # Among equal utilities (a join that leaves the batch's point as it is), prefer the
                    # members whose own point the batch runs at: cheaper floors are kept for cheaper batches.
                    point = cheapest_of(new_bits)[2]
                    overpay = sum(point - own_rank[b] for b in joining)
                    key = (forced, full, round(utility, 12), -overpay)
                    if best is None or key > best[0]:
                        best = (key, index, [r for r, _ in members], _Planned(entry.batch, new_rows, new_bits, new_cost))
            if best is None:
                break
            (forced, *_), index, members, after = best
            if overdue is not None and not forced:
                break  # the overdue request fits nowhere yet: keep the room for it
            if index < len(plan):
                plan[index] = after
            else:
                plan.append(after)
                admits.append(cheapest_of(after.bits)[1])
            target = after.batch
            if isinstance(target, _NewBatch):  # a batch created by an earlier launch of this iteration
                launched[target.launch].requests.extend(members)
            elif target is None:
                launched.append(Launch(None, list(members)))
                after.batch = _NewBatch(len(launched) - 1)
            else:
                existing = next((lt for lt in launched if lt.batch is target), None)
                if existing is not None:
                    existing.requests.extend(members)
                else:
                    launched.append(Launch(target, list(members)))
            free -= len(members)
            if not free:
                break
            taken.update(id(m) for m in members)
            for m in members:
                b = bit_of[m.floor]
                placed[b] = placed.get(b, 0) + 1
            for p in plan:  # fewer requests left to fill the other batches
                p.cost = planned(p.rows, p.bits)
        return launched


@dataclass(eq=False)
class _Planned:
    """A batch as a decision plans it: the batch (running, created by a launch of this decision, or None for
    one still to create), and its rows after this decision's launches so far: how many, the bits of their
    floors (``Ladder.bit``), and the planned milliseconds of its next step."""

    batch: Batch | _NewBatch | None
    rows: int
    bits: int
    cost: float = 0.0


@dataclass(eq=False)
class _NewBatch:
    """A batch that a launch of this iteration creates (others of the same iteration may join it)."""

    launch: int

