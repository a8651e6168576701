"""The executor's size bounds: derived from timed calls by hand-checked rules, saved per machine, read back."""

from __future__ import annotations

import json

import pytest

from prism_cli.environment import environment
from prism_cli.errors import PrismError
from prism_cli.runtime import bounds
from prism_cli.runtime.bounds import ExecutorBounds, Timing, derive_bounds


@pytest.fixture
def bounds_file(monkeypatch, tmp_path):
    path = tmp_path / "executor_bounds.json"
    monkeypatch.setenv("PRISM_EXECUTOR_BOUNDS", str(path))
    return path


def _prefix(tokens: int, rows: int, ratio: float) -> Timing:
    return Timing(tokens, True, rows, plan_ms=10.0, mm_ms=10.0 * ratio)


def _subsets(tokens: int, pairs: int, ratio_to_plan: float, ratio_to_loop: float) -> Timing:
    return Timing(tokens, False, pairs, plan_ms=10.0, mm_ms=10.0 * ratio_to_plan, loop_ms=10.0 * ratio_to_plan / ratio_to_loop)


def test_each_bound_is_the_threshold_with_the_largest_summed_log_gain():
    """Gains are log(alternative / grouped): ratio 0.5 -> +0.693, 0.8 -> +0.223, 1.25 -> -0.223, 2 -> -0.693
    (none within the 3 % tie)."""
    timings = [
        _prefix(2, 2, 2.0),  # 2 tokens lose: min_tokens 4 drops this call (suffix sums: 2 +1.14, 4 +1.83, 2,048 +1.39)
        _prefix(4, 4, 0.8), _subsets(4, 8, 0.8, 0.8),
        # prefix rows, cumulative gain: 4 +0.223, 2,048 +0.916, 4,096 0.0, 8,192 +0.223 -> 2,048
        _prefix(2048, 2048, 0.5), _prefix(2048, 4096, 1.25), _prefix(2048, 4096, 2.0), _prefix(8192, 8192, 0.8),
        # pairs against flat-loop, cumulative: 8 +0.223, 4,096 +0.916, 8,192 +0.223 -> 4,096
        _subsets(2048, 4096, 0.5, 0.5), _subsets(2048, 8192, 0.5, 2.0),
    ]
    got = derive_bounds(timings, source="hand")
    assert got == ExecutorBounds(min_tokens=4, max_prefix_rows=2048, max_pairs=4096, source="hand")


def test_a_loss_at_the_smallest_size_does_not_zero_a_bound_and_no_gain_means_no_grouped_products():
    # prefix cumulative: 4 -0.223 (below 0, kept at 0), 8 +0.470 -> 8; min_tokens: suffix 4 +1.163 > 8 +0.693
    timings = [_prefix(4, 4, 1.25), _subsets(4, 8, 0.5, 0.5), _prefix(8, 8, 0.5)]
    assert derive_bounds(timings) == ExecutorBounds(4, 8, 8, source="measured")
    assert derive_bounds([_prefix(4, 4, 2.0)]) == ExecutorBounds(5, 0, 0, source="measured")


def test_a_call_within_three_percent_is_a_tie_and_ties_keep_grouped_products():
    """4 rows +0.223; 8,192 rows log(10 / 10.2) = -0.020, a tie: the sum stays +0.223 and the bound goes to
    8,192 (counted as a loss it would be 4). 16,384 rows log(10 / 11) = -0.095: a loss, the bound stays."""
    timings = [_prefix(4, 4, 0.8), _prefix(8192, 8192, 1.02), _prefix(8192, 16384, 1.1)]
    assert derive_bounds(timings).max_prefix_rows == 8192
    assert derive_bounds([_prefix(4, 4, 0.8), _prefix(8192, 8192, 1.04)]).max_prefix_rows == 4  # 4 % is a loss


def test_the_padded_bound_weighs_padding_against_what_the_other_bounds_would_run():
    """Prefix gains log(plan / mm): 16 rows +1.386, 512 +0.693, 4,096 -1.386 -> max_prefix_rows 512 (min_tokens
    8: suffix sums +0.693, -0.693, -1.386). Padded against that: 16 rows log(10 / 5) = +0.693; 512 rows
    log(5 / 6.25) = -0.223; 4,096 rows are past 512, so against the plan executor: log(10 / 9) = +0.105
    (against grouped products it would be log(40 / 9) = +1.49, and the bound 4,096). Cumulative +0.693,
    +0.470, +0.575 -> 16."""
    timings = [Timing(8, True, 16, plan_ms=40.0, mm_ms=10.0, padded_ms=5.0),
               Timing(256, True, 512, plan_ms=10.0, mm_ms=5.0, padded_ms=6.25),
               Timing(2048, True, 4096, plan_ms=10.0, mm_ms=40.0, padded_ms=9.0)]
    assert derive_bounds(timings) == ExecutorBounds(8, 512, 0, max_padded_rows=16, source="measured")


def test_an_entry_saved_before_the_padded_bound_takes_the_default_one(bounds_file):
    bounds_file.write_text(json.dumps({"format": bounds.FORMAT, "version": bounds.VERSION, "machines": {
        bounds.machine_key(): {"min_tokens": 4, "max_prefix_rows": 1024, "max_pairs": 2048}}}))
    got = bounds.current_bounds()
    assert (got.max_prefix_rows, got.max_padded_rows) == (1024, bounds.DEFAULT.max_padded_rows)
    with pytest.raises(PrismError, match="no timed calls"):
        derive_bounds([])


def test_saved_bounds_are_read_back_for_this_machine_only(bounds_file):
    assert bounds.current_bounds() == bounds.DEFAULT  # nothing measured yet
    other = "Some Other CPU | 2 threads | torch 0.0"
    bounds.save_bounds(ExecutorBounds(8, 100, 200), other)
    assert bounds.current_bounds() == bounds.DEFAULT
    bounds.save_bounds(ExecutorBounds(4, 8192, 12288), bounds.machine_key(), measured_by="test")
    got = bounds.current_bounds()
    assert (got.min_tokens, got.max_prefix_rows, got.max_pairs) == (4, 8192, 12288)
    assert str(bounds_file) in got.source
    saved = json.loads(bounds_file.read_text())["machines"]
    assert set(saved) == {other, bounds.machine_key()}  # the other machine's entry is kept
    assert "8,192" in environment()["executor_bounds"]
    # another thread count is another machine
    assert bounds._bounds_for(str(bounds_file), 97, None) == bounds.DEFAULT


def test_bounds_are_kept_per_sub_expert_width_and_fall_back_to_the_machines(bounds_file):
    """An entry for one width of sub-experts serves that width only; other widths take the machine's entry,
    and with neither, the defaults."""
    bounds.save_bounds(ExecutorBounds(2, 16384, 32768), bounds.machine_key(width=64), measured_by="test")
    assert (bounds.current_bounds(64).max_prefix_rows, bounds.current_bounds(128)) == (16384, bounds.DEFAULT)
    assert "sub-experts of 64" in bounds.current_bounds(64).source
    bounds.save_bounds(ExecutorBounds(4, 8192, 16384), bounds.machine_key(), measured_by="test")
    assert bounds.current_bounds(128).max_prefix_rows == bounds.current_bounds().max_prefix_rows == 8192
    assert bounds.current_bounds(64).max_prefix_rows == 16384


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other", "version": 1, "machines": {}}),
                                     json.dumps({"format": bounds.FORMAT, "version": 1, "machines": {"m": {"min_tokens": 4}}})])
def test_an_unreadable_bounds_file_is_one_line_naming_it(bounds_file, content):
    bounds_file.write_text(content)
    with pytest.raises(PrismError) as info:
        bounds.current_bounds()
    message = str(info.value)
    assert str(bounds_file) in message and "\n" not in message
