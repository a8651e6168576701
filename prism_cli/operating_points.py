"""Operating points: how many sub-experts each token computes, and by which rule.

Written ``policy:value``:

* ``linear:K``     the flat router's top-K over all ``E * N`` sub-experts (the linear gate, SPEC 3.4b);
* ``topk:K``       training-free gate: the K best (expert, sub-expert) pairs per token (SPEC 3.4a);
* ``pattern:P``    training-free gate, the paper's per-rank pattern (``4,3,1``) or a total K;
* ``threshold:T``  training-free gate, pairs until their estimated share of mass reaches T (variable);
* ``layered:K+j``  the linear gate at ``K`` in every MoE layer but ``j``, which take ``K+1``: the ``j`` layers
                   where one more sub-expert helped most on calibration text (``prism rank-layers``), so
                   a token computes ``K + j/L`` sub-experts on average over ``L`` layers, between two
                   ``linear`` points;
* ``original:k``   a plain (not exported) model at top-k experts (the baseline).

A bare integer means the gate's own default policy (``linear`` or ``topk``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prism_cli.errors import PrismError

GATES = ("linear", "neurons")
NEURON_POLICIES = ("topk", "pattern", "threshold")
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class OperatingPoint:
    policy: str
    value: int | float | tuple[int, ...]

    def __post_init__(self) -> None:
        # Points key the scheduler's memos, consulted many times in every decision (which is charged to
        # every request): hashed once, not on each lookup.
        object.__setattr__(self, "_hash", hash((self.policy, self.value)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __reduce__(self) -> tuple[type, tuple]:
        return OperatingPoint, (self.policy, self.value)  # rehashed where it is unpickled (string hashes are per process)

    def __str__(self) -> str:
        sep = "+" if self.policy == "layered" else ","
        value = sep.join(map(str, self.value)) if isinstance(self.value, tuple) else self.value
        return f"{self.policy}:{value}"


def parse_operating_point(spec: str | int | OperatingPoint, gate: str | None, n_sub: int, top_k: int) -> OperatingPoint:
    """Parse and validate a point for a model with ``n_sub`` sub-experts per expert and top-``top_k`` routing.

    ``gate`` is the export's gate (None for a plain model, which only has ``original`` points).
    """
    if isinstance(spec, OperatingPoint):
        policy, raw = spec.policy, spec.value
    else:
        text = str(spec).strip()
        policy, sep, raw = text.partition(":")
        if not sep:
            policy, raw = {"linear": "linear", "neurons": "topk", None: "original"}[gate], text
    allowed = {None: ("original",), "linear": ("linear", "layered"), "neurons": ("linear", "layered", *NEURON_POLICIES)}[gate]
    if policy not in allowed:
        raise PrismError(f"operating point {spec!r} is not available here; policies: {', '.join(allowed)}")
    if policy == "pattern":
        return OperatingPoint(policy, raw if isinstance(raw, tuple) else _pattern(str(raw), n_sub, top_k))
    if policy == "threshold":
        try:
            tau = float(raw)
        except ValueError:
            raise PrismError(f"threshold {raw!r} is not a number") from None
        if not 0.0 < tau <= 1.0:
            raise PrismError(f"threshold {tau} must be in (0, 1]")
        return OperatingPoint(policy, tau)
    if policy == "layered":
        return OperatingPoint(policy, raw if isinstance(raw, tuple) else _layered(str(raw), n_sub, top_k))
    try:
        k = int(raw)
    except ValueError:
        raise PrismError(f"operating point {spec!r}: {raw!r} is not an integer") from None
    limit = top_k if policy == "original" else n_sub * top_k
    if not 1 <= k <= limit:
        raise PrismError(f"operating point {policy}:{k} is outside 1..{limit}")
    return OperatingPoint(policy, k)


def _layered(raw: str, n_sub: int, top_k: int) -> tuple[int, int]:
    """``K+j``: K in ``1 .. N*k - 1`` (there is a K+1 to give), at least one layer at K+1. Whether the
    model has ``j`` layers to give it and a ranking of them is checked where the point is set."""
    base, plus, extra = raw.partition("+")
    try:
        k, j = int(base), int(extra)
    except ValueError:
        raise PrismError(f"layered point {raw!r} must be K+j (e.g. layered:2+2), integers") from None
    if not plus or not 1 <= k < n_sub * top_k or j < 1:
        raise PrismError(f"layered:{raw}: K must be within 1..{n_sub * top_k - 1} and j at least 1 (K+j: j layers at K+1)")
    return k, j


def _pattern(raw: str, n_sub: int, top_k: int) -> tuple[int, ...]:
    """A per-rank pattern (``4,3,1``) or a total K, filled front-loaded (best expert first)."""
    try:
        parts = [int(p) for p in raw.split(",")]
    except ValueError:
        raise PrismError(f"pattern {raw!r} must be an integer or comma-separated integers") from None
    if len(parts) == 1:
        total = parts[0]
        if not 1 <= total <= n_sub * top_k:
            raise PrismError(f"operating point pattern:{total} is outside 1..{n_sub * top_k}")
        parts = [min(n_sub, max(0, total - r * n_sub)) for r in range(top_k)]
    if len(parts) > top_k or any(not 0 <= p <= n_sub for p in parts) or sum(parts) == 0:
        raise PrismError(f"pattern {raw!r} must list at most {top_k} counts between 0 and {n_sub}, not all zero")
    return tuple(parts) + (0,) * (top_k - len(parts))


def default_operating_points(gate: str | None, n_sub: int, top_k: int) -> list[OperatingPoint]:
    """The points an export advertises (and ``prism bench`` sweeps by default)."""
    if gate is None:
        return [OperatingPoint("original", k) for k in range(1, top_k + 1)]
    ks = range(1, n_sub * top_k + 1)
    points = [OperatingPoint("linear", k) for k in ks]
    if gate == "neurons":
        points += [OperatingPoint("topk", k) for k in ks]
        points += [OperatingPoint("threshold", t) for t in DEFAULT_THRESHOLDS]
    return points
