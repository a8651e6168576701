"""Layer lists: how ``--layers`` is read and how errors name layers."""

from __future__ import annotations

import random

import pytest

from prism_cli.commands.common import parse_layers
from prism_cli.errors import PrismError
from prism_cli.layers import MAX_LAYERS, format_layers


def test_format_layers_by_hand():
    assert format_layers([]) == ""
    assert format_layers([5]) == "5"
    assert format_layers([3, 0, 1, 2, 7, 9, 10, 7]) == "0-3,7,9-10"


def test_format_layers_reads_back_as_the_same_set():
    """``parse_layers`` of ``format_layers`` is the set it started from (random sets against themselves)."""
    rng = random.Random(0)
    for _ in range(200):
        layers = set(rng.sample(range(60), rng.randrange(1, 30)))
        assert set(parse_layers(format_layers(layers))) == layers


def test_a_range_past_any_model_is_refused_before_it_is_listed():
    """``0-100000000`` once built a list of 10^8 layers (and an error message of the missing ones, 1 GB)."""
    with pytest.raises(PrismError, match=f"up to {MAX_LAYERS:,} decoder layers"):
        parse_layers("0-100000000")
    assert parse_layers(f"0-{MAX_LAYERS - 1}") == list(range(MAX_LAYERS))
