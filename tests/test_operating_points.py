"""Operating-point syntax, the edges a fuzz round found: point objects get exactly the checks of the string
form, numbers are plain ASCII decimals, an empty point says so."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FULL, N_SUB, TOP_K

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint, default_operating_points, parse_operating_point, require_points, split_points


def refused(spec: str | int | OperatingPoint, gate: str | None = "neurons") -> str:
    """The one-line message ``spec`` is refused with."""
    with pytest.raises(PrismError) as exc:
        parse_operating_point(spec, gate, N_SUB, TOP_K)
    message = str(exc.value)
    assert "\n" not in message
    return message


def outcome(spec: str | OperatingPoint, gate: str | None) -> OperatingPoint | str:
    """The parsed point, or "refused" (any other exception propagates)."""
    try:
        return parse_operating_point(spec, gate, N_SUB, TOP_K)
    except PrismError as exc:
        assert "\n" not in str(exc)
        return "refused"


def test_a_point_object_gets_exactly_the_checks_of_its_string_form():
    valid = [
        *default_operating_points("neurons", N_SUB, TOP_K), OperatingPoint("pattern", (4, 1)), OperatingPoint("pattern", (0, 3)),
        OperatingPoint("layered", (2, 1)), OperatingPoint("layered", (FULL - 1, 3)), OperatingPoint("threshold", 0.1 + 0.2),
        OperatingPoint("threshold", 1e-5), OperatingPoint("threshold", 1), OperatingPoint("topk", np.int64(3)),
        OperatingPoint("threshold", np.float32(0.75)),  # exact in float32: the same point once parsed
    ]
    invalid = [
        OperatingPoint("pattern", (9, 9)), OperatingPoint("pattern", (0, 0)), OperatingPoint("pattern", (1, 2, 3)),
        OperatingPoint("pattern", ()), OperatingPoint("pattern", (-1, 2)), OperatingPoint("layered", (0, 1)),
        OperatingPoint("layered", (FULL, 1)), OperatingPoint("layered", (2, 0)), OperatingPoint("topk", 0),
        OperatingPoint("threshold", 1.5), OperatingPoint("threshold", float("nan")), OperatingPoint("threshold", float("inf")),
    ]
    for p in invalid:  # before: accepted, then an index error in the forward (or a bare ValueError)
        assert outcome(p, "neurons") == "refused", p
    assert outcome(OperatingPoint("topk", 3), "linear") == "refused"
    assert [outcome(OperatingPoint("original", k), None) for k in (0, 1, 2, 3)] == [
        "refused", OperatingPoint("original", 1), OperatingPoint("original", 2), "refused"]
    for p in valid:  # the same point back, its value a plain Python number or tuple of them
        got = parse_operating_point(p, "neurons", N_SUB, TOP_K)
        assert got == p, p
        assert type(got.value) in (int, float, tuple) and (not isinstance(got.value, tuple)
                                                           or all(type(v) is int for v in got.value)), p


def test_a_pattern_object_shorter_than_top_k_is_not_read_as_a_total():
    # pattern:5 is a total (4, 1); the object (5,) asks for 5 of 4 sub-experts on the first expert.
    assert "pattern:4,1" in refused(OperatingPoint("pattern", (5,)))


@pytest.mark.parametrize(
    ("policy", "value"),
    [
        ("topk", 2.7), ("topk", 2.0), ("linear", True), ("topk", None), ("topk", "3"), ("original", 1.0),
        ("pattern", [4, 1]), ("pattern", (4.0, 1)), ("pattern", (True, 1)), ("pattern", 5),
        ("layered", (1,)), ("layered", (2, 1, 1)), ("layered", [2, 1]), ("layered", (2.0, 1)),
        ("threshold", True), ("threshold", "0.9"), ("threshold", None),
    ],
    ids=repr,
)
def test_a_point_object_of_the_wrong_type_is_refused_by_name(policy, value):
    point = OperatingPoint(policy, value)  # built here, not at collection: a list value failed to build
    assert repr(point) in refused(point, None if policy == "original" else "neurons")


def test_numbers_are_plain_ascii_decimals_and_a_refusal_quotes_what_was_typed():
    refuse = [
        ("topk:\uff14", "\uff14"), ("topk:\u0664", "\u0664"), ("\uff14", "\uff14"), ("linear:0_4", "0_4"),
        ("linear:+4", "+4"), ("linear:1_0", "1_0"), ("original:\uff11", "\uff11"), ("topk: 4", " 4"),
        ("threshold:1_0e-1", "1_0e-1"), ("threshold:\uff10.5", "\uff10.5"), ("threshold:+0.5", "+0.5"),
        ("threshold:nan", "'nan' is not a number"), ("threshold:inf", "'inf' is not a number"), ("threshold:0x1p-1", "0x1p-1"),
        ("pattern:\uff14,1", "\uff14,1"), ("pattern:4_0", "4_0"), ("pattern:+4,1", "+4,1"), ("pattern:4, 1", "4, 1"),
        ("layered:\uff12+1", "\uff12+1"), ("layered:2+\u0661", "2+\u0661"), ("layered:1_0+1", "1_0+1"), ("layered:+2+1", "+2+1"),
        ("linear:010", "linear:010 is outside 1..8"), ("threshold:1.50", "threshold 1.50 must be in (0, 1]"),
        ("pattern:09", "pattern:09 is outside 1..8"), ("topk:" + "9" * 5000, "is outside 1..8"),  # past int()'s digit limit
    ]
    wrong = []
    for spec, needle in refuse:
        gate = None if spec.startswith("original") else "neurons"
        try:
            got = str(parse_operating_point(spec, gate, N_SUB, TOP_K))
        except PrismError as exc:
            got = str(exc)
        if needle not in got:
            wrong.append((spec[:40], got[:200]))
    assert not wrong
    accept = {
        "topk:007": OperatingPoint("topk", 7), "pattern:04,1": OperatingPoint("pattern", (4, 1)),
        "threshold:.5": OperatingPoint("threshold", 0.5), "threshold:5e-1": OperatingPoint("threshold", 0.5),
        "threshold:1.": OperatingPoint("threshold", 1.0), "threshold:1E-5": OperatingPoint("threshold", 1e-5),
    }
    for spec, want in accept.items():
        assert outcome(spec, "neurons") == want, spec


@pytest.mark.parametrize("spec", ["", " ", "\t\n"])
def test_an_empty_point_says_so(spec):
    assert "operating point is empty" in refused(spec)


@pytest.mark.parametrize(("text", "items"), [
    ("topk:4;linear:4", ["topk:4", "linear:4"]),
    ("topk:4,linear:4", ["topk:4", "linear:4"]),
    ("pattern:4,3,1", ["pattern:4,3,1"]),
    ("topk:4, pattern:4,3,1 ,linear:8", ["topk:4", "pattern:4,3,1", "linear:8"]),
    ("pattern:4,3;pattern:2,2", ["pattern:4,3", "pattern:2,2"]),
    ("2;threshold:0.8", ["2", "threshold:0.8"]),
    ("4,8", ["4", "8"]),  # bare numbers: the gate's default policy, as offload-bench always read them
    ("topk:4,8", ["topk:4", "8"]),
    ("pattern:4,3,linear:2,2", ["pattern:4,3", "linear:2", "2"]),
    (" ; ", []),
])
def test_split_points_by_hand(text, items):
    """';' always separates; ',' only where another named point starts (a pattern's commas stay in it)."""
    assert split_points(text, "--points") == items


@pytest.mark.parametrize("text", ["topk:4;;linear:4", "topk:4;", ",linear:4", "topk:4,,linear:4", "topk:4,", "pattern:4,3,",
                                  "4,,8"])
def test_split_points_refuses_empty_items(text):
    with pytest.raises(PrismError, match="--points .* has an empty item"):
        split_points(text, "--points")


def test_require_points_refuses_text_naming_none():
    assert require_points("linear:2", "--points") == ["linear:2"]
    with pytest.raises(PrismError, match="--points ' ; ' names no operating point"):
        require_points(" ; ", "--points")
