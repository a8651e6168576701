"""Architecture adapters: what prism needs to know about an MoE family, found from the module structure
wherever the family follows transformers v5's MoE block, with the family's quirks declared as data.

A v5 sparse MoE block is a module with an ``experts`` child (fused tensors, dispatched through
transformers' ``ExpertsInterface``, layout declared by ``use_experts_implementation``) and a router
child (``gate`` or ``router``) returning ``(logits, weights, indices)``. Everything structural is read
from the modules: where the blocks are, which layers are dense, the expert layout (``layout.py``),
which tensors are the router's, how checkpoint tensors are named on disk (``conversion.py``).

What the structure cannot tell is declared per family in ``FAMILIES`` (one ``Family`` each):

* which config fields hold the routed-expert count, the expert width and the top-k;
* the router's semantics (``Routing``): softmax over all experts, softmax over the top-k logits or a
  sigmoid per expert; top-k weights renormalised or not; group-limited routing and how a group is
  scored; a score-correction bias. From these follow the ``down_proj`` scale that makes the flat
  export (E*N sub-experts, router rows repeated N times) reproduce the original routing weights, and
  whether repeating router rows can reproduce the routing at all;
* config counts that size shared experts in units of the routed width (DeepSeek's
  ``n_shared_experts``), which the flat export must scale so the shared experts keep their width.

A family that needs more keeps a small ``MoEAdapter`` subclass of its own (``Family.adapter``).
Every claim made here is also measured: ``prism export`` runs the source and the export on probe
inputs and records the difference (``prism_cli.export.exactness``), and the family matrix
(``make families``) does so for every MoE family of the installed transformers.
"""

from __future__ import annotations

import copy
import re
import types
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from prism_cli.errors import PrismError
from prism_cli.models.layout import ExpertLayout
from prism_cli.models.llama4 import allow_experts_implementation, convert_llama4
from prism_cli.registry import Registry

#: Config fields that mark a config as Mixture-of-Experts, whatever the family.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
#: Child modules of an MoE block that may be its router.
_ROUTER_NAMES = ("gate", "router")
#: How ``scores`` values turn logits into the scores a correction bias is added to.
_SCORE_FUNCTIONS = {
    "softmax": lambda logits: logits.float().softmax(dim=-1),
    "sigmoid": lambda logits: logits.float().sigmoid(),
    "logits": lambda logits: logits.float(),
}


@dataclass(frozen=True)
class Routing:
    """A router's semantics, as far as repeating its rows N times is concerned.

    ``scores``: ``"softmax"`` (probabilities over all experts: N copies of an expert share its
    probability), ``"softmax_topk"`` (softmax over the top-k logits: copies share the expert's weight),
    ``"sigmoid"`` (an independent score per expert: every copy gets the expert's full score).
    ``normalize``: the top-k weights are divided by their sum (a str names the config field saying so).
    ``group_score``: group-limited routing keeps the best groups, scoring a group by its best expert
    (``"max"``, DeepSeek-V2: copies leave it unchanged) or by the sum of its two best (``"top2_sum"``,
    DeepSeek-V3: two copies of one expert change it).
    ``correction_bias``: path, relative to the router, of a per-expert bias added to the selection
    scores only (DeepSeek-V3's ``e_score_correction_bias``); ``bias_on`` says what it is added to
    when that is not ``scores`` (``"softmax"``, ``"sigmoid"`` or ``"logits"``).
    ``router_args``: block attributes the block passes to its router as extra arguments (bound to the
    router by ``bind_router_args``, so that prism's runtime can call it with the hidden states alone).
    ``inexact``: why repeated rows cannot reproduce the routing whatever the config.
    ``groups``: the config fields holding the number of expert groups and of groups kept.
    ``sorted``: the top-k comes out sorted by score (the runtime can then keep the first pairs).
    """

    scores: str = "softmax"
    normalize: bool | str = False
    group_score: str | None = None
    correction_bias: str | None = None
    bias_on: str | None = None
    router_args: tuple[str, ...] = ()
    inexact: str | None = None
    #: Config fields of the group count and of the groups kept.
    groups: tuple[str, str] = ("n_group", "topk_group")
    #: The router returns its top-k sorted by score (``torch.topk``'s default); DeepSeek's do not.
    sorted: bool = True

    def __post_init__(self) -> None:
        if self.scores not in ("softmax", "softmax_topk", "sigmoid"):
            raise ValueError(f"unknown router scores {self.scores!r}")
        if self.group_score not in (None, "max", "top2_sum"):
            raise ValueError(f"unknown group score {self.group_score!r}")


@dataclass(frozen=True)
class Family:
    """One MoE family: its config fields, its router semantics and, if it needs more, its own adapter class."""

    model_type: str
    experts: str = "num_experts"
    width: str = "intermediate_size"
    top_k: str = "num_experts_per_tok"
    routing: Routing = field(default_factory=Routing)
    #: Config counts that size shared experts in routed-width units (scaled by N in the flat export).
    coupled: tuple[str, ...] = ()
    #: Multi-head latent attention: KV heads are not split over tensor-parallel ranks.
    latent_attention: bool = False
    #: Why the prism runtime cannot run this family's neurons gate (the linear export is unaffected).
    neurons_unsupported: str | None = None
    #: How serving engines' own model class for this family differs from transformers', as (config flag
    #: that triggers it, note): the export's serving check records the note where the flag is set.
    engine_quirks: tuple[tuple[str, str], ...] = ()
    adapter: type[MoEAdapter] | None = None


@dataclass(frozen=True)
class KeyPatterns:
    """Regexes for a family's MoE tensors in checkpoint files (groups: ``layer``, and ``name`` for routers)."""

    experts: re.Pattern[str]
    router: re.Pattern[str]


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block of a loaded model."""

    index: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    router_name: str = "gate"
    layout: ExpertLayout = field(default_factory=ExpertLayout)

    def routing_tensors(self) -> dict[str, torch.Tensor]:
        """The block's routing state, by name relative to the block: the router's parameters and
        persistent buffers, and the block's own (a correction bias some families keep there)."""
        own = {k: v for k, v in self.block.state_dict(keep_vars=True).items() if "." not in k}
        router = {f"{self.router_name}.{k}": v for k, v in self.router.state_dict(keep_vars=True).items()}
        return {**own, **router}


class MoEAdapter:
    """An MoE family's adapter: structure from the modules, quirks from its ``Family`` (see the module docstring)."""

    def __init__(self, config: Any, family: Family) -> None:
        self.config = config
        self.family = family
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    # ---- the declared data, by the names the rest of prism uses ---------------------------------
    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def experts_key(self) -> str:
        return self.family.experts

    @property
    def width_key(self) -> str:
        return self.family.width

    @property
    def top_k_key(self) -> str:
        return self.family.top_k

    @property
    def routing(self) -> Routing:
        return self.family.routing

    @property
    def latent_attention(self) -> bool:
        return self.family.latent_attention

    @property
    def router_sorted(self) -> bool:
        """The router returns its top-k sorted by score (``torch.topk``'s default); DeepSeek's do not."""
        return self.routing.sorted

    # ---- shape -------------------------------------------------------------------------------
    def _int_field(self, key: str) -> int:
        value = getattr(self.text_config, key, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PrismError(
                f"{self.model_type} config field {key!r} is {value!r}; prism needs one integer for every MoE layer"
            )
        return value

    @property
    def num_experts(self) -> int:
        return self._int_field(self.experts_key)

    @property
    def width(self) -> int:
        return self._int_field(self.width_key)

    @property
    def top_k(self) -> int:
        return self._int_field(self.top_k_key)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "expert_width": self.width,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
        }

    # ---- where the MoE blocks are -------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The sparse MoE blocks of ``model`` in layer order (dense layers are skipped)."""
        layers: list[MoELayer] = []
        for name, module in model.named_modules():
            experts = getattr(module, "experts", None)
            fused = isinstance(experts, nn.Module) and isinstance(
                getattr(experts, "gate_up_proj", getattr(experts, "up_proj", None)), torch.Tensor
            )
            if not fused:
                continue
            match = re.search(r"layers\.(\d+)\.", name + ".")
            if match is None:
                continue
            router_name = next((r for r in _ROUTER_NAMES if isinstance(getattr(module, r, None), nn.Module)), None)
            if router_name is None:
                raise PrismError(f"{name} has fused experts but no router child ({' or '.join(_ROUTER_NAMES)})")
            layout = self._check_experts(experts, name)
            router = getattr(module, router_name)
            if self.routing.router_args:
                bind_router_args(router, module, self.routing.router_args)
            layers.append(MoELayer(int(match.group(1)), name, module, router, experts, router_name, layout))
        if not layers:
            raise PrismError(f"found no sparse MoE block with fused experts in this {self.model_type} model")
        return sorted(layers, key=lambda layer: layer.index)

    def _check_experts(self, experts: nn.Module, name: str) -> ExpertLayout:
        """The experts' layout, refusing what prism cannot split and weights the config disagrees with."""
        layout = ExpertLayout.of(experts, f"{name}.experts")
        want = layout.shapes(self.num_experts, self.width, self.hidden_size)
        got = {key: tuple(getattr(experts, key).shape) for key in want if isinstance(getattr(experts, key, None), torch.Tensor)}
        if got != want:
            found = ", ".join(f"{key} {shape}" for key, shape in got.items())
            raise PrismError(
                f"{name}.experts does not match the config ({self.experts_key}={self.num_experts}, "
                f"{self.width_key}={self.width}, hidden_size={self.hidden_size}): the config and the weights "
                f"disagree ({found}; want {', '.join(f'{k} {v}' for k, v in want.items())})"
            )
        return layout

    # ---- checkpoints on disk ------------------------------------------------------------------
    @cached_property
    def skeleton(self) -> nn.Module:
        """The source model on the meta device (module tree and shapes, no weights)."""
        from prism_cli.models.conversion import skeleton

        return skeleton(self.config)

    @cached_property
    def names(self):
        """Disk <-> module tensor names and conversions of this model (``conversion.CheckpointNames``)."""
        from prism_cli.models.conversion import CheckpointNames

        return CheckpointNames(self.skeleton)

    def key_patterns(self) -> KeyPatterns:
        """Regexes matching this family's routed-expert and routing tensors in checkpoint files (group
        ``layer``), found by converting the first MoE layer's module names as ``save_pretrained`` does."""
        layer = self.moe_layers(self.skeleton)[0]
        experts = [f"{layer.name}.experts.{k}" for k in layer.layout.tensor_names()]
        routing = [f"{layer.name}.{k}" for k in layer.routing_tensors()]
        return KeyPatterns(experts=_layer_pattern(self.names.disk_keys(experts), layer.index),
                           router=_layer_pattern(self.names.disk_keys(routing), layer.index))

    def check_checkpoint(self, directory: Any) -> None:
        """Refuse a checkpoint whose MoE tensors disagree with its config, naming the first one, before
        anything loads it (transformers would stop with a report, or silently re-initialise)."""
        from prism_cli.models.checkpoint import CheckpointReader

        reader = CheckpointReader(directory)
        on_disk = set(reader.keys())
        layers = self.moe_layers(self.skeleton)
        module = self.skeleton.state_dict()
        for layer in layers:
            keys = [f"{layer.name}.experts.{k}" for k in layer.layout.tensor_names()]
            keys += [f"{layer.name}.{k}" for k in layer.routing_tensors()]
            for key, want in self.names.to_disk({k: module[k] for k in keys}).items():
                if key not in on_disk:
                    continue  # another naming (a fused save, a legacy format): checked when exported
                shape = reader.shape(key)
                if shape != tuple(want.shape):
                    raise PrismError(
                        f"{directory}: the config and the weights disagree: {key} is {shape} in the checkpoint but "
                        f"{tuple(want.shape)} by config.json ({self.experts_key}={self.num_experts}, "
                        f"{self.width_key}={self.width}, hidden_size={self.hidden_size})"
                    )

    # ---- the flat (linear-gate) export ----------------------------------------------------------
    def flat_config_updates(self, n_sub: int) -> dict[str, Any]:
        """Config fields of the flat export with ``n_sub`` sub-experts per expert."""
        updates: dict[str, Any] = {
            self.experts_key: self.num_experts * n_sub,
            self.width_key: self.width // n_sub,
            self.top_k_key: self.top_k * n_sub,
        }
        for key in self.family.coupled:
            count = getattr(self.text_config, key, None) or 0
            if count:
                updates[key] = int(count) * n_sub
        return updates

    def flat_config(self, n_sub: int) -> Any:
        """A copy of the config with ``flat_config_updates`` applied (to the text config of a composite)."""
        flat = copy.deepcopy(self.config)
        target = flat.get_text_config() if hasattr(flat, "get_text_config") else flat
        for key, value in self.flat_config_updates(n_sub).items():
            setattr(target, key, value)
        return flat

    def mlp_widths(self, config: Any) -> dict[str, int]:
        """Every MLP width of ``config`` (a flat export's) that serving engines shard over tensor-parallel
        ranks: the routed sub-experts, shared experts (their own width field, or a count in routed widths:
        ``Family.coupled``) and the dense layers' MLP where the model has some."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        routed = int(getattr(text, self.width_key))
        widths = {"sub-expert width": routed}
        shared = getattr(text, "shared_expert_intermediate_size", None)
        if shared:
            widths["shared expert width"] = int(shared)
        for key in self.family.coupled:
            count = getattr(text, key, None)
            if count:
                widths["shared experts width"] = int(count) * routed
        dense_layers = (getattr(text, "first_k_dense_replace", 0) or 0) > 0 or bool(getattr(text, "mlp_only_layers", None)) \
            or (getattr(text, "decoder_sparse_step", 1) or 1) > 1
        if dense_layers and self.width_key != "intermediate_size":
            widths["dense MLP width"] = int(text.intermediate_size)
        return widths

    def engine_notes(self, config: Any) -> list[str]:
        """What serving engines do differently from transformers for this family, given ``config``."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return [note for flag, note in self.family.engine_quirks if getattr(text, flag, False)]

    def normalized(self) -> bool:
        """Whether the router divides its top-k weights by their sum."""
        value = self.routing.normalize
        return bool(getattr(self.text_config, value, False)) if isinstance(value, str) else bool(value)

    def flat_down_scale(self, n_sub: int) -> float:
        """Factor on sub-expert ``down_proj`` (and its bias) so the top-(N*k) flat model equals the original.

        N copies of an expert share its weight (softmax over all experts or over the top-k logits, or any
        renormalised top-k): each copy carries 1/N of it, so the sub-experts' outputs are scaled back by
        N. An unnormalised sigmoid gives every copy the expert's full score: no scale.
        """
        return 1.0 if self.routing.scores == "sigmoid" and not self.normalized() else float(n_sub)

    def linear_gate_inexact_reason(self) -> str | None:
        """Why repeating router rows cannot reproduce this model's routing, or None when it can."""
        if self.routing.inexact:
            return self.routing.inexact
        if self.routing.group_score == "top2_sum":
            groups, kept = self.routing.groups
            n_group = getattr(self.text_config, groups, 1) or 1
            topk_group = getattr(self.text_config, kept, n_group) or n_group
            if n_group > 1 and topk_group < n_group:
                return (
                    f"{self.model_type} routing keeps {topk_group} of {n_group} expert groups, scoring each group by the "
                    "sum of its two best experts; two copies of one expert change that sum, so repeated router rows "
                    "cannot reproduce it"
                )
        return None

    def neurons_unsupported_reason(self) -> str | None:
        """Why the prism runtime cannot run this family's training-free gate (None when it can)."""
        return self.family.neurons_unsupported

    def expert_dim(self, name: str, tensor: torch.Tensor, num_experts: int) -> int | None:
        """The axis of a routing tensor that runs over experts (None: not per expert, copied as is): the
        first axis when it has ``num_experts`` entries (a router's ``[E, H]`` weight, even where H = E),
        else the only axis that has."""
        if tensor.ndim and tensor.shape[0] == num_experts:
            return 0
        dims = [d for d, size in enumerate(tensor.shape) if size == num_experts]
        if len(dims) > 1:
            raise PrismError(f"routing tensor {name} {tuple(tensor.shape)} has several axes of size {num_experts}; "
                             "prism cannot tell which runs over experts")
        return dims[0] if dims else None

    def _bias_scale(self, name: str, n_sub: int) -> float:
        """A correction bias added to softmax probabilities is scaled like them (1/N per copy)."""
        path = self.routing.correction_bias
        on = self.routing.bias_on or self.routing.scores
        if path is not None and name.endswith(path) and on == "softmax":
            return 1.0 / n_sub
        return 1.0

    def flat_routing_tensor(self, name: str, tensor: torch.Tensor, n_sub: int) -> torch.Tensor:
        """A routing tensor of the flat export: per-expert entries repeated N times (in expert order)."""
        dim = self.expert_dim(name, tensor, self.num_experts)
        if dim is None:
            return tensor
        flat = tensor.repeat_interleave(n_sub, dim=dim)
        scale = self._bias_scale(name, n_sub)
        return flat if scale == 1.0 else (flat.double() * scale).to(tensor.dtype)

    def source_routing_tensor(self, name: str, flat: torch.Tensor, n_sub: int, num_experts: int) -> torch.Tensor:
        """The inverse of ``flat_routing_tensor`` (``num_experts``: the source count)."""
        dim = self.expert_dim(name, flat, num_experts * n_sub)
        if dim is None:
            return flat
        source = flat.index_select(dim, torch.arange(0, flat.shape[dim], n_sub, device=flat.device))
        scale = self._bias_scale(name, n_sub)
        return source if scale == 1.0 else (source.double() / scale).to(flat.dtype)

    # ---- the runtime: the original router, gate-neuron rows -------------------------------------
    def source_router(self, layer: MoELayer, flat_config: Any, n_sub: int, top_k: int) -> nn.Module:
        """The original router of a flat export's ``layer``: same class, the source's expert count and
        top-k, every N-th row (and per-expert tensor) of the flat router, in the flat router's dtypes."""
        router_config = copy.deepcopy(flat_config)
        target = router_config.get_text_config() if hasattr(router_config, "get_text_config") else router_config
        source_experts = self._int_field(self.experts_key) // n_sub
        setattr(target, self.experts_key, source_experts)
        setattr(target, self.top_k_key, top_k)
        flat = layer.router
        device = next(iter(flat.state_dict().values())).device
        router = type(flat)(target).to(device=device)
        for name, tensor in flat.state_dict().items():
            value = self.source_routing_tensor(name, tensor.detach(), n_sub, source_experts).clone()
            owner, _, attr = name.rpartition(".")
            module = router.get_submodule(owner) if owner else router
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
        if self.routing.router_args:
            # the block's tensors this router is called with, unflattened to the source experts, held by the router
            for arg in self.routing.router_args:
                tensor = getattr(layer.block, arg, None)
                if tensor is not None:
                    router.register_buffer(arg, self.source_routing_tensor(arg, tensor.detach(), n_sub, source_experts).clone(),
                                           persistent=False)
            bind_router_args(router, None, self.routing.router_args)
        return router.train(flat.training)  # a new module trains; Phi-MoE's router samples while it does

    def gate_neuron_rows(self, layer: MoELayer, positions: torch.Tensor, n_sub: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate-neuron rows ``[E, N*s, H]`` of W_gate and W_up (neuron rows, whatever the experts' layout),
        taken from the flat sub-experts; ``positions [E, N, s]`` are positions within each sub-expert."""
        gate_rows, up_rows = layer.layout.gate_up_rows(layer.experts.gate_up_proj.detach())
        experts, _, s = positions.shape
        sub = torch.arange(experts * n_sub, device=gate_rows.device).view(experts, n_sub, 1).expand(-1, -1, s)
        pos = positions.to(gate_rows.device).long()
        gate_w = gate_rows[sub, pos].reshape(experts, n_sub * s, -1)
        up_w = up_rows[sub, pos].reshape(experts, n_sub * s, -1)
        return gate_w.contiguous(), up_w.contiguous()

    def install_router(self, layer: MoELayer, router: nn.Module) -> None:
        """Put ``router`` where the block calls its router. Where the block passes its router extra
        tensors (``Routing.router_args``), ``router`` is called with them and drops them: its own routers
        are bound to theirs (``bind_router_args``)."""
        if self.routing.router_args:
            router.forward = types.MethodType(_drop_block_args, router)
        setattr(layer.block, layer.router_name, router)

    # ---- routing semantics, for a top-K below the router's own ------------------------------------
    def renormalizes(self) -> bool:
        """Whether the router's top-k weights sum to one (renormalised, or a softmax over the top-k)."""
        return self.normalized() or self.routing.scores == "softmax_topk"

    def selection_scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The scores the router ranks experts by (any monotone transform will do): the logits, or the
        scores plus the correction bias where the family has one."""
        path = self.routing.correction_bias
        if self.routing.router_args:
            bias = bound_router_args(router)[0]
        elif path is not None:
            owner, _, attr = path.rpartition(".")
            bias = getattr(router.get_submodule(owner) if owner else router, attr)
        else:
            bias = None
        if bias is None:
            return logits
        on = self.routing.bias_on or ("logits" if self.routing.scores == "softmax_topk" else self.routing.scores)
        return _SCORE_FUNCTIONS[on](logits) + bias.reshape(-1)


def bind_router_args(router: nn.Module, block: nn.Module | None, names: tuple[str, ...]) -> None:
    """Make ``router(x)`` work for a router its block calls as ``router(x, block.<name>, ...)``: called
    without them, it takes them from ``block`` (or, with ``block`` None, from its own buffers). Called
    with them, as its block does, it behaves as before. The router keeps its class's state-dict names."""
    cls = type(router)
    if not getattr(cls, "_prism_bound", False):
        router.__class__ = type(cls.__name__, (cls,), {"_prism_bound": True, "forward": _bound_forward})
    router._prism_args = (None if block is None else weakref.ref(block), names)


def bound_router_args(router: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors a bound router is called with by default."""
    block, names = router._prism_args
    owner = router if block is None else block()
    return tuple(getattr(owner, name, None) for name in names)


def _drop_block_args(self: nn.Module, hidden_states: torch.Tensor, *_block_args: Any) -> Any:
    return type(self).forward(self, hidden_states)


def _bound_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any) -> Any:
    return type(self).__mro__[1].forward(self, hidden_states, *(args or bound_router_args(self)))


def _layer_pattern(keys: list[str], index: int) -> re.Pattern[str]:
    """One regex for the tensors ``keys`` of layer ``index`` in every layer (and every expert number)."""
    marker = f"layers.{index}."
    heads, tails = set(), []
    for key in keys:
        head, _, tail = key.partition(marker)
        heads.add(head)
        tails.append(re.sub(r"experts\\\.\d+\\\.", r"experts\\.\\d+\\.", re.escape(tail)))
    if len(heads) != 1:
        raise PrismError(f"MoE tensors of layer {index} are not all under one prefix: {sorted(keys)[:4]}")
    body = "|".join(sorted(set(tails)))
    return re.compile(re.escape(heads.pop()) + r"layers\.(?P<layer>\d+)\.(?:" + body + ")$")


FAMILIES: Registry[Family] = Registry("MoE family")


def register_family(family: Family) -> Family:
    return FAMILIES.register(family.model_type)(family)


# ---- the families ----------------------------------------------------------------------------------


class Cohere2MoeAdapter(MoEAdapter):
    """Cohere2-MoE picks its router scores by config (``expert_selection_fn``): a softmax over the top-k
    logits, or a sigmoid per expert renormalised when ``norm_topk_prob`` is set."""

    @property
    def routing(self) -> Routing:
        if getattr(self.text_config, "expert_selection_fn", "softmax") == "sigmoid":
            return Routing("sigmoid", normalize="norm_topk_prob")
        return self.family.routing


class Llama4Adapter(MoEAdapter):
    """Llama-4's blocks are put in transformers v5's protocol before prism looks at them
    (``prism_cli.models.llama4``): a router returning ``(logits, weights, indices)``, experts through the
    experts interface, each (token, expert) pair's input scaled by the expert's sigmoid score."""

    def __init__(self, config: Any, family: Family) -> None:
        super().__init__(config, family)
        allow_experts_implementation()

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        convert_llama4(model)
        return super().moe_layers(model)


# Router semantics as read from each family's modeling file in transformers 5.x (the family matrix
# measures every one of them: tests/test_families.py, `make families`).

_SOFTMAX_NORM = Routing("softmax", normalize="norm_topk_prob")
_V3 = Routing("sigmoid", normalize="norm_topk_prob", group_score="top2_sum", correction_bias="e_score_correction_bias",
              sorted=False)
_SIGMOID_BIAS = Routing("sigmoid", normalize=True, correction_bias="e_score_correction_bias")
_SIGMOID_BIAS_UNSORTED = Routing("sigmoid", normalize=True, correction_bias="e_score_correction_bias", sorted=False)

for _family in (
    Family("olmoe", routing=_SOFTMAX_NORM, engine_quirks=(
        ("norm_topk_prob", "vLLM's OLMoE never renormalises top-k weights, but this config sets norm_topk_prob: "
                           "vLLM will not match transformers (for the source model as well)"),)),
    Family("flex_olmo", routing=_SOFTMAX_NORM),
    Family("qwen2_moe", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("qwen3_moe", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("qwen3_next", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("qwen3_5_moe", width="moe_intermediate_size", routing=Routing("softmax", normalize=True)),
    Family("qwen3_5_moe_text", width="moe_intermediate_size", routing=Routing("softmax", normalize=True)),
    Family("qwen4_exp_text", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("mellum", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("lara_mini", width="moe_intermediate_size", routing=_SOFTMAX_NORM),
    Family("mixtral", experts="num_local_experts", routing=Routing("softmax", normalize=True)),
    Family("minimax", experts="num_local_experts", routing=Routing("softmax", normalize=True)),
    Family("jamba", routing=Routing("softmax")),
    Family("phimoe", experts="num_local_experts", routing=Routing(
        "softmax_topk",
        inexact="Phi-MoE's sparsemixer router picks an expert, masks that expert's logit and picks again; with N "
                "copies of every router row the second pick is another copy of the first expert, so repeated router "
                "rows cannot reproduce it")),
    Family("deepseek_v2", experts="n_routed_experts", width="moe_intermediate_size",
           routing=Routing("softmax", group_score="max", sorted=False), coupled=("n_shared_experts",), latent_attention=True),
    Family("deepseek_v3", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",), latent_attention=True),
    Family("glm4_moe", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",)),
    Family("glm4_moe_lite", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",), latent_attention=True),
    Family("exaone_moe", experts="num_experts", width="moe_intermediate_size", routing=_V3, coupled=("num_shared_experts",)),
    Family("solar_open", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",)),
    Family("mimo_v2_flash", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",)),
    Family("deepseek_v32", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",), latent_attention=True),
    Family("glm_moe_dsa", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",), latent_attention=True),
    Family("sarvam_mla", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",), latent_attention=True),
    Family("sarvam_moe", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",)),
    Family("axk1", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",),
           latent_attention=True),
    Family("axk2", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",),
           latent_attention=True),
    Family("kimi_linear", width="moe_intermediate_size", top_k="num_experts_per_token",
           routing=Routing("sigmoid", normalize="norm_topk_prob", group_score="top2_sum",
                           correction_bias="e_score_correction_bias", groups=("num_expert_group", "topk_group"),
                           sorted=False),
           coupled=("num_shared_experts",), latent_attention=True),
    Family("bailing_hybrid", width="moe_intermediate_size", top_k="num_experts_per_token",
           routing=Routing("sigmoid", normalize="norm_topk_prob", group_score="top2_sum",
                           correction_bias="e_score_correction_bias", groups=("num_expert_group", "topk_group"),
                           sorted=False),
           coupled=("num_shared_experts",), latent_attention=True),
    Family("dots1", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3, coupled=("n_shared_experts",)),
    Family("minicpm5_moe", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3,
           coupled=("n_shared_experts",)),
    Family("ernie4_5_moe", width="moe_intermediate_size",
           routing=Routing("softmax", normalize=True, correction_bias="moe_statics.e_score_correction_bias"),
           coupled=("moe_num_shared_experts",)),
    # Llama-4 scales each expert's input by its sigmoid score; its blocks are converted (Llama4Adapter).
    Family("llama4_text", experts="num_local_experts", routing=Routing("sigmoid"), adapter=Llama4Adapter),
    Family("llama4", experts="num_local_experts", routing=Routing("sigmoid"), adapter=Llama4Adapter),
    Family("hunyuan_v1_moe", experts="num_experts", top_k="moe_topk", routing=Routing("softmax", normalize=True)),
    Family("gpt_oss", experts="num_local_experts", routing=Routing("softmax_topk")),
    Family("granitemoe", experts="num_local_experts", routing=Routing("softmax_topk")),
    Family("granitemoeshared", experts="num_local_experts", routing=Routing("softmax_topk")),
    Family("granitemoehybrid", experts="num_local_experts", routing=Routing("softmax_topk")),
    Family("granitemoe_swa", experts="num_local_experts", routing=Routing("softmax_topk")),
    Family("aria_text", experts="moe_num_experts", top_k="moe_topk", routing=Routing("softmax_topk"),
           coupled=("moe_num_shared_experts",)),
    Family("flint", width="moe_intermediate_size", routing=Routing("sigmoid", normalize="norm_topk_prob")),
    Family("laguna", width="moe_intermediate_size", routing=_SIGMOID_BIAS),
    Family("minimax_m3_vl_text", experts="num_local_experts", routing=_SIGMOID_BIAS_UNSORTED),
    Family("kolibri1", width="moe_intermediate_size",
           routing=Routing("sigmoid", normalize="norm_topk_prob", correction_bias="e_score_correction_bias", bias_on="logits")),
    Family("minimax_m2", experts="num_local_experts",
           routing=Routing("sigmoid", normalize=True, router_args=("e_score_correction_bias",), sorted=False)),
    Family("hy_v3", width="moe_intermediate_size", coupled=("num_shared_experts",),
           routing=Routing("sigmoid", normalize=True, router_args=("e_score_correction_bias",), sorted=False)),
    Family("lfm2_moe", width="moe_intermediate_size",
           routing=Routing("sigmoid", normalize="norm_topk_prob", router_args=("expert_bias",))),
    Family("cohere2_moe", routing=Routing("softmax_topk"), coupled=("num_shared_experts",), adapter=Cohere2MoeAdapter),
    # NemotronH's and Ergo's experts have no gate projection (plain MLP experts): found and refused with that reason.
    Family("nemotron_h", experts="n_routed_experts", width="moe_intermediate_size", routing=_V3),
    Family("ergo", width="moe_intermediate_size", routing=_SIGMOID_BIAS_UNSORTED),
    Family("afmoe", width="moe_intermediate_size", coupled=("num_shared_experts",),
           routing=Routing("sigmoid", normalize=True, router_args=("expert_bias",))),
):
    register_family(_family)


#: Config ``quantization_config.quant_method`` values, with the step that dequantizes such a checkpoint.
_DEQUANTIZE = {
    "mxfp4": "Mxfp4Config(dequantize=True)",
    "fp8": "FineGrainedFP8Config(dequantize=True)",
    "compressed-tensors": "CompressedTensorsConfig(dequantize=True)",
}


def _check_not_quantized(config: Any) -> None:
    """Refuse quantized weights, naming the transformers step that dequantizes them."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = str(getattr(method, "value", method))
    step = _DEQUANTIZE.get(method)
    how = (
        f"dequantize it first: AutoModelForCausalLM.from_pretrained(MODEL, quantization_config={step}, "
        "dtype=torch.bfloat16).save_pretrained(OUT), then give prism OUT"
        if step else "dequantize it to bfloat16 first (load it with transformers and save_pretrained a bf16 copy)"
    )
    raise PrismError(f"this {config.model_type} checkpoint is quantized ({method}): prism splits experts neuron by "
                     f"neuron and needs unquantized weights; {how}")


def _declares_experts(config: Any) -> bool:
    """True when ``config`` or one of its sub-configs counts experts.

    Some MoE families keep the expert count in a nested config (DBRX's ``ffn_config``, the
    ``text_config`` of a vision-language MoE); looking only at the top level would call them dense.
    """
    nested = [getattr(config, name, None) for name in (getattr(config, "sub_configs", None) or {})]
    return any(getattr(c, field, None) for c in (config, *nested) if c is not None for field in _EXPERT_COUNT_FIELDS)


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def adapter_for_config(config: Any, *, quantized: bool = False) -> MoEAdapter:
    """The adapter for ``config``, or a one-line error naming what was found. A quantized checkpoint is
    refused (naming the step that dequantizes it) unless ``quantized`` (planning reads shapes only)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in FAMILIES:
        if not quantized:
            _check_not_quantized(config)
        family = FAMILIES.get(model_type)
        return (family.adapter or MoEAdapter)(config, family)
    arch = ", ".join(getattr(config, "architectures", None) or []) or "no architecture listed"
    supported = ", ".join(FAMILIES.names())
    if not _is_causal_lm(model_type):
        text = getattr(config, "text_config", None)
        hint = f"; export its text model (model type {text.model_type!r}) instead" if getattr(text, "model_type", None) else ""
        raise PrismError(f"model type {model_type!r} ({arch}) has no causal LM class in transformers "
                         f"(AutoModelForCausalLM): prism splits the experts of causal language models{hint}")
    if _declares_experts(config):
        raise PrismError(f"unsupported MoE family {model_type!r} ({arch}); supported: {supported}")
    raise PrismError(
        f"model type {model_type!r} ({arch}) is not a Mixture-of-Experts model: its config lists no experts; "
        f"prism supports: {supported}"
    )
