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

import numbers
import re
from dataclasses import dataclass

from prism_cli.errors import PrismError, nonempty_items

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
        try:
            h = hash((self.policy, self.value))
        except TypeError:  # a list value: refused where the point is parsed, and it must get that far
            h = 0
        object.__setattr__(self, "_hash", h)

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __reduce__(self) -> tuple[type, tuple]:
        return OperatingPoint, (self.policy, self.value)  # rehashed where it is unpickled (string hashes are per process)

    def __str__(self) -> str:
        sep = "+" if self.policy == "layered" else ","
        value = sep.join(map(str, self.value)) if isinstance(self.value, tuple) else self.value
        return f"{self.policy}:{value}"


def split_points(text: str, option: str) -> list[str]:
    """The points of a list option, stripped: split at ``;``, and at ``,`` except inside a pattern, whose
    counts are commas too (``topk:4,linear:4``, ``4,8``, ``topk:4;pattern:4,3,1``, ``pattern:4,3,linear:2``:
    a bare number after a ``pattern:`` item continues it). An empty item beside others is refused (a point
    lost to a typo or an unset shell variable); text with no point at all gives [] (``require_points``)."""
    items: list[str] = []
    for chunk in str(text).split(";"):
        for piece in chunk.split(","):
            piece = piece.strip()
            if items and piece.isdigit() and items[-1].startswith("pattern:") and items[-1] != "pattern:":
                items[-1] += "," + piece
            else:
                items.append(piece)
    return nonempty_items(items, text, option, "point")


def require_points(text: str, option: str) -> list[str]:
    """``split_points``, refusing text that names no point."""
    points = split_points(text, option)
    if not points:
        raise PrismError(f"{option} {text!r} names no operating point; separate points with ';' or ',' (e.g. 'linear:2;linear:8')")
    return points


def parse_operating_point(spec: str | int | OperatingPoint, gate: str | None, n_sub: int, top_k: int) -> OperatingPoint:
    """Parse and validate a point for a model with ``n_sub`` sub-experts per expert and top-``top_k`` routing.

    ``gate`` is the export's gate (None for a plain model, which only has ``original`` points). An
    ``OperatingPoint`` gets exactly the checks of its string form: its value is type-checked, then its
    ``str()`` is parsed.
    """
    if isinstance(spec, OperatingPoint):
        parsed = parse_operating_point(_point_text(spec), gate, n_sub, top_k)
        if parsed != spec:  # e.g. a pattern shorter than top_k, read as a total: (5,) -> pattern:5 -> (4, 1)
            raise PrismError(f"operating point {spec!r} reads as {parsed}; give {parsed!r}")
        return parsed
    text = str(spec).strip()
    if not text:
        raise PrismError("operating point is empty")
    policy, sep, raw = text.partition(":")
    if not sep:
        policy, raw = {"linear": "linear", "neurons": "topk", None: "original"}[gate], text
    allowed = {None: ("original",), "linear": ("linear", "layered"), "neurons": ("linear", "layered", *NEURON_POLICIES)}[gate]
    if policy not in allowed:
        raise PrismError(f"operating point {spec!r} is not available here; policies: {', '.join(allowed)}")
    if policy == "pattern":
        return OperatingPoint(policy, _pattern(raw, n_sub, top_k))
    if policy == "threshold":
        if not _FLOAT.fullmatch(raw):
            raise PrismError(f"threshold {raw!r} is not a number")
        tau = float(raw)
        if not 0.0 < tau <= 1.0:
            raise PrismError(f"threshold {raw} must be in (0, 1]")
        return OperatingPoint(policy, tau)
    if policy == "layered":
        return OperatingPoint(policy, _layered(raw, n_sub, top_k))
    k = _integer(raw)
    if k is None:
        raise PrismError(f"operating point {spec!r}: {raw!r} is not an integer")
    limit = top_k if policy == "original" else n_sub * top_k
    if not 1 <= k <= limit:
        raise PrismError(f"operating point {policy}:{raw} is outside 1..{limit}")
    return OperatingPoint(policy, k)


# Python's int() and float() also take '_' separators, a leading '+', non-ASCII digits and nan/inf; a point
# takes plain ASCII decimals. A leading '-' is let through so that a negative count or threshold is refused
# as out of range (the message a user expects) rather than as not a number.
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _integer(text: str) -> int | None:
    """``text`` as an integer, None unless it is a plain ASCII one. Past 18 digits it is clamped (every
    bound here is far smaller), which keeps int() clear of its limit on digits."""
    if not _INT.fullmatch(text):
        return None
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text)
    digits = digits.lstrip("0") or "0"
    return sign * (10**18 if len(digits) > 18 else int(digits))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _point_text(point: OperatingPoint) -> str:
    """The string form of a point object, once its value has the type its policy takes (the string form
    cannot tell 2.7 from "2.7", nor True from 1). Unknown policies are left to the parse to refuse."""
    policy, value = point.policy, point.value
    if not isinstance(policy, str):
        raise PrismError(f"operating point {point!r}: the policy must be a string, not {type(policy).__name__}")
    if policy in ("pattern", "layered"):
        ok = isinstance(value, tuple) and all(_is_int(v) for v in value) and (policy == "pattern" or len(value) == 2)
        want = "a tuple of integer counts" if policy == "pattern" else "a tuple (K, j) of integers"
    elif policy == "threshold":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        want = "a number"
    elif policy in ("linear", "topk", "original"):
        ok, want = _is_int(value), "an integer"
    else:
        ok, want = True, ""
    if not ok:
        raise PrismError(f"operating point {point!r}: {policy} takes {want}, not {type(value).__name__} {value!r}")
    try:
        return str(point)
    except ValueError:  # an integer too long for str()
        raise PrismError(f"operating point {policy}: a value is far outside any range") from None


def _layered(raw: str, n_sub: int, top_k: int) -> tuple[int, int]:
    """``K+j``: K in ``1 .. N*k - 1`` (there is a K+1 to give), at least one layer at K+1. Whether the
    model has ``j`` layers to give it and a ranking of them is checked where the point is set."""
    base, plus, extra = raw.partition("+")
    k, j = _integer(base), _integer(extra)
    if k is None or j is None:
        raise PrismError(f"layered point {raw!r} must be K+j (e.g. layered:2+2), integers")
    if not 1 <= k < n_sub * top_k or j < 1:
        raise PrismError(f"layered:{raw}: K must be within 1..{n_sub * top_k - 1} and j at least 1 (K+j: j layers at K+1)")
    return k, j


def _pattern(raw: str, n_sub: int, top_k: int) -> tuple[int, ...]:
    """A per-rank pattern (``4,3,1``) or a total K, filled front-loaded (best expert first)."""
    counts = [_integer(p) for p in raw.split(",")]
    if None in counts:
        raise PrismError(f"pattern {raw!r} must be an integer or comma-separated integers")
    parts = [c for c in counts if c is not None]
    if len(parts) == 1:
        total = parts[0]
        if not 1 <= total <= n_sub * top_k:
            raise PrismError(f"operating point pattern:{raw} is outside 1..{n_sub * top_k}")
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
