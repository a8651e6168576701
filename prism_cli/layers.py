"""Decoder-layer indices as users give them and as errors name them."""

from __future__ import annotations

from collections.abc import Iterable

#: The most decoder layers prism handles (published MoE models have under 100): a bound on what a config
#: may claim and on the layer indices an option may name, so that neither sizes work by a typo.
MAX_LAYERS = 1_000


def format_layers(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``: runs of consecutive layers as ranges, the way ``--layers`` takes them."""
    out: list[str] = []
    run: list[int] = []
    for layer in sorted(set(layers)):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
