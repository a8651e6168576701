"""Routing traces: what a model's routers chose, token after token, for replaying caches at other shapes.

A trace is recorded from a neurons-gate export running text at its full operating point (the source
model's routing). For every MoE layer ``l`` and token ``t`` it keeps the original router's top-k experts,
their weights and the gate-neuron scores of their sub-experts (so that any operating point can be
allocated afterwards with the runtime's own policies), and the *prediction* of layer ``l + 1``: the
same three made by layer ``l + 1``'s router from layer ``l``'s hidden state (what the prefetch policy
sees). Tokens are in reading order, sequence after sequence.

File format (``.npz``, written atomically): ``experts [L, T, k]`` int32, ``weights [L, T, k]`` float32,
``scores [L, T, k, N]`` float32, ``pred_experts [L-1, T, k]``, ``pred_weights``, ``pred_scores`` (the
prediction of layer l+1 made at layer l), and ``meta``, a JSON string: ``format_version``, ``source``,
``sub_experts`` N, ``num_experts`` E, ``top_k`` k, ``tokens``, ``seq_len``, ``text``.

**Mapping to another shape** (``TraceMapping``): a target with ``E' = g * E`` experts, top-``k'`` (``k' <=
g * k``) and ``L'`` MoE layers is driven by ``g`` streams of the trace. Target layer ``l`` reads trace layer
``l mod L``; stream ``j`` reads it at its own offset in the token sequence (seeded; offset 0 for the
first ``L`` layers when ``g = 1``, i.e. a trace of the same shape is replayed as recorded) and its
experts become ``j * E + e``. Of the ``g * k`` candidates, the ``k'`` with the largest router weights are
the target's routing. So each stream keeps the real text's reuse (consecutive tokens, consecutive trace
positions), expert popularity is the recorded one, and the choice among streams follows real router
confidences. The prediction of target layer ``l`` (trace layer ``m = l mod L``) is read the same way
from the trace's prediction of layer ``m``; for ``m = 0`` there is none (no prefetch into that layer).
This is a model of a bigger router's behaviour, not a recording of it: say so wherever it is used.
It inherits the recorded model's popularity skew: the built-in model, trained briefly without much
load balancing, leaves some experts nearly unused, so the mapped routing is far more concentrated
than a load-balanced production router's (the caches see optimistic hit rates).
``balanced_trace`` is the other model offered: every expert equally popular, the recorded reuse of
consecutive tokens (above chance) and the recorded sub-expert scores and prediction hit rate.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_cli.errors import PrismError
from prism_cli.io import atomic_path

TRACE_FORMAT_VERSION = 1
_ARRAYS = ("experts", "weights", "scores", "pred_experts", "pred_weights", "pred_scores")


@dataclass
class RoutingTrace:
    experts: np.ndarray
    weights: np.ndarray
    scores: np.ndarray
    pred_experts: np.ndarray
    pred_weights: np.ndarray
    pred_scores: np.ndarray
    meta: dict[str, Any]

    @property
    def layers(self) -> int:
        return int(self.experts.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[1])

    @property
    def n_sub(self) -> int:
        return int(self.meta["sub_experts"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def save(self, path: Path) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, meta=np.array(json.dumps(self.meta)), **{k: getattr(self, k) for k in _ARRAYS})

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if path.is_dir():
            raise PrismError(f"trace file {path} is a folder, not an .npz routing trace")
        if not path.is_file():
            raise PrismError(f"trace file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in _ARRAYS}
        except (KeyError, json.JSONDecodeError):
            raise PrismError(f"{path} is not a prism routing trace (an .npz archive without its meta and routing "
                             "arrays)") from None
        except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error):
            raise PrismError(f"{path} is not a prism routing trace (not a readable .npz archive: truncated or "
                             "another kind of file?)") from None
        if not isinstance(meta, dict):
            raise PrismError(f"{path} is not a prism routing trace (its meta is not a JSON object)")
        if meta.get("format_version") != TRACE_FORMAT_VERSION:
            raise PrismError(f"{path} is a routing trace of format {meta.get('format_version')}; this prism reads "
                             f"{TRACE_FORMAT_VERSION}: record it again")
        trace = cls(**arrays, meta=meta)
        trace.check(path)
        return trace

    def check(self, path: str | Path) -> None:
        """Refuse arrays that disagree with each other or the meta, expert ids out of range, NaN or infinite values."""
        for name in ("sub_experts", "num_experts", "top_k"):
            if not isinstance(self.meta.get(name), int) or self.meta[name] < 1:
                raise PrismError(f"{path}: the trace's meta {name} is {self.meta.get(name)!r}, not a positive integer")
        if self.experts.ndim != 3 or 0 in self.experts.shape:
            raise PrismError(f"{path}: the trace holds no routing (experts of shape {self.experts.shape})")
        L, T, k = self.experts.shape
        if (self.weights.shape != (L, T, k) or self.scores.shape != (L, T, k, self.n_sub)
                or self.pred_experts.shape != (L - 1, T, k) or self.pred_weights.shape != (L - 1, T, k)
                or self.pred_scores.shape != (L - 1, T, k, self.n_sub)):
            raise PrismError(f"{path}: the trace's arrays do not agree with each other (a damaged file?)")
        for name in ("experts", "pred_experts"):
            ids = getattr(self, name)
            if not np.issubdtype(ids.dtype, np.integer):
                raise PrismError(f"{path}: the trace's {name} are {ids.dtype}, not integer expert ids")
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise PrismError(f"{path}: the trace's {name} hold expert id {bad}, outside 0..{self.num_experts - 1} "
                                 "(a damaged file?)")
        for name in ("weights", "scores", "pred_weights", "pred_scores"):
            values = getattr(self, name)
            if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
                raise PrismError(f"{path}: the trace's {name} hold NaN, infinite or non-float values (a damaged file?)")


@torch.inference_mode()
def record_trace(model: Any, windows: torch.Tensor, batch_size: int = 8, text: str = "",
                 on_batch: Any = None) -> RoutingTrace:
    """Record the routing of a neurons-gate export (``load_elastic``) over token ``windows [S, seq]``."""
    from prism_cli.runtime.elastic import set_operating_point
    from prism_cli.runtime.scoring import gate_scores

    state = model.prism_state
    if state.gate != "neurons":
        raise PrismError("a routing trace needs a neurons-gate export (its gate-neuron scores allocate every operating "
                         "point); export with --gate neurons")
    set_operating_point(model, f"topk:{state.n_sub * state.source_top_k}")
    inputs: dict[int, torch.Tensor] = {}
    handles = [router.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, router in enumerate(state.elastic_routers)]
    rows: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in state.layers] for k in _ARRAYS}

    def route(layer: int, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gate = state.gate_routers[layer]
        x = h.reshape(-1, gate.hidden_dim)
        _, w, idx = gate.router(x)
        scores = gate_scores(x, gate.rows, idx, state.n_sub)
        return idx.cpu().numpy().astype(np.int32), w.float().cpu().numpy(), scores.float().cpu().numpy()

    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            model(input_ids=batch.to(next(model.parameters()).device))
            for layer in range(len(state.layers)):
                for name, value in zip(("experts", "weights", "scores"), route(layer, inputs[layer]), strict=True):
                    rows[name][layer].append(value)
                if layer + 1 < len(state.layers):
                    for name, value in zip(("pred_experts", "pred_weights", "pred_scores"),
                                           route(layer + 1, inputs[layer]), strict=True):
                        rows[name][layer].append(value)
            if on_batch:
                on_batch(batch.numel())
    finally:
        for h in handles:
            h.remove()
    arrays = {}
    for name in _ARRAYS:
        layers = rows[name] if not name.startswith("pred") else rows[name][:-1]
        arrays[name] = np.stack([np.concatenate(parts) for parts in layers]) if layers else np.zeros((0,))
    meta = {"format_version": TRACE_FORMAT_VERSION, "source": state.meta.get("source", {}).get("model"),
            "sub_experts": state.n_sub, "num_experts": state.source_experts, "top_k": state.source_top_k,
            "tokens": int(windows.numel()), "seq_len": int(windows.shape[1]), "text": text}
    return RoutingTrace(**arrays, meta=meta)


@dataclass
class LayerRouting:
    """A target layer's routing for every token: experts ``[T, k']``, weights, sub-expert scores ``[T, k', N]``."""

    experts: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


class TraceMapping:
    """A trace driving a target of ``num_experts`` experts, top-``top_k``, ``layers`` MoE layers (see the module docstring)."""

    def __init__(self, trace: RoutingTrace, num_experts: int, top_k: int, layers: int, seed: int = 0) -> None:
        if num_experts % trace.num_experts:
            raise PrismError(f"a trace of {trace.num_experts} experts cannot drive {num_experts} experts: the target's "
                             "expert count must be a multiple of the trace's")
        self.streams = num_experts // trace.num_experts
        if top_k > self.streams * trace.top_k:
            raise PrismError(f"top-{top_k} needs more candidates than {self.streams} streams of a top-{trace.top_k} "
                             "trace give")
        self.trace, self.num_experts, self.top_k, self.layers = trace, num_experts, top_k, layers
        rng = np.random.default_rng(seed)
        T = trace.tokens
        self.offsets = rng.integers(0, T, size=(layers, self.streams))
        if self.streams == 1:
            self.offsets[: min(layers, trace.layers)] = 0  # a trace of the target's own shape: as recorded

    @property
    def tokens(self) -> int:
        return self.trace.tokens

    def routing(self, layer: int) -> LayerRouting:
        return self._map(layer, predicted=False)

    def prediction(self, layer: int) -> LayerRouting | None:
        """Layer ``layer``'s routing as predicted from the previous layer's hidden state (None if unknown)."""
        if layer == 0 or layer % self.trace.layers == 0:
            return None
        return self._map(layer, predicted=True)

    @lru_cache(maxsize=256)  # noqa: B019 - one mapping object per replay; its layers are reused per config
    def _map(self, layer: int, predicted: bool) -> LayerRouting:
        tr = self.trace
        m = layer % tr.layers
        if predicted:
            experts, weights, scores = tr.pred_experts[m - 1], tr.pred_weights[m - 1], tr.pred_scores[m - 1]
        else:
            experts, weights, scores = tr.experts[m], tr.weights[m], tr.scores[m]
        T = tr.tokens
        ex, wt, sc = [], [], []
        for j in range(self.streams):
            pos = (np.arange(T) + self.offsets[layer, j]) % T
            ex.append(experts[pos] + j * tr.num_experts)
            wt.append(weights[pos])
            sc.append(scores[pos])
        ex_all, wt_all, sc_all = np.concatenate(ex, 1), np.concatenate(wt, 1), np.concatenate(sc, 1)
        order = np.argsort(-wt_all, axis=1, kind="stable")[:, : self.top_k]
        pick = np.take_along_axis
        return LayerRouting(torch.from_numpy(pick(ex_all, order, 1).astype(np.int64)),
                            torch.from_numpy(pick(wt_all, order, 1)),
                            torch.from_numpy(np.take_along_axis(sc_all, order[:, :, None], 1)))


def reuse_rate(experts: np.ndarray) -> float:
    """Mean share of a token's experts that the next token routes to again (``experts [T, k]``)."""
    a, b = np.sort(experts[:-1], axis=1), np.sort(experts[1:], axis=1)
    k = experts.shape[1]
    same = sum((a[:, i : i + 1] == b).any(axis=1) for i in range(k))
    return float(np.mean(same) / k)


def balanced_trace(like: RoutingTrace, num_experts: int, top_k: int, layers: int, tokens: int,
                   seed: int = 0) -> RoutingTrace:
    """A synthetic routing of a load-balanced router at the target's shape, calibrated on ``like``.

    Per layer, each token keeps each expert of the previous token with probability ``p`` and fills its other slots uniformly
    from the experts the previous token did not use, so every expert is equally popular in the long run. Router
    weights and sub-expert score vectors are drawn from the recorded ones (a weight per expert slot, a
    whole score vector per (token, expert), so the sub-experts' relative masses are real). The
    prediction of layer ``l + 1`` keeps each true expert with the recorded prediction's hit rate and
    replaces the others at random. ``p`` is the recorded consecutive-token reuse rate (averaged over
    layers) with its share above chance (``k / E``) carried over to the target's chance level. A model of
    routing, not a recording: label its results so.
    """
    if len(like.experts[0]) < 2:  # no consecutive pair: the reuse rate would be NaN, read as chance
        raise PrismError(f"the recorded routing has {len(like.experts[0])} token(s); a balanced trace is calibrated on "
                         "consecutive tokens: record at least 2")
    rng = np.random.default_rng(seed)
    # Reuse above chance carries over: a top-2-of-8 router reuses 25 % by chance alone, top-6-of-64 9 %.
    recorded = float(np.mean([reuse_rate(like.experts[layer]) for layer in range(like.layers)]))
    chance, target_chance = like.top_k / like.num_experts, top_k / num_experts
    excess = max(0.0, (recorded - chance) / (1 - chance))
    p = target_chance + excess * (1 - target_chance)
    hit = float(np.mean([np.mean((like.pred_experts[layer][:, :, None] == like.experts[layer + 1][:, None, :]).any(2))
                         for layer in range(like.layers - 1)])) if like.layers > 1 else 0.0
    pool_w = like.weights.reshape(-1)
    pool_s = like.scores.reshape(-1, like.n_sub)
    experts = np.zeros((layers, tokens, top_k), dtype=np.int32)
    for layer in range(layers):
        current = rng.choice(num_experts, size=top_k, replace=False)
        for t in range(tokens):
            keep = current[rng.random(top_k) < p]
            # new experts come from outside the previous token's set, so that the reuse rate is p itself
            free = np.setdiff1d(np.arange(num_experts), current if num_experts >= 2 * top_k else keep)
            current = np.concatenate([keep, rng.choice(free, size=top_k - keep.size, replace=False)])
            experts[layer, t] = current
    weights = rng.choice(pool_w, size=(layers, tokens, top_k)).astype(np.float32)
    scores = pool_s[rng.integers(0, pool_s.shape[0], size=(layers, tokens, top_k))].astype(np.float32)
    pred = experts[1:].copy()
    wrong = rng.random(pred.shape) >= hit
    pred[wrong] = rng.integers(0, num_experts, size=int(wrong.sum()))
    meta = {**like.meta, "num_experts": num_experts, "top_k": top_k, "tokens": tokens,
            "synthetic": {"kind": "balanced", "reuse": p, "recorded_reuse": recorded, "prediction_hit": hit, "seed": seed,
                          "calibrated_on": like.meta.get("text")}}
    return RoutingTrace(experts, weights, scores, pred, weights[1:].copy(), scores[1:].copy(), meta)


def allocate(routing: LayerRouting, point: Any, n_sub: int, num_experts: int) -> list[list[int]]:
    """Per token, the pieces a point computes from a layer's routing: sub-expert ids ``e * N + n``, or
    expert ids for ``original`` points (whole experts). Uses the runtime's own allocation policies."""
    from prism_cli.runtime.policies import POLICIES

    experts, weights = routing.experts, routing.weights
    top_k = experts.shape[1]
    if point.policy == "original":
        order = torch.argsort(weights, dim=1, descending=True, stable=True)[:, : int(point.value)]
        return experts.gather(1, order).tolist()
    if point.policy == "linear":
        # The linear gate: every copy of an expert ties; best expert first, sub-expert 0 first within it.
        order = torch.argsort(weights, dim=1, descending=True, stable=True)
        ids = (experts.gather(1, order).unsqueeze(-1) * n_sub + torch.arange(n_sub)).reshape(experts.shape[0], -1)
        return ids[:, : int(point.value)].tolist()
    policy = POLICIES.get(point.policy)(n_sub, top_k, num_experts)
    ids, _ = policy.allocate(experts, weights, routing.scores, point.value)
    sentinel = num_experts * n_sub
    return [[g for g in row if g != sentinel] for row in ids.tolist()]
