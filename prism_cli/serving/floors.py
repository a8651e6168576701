"""Quality floors: what a request accepts, and which operating points meet it.

A floor is written as an operating point of the export (``linear:4``, ``topk:6``, ``threshold:0.9``)
or as a perplexity ceiling (``ppl:45``), which the cost model maps to the cheapest point within it
(SPEC 4.2 calls the floor ``k_min``, the fewest active sub-experts a request accepts).

Point ``P`` *meets* floor ``F`` when

* ``P`` is the full model (``linear:N*k``, ``topk:N*k``, ``original:k``): it meets every floor;
* ``P`` and ``F`` share a policy and ``P`` computes at least as much (``linear:6`` meets ``linear:4``;
  ``threshold:0.95`` meets ``threshold:0.9``);
* ``P = original:k`` and ``F = linear:K`` with ``N*k >= K``, or the other way round: the export's
  ``linear:N*k`` is exactly the source model at top-``k`` (every sub-expert of its top-``k`` experts).

Anything else is not comparable (a ``topk`` floor is not met by a ``linear`` point of the same K: the
two choose different sub-experts). A floor mix is ``linear:2=0.5,linear:6=0.3,linear:8=0.2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prism_cli.errors import PrismError, split_items
from prism_cli.operating_points import OperatingPoint, parse_operating_point

CEILING = "ppl"


@dataclass(frozen=True)
class PointSpace:
    """The operating points of one model: its gate (None for a plain model), N and top-k."""

    gate: str | None
    n_sub: int
    top_k: int

    @classmethod
    def of_export(cls, meta: dict) -> PointSpace:
        """The points of an export, from its metadata (``read_export_meta``)."""
        return cls(meta["gate"], int(meta["sub_experts"]), int(meta["source"]["top_k"]))

    def parse(self, spec: str | OperatingPoint) -> OperatingPoint:
        op = parse_operating_point(spec, self.gate, self.n_sub, self.top_k)
        if op.policy in ("pattern", "layered"):
            raise PrismError(f"{op} cannot be a quality floor: use linear, topk or threshold points, or ppl:CEILING")
        return op

    def is_full(self, p: OperatingPoint) -> bool:
        """The full model: every sub-expert of the source's top-k experts."""
        full = self.n_sub * self.top_k
        return (p.policy == "original" and p.value == self.top_k) or (p.policy in ("linear", "topk") and p.value == full)

    def full(self) -> OperatingPoint:
        """The point a request without a floor is served at (the full model)."""
        return OperatingPoint("original", self.top_k) if self.gate is None else OperatingPoint("linear", self.n_sub * self.top_k)

    def meets(self, point: OperatingPoint, floor: OperatingPoint) -> bool:
        """Whether serving at ``point`` keeps the promise of ``floor`` (see the module docstring)."""
        if self.is_full(point):
            return True
        if point.policy == floor.policy:
            return point.value >= floor.value  # type: ignore[operator]
        as_linear = {"original": self.n_sub, "linear": 1}
        if point.policy in as_linear and floor.policy in as_linear:
            return point.value * as_linear[point.policy] >= floor.value * as_linear[floor.policy]  # type: ignore[operator]
        return False


@dataclass(frozen=True)
class FloorSpec:
    """A floor as the user wrote it: an operating point, or a perplexity ceiling (``ppl:45``)."""

    text: str
    point: OperatingPoint | None = None
    ceiling: float | None = None

    def __str__(self) -> str:
        return self.text


def parse_floor(text: str, space: PointSpace) -> FloorSpec:
    """``linear:4`` / ``topk:6`` / ``ppl:45``; the point is checked against the export's points."""
    text = str(text).strip()
    policy, sep, raw = text.partition(":")
    if sep and policy == CEILING:
        try:
            ceiling = float(raw)
        except ValueError:
            raise PrismError(f"floor {text!r}: {raw!r} is not a perplexity") from None
        if not 0 < ceiling < math.inf:
            raise PrismError(f"floor {text!r}: the perplexity ceiling must be a positive, finite number")
        return FloorSpec(text, ceiling=ceiling)
    try:
        return FloorSpec(text, point=space.parse(text))
    except PrismError as exc:
        # A bare number names sub-experts per token (the gate's default policy), as in every operating point;
        # where that fails, the sender may have meant a perplexity.
        hint = f" (a bare number counts sub-experts; a perplexity ceiling is ppl:{text})" if _is_number(text) else ""
        raise PrismError(f"floor {text!r}: {exc}{hint}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def floor_spec(value: object, space: PointSpace) -> FloorSpec:
    """A floor as a request or a trace line gives it: a string (``linear:4``, ``ppl:45``) or a number, which is a
    perplexity ceiling (a client sends a number for a quality, not for a count of sub-experts)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            ceiling = float(value)
        except OverflowError:  # an integer past float range
            ceiling = math.inf
        if not 0 < ceiling < math.inf:
            raise PrismError(f"a perplexity ceiling must be a positive, finite number, got {ceiling:g}")
        return FloorSpec(f"ppl:{value}", ceiling=ceiling)
    if isinstance(value, str):
        return parse_floor(value, space)
    raise PrismError('expected an operating point ("linear:4") or a perplexity ceiling (a number)')


def parse_mix(text: str, space: PointSpace) -> list[tuple[FloorSpec, float]]:
    """``linear:2=0.5,linear:6=0.3,linear:8=0.2`` -> floors with probabilities (normalised to sum 1)."""
    return normalise_mix(parse_shares(text, space))


def parse_shares(text: str, space: PointSpace) -> list[tuple[FloorSpec, float]]:
    """The floors of a mix with their shares as written (finite, > 0; a floor without ``=SHARE`` has 1)."""
    mix: list[tuple[FloorSpec, float]] = []
    for part in split_items(text, "--floors"):
        floor, sep, weight = part.rpartition("=")
        if not sep:
            floor, weight = part, "1"
        try:
            w = float(weight)
        except ValueError:
            raise PrismError(f"--floors: {weight!r} in {part!r} is not a share (write POINT=SHARE, e.g. linear:2=0.5)") from None
        if not (math.isfinite(w) and w > 0):
            raise PrismError(f"--floors: share {weight.strip()!r} of {floor} must be a finite number > 0")
        spec = parse_floor(floor, space)
        same = next((f for f, _ in mix if (f.point, f.ceiling) == (spec.point, spec.ceiling)), None)
        if same is not None:  # also spelt apart: linear:2 and linear:02, ppl:45 and ppl:45.0
            named = f"{spec} twice" if str(same) == str(spec) else f"{same} and {spec}, one floor,"
            raise PrismError(f"--floors names {named}; give each floor once with its whole share")
        mix.append((spec, w))
    if not mix:
        raise PrismError(f"--floors {text!r} names no floor with a positive share (e.g. linear:2=0.5,linear:8=0.5)")
    return mix


def normalise_mix(mix: list[tuple[FloorSpec, float]]) -> list[tuple[FloorSpec, float]]:
    """Shares rescaled to sum 1."""
    top = max(w for _, w in mix)  # scaled first, so that huge shares cannot add up to infinity
    total = sum(w / top for _, w in mix)
    return [(f, w / top / total) for f, w in mix]


def rescale_note(shares: list[tuple[FloorSpec, float]]) -> str | None:
    """One line saying that shares as written (``parse_shares``) do not sum to 1 and what they were
    rescaled to; None where they sum to 1."""
    total = math.fsum(w for _, w in shares)
    if math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        return None
    used = ", ".join(f"{f}={w:.4g}" for f, w in normalise_mix(shares))
    return f"floor shares sum to {total:g}: rescaled to {used}"


class Ladder:
    """The points one engine can run, ordered by cost, with the floor arithmetic the policies need.

    The point that serves a set of floors is the cheapest that meets all of them: one of the floors or
    the full model (within a family the highest floor meets the others; across families only the full
    model does). Costs come from the cost model at ``max_batch`` when it has the point, else from the
    compute of the point (its sub-experts per token), which orders a family the same way.
    """

    def __init__(self, space: PointSpace, cost_model=None, max_batch: int = 16) -> None:
        self.space = space
        self.cost_model = cost_model
        self.max_batch = max_batch
        # Memos: a policy asks these of the same few points many times per decision, and its time is
        # charged to every request (the cost model and the space never change under a ladder).
        self._cheapest: dict[frozenset[OperatingPoint], OperatingPoint] = {}
        self._meets: dict[tuple[OperatingPoint, OperatingPoint], bool] = {}
        self._rank: dict[OperatingPoint, float] = {}
        self._decode: dict[tuple[OperatingPoint, int], float] = {}
        self._own: dict[OperatingPoint, OperatingPoint] = {}
        self._queues: dict[frozenset[OperatingPoint], tuple[OperatingPoint, ...]] = {}
        # Floors as bits of an int (numbered as first seen), so that a policy tests a set of floors against
        # a point with one ``&`` instead of a memo lookup per floor.
        self._bits: dict[OperatingPoint, int] = {}
        self._masks: dict[OperatingPoint, int] = {}
        self._bits_of: dict[frozenset[OperatingPoint], int] = {}
        self._by_bits: dict[int, tuple[OperatingPoint, int, float]] = {}
        self._queue_masks: dict[int, tuple[tuple[OperatingPoint, int], ...]] = {}

    def meets(self, point: OperatingPoint, floor: OperatingPoint) -> bool:
        key = (point, floor)
        found = self._meets.get(key)
        if found is None:
            found = self._meets[key] = self.space.meets(point, floor)
        return found

    def rank(self, p: OperatingPoint) -> float:
        """Milliseconds of a step of ``max_batch`` rows where the cost model times ``p``, else its compute."""
        found = self._rank.get(p)
        if found is None:
            timed = self.cost_model is not None and self.cost_model.has(p)
            found = self._rank[p] = self.cost_model.decode(p, self.max_batch) if timed else self.compute(p)
        return found

    def compute(self, p: OperatingPoint) -> float:
        """Sub-experts per token (a whole expert is ``n_sub``)."""
        scale = {"original": self.space.n_sub, "threshold": self.space.n_sub * self.space.top_k}.get(p.policy, 1)
        return float(p.value) * scale  # type: ignore[arg-type]

    def order(self, points: Iterable[OperatingPoint]) -> list[OperatingPoint]:
        """``points`` cheapest first, in one unit: milliseconds where the cost model times every one of
        them, else compute (a timed point's milliseconds against an untimed one's sub-experts would put a
        point above the full model); ties broken by name, so that the order never depends on set order."""
        points = set(points)
        timed = self.cost_model is not None and all(self.cost_model.has(p) for p in points)
        measure = self.rank if timed else self.compute
        return sorted(points, key=lambda p: (measure(p), str(p)))

    def queue_points(self, floors: Iterable[OperatingPoint]) -> list[OperatingPoint]:
        """The virtual queues worth keeping: every floor waiting, and the full model (any other point has
        the members of the highest floor below it in its family, at a higher cost)."""
        key = frozenset(floors)
        found = self._queues.get(key)
        if found is None:
            found = self._queues[key] = tuple(self.order({*key, self.space.full()}))
        return list(found)

    def cheapest_meeting(self, floors: Iterable[OperatingPoint]) -> OperatingPoint:
        key = frozenset(floors)  # the same object where ``floors`` is one already
        if key not in self._cheapest:
            candidates = {*key, self.space.full()}
            self._cheapest[key] = next(p for p in self.order(candidates) if all(self.meets(p, f) for f in key))
        return self._cheapest[key]

    def bit(self, floor: OperatingPoint) -> int:
        """The bit of ``floor`` (a new floor gets the next one)."""
        found = self._bits.get(floor)
        if found is None:
            found = self._bits[floor] = 1 << len(self._bits)
            for point in self._masks:  # a mask covers every floor with a bit
                if self.meets(point, floor):
                    self._masks[point] |= found
            self._by_bits.clear()  # memos that hold masks
            self._queue_masks.clear()
        return found

    def bits_of(self, floors: frozenset[OperatingPoint]) -> int:
        """The bits of a set of floors (memoised by the set: pass the same frozenset where it is kept)."""
        found = self._bits_of.get(floors)
        if found is None:
            found = self._bits_of[floors] = sum(map(self.bit, floors))
        return found

    def mask(self, point: OperatingPoint) -> int:
        """The bits of the floors ``point`` meets (of every floor that has a bit: a new floor's bit is added to
        the masks made before it)."""
        found = self._masks.get(point)
        if found is None:
            found = self._masks[point] = sum(b for f, b in self._bits.items() if self.meets(point, f))
        return found

    def cheapest_of(self, bits: int) -> tuple[OperatingPoint, int, float]:
        """``cheapest_meeting`` of the floors given as bits, with its ``mask`` and ``rank``: the point that
        serves them and all a policy asks of it, in one lookup."""
        found = self._by_bits.get(bits)
        if found is None:
            point = self.cheapest_meeting(f for f, b in self._bits.items() if b & bits)
            found = self._by_bits[bits] = (point, self.mask(point), self.rank(point))
        return found

    def queues(self, bits: int) -> tuple[tuple[OperatingPoint, int], ...]:
        """``queue_points`` of the floors given as bits, each with its ``mask``."""
        found = self._queue_masks.get(bits)
        if found is None:
            floors = (f for f, b in self._bits.items() if b & bits)
            found = self._queue_masks[bits] = tuple((k, self.mask(k)) for k in self.queue_points(floors))
        return found

    def own_point(self, floor: OperatingPoint) -> OperatingPoint:
        """The point a request of this floor alone is served at."""
        found = self._own.get(floor)
        if found is None:
            found = self._own[floor] = self.cheapest_meeting((floor,))
        return found

    def step_cost(self, point: OperatingPoint, rows: int, size: int | None = None) -> float:
        """Planned milliseconds of one decode step of ``rows`` rows at ``point`` (0 without rows); with
        ``size``, their share of a step of a batch of ``size`` rows."""
        if not rows:
            return 0.0
        assert self.cost_model is not None
        size = size or rows
        step = self._decode.get((point, size))
        if step is None:
            step = self._decode[(point, size)] = self.cost_model.decode(point, size)
        return step * rows / size
