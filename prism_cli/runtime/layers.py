"""Layered operating points: ``linear:K`` in most MoE layers and ``K+1`` in the ones where it helps most.

The linear points of an export are ``K = 1 .. N*k`` sub-experts per token; between two of them lies a
step in cost and in quality that no integer K fills. A layer need not compute what every other layer
computes: ``layered:K+j`` runs the linear gate at ``K`` everywhere except ``j`` layers, which run at
``K+1``, so a token computes ``K + j/L`` sub-experts on average over ``L`` layers. Every layer still
runs one integer K, through the same experts paths as ``linear:K`` (no per-token variable shapes),
so the point costs what it computes.

Which ``j`` layers: those where one more sub-expert lowered the model's loss most, measured on
calibration text (never the evaluation split) by ``prism rank-layers`` (``prism_cli.tuning.layers``):
for each K, the perplexity with one layer at ``K+1`` and the others at ``K``, one run per layer. The
ranking is saved in the export as ``layer_ranking.json``; an export that has one offers ``layered`` points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_cli.errors import PrismError
from prism_cli.io import read_json, write_json

RANKING_FILE = "layer_ranking.json"
RANKING_FORMAT = 1


@dataclass(frozen=True)
class LayerRanking:
    """For each ``K`` (1 .. N*k - 1), the MoE layers (positions ``0 .. L-1`` in model order) best first:
    ``order[K][:j]`` are the layers ``layered:K+j`` runs at K+1."""

    order: dict[int, list[int]]
    #: Calibration perplexity with only that layer at K+1 (``perplexity[K][layer]``), and with none.
    perplexity: dict[int, list[float]]
    base: dict[int, float]
    data: str
    tokens: int

    def layer_ks(self, k: int, extra: int, layers: int) -> list[int]:
        """The K of every layer at ``layered:k+extra``."""
        if k not in self.order:
            raise PrismError(f"layered:{k}+{extra}: the layer ranking has K = {min(self.order)}..{max(self.order)}")
        if not 1 <= extra < layers:
            raise PrismError(f"layered:{k}+{extra}: j must be within 1..{layers - 1} (this model has {layers} MoE layers; "
                             f"all {layers} at K+1 is linear:{k + 1})")
        ks = [k] * layers
        for layer in self.order[k][:extra]:
            ks[layer] = k + 1
        return ks

    def to_json(self) -> dict[str, Any]:
        return {"format": RANKING_FORMAT, "data": self.data, "tokens": self.tokens,
                "order": {str(k): v for k, v in self.order.items()},
                "perplexity": {str(k): v for k, v in self.perplexity.items()},
                "base": {str(k): v for k, v in self.base.items()}}


def _key(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} has key {text!r}, not a K")
    return int(text)


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} holds {value!r}, not a whole number >= 0")
    return value


def _perplexity(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} holds {value!r}, not a perplexity (a finite number > 0)")
    return float(value)


def _mapping(data: dict[str, Any], what: str) -> dict[str, Any]:
    value = data[what]
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not an object")
    return value


def _items(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list")
    return value


def read_ranking(directory: Path, layers: int, full_k: int) -> LayerRanking | None:
    """The export's layer ranking (None when it has none), checked against its ``layers`` MoE layers and
    ``full_k`` = N*k; a file that does not fit is one line naming what is wrong."""
    path = Path(directory) / RANKING_FILE
    if not path.exists():
        return None
    data = read_json(path, "layer ranking", f"{path} is missing")
    where = f"layer ranking {path}"
    try:
        if not isinstance(data, dict):
            raise TypeError("its content is not an object")
        if data.get("format") != RANKING_FORMAT:
            raise PrismError(f"{where} has format {data.get('format')!r}, this prism reads {RANKING_FORMAT}: "
                             "run `prism rank-layers` again")
        order = {_key(k, "order"): [_index(i, f"order.{k}") for i in _items(v, f"order.{k}")] for k, v in _mapping(data, "order").items()}
        perplexity = {_key(k, "perplexity"): [_perplexity(x, f"perplexity.{k}") for x in _items(v, f"perplexity.{k}")]
                      for k, v in _mapping(data, "perplexity").items()}
        base = {_key(k, "base"): _perplexity(v, f"base.{k}") for k, v in _mapping(data, "base").items()}
        ranking = LayerRanking(order, perplexity, base, str(data["data"]), _index(data["tokens"], "tokens"))
    except PrismError:
        raise
    except KeyError as exc:
        raise PrismError(f"{where} is not a layer ranking (no {exc}): run `prism rank-layers` again") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise PrismError(f"{where} is not a layer ranking ({exc}): run `prism rank-layers` again") from None
    ks = list(range(1, full_k))
    if (sorted(order) != ks or any(sorted(v) != list(range(layers)) for v in order.values())
            or sorted(base) != ks or sorted(perplexity) != ks or any(len(v) != layers for v in perplexity.values())):
        raise PrismError(f"{where} does not fit this export ({layers} MoE layers, K = 1..{full_k - 1} to rank): "
                         "run `prism rank-layers` again")
    return ranking


def write_ranking(directory: Path, ranking: LayerRanking) -> Path:
    path = Path(directory) / RANKING_FILE
    write_json(path, ranking.to_json())
    return path


def set_layer_ks(model: Any, ks: list[int]) -> None:
    """Every MoE layer ``i`` of an elastic ``model`` at ``linear:ks[i]`` (the state's point is not changed)."""
    state = model.prism_state
    for i, k in enumerate(ks):
        state.route_linear(i, k)
        if state.elastic_routers:
            state.elastic_routers[i].use_neurons = False
