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
from collections.abc import Sequence
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

    @staticmethod
    def _batch_points(engine: Engine, plan: list[_Planned], waiting: list[OperatingPoint]) -> tuple[list[OperatingPoint | None], int]:
        """The point each running batch is kept at (None: it takes any floor now), and how many batches may run.

        A batch that took every floor would run at the highest one for as long as it runs, and under load it
        runs for ever (each freed slot is refilled at once): every step at the full model, whatever the mix.
        So each batch keeps the point of its rows when first seen (``Batch.target``) and admits only the
        floors that point meets; its higher rows drain as they finish. With no room for another batch, a
        floor that no batch's point meets re-points the batch whose rows already run highest (up), and a
        floor whose own point is below every batch's re-points one batch down to it (``_point_down``); a
        batch whose point no waiting request fits takes any floor for now. At most ``max_running /
        max_batch`` batches. ``plan``: the running batches; ``waiting``: the floors waiting."""
        ladder, limits = engine.ladder, engine.limits
        batches = [p.batch for p in plan]
        for p in plan:
            if p.batch.target is None and p.rows:
                p.batch.target = ladder.cheapest_meeting(p.floors)
        most = -(-limits.max_running // limits.max_batch)
        if len(batches) >= most and batches:
            homeless = [f for f in waiting if not any(ladder.meets(b.target, f) for b in batches)]
            if homeless:
                b = max(plan, key=lambda p: ladder.rank(ladder.cheapest_meeting(p.floors))).batch
                b.target = ladder.cheapest_meeting([b.target, *homeless])
            else:
                PrismPolicy._point_down(engine, batches, waiting)
        fits = [b.target is not None and any(ladder.meets(b.target, f) for f in waiting) for b in batches]
        return [b.target if ok else None for b, ok in zip(batches, fits, strict=True)], most

    @staticmethod
    def _point_down(engine: Engine, batches: list[Batch], waiting: list[OperatingPoint]) -> None:
        """Where a waiting floor's own point is below every batch's, re-point one batch down to it.

        Batches that opened high (a burst of high floors) would otherwise stay high for as long as the load
        lasts: a point only ever rises, and a cheap floor joins the high batches and pays their price. The
        batch re-pointed is one whose old point no waiting floor needs (the other batches still meet every
        floor waiting), the one with the fewest rows above the new point (it drains soonest); its rows
        finish at the point they run at, and it admits only floors the new point meets meanwhile."""
        ladder = engine.ladder
        if len(batches) < 2:
            return  # one batch re-pointed down would turn the higher floors away until it drained
        lowest = min(ladder.rank(b.target) for b in batches)
        below = [p for p in map(ladder.own_point, waiting) if ladder.rank(p) < lowest]
        if not below:
            return
        low = min(below, key=lambda p: (ladder.rank(p), str(p)))
        spare = [b for b in batches
                 if all(any(ladder.meets(o.target, f) for o in batches if o is not b) for f in waiting)]
        if spare:
            b = min(spare, key=lambda b: (sum(not ladder.meets(low, r.floor) for r in b.rows), len(b.rows)))
            b.target = low

    def admit(self, engine: Engine) -> list[Launch]:
        if engine.cost_model is None:
            raise PrismError("the prism policy plans with a cost model: build one with `prism schedule cost-model` "
                             "or pass --cost-model")
        limits, ladder, waiting = engine.limits, engine.ladder, engine.waiting
        # A decision runs between two forward passes and is charged to every request, so a batch is planned by
        # its number of rows and the set of their floors (its point depends on nothing else), not row by row.
        plan = [_Planned(b, len(b.rows), frozenset(r.floor for r in b.rows)) for b in engine.batches]
        waiting_floors = waiting.floors()
        # Floors of the waiting requests this iteration has placed already: still in the waiting queue
        # until the engine launches them, they are rows of a planned batch, not requests that may fill one.
        placed: dict[OperatingPoint, int] = {}
        queued: dict[OperatingPoint, int] = {}  # the size of a point's virtual queue (fixed within a decision)

        def planned(rows: int, floors: frozenset[OperatingPoint], joining: Sequence[OperatingPoint] = ()) -> float:
            # A batch is priced per row at the size its queue can fill it to (its rows plus the waiting
            # requests its point meets, up to max_batch): SPEC's C(|Q_K|, K) over the whole queue. With
            # nothing waiting that is today's size; under load a batch that the queue will fill is worth
            # opening now, which pricing it at one row would never show. ``joining``: the floors of the
            # waiting requests among its rows (a candidate launch's members).
            if not rows:
                return 0.0
            point = ladder.cheapest_meeting(floors)
            if point not in queued:
                queued[point] = waiting.count(lambda f: ladder.meets(point, f))
            claimed = sum(n for f, n in placed.items() if ladder.meets(point, f)) + sum(ladder.meets(point, f) for f in joining)
            size = min(limits.max_batch, rows + queued[point] - claimed)
            return ladder.step_cost(point, rows, max(size, rows))

        for p in plan:
            p.cost = planned(p.rows, p.floors)
        targets, most_batches = self._batch_points(engine, plan, waiting_floors)

        def own_batches(floor: OperatingPoint) -> list[int]:
            """The planned batches whose point meets ``floor`` (or that take any floor now)."""
            return [i for i in range(len(plan)) if targets[i] is None or ladder.meets(targets[i], floor)]

        def may_launch(floor: OperatingPoint) -> bool:
            """Room for a request of ``floor`` in one of its own batches or in a new one; or no batch of its own
            at all (then it may raise another batch's point, so that ``t_max`` still bounds its wait)."""
            own = own_batches(floor)
            return len(plan) < most_batches or not own or any(plan[i].rows < limits.max_batch for i in own)

        free = engine.free_slots()
        launched: list[Launch] = []
        taken: set[int] = set()
        now = engine.now()
        while free > 0:
            oldest = waiting.oldest(may_launch, taken)
            if oldest is None:
                break
            overdue = oldest if now - oldest.arrival > limits.t_max else None
            homeless = overdue is not None and len(plan) >= most_batches and not own_batches(overdue.floor)
            rows = sum(p.rows for p in plan)
            total = sum(p.cost for p in plan)
            best = None  # ((forced, full, utility, -overpay), plan index, members, its rows, floors and cost after)
            for k in ladder.queue_points(waiting_floors):
                if overdue is None:
                    accepts = lambda f, k=k: ladder.meets(k, f)  # noqa: E731 - the virtual queue of point k
                elif ladder.meets(k, overdue.floor):
                    # A forced launch takes the overdue request with the requests that k is the own point of:
                    # filling it with cheaper floors would make them pay k's price for a launch they did not win.
                    accepts = lambda f, k=k, own=overdue.floor: f == own or ladder.own_point(f) == k  # noqa: E731
                else:
                    continue
                members_all = [r for r in waiting.peek(accepts, free + len(taken)) if id(r) not in taken]
                if not members_all:
                    continue
                for index in range(len(plan) + (1 if len(plan) < most_batches else 0)):
                    entry = plan[index] if index < len(plan) else _Planned(None, 0, frozenset())
                    room = min(free, limits.max_batch - entry.rows)
                    if room <= 0:
                        continue
                    target = None if homeless or index >= len(targets) else targets[index]
                    pool = members_all if target is None else [r for r in members_all if ladder.meets(target, r.floor)]
                    if not pool:
                        continue
                    members = pool[:room]
                    joining = [r.floor for r in members]
                    new_rows, new_floors = entry.rows + len(members), entry.floors.union(joining)
                    new_cost = planned(new_rows, new_floors, joining)
                    utility = (rows + len(members)) / (total - entry.cost + new_cost)
                    full = new_rows == limits.max_batch
                    forced = overdue is not None and any(m is overdue for m in members)
                    # Among equal utilities (a join that leaves the batch's point as it is), prefer the
                    # members whose own point the batch runs at: cheaper floors are kept for cheaper batches.
                    point = ladder.rank(ladder.cheapest_meeting(new_floors))
                    overpay = sum(point - ladder.own_rank(f) for f in joining)
                    key = (forced, full, round(utility, 12), -overpay)
                    if best is None or key > best[0]:
                        best = (key, index, members, _Planned(entry.batch, new_rows, new_floors, new_cost))
            if best is None:
                break
            (forced, *_), index, members, after = best
            if overdue is not None and not forced:
                break  # the overdue request fits nowhere yet: keep the room for it
            if index < len(plan):
                plan[index] = after
            else:
                plan.append(after)
                targets.append(ladder.cheapest_meeting(after.floors))
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
            taken.update(id(m) for m in members)
            for m in members:
                placed[m.floor] = placed.get(m.floor, 0) + 1
            for p in plan:  # fewer requests left to fill the other batches
                p.cost = planned(p.rows, p.floors)
            free -= len(members)
        return launched


@dataclass(eq=False)
class _Planned:
    """A batch as a decision plans it: the batch (running, created by a launch of this decision, or None for
    one still to create), and its rows after this decision's launches so far: how many, their distinct
    floors, and the planned milliseconds of its next step."""

    batch: Batch | _NewBatch | None
    rows: int
    floors: frozenset[OperatingPoint]
    cost: float = 0.0


@dataclass(eq=False)
class _NewBatch:
    """A batch that a launch of this iteration creates (others of the same iteration may join it)."""

    launch: int

