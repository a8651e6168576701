"""Loading an export as an elastic model and moving it between operating points in place.

``load_elastic(DIR)`` loads a prism export with stock ``AutoModelForCausalLM`` and prism's experts
implementation, then replaces each MoE block's router once by an ``ElasticRouter``: the linear gate
(the flat router with a defined tie order) and, for a neurons-gate export, a ``GateNeuronRouter``
around the original router (its rows are every N-th row of the flat router). ``set_operating_point``
then switches branches and policies without reloading: the weights never move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from prism_cli.errors import PrismError
from prism_cli.export.format import EXPORT_FORMAT_VERSION, GATE_FILE, ROUTER_BANK_FILE, SOURCE_ROUTER_FILE, read_source_router_file
from prism_cli.export.validate import validate_export
from prism_cli.io import read_json
from prism_cli.models.adapters import MoELayer, adapter_for_config
from prism_cli.models.loading import BUILTIN, LoadedModel, load_model, resolve_model
from prism_cli.operating_points import OperatingPoint, default_operating_points, parse_operating_point
from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION
from prism_cli.runtime.grouped import settle_down_layout
from prism_cli.runtime.layers import LayerRanking, read_ranking, set_layer_ks
from prism_cli.runtime.policies import POLICIES
from prism_cli.runtime.router import ElasticRouter, GateNeuronRouter, GateRowsSource, LinearGateRouter, RouteMode


@dataclass(frozen=True)
class RouterBank:
    """Which flat router each ``linear:K`` uses (``prism select-routers``): ``by_k[K]`` indexes ``names``;
    router j's rows are the buffer ``bank_{j}`` of every layer's ``LinearGateRouter``."""

    names: list[str]
    by_k: dict[int, int]
    #: How router j's linear gate finds its pairs (``LinearGateRouter.mode``): ``blocks`` for the untuned
    #: router of an exact export whose router sorts, ``ranked`` for a tuned one.
    modes: list[RouteMode]


@dataclass
class ElasticState:
    """What ``set_operating_point`` needs, attached to the model as ``model.prism_state``."""

    gate: str | None
    n_sub: int
    #: The source model's top-k and expert count (the flat export has ``N`` times each).
    source_top_k: int
    source_experts: int
    layers: list[MoELayer]
    flat_routers: list[nn.Module]
    gate_routers: list[GateNeuronRouter] = field(default_factory=list)
    elastic_routers: list[ElasticRouter] = field(default_factory=list)
    point: OperatingPoint | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    bank: RouterBank | None = None
    #: Which layers take K+1 at ``layered:K+j`` (``prism rank-layers``); None: no layered points.
    ranking: LayerRanking | None = None

    def points(self) -> list[OperatingPoint]:
        """The points the export advertises: its gate's, and with a layer ranking ``layered:K+L/2`` between
        every two linear points (half the layers at K+1; ``layered:K+j`` takes any j)."""
        points = default_operating_points(self.gate, self.n_sub, self.source_top_k)
        if self.ranking is not None and self.gate is not None:
            half = len(self.layers) // 2
            points += [OperatingPoint("layered", (k, half)) for k in sorted(self.ranking.order)]
        return points

    def layer_ks(self, op: OperatingPoint) -> list[int]:
        """The router's top-K in every MoE layer at a ``linear``, ``layered`` or ``original`` point."""
        if op.policy != "layered":
            return [int(op.value)] * len(self.layers)
        if self.ranking is None:
            raise PrismError(f"{op} needs a layer ranking, and this export has none: run `prism rank-layers DIR` on it")
        k, extra = op.value  # type: ignore[misc]
        return self.ranking.layer_ks(k, extra, len(self.layers))

    def route_linear(self, layer: int, k: int) -> None:
        """Put layer ``layer``'s linear gate at top-``k``, with the bank's router for ``k`` where there is one."""
        router = self.flat_routers[layer]
        router.top_k = k
        if self.bank is not None:
            j = self.bank.by_k[k]
            router.use_bank_rows(j, self.bank.modes[j])


def export_meta(spec: str | Path) -> dict[str, Any] | None:
    """The ``prism`` section of a checkpoint's config, or None when it is not a prism export; a config.json
    that cannot be read is a one-line error (taking it for a plain model misnamed what is wrong)."""
    path = Path(spec) / "config.json"
    if not path.exists():
        return None
    config = read_json(path, "model config", f"{path} is missing")
    section = config.get("prism") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else None


def read_export_meta(spec: str | Path, what: str | None = None) -> dict[str, Any]:
    """The ``prism`` section of an export this prism reads, or a one-line error (``what`` names the
    argument in it, e.g. ``candidate tuned``)."""
    where = f"{what}: {spec}" if what else str(spec)
    if not Path(spec).exists():
        hint = (": it names the built-in model, not an export; make one with `prism export builtin PARTITION --out DIR`"
                if str(spec) == BUILTIN else "")
        raise PrismError(f"{where} does not exist{hint}")
    if not Path(spec).is_dir():
        raise PrismError(f"{where} is a file; give the export folder")
    if not (Path(spec) / "config.json").exists():
        raise PrismError(f"{where} is not a prism export (it has no config.json); "
                         "make one with `prism export MODEL PARTITION --out DIR`")
    meta = export_meta(spec)
    if meta is None:
        raise PrismError(f"{where} is not a prism export (its config.json has no 'prism' object); "
                         "make one with `prism export MODEL PARTITION --out DIR`")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        version = meta.get("format_version")
        got = ("missing" if version is None else f"{version!r}, not an integer"
               if not isinstance(version, int) or isinstance(version, bool) else version)
        raise PrismError(f"{where} has export format version {got}; this prism reads {EXPORT_FORMAT_VERSION}: export it again")
    return meta


def is_prism_export(spec: str | Path | None) -> bool:
    return spec is not None and export_meta(spec) is not None


def linear_mode(exact: bool, router_sorted: bool, tuned: bool) -> RouteMode:
    """How a linear gate finds its pairs (``LinearGateRouter.mode``). An expert's N copies tie in an
    untuned router whose linear gate is ``exact``: whole blocks where the router sorts its top-k
    (``blocks``), else the rule. A tuned router's copies differ: its own top-K (``ranked``). An inexact
    router (e.g. Phi-MoE's fixed two picks) does not return every copy: the rule."""
    if not exact:
        return "rule"
    if tuned:
        return "ranked"
    return "blocks" if router_sorted else "rule"


def export_linear_mode(meta: dict[str, Any], router_sorted: bool) -> RouteMode:
    """``linear_mode`` of an export's own router rows (its ``prism`` meta). A router bank's rows are chosen
    per K (``RouterBank.modes``); until then the rule."""
    if "router_bank" in meta:
        return "rule"
    return linear_mode(bool(meta.get("linear_gate_exact", True)), router_sorted, "tuning" in meta)


def attach_elastic_state(model: Any, directory: Path | None, *, ranked: bool = True) -> ElasticState:
    """Prepare ``model`` (an export, or a plain model when ``directory`` is None) for operating points;
    ``ranked=False`` leaves the export's layer ranking unread (``prism rank-layers`` replaces it)."""
    adapter = adapter_for_config(model.config)
    layers = adapter.moe_layers(model)
    meta = getattr(model.config, "prism", None) if directory is not None else None
    if meta is None:
        state = ElasticState(None, 1, adapter.top_k, adapter.num_experts, layers, [layer.router for layer in layers])
    else:
        n_sub = int(meta["sub_experts"])
        top_k = int(meta["source"]["top_k"])
        mode = export_linear_mode(meta, adapter.router_sorted)
        flat = [LinearGateRouter(layer.router, n_sub * top_k, adapter.renormalizes(), adapter.selection_scores, n_sub,
                                 mode=mode) for layer in layers]
        state = ElasticState(meta["gate"], n_sub, top_k, int(meta["source"]["num_experts"]), layers, flat, meta=meta,
                             ranking=read_ranking(directory, len(layers), n_sub * top_k) if ranked else None)
        if "router_bank" in meta:
            state.bank = _load_bank(directory, meta, layers, flat, adapter.router_sorted)
        if meta["gate"] == "neurons":
            gate_file = directory / GATE_FILE
            if not gate_file.exists():
                raise PrismError(f"{directory} is a neurons-gate export but {GATE_FILE} is missing")
            positions = load_file(str(gate_file))
            stored = read_source_router_file(directory, meta)
            for layer in layers:
                key = f"layers.{layer.index}.gate_positions"
                if key not in positions:
                    raise PrismError(f"{gate_file} has no gate neurons for layer {layer.index}")
                source = GateRowsSource(adapter, layer, positions[key], n_sub)
                policy = POLICIES.get("topk")(n_sub, state.source_top_k, state.source_experts)
                router = adapter.source_router(layer, model.config, n_sub, top_k)
                if stored is not None:  # a tuned export: the original router rows are stored apart
                    key = f"layers.{layer.index}.weight"
                    if key not in stored:
                        raise PrismError(f"{SOURCE_ROUTER_FILE} has no {key}")
                    router.weight = nn.Parameter(stored[key].to(router.weight), requires_grad=False)
                gate_router = GateNeuronRouter(router, source, n_sub, float(meta["down_scale"]), policy,
                                               n_sub * state.source_top_k)
                gate_router.router_from_flat = stored is None
                state.gate_routers.append(gate_router)
        for i, layer in enumerate(layers):
            router = ElasticRouter(flat[i], state.gate_routers[i] if state.gate_routers else None)
            adapter.install_router(layer, router)
            state.elastic_routers.append(router)
    for layer in layers:
        layer.experts.prism_sub_experts = state.n_sub  # the grouped executor runs an expert's pieces together
        if state.n_sub > 1:
            settle_down_layout(layer.experts)
    model.prism_state = state
    return state


def _load_bank(directory: Path, meta: dict[str, Any], layers: list[MoELayer], flat: list[LinearGateRouter],
               router_sorted: bool) -> RouterBank:
    """Attach the routers of a bank export to each layer's linear gate (as buffers: they move with the model)."""
    bank = meta["router_bank"]
    path = directory / bank.get("file", ROUTER_BANK_FILE)
    if not path.exists():
        raise PrismError(f"{directory} is a router-bank export but {path.name} is missing")
    rows = load_file(str(path))
    names = sorted(set(bank["by_k"].values()))
    for j, name in enumerate(names):
        for layer, router in zip(layers, flat, strict=True):
            key = f"{name}.layers.{layer.index}.weight"
            if key not in rows:
                raise PrismError(f"{path} has no {key}")
            weight = router.router.weight
            if rows[key].shape != weight.shape:
                raise PrismError(f"{path}: {key} is {tuple(rows[key].shape)}, the router {tuple(weight.shape)}")
            router.register_buffer(f"bank_{j}", rows[key].to(weight), persistent=False)
    untuned = [(bank.get("routers", {}).get(name) or {}).get("tuning") is None for name in names]
    exact = bool(meta.get("linear_gate_exact", True))
    modes = [linear_mode(exact, router_sorted, tuned=not u) for u in untuned]
    return RouterBank(names, {int(k): names.index(v) for k, v in bank["by_k"].items()}, modes)


def set_operating_point(model: Any, point: str | int | OperatingPoint) -> OperatingPoint:
    """Move ``model`` to ``point`` in place (see ``operating_points`` for the syntax); returns it parsed."""
    state: ElasticState | None = getattr(model, "prism_state", None)
    if state is None:
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise PrismError(f"set_operating_point takes a model from prism_cli.load_elastic (or a transformers MoE "
                             f"model), not {type(model).__name__}")
        if isinstance(getattr(model.config, "prism", None), dict):  # taken as a plain model, original:k meant top-k sub-experts
            raise PrismError("this model is a prism export loaded without prism: load it with prism_cli.load_elastic(DIR) "
                             "to run its operating points")
        state = attach_elastic_state(model, None)
    op = parse_operating_point(point, state.gate, state.n_sub, state.source_top_k)
    if op.policy in ("linear", "layered", "original"):
        set_layer_ks(model, state.layer_ks(op))  # a layered point without a ranking: one line, nothing changed
    else:
        policy = POLICIES.get(op.policy)(state.n_sub, state.source_top_k, state.source_experts)
        for i in range(len(state.layers)):
            state.gate_routers[i].policy, state.gate_routers[i].value = policy, op.value
            state.elastic_routers[i].use_neurons = True
    state.point = op
    return op


def load_elastic_model(spec: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu", operating_point: str | None = None,
                       offload: Any = None, ranked: bool = True) -> LoadedModel:
    """Load a prism export with its tokenizer; the model is at ``operating_point`` or the export's default.

    ``offload`` (a ``prism_cli.offload.OffloadConfig``) keeps the routed experts in host memory behind a
    device cache; the model is then placed by the offloading, on ``offload.device`` (default ``device``).
    """
    meta = read_export_meta(resolve_model(spec))
    validate_export(resolve_model(spec), meta)  # an edited config.json: one line naming the field
    loaded = load_model(spec, dtype=dtype, device="cpu" if offload is not None else device,
                        experts_implementation=EXPERTS_IMPLEMENTATION)
    attach_elastic_state(loaded.model, Path(loaded.name), ranked=ranked)
    set_operating_point(loaded.model, meta["default_operating_point"] if operating_point is None else operating_point)
    if offload is not None:
        from prism_cli.offload.executor import attach_offload  # a later stage, imported only when asked for

        attach_offload(loaded.model, offload, default_device=device)
    return loaded


def load_elastic(directory: str | PathLike, operating_point: str | int | None = None, *,
                 dtype: str | torch.dtype = "float32", device: str = "cpu", offload: Any = None) -> Any:
    """Python API: a transformers model loaded from a prism export, at ``operating_point``.

    >>> model = load_elastic("export/", operating_point="topk:4")
    >>> set_operating_point(model, "threshold:0.9")
    >>> small = load_elastic("export/", offload=OffloadConfig(device_memory="4GB", policy="lru", device="cuda"))
    """
    if not isinstance(directory, str | PathLike):
        raise PrismError(f"load_elastic takes the folder of a prism export (a str or a path), not {type(directory).__name__}")
    return load_elastic_model(str(directory), dtype=dtype, device=device, offload=offload,
                              operating_point=None if operating_point is None else str(operating_point)).model
