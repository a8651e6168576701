"""``prism rank-layers``: which MoE layers get the extra sub-expert of a ``layered:K+j`` point.

For every K of an export (1 .. N*k - 1) the perplexity of the calibration text is measured with the
linear gate at ``K`` in every layer (the base) and then with one layer at a time at ``K+1``: ``L + 1``
runs per K. Layers are ranked by that perplexity, lowest first (model order breaks ties), and the
ranking is written into the export (``runtime/layers.py``). This is a setting chosen on calibration
text; the evaluation split is refused, as everywhere a setting is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism_cli.data import load_selection_text
from prism_cli.data.windows import token_windows
from prism_cli.errors import PrismError
from prism_cli.evaluation.perplexity import perplexity
from prism_cli.io import check_writable
from prism_cli.models.loading import check_context_length
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import load_elastic_model, read_export_meta, set_operating_point
from prism_cli.runtime.layers import RANKING_FILE, LayerRanking, set_layer_ks, write_ranking

#: Window length of the calibration runs by default (the length the tables' quality columns use).
SEQ_LEN = 256


def ranking_steps(model: Any) -> int:
    """How many perplexity runs ``rank_layers`` makes on ``model`` (for a progress bar)."""
    state = model.prism_state
    return (state.n_sub * state.source_top_k - 1) * (len(state.layers) + 1)


def rank_layers(model: Any, windows: Any, data: str, batch_size: int = 8,
                on_step: Callable[[], None] | None = None) -> LayerRanking:
    """Rank the MoE layers of an elastic ``model`` at every K on calibration ``windows`` (``[n, seq_len]``
    token windows); ``on_step()`` after each perplexity run. The model is left at the point it was at."""
    state = model.prism_state
    layers, full_k = len(state.layers), state.n_sub * state.source_top_k
    saved = state.point
    order: dict[int, list[int]] = {}
    ppl: dict[int, list[float]] = {}
    base: dict[int, float] = {}

    def measure(ks: list[int]) -> float:
        set_layer_ks(model, ks)
        value = perplexity(model, windows, batch_size).perplexity
        if not math.isfinite(value):
            raise PrismError(f"the calibration perplexity is {value} with layers at K = {ks}: the export is broken")
        if on_step is not None:
            on_step()
        return value

    try:
        for k in range(1, full_k):
            base[k] = measure([k] * layers)
            ppl[k] = [measure([k + 1 if i == layer else k for i in range(layers)]) for layer in range(layers)]
            order[k] = sorted(range(layers), key=lambda i, row=ppl[k]: (row[i], i))
    finally:
        if saved is not None:
            set_operating_point(model, saved)
    return LayerRanking(order, ppl, base, data, int(windows.numel()))


#: Calibration tokens ``rank_export`` ranks on by default.
TOKENS = 16_384


def check_windows(tokens: int, seq_len: int) -> None:
    """``rank_export``'s window settings, refused in one line (also before a tables run's first stage)."""
    if seq_len < 2:
        raise PrismError(f"--seq-len must be at least 2 (a token and the next), got {seq_len}")
    if tokens < seq_len:
        raise PrismError(f"--tokens must be at least --seq-len ({seq_len}: one window of calibration text), got {tokens}")


def rank_export(directory: Path, *, data: str | None = None, tokens: int = TOKENS, seq_len: int = SEQ_LEN,
                on_start: Callable[[int], None] | None = None, on_step: Callable[[], None] | None = None,
                ) -> LayerRanking:
    """Rank the layers of the export in ``directory`` on ``tokens`` tokens of calibration text and write
    the ranking into it (``layer_ranking.json``, replacing one there)."""
    read_export_meta(directory)  # not an export: one line
    check_writable(Path(directory) / RANKING_FILE)  # before the long work, not after
    check_windows(tokens, seq_len)
    text, data_name = load_selection_text(data, "rank layers")
    loaded = load_elastic_model(str(directory), ranked=False)  # the ranking there (even a damaged one) is replaced
    check_context_length(loaded.model.config, seq_len)
    state = loaded.model.prism_state
    if len(state.layers) < 2:
        raise PrismError(f"{directory} has one MoE layer: layered points need at least two")
    try:
        windows = token_windows(loaded.tokenizer, text, seq_len, tokens)
    except ValueError as exc:  # shorter than one window
        raise PrismError(f"calibration text {data_name}: {exc}") from None
    if on_start is not None:
        on_start(ranking_steps(loaded.model))
    ranking = rank_layers(loaded.model, windows, data_name, on_step=on_step)
    write_ranking(directory, ranking)
    return ranking


def ranking_table(ranking: LayerRanking) -> ResultTable:
    """Per K: the base perplexity, each layer's with one more sub-expert, and the order."""
    layers = len(next(iter(ranking.order.values())))
    table = ResultTable(f"calibration perplexity with one MoE layer at K+1 ({ranking.data}, {ranking.tokens:,} tokens)",
                        ["K", "all at K", *[f"MoE layer {i} at K+1" for i in range(layers)], "order (layered:K+j takes the first j)"])
    for k in sorted(ranking.order):
        table.add(k, ranking.base[k], *ranking.perplexity[k], " ".join(map(str, ranking.order[k])))
    return table
