"""``prism plan``: the time, memory and disk of profile, partition and export for a model, from its config.

No weights are needed: the model is built on the ``meta`` device from its ``config.json`` to count
its parameters layer by layer (what transformers would instantiate), and each stage is priced with
per-unit costs measured on this machine:

* **profile**: per token, every decoder layer up to the last profiled MoE layer (the profiler stops
  each forward pass there) costs what one MoE layer costs outside its routed experts (attention,
  norms, router, shared experts: measured now on a one-layer copy of the model with random weights,
  ``shrunk_config``; a dense layer in proportion to its parameters), plus, in MoE layers, ``top_k``
  expert calls of the recording experts path (``profiling_experts_forward`` with a real recorder),
  measured now at the model's expert shape and tokens per expert; plus loading the checkpoint and
  writing the rows (the work folder, then the profile) at the calibrated load and disk rates.
  Memory: the model at ``--dtype``, the process's runtime and the profiler's budget (``--max-memory``,
  default half the memory left after the model, capped at what the run can use: activations, counters
  and every row). Disk: ``budget.ProfileGeometry``.
* **partition**: seconds per expert by solver and expert width, measured by ``prism plan calibrate``
  (one expert per width on synthetic rows, one core, the way ``prism partition`` runs each expert),
  interpolated in log-log between widths (extrapolated beyond them, and said so) and scaled linearly
  by the fit rows per expert; divided over the cores. The cores or Ray workers (one CPU each) that
  bring it under an hour follow.
* **export**: bytes read plus bytes written at the rate a calibration export measured.

Profile and export each add the seconds a fresh process takes to import torch, transformers and prism.

Every unit cost is measured both as wall-clock time and as the process's CPU time: the first is what
this machine takes at its current load; the second is the work itself, which on a shared machine is
the steadier of the two (and, for single-threaded work, what an idle machine takes).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers.integrations.moe import _default_apply_gate

from prism_cli.errors import PrismError
from prism_cli.layers import MAX_LAYERS, format_layers
from prism_cli.models.adapters import MoEAdapter, adapter_for_config
from prism_cli.profiling.budget import ProfileGeometry, check_buffer_fits, format_size, forward_bytes, plan_memory, reservoir_caps

COSTS_FORMAT = "prism-plan-costs"
#: Bytes per parameter of a checkpoint by its stored dtype (FP8-quantized checkpoints: one).
_CHECKPOINT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Routed experts per layer the planner takes at most: published MoE models have at most a few hundred, and
#: far beyond them the per-expert costs round to nothing while their sums do not (1e9 experts: 0.0 s each, 14 h).
MAX_EXPERTS = 65_536
#: The sizes every config must give (besides the family's expert count, width and top-k).
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# ---- the model, from its config ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read from its config."""

    name: str
    model_type: str
    n_layers: int
    moe_layers: list[int]
    num_experts: int
    width: int
    top_k: int
    hidden_size: int
    params: int
    #: Per decoder layer: parameters outside the routed experts (attention, norms, router, shared or dense MLP).
    dense_params: list[int]
    attention_heads: int
    checkpoint_bytes_per_param: float

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.width

    @property
    def checkpoint_bytes(self) -> int:
        return int(self.params * self.checkpoint_bytes_per_param)


def read_config(spec: str) -> tuple[Any, str]:
    """A config and a display name from a ``config.json`` file, a checkpoint folder, a hub id or ``builtin``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from prism_cli.models.loading import load_config, model_label, resolve_model

    path = Path(spec).expanduser()
    try:
        if not path.is_file():
            return load_config(spec), model_label(resolve_model(spec))
        data = _config_json(path, spec)
        model_type = data.pop("model_type")
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        known = list(CONFIG_MAPPING)  # (its len() is 0: a lazy mapping)
        if model_type not in known:  # transformers' own message lists all of its hundreds of types
            close = difflib.get_close_matches(model_type, known, n=3)
            raise PrismError(f"{spec}: transformers does not know model_type {model_type!r}"
                             + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                             + f"; it knows {len(known)} model types, of which prism exports the MoE families")
        try:
            return AutoConfig.for_model(model_type, **data), path.stem
        except (ValueError, KeyError) as exc:
            raise PrismError(f"{spec}: transformers cannot build a {model_type!r} config from it ({exc})") from None
    except StrictDataclassFieldValidationError as exc:  # transformers' own type checks, e.g. a string for an integer
        raise PrismError(f"{spec}: {' '.join(str(exc.__cause__ or exc).split())}") from None


def _config_json(path: Path, spec: str) -> dict[str, Any]:
    """The object of a model's config.json, refused in one line unless it is a JSON object with a model_type."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PrismError(f"{spec} is not a model config.json (a JSON object with a model_type)")
    return data


def defaulted_fields(spec: str, adapter: MoEAdapter) -> list[str]:
    """The sizes ``check_config`` reads that the config.json at ``spec`` (a file or a checkpoint folder) leaves
    out, which transformers fills with its defaults (a Qwen3-MoE config without ``num_experts`` has 128); [] for
    a hub id or ``builtin``, whose file is not at hand."""
    path = Path(spec).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        return []
    data = _config_json(path, spec)
    section = data["text_config"] if isinstance(data.get("text_config"), dict) else data
    return [key for key in _SIZE_FIELDS + (adapter.experts_key, adapter.width_key, adapter.top_k_key) if key not in section]


@contextlib.contextmanager
def _config_failures(name: str, what: str) -> Iterator[None]:
    """transformers' own failure to build or run a model from a config that passed ``check_config`` (sizes
    its attention cannot use, tensors past int64 bytes), in one line naming the model."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrismError(f"transformers cannot {what} a layer of {name} from its config.json ({first}): check its sizes "
                         "(hidden_size, num_attention_heads, head_dim, the expert width)") from None


def check_config(adapter: MoEAdapter) -> None:
    """Refuse config values no model can have, naming each key as the family's config.json spells it."""
    text = adapter.text_config
    for key in (*_SIZE_FIELDS, adapter.experts_key, adapter.width_key, adapter.top_k_key):
        value = getattr(text, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrismError(f"config field {key!r} is {value!r}: it must be a positive integer")
    if text.num_hidden_layers > MAX_LAYERS:
        raise PrismError(f"config field 'num_hidden_layers' is {text.num_hidden_layers:,}: prism plans models of up to "
                         f"{MAX_LAYERS:,} decoder layers (published MoE models have under 100)")
    if adapter.num_experts > MAX_EXPERTS:
        raise PrismError(f"config field {adapter.experts_key!r} is {adapter.num_experts:,}: prism plans models of up to "
                         f"{MAX_EXPERTS:,} experts per layer (published MoE models have at most a few hundred)")
    if adapter.top_k > adapter.num_experts:
        raise PrismError(f"config field {adapter.top_k_key!r} is {adapter.top_k}: more than the "
                         f"{adapter.num_experts} experts of {adapter.experts_key!r}")
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None)
    for key in ("head_dim", "max_position_embeddings", "decoder_sparse_step"):  # optional: when given, as the others
        value = getattr(text, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PrismError(f"config field {key!r} is {value!r}: it must be a positive integer (or left out)")
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and text.hidden_size % heads:
        raise PrismError(f"config field 'num_attention_heads' ({heads}) does not divide 'hidden_size' "
                         f"({text.hidden_size}), and the config sets no 'head_dim'")
    if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1
                                 or heads % kv_heads):
        raise PrismError(f"config field 'num_key_value_heads' is {kv_heads!r}: it must divide "
                         f"'num_attention_heads' ({heads})")


def model_shape(config: Any, name: str) -> ModelShape:
    """Count the parameters of the model ``config`` describes, layer by layer, on the meta device."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for_config(config, quantized=True)
    check_config(adapter)
    with _config_failures(name, "build"), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    moe = {layer.index: layer for layer in adapter.moe_layers(model)}
    decoder = model.model.layers
    dense = []
    for i, layer in enumerate(decoder):
        n = sum(p.numel() for p in layer.parameters())
        if i in moe:
            n -= sum(p.numel() for p in moe[i].experts.parameters())
        dense.append(n)
    heads = int(config.num_attention_heads)
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    stored = "float8_e4m3fn" if quant.get("quant_method") == "fp8" else str(getattr(config, "dtype", None) or "bfloat16")
    return ModelShape(
        name=name,
        model_type=adapter.model_type,
        n_layers=len(decoder),
        moe_layers=sorted(moe),
        num_experts=adapter.num_experts,
        width=adapter.width,
        top_k=adapter.top_k,
        hidden_size=adapter.hidden_size,
        params=sum(p.numel() for p in model.parameters()),
        dense_params=dense,
        attention_heads=heads,
        checkpoint_bytes_per_param=_CHECKPOINT_BYTES.get(stored.removeprefix("torch."), 2),
    )


# ---- unit costs measured now, at the model's shapes ----------------------------------------------


@dataclass(frozen=True)
class Timed:
    """A duration measured both ways: wall clock, and CPU time of this process (all threads)."""

    wall: float
    cpu: float


def _timed(fn: Callable[[], Any], min_seconds: float, min_repeats: int = 2) -> tuple[Timed, int]:
    """Mean duration of ``fn`` (after one warm-up call) over at least ``min_repeats`` calls and ``min_seconds``,
    and the number of calls timed."""
    fn()
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while n < min_repeats or time.perf_counter() - wall0 < min_seconds:
        fn()
        n += 1
    return Timed((time.perf_counter() - wall0) / n, (time.process_time() - cpu0) / n), n


@dataclass(frozen=True)
class ProfileUnitCosts:
    """Per-unit costs of profiling this model on this machine, measured at its shapes."""

    dense_token: Timed  # seconds per token of a MoE decoder layer outside its routed experts
    expert_call: Timed  # seconds per expert call of the recording path, ``tokens_per_call`` tokens
    tokens_per_call: int


def shrunk_config(config: Any, adapter: Any) -> Any:
    """One MoE decoder layer of ``config`` with as few routed experts as its router allows and a tiny vocabulary.

    Attention, norms, router and shared experts keep their shapes: timing this model's forward pass
    outside its experts gives a MoE layer's cost per token outside the routed experts.
    """
    small = copy.deepcopy(config)
    groups = int(getattr(config, "n_group", None) or 1)
    # Group-limited routers score a group by the sum of its top-2 experts (DeepSeek-V3): two per group.
    overrides = {"num_hidden_layers": 1, "vocab_size": 256, adapter.experts_key: 2 * groups, adapter.top_k_key: 1,
                 "first_k_dense_replace": 0, "topk_group": 1, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "moe_layer_freq": 1, "num_nextn_predict_layers": 0}
    for key, value in overrides.items():
        if key in (adapter.experts_key, adapter.top_k_key, "num_hidden_layers", "vocab_size") or hasattr(small, key):
            setattr(small, key, value)
    small.quantization_config = None
    return small


class _StandInExperts(torch.nn.Module):
    """Two experts with the model's shapes, for ``profiling_experts_forward``."""

    def __init__(self, hidden: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_experts = 2
        self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 2 * width, hidden, dtype=dtype, device=device) * hidden**-0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(2, hidden, width, dtype=dtype, device=device) * width**-0.5)
        self.act_fn = torch.nn.SiLU()
        # transformers' experts-interface flags: the standard layout (what ExpertLayout.of reads).
        self.is_transposed, self.is_concatenated, self.has_bias, self.has_gate = False, True, False, True

    _apply_gate = _default_apply_gate


def measure_dense_layer(config: Any, *, dtype: str, device: str, batch_size: int, seq_len: int,
                        min_seconds: float = 1.0) -> Timed:
    """Seconds per token of one MoE decoder layer outside its routed experts (``shrunk_config``, random weights)."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for_config(config, quantized=True)
    small = shrunk_config(config, adapter)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small, dtype=_DTYPES[dtype]).to(device).eval()
    experts = adapter_for_config(small, quantized=True).moe_layers(model)[0].experts
    inside = {"wall": 0.0, "cpu": 0.0}
    marks: dict[str, float] = {}

    def enter(*_: Any) -> None:
        marks["wall"], marks["cpu"] = time.perf_counter(), time.process_time()

    def leave(*_: Any) -> None:
        inside["wall"] += time.perf_counter() - marks["wall"]
        inside["cpu"] += time.process_time() - marks["cpu"]

    experts.register_forward_pre_hook(enter)
    experts.register_forward_hook(leave)
    ids = torch.randint(0, 256, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        model(input_ids=ids, use_cache=False)

    with torch.inference_mode():
        forward()  # warm-up, outside the timed calls and the hooks' sums
        inside.update(wall=0.0, cpu=0.0)
        total, n = _timed(forward, min_seconds, min_repeats=1)
    # _timed's own warm-up call is inside the hooks' sums too: n + 1 calls.
    tokens = batch_size * seq_len
    return Timed((total.wall - inside["wall"] / (n + 1)) / tokens, (total.cpu - inside["cpu"] / (n + 1)) / tokens)


def check_measurable(shape: ModelShape, config: Any, *, dtype: str, device: str, batch_size: int, seq_len: int) -> None:
    """Refuse a model whose one-layer copy (``shrunk_config``), two stand-in experts and one forward pass
    do not fit the memory free on ``device``: the costs are measured on them."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for_config(config, quantized=True)
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(shrunk_config(config, adapter))
    dtype_bytes = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
    params = sum(p.numel() for p in small.parameters()) + 2 * shape.expert_params
    need = params * dtype_bytes + forward_bytes(batch_size, seq_len, shape.hidden_size, shape.attention_heads, dtype_bytes)
    dev = torch.device(device)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else psutil.virtual_memory().available
    if need > free:
        raise PrismError(f"measuring the profiling costs runs one layer of {shape.name} (hidden_size {shape.hidden_size:,}, "
                         f"{adapter.width_key} {shape.width:,}) at {dtype}: {format_size(need)}, more than the "
                         f"{format_size(free)} free on {device}")


def measure_profile_costs(shape: ModelShape, config: Any, *, dtype: str, device: str, batch_size: int, seq_len: int,
                          max_rows: int, holdout_fraction: float, min_seconds: float = 1.0) -> ProfileUnitCosts:
    """Time a MoE layer outside its experts and the recording experts path at the model's sizes (seconds)."""
    from prism_cli.profiling.recorder import ActivationRecorder, LayerRecord, Reservoir, profiling_experts_forward
    from prism_cli.profiling.spill import LayerSpill, RowBuffer

    check_measurable(shape, config, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len)
    with _config_failures(shape.name, "run"):
        dense = measure_dense_layer(config, dtype=dtype, device=device, batch_size=batch_size, seq_len=seq_len,
                                    min_seconds=min_seconds)
    torch_dtype, dev = _DTYPES[dtype], torch.device(device)
    h, width = shape.hidden_size, shape.width
    batch_tokens = batch_size * seq_len
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        n = max(1, round(batch_tokens * shape.top_k / shape.num_experts))
        experts = _StandInExperts(h, width, torch_dtype, dev)
        hidden = torch.randn(2 * n, h, generator=gen).to(dev, torch_dtype)
        index = (torch.arange(2 * n, device=dev) % 2)[:, None]
        weights = torch.ones(2 * n, 1, dtype=torch_dtype, device=dev)
        holdout = torch.rand(2 * n, generator=gen).to(dev) < holdout_fraction
        caps = reservoir_caps(max_rows, holdout_fraction)
        with tempfile.TemporaryDirectory() as tmp:
            spill = LayerSpill(Path(tmp), 0, 2, caps, width, torch.float16)
            rngs = np.random.SeedSequence(0).spawn(4)
            record = LayerRecord(
                layer=0, routed=torch.zeros(2, dtype=torch.long, device=dev),
                weight_sum=torch.zeros(2, dtype=torch.float64, device=dev),
                l1_mass=torch.zeros(2, width, dtype=torch.float64, device=dev),
                hot_count=torch.zeros(2, width, dtype=torch.long, device=dev),
                reservoirs=[[Reservoir(cap, np.random.default_rng(rngs[2 * k + e])) for e in range(2)]
                            for k, cap in enumerate(caps)],
                spill=spill,
            )
            buffer = RowBuffer(max_rows, width, torch.float16)

            def reserve(n_rows: int) -> None:  # the profiler writes the buffer at a checkpoint: here it is dropped
                if n_rows > buffer.free_rows():
                    buffer.release()

            recorder = ActivationRecorder({0: record}, width, buffer=buffer, reserve=reserve)
            experts._prism_recorder, experts._prism_layer = recorder, 0
            batch = iter(range(1_000_000))

            def call() -> None:
                recorder.begin_batch(next(batch), 0, holdout)
                profiling_experts_forward(experts, hidden, index, weights)

            per_two, _ = _timed(call, min_seconds, min_repeats=3)
            spill.close()
    return ProfileUnitCosts(dense_token=dense, expert_call=Timed(per_two.wall / 2, per_two.cpu / 2), tokens_per_call=n)


# ---- unit costs calibrated once per machine ------------------------------------------------------


@dataclass
class MachineCosts:
    """Per-unit costs that take minutes to measure (``prism plan calibrate``), saved as JSON."""

    machine: dict[str, Any]
    #: solver -> sorted [(expert width, seconds per expert (wall), seconds (CPU))] at ``partition_rows`` fit rows.
    partition: dict[str, list[tuple[int, float, float]]]
    partition_rows: int
    #: [(expert width, peak resident bytes of a worker process solving one expert)].
    partition_worker_bytes: list[tuple[int, int]]
    export_bytes_per_s: float  # bytes read plus bytes written per CPU second by `prism export` (single-threaded)
    load_bytes_per_s: float  # checkpoint bytes per second loaded for profiling
    disk_write_bytes_per_s: float
    runtime_bytes: int  # resident memory of a process that imported torch, transformers and prism
    #: Wall seconds a fresh process takes to import them: every stage is a new `prism` process.
    #: (0 in costs files calibrated before it was measured.)
    startup_seconds: float = 0.0
    source: str = ""

    def partition_seconds(self, solver: str, width: int, rows: float) -> tuple[Timed, bool]:
        """Seconds per expert at ``width`` and ``rows`` fit rows, and whether ``width`` lies outside the table."""
        table = self.partition[solver]
        widths = sorted(w for w, _, _ in table)
        scale = rows / self.partition_rows
        wall = self._extrapolated([(w, s) for w, s, _ in table], width, f"partition.{solver}") * scale
        cpu = self._extrapolated([(w, c) for w, _, c in table], width, f"partition.{solver}") * scale
        return Timed(wall, cpu), not widths[0] <= width <= widths[-1]

    def worker_bytes(self, width: int) -> int:
        return int(self._extrapolated([(w, float(b)) for w, b in self.partition_worker_bytes], width,
                                      "partition_worker_bytes"))

    def _extrapolated(self, points: list[tuple[int, float]], width: int, name: str) -> float:
        """``_loglog`` at ``width``, or one line where a costs file's table, extended to it, gives no finite value."""
        try:
            value = _loglog(points, width)
        except (OverflowError, ZeroDivisionError, ValueError):
            value = math.inf
        if not math.isfinite(value):
            raise PrismError(f"{self.source or 'the plan costs'}: {name} extended to expert width {width:,} gives no "
                             f"finite value; calibrate that width with `prism plan calibrate --widths {width}`")
        return value

    def save(self, path: Path) -> None:
        from prism_cli.io import write_json

        data = asdict(self)
        data.pop("source")
        write_json(path, {"format": COSTS_FORMAT, **data})

    @classmethod
    def load(cls, path: Path) -> MachineCosts:
        """The costs in ``path``, every field checked: one line naming the file and the field it refuses."""
        data = read_costs_file(path)
        try:
            return cls(**_checked_costs(data), source=str(path))
        except _BadCosts as exc:
            raise PrismError(f"{path} is not a valid plan costs file: {exc}; measure them again with "
                             f"`prism plan calibrate --out {path}`") from None


def read_costs_file(path: Path) -> dict[str, Any]:
    """The JSON of a costs file (a JSON object marked with ``COSTS_FORMAT``), its fields not yet checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PrismError(f"costs file {path} does not exist; run `prism plan calibrate --out {path}`") from None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != COSTS_FORMAT:
        raise PrismError(f"{path} is not a prism plan costs file; make one with `prism plan calibrate --out COSTS.json` "
                         "and pass that")
    return data


def is_costs_file(path: Path) -> bool:
    """Whether ``path`` is a costs file (valid or not): what `prism plan calibrate --out` may replace."""
    try:
        read_costs_file(path)
    except PrismError:
        return False
    return True


class _BadCosts(Exception):
    """A field of a costs file that no measurement gives (``MachineCosts.load`` names the file)."""


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _costs_number(value: Any, name: str, *, integer: bool = False, zero: bool = False) -> Any:
    """``value`` where it is a finite number (an integer with ``integer``) above 0 (at least 0 with ``zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok:
        try:
            ok = math.isfinite(float(value)) and (value >= 0 if zero else value > 0)
        except OverflowError:  # an integer past any float
            ok = False
    if not ok:
        raise _BadCosts(f"{name} must be {'an integer' if integer else 'a finite number'} {'>=' if zero else '>'} 0, "
                        f"got {_shown(value)}")
    return value


def _costs_table(value: Any, name: str, columns: list[str]) -> list[tuple[Any, ...]]:
    """A non-empty list of ``[width, value, ...]`` rows (``columns`` names the values), one row per width,
    sorted by width."""
    shape = f"[{', '.join(['width', *columns])}]"
    if not isinstance(value, list) or not value:
        raise _BadCosts(f"{name} must be a non-empty list of {shape}, got {_shown(value)}")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != 1 + len(columns):
            raise _BadCosts(f"{name}[{i}] must be {shape}, got {_shown(row)}")
        width = _costs_number(row[0], f"{name}[{i}][0] (a width)", integer=True)
        values = [_costs_number(v, f"{name}[{i}][{j}] ({what})", integer=what == "bytes")
                  for j, (v, what) in enumerate(zip(row[1:], columns, strict=True), start=1)]
        rows.append((width, *values))
    widths = [row[0] for row in rows]
    repeated = sorted({w for w in widths if widths.count(w) > 1})
    if repeated:
        raise _BadCosts(f"{name} gives width {repeated[0]} more than once")
    return sorted(rows)


def _checked_costs(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a costs file as ``MachineCosts`` takes them, or ``_BadCosts`` naming the first bad one."""
    fields = {f.name: f for f in dataclasses.fields(MachineCosts) if f.name != "source"}
    data = {k: v for k, v in data.items() if k != "format"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _BadCosts(f"it has an unknown field {unknown[0]!r}")
    missing = [name for name, f in fields.items()
               if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _BadCosts(f"field {missing[0]} is missing")
    machine = data["machine"]
    if not isinstance(machine, dict):
        raise _BadCosts(f"machine must be an object (processor, cores, memory_bytes ...), got {_shown(machine)}")
    if "memory_bytes" in machine:
        _costs_number(machine["memory_bytes"], "machine.memory_bytes", zero=True)
    partition = data["partition"]
    if not isinstance(partition, dict) or not partition:
        raise _BadCosts(f"partition must be an object of solver: [[width, wall seconds, CPU seconds], ...], "
                        f"got {_shown(partition)}")
    checked = {
        "machine": machine,
        "partition": {solver: _costs_table(table, f"partition.{solver}", ["wall seconds", "CPU seconds"])
                      for solver, table in partition.items()},
        "partition_rows": _costs_number(data["partition_rows"], "partition_rows", integer=True),
        "partition_worker_bytes": _costs_table(data["partition_worker_bytes"], "partition_worker_bytes", ["bytes"]),
        "runtime_bytes": _costs_number(data["runtime_bytes"], "runtime_bytes", integer=True),
    }
    for name in ("export_bytes_per_s", "load_bytes_per_s", "disk_write_bytes_per_s"):
        checked[name] = _costs_number(data[name], name)
    if "startup_seconds" in data:  # 0 (or left out) in files calibrated before it was measured
        checked["startup_seconds"] = _costs_number(data["startup_seconds"], "startup_seconds", zero=True)
    return checked


def _loglog(points: list[tuple[int, float]], x: float) -> float:
    """Piecewise-linear interpolation in log-log space; the end segments extend beyond the table."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] * x / points[0][0]  # one point: proportional
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y0 * (x / x0) ** slope


def default_costs_path() -> Path:
    """Where `prism plan calibrate` writes by default, and `prism plan` looks first."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prism" / "plan_costs.json"


def packaged_costs_path() -> Path:
    """Costs measured on the machine this prism was built and tested on (used when this one has none)."""
    return Path(__file__).resolve().parent / "data" / "plan_costs.json"


def machine_info() -> dict[str, Any]:
    from prism_cli.evaluation.bench import environment

    env = environment(torch.device("cpu"))
    return {"processor": env["processor"], "platform": env["platform"], "cores": os.cpu_count() or 1,
            "memory_bytes": psutil.virtual_memory().total, "torch": env["torch"], "prism": env["prism"]}


# ---- the plan ------------------------------------------------------------------------------------


@dataclass
class PlanSettings:
    """The run being planned (the defaults of `prism profile`, `partition` and `export`)."""

    tokens: int = 131_072
    seq_len: int = 256
    batch_size: int = 8
    max_rows: int = 5_120
    holdout_fraction: float = 0.2
    row_dtype: str = "float16"
    dtype: str = "float32"
    device: str = "cpu"
    max_memory: int | None = None
    solver: str = "nsga2"
    sub_experts: int = 4
    gate_neurons: int = 4
    workers: int | None = None  # partition worker processes (default: the cores here)
    layers: list[int] | None = None


@dataclass
class StagePlan:
    name: str
    seconds: float
    cpu_seconds: float
    memory_bytes: int
    disk_bytes: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    shape: ModelShape
    settings: PlanSettings
    stages: list[StagePlan]
    partition_core_seconds: float  # one core's wall time for every expert
    cores_for_an_hour: int
    cores_here: int
    memory_here: int
    disk_free_here: int
    costs_source: str

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def check_plan(shape: ModelShape, settings: PlanSettings, machine: MachineCosts) -> None:
    """Refuse what cannot be planned before anything is measured."""
    missing = sorted(set(settings.layers or []) - set(shape.moe_layers))
    if missing:
        raise PrismError(f"--layers {format_layers(missing)} are not MoE layers of {shape.name} "
                         f"(MoE layers: {format_layers(shape.moe_layers)})")
    if settings.sub_experts < 2:
        raise PrismError(f"--sub-experts must be at least 2, got {settings.sub_experts}")
    if shape.width % settings.sub_experts:
        raise PrismError(f"--sub-experts {settings.sub_experts} does not divide the expert width {shape.width}")
    if settings.solver not in machine.partition:
        raise PrismError(f"no calibrated partition cost for solver {settings.solver!r} (calibrated: "
                         f"{', '.join(machine.partition)}); run `prism plan calibrate --solvers {settings.solver}`")
    machine.partition_seconds(settings.solver, shape.width, 1.0)  # a table that extends to no finite cost at this width
    machine.worker_bytes(shape.width)
    if settings.max_memory:  # refused as `prism profile` would refuse it (the default budget is within the memory)
        check_buffer_fits(plan_memory(_geometry(shape, settings), settings.max_memory), psutil.virtual_memory().total)


def _geometry(shape: ModelShape, settings: PlanSettings) -> ProfileGeometry:
    """The sizes of the profiling run ``settings`` describe for ``shape``."""
    dtype_bytes = torch.empty(0, dtype=_DTYPES[settings.dtype]).element_size()
    return ProfileGeometry(num_experts=shape.num_experts, width=shape.width, top_k=shape.top_k,
                           n_layers=len(settings.layers or shape.moe_layers), max_rows=settings.max_rows,
                           holdout_fraction=settings.holdout_fraction, row_bytes=2 if settings.row_dtype == "float16" else 4,
                           forward_bytes=forward_bytes(settings.batch_size, settings.seq_len, shape.hidden_size,
                                                       shape.attention_heads, dtype_bytes))


def make_plan(shape: ModelShape, settings: PlanSettings, unit: ProfileUnitCosts, machine: MachineCosts,
              *, available_memory: int | None = None, cores: int | None = None, disk_free: int | None = None) -> Plan:
    """Every stage's time, memory and disk for ``shape`` with ``settings`` at the given unit costs."""
    check_plan(shape, settings, machine)
    cores = cores or os.cpu_count() or 1
    available = psutil.virtual_memory().available if available_memory is None else available_memory
    disk_free = disk_free if disk_free is not None else _disk_free(Path.cwd())
    layers = settings.layers or shape.moe_layers
    dtype_bytes = torch.empty(0, dtype=_DTYPES[settings.dtype]).element_size()
    geometry = _geometry(shape, settings)
    tokens = settings.tokens - settings.tokens % settings.seq_len
    model_bytes = shape.params * dtype_bytes

    # profile: the budget, then the passes over the layers it allows
    rows_bytes = len(layers) * shape.num_experts * sum(geometry.expected_rows(tokens)) * geometry.row_size
    need = geometry.forward_bytes + len(layers) * geometry.layer_state_bytes + int(rows_bytes) + geometry.reservoir_bytes
    if settings.max_memory:
        budget, budget_note = settings.max_memory, f"--max-memory {format_size(settings.max_memory)}"
    else:
        budget = max(geometry.minimum_budget, (available - model_bytes) // 2)
        budget_note = f"default budget: half the {format_size(max(0, available - model_bytes))} left after the model"
    memory = plan_memory(geometry, budget)
    used = min(budget, need)
    passes = [layers[i : i + memory.layers_per_pass] for i in range(0, len(layers), memory.layers_per_pass)]
    forward = Timed(0.0, 0.0)
    for group in passes:
        per_token = _per_token(shape, settings, unit, last=group[-1])
        forward = Timed(forward.wall + tokens * per_token.wall, forward.cpu + tokens * per_token.cpu)
    profile_bytes = geometry.profile_bytes(tokens)
    work_bytes = geometry.work_bytes(tokens, memory.buffer_bytes)
    io = (rows_bytes + profile_bytes) / machine.disk_write_bytes_per_s
    load = machine.startup_seconds + shape.checkpoint_bytes / machine.load_bytes_per_s
    profile = StagePlan(
        "profile", seconds=load + forward.wall + io, cpu_seconds=load + forward.cpu + io,
        memory_bytes=model_bytes + machine.runtime_bytes + used,
        disk_bytes=profile_bytes + work_bytes,
        notes=[f"{tokens:,} tokens, {len(layers)} MoE layers, {'one pass' if len(passes) == 1 else f'{len(passes)} passes'}",
               f"forward {format_duration(forward.wall)} + start and loading {format_duration(load)} + writing rows {format_duration(io)}",
               f"model {format_size(model_bytes)} ({settings.dtype}) + profiler {format_size(used)} ({budget_note})",
               f"profile {format_size(profile_bytes)}, work folder up to {format_size(work_bytes)} until the end"],
    )

    # partition
    fit_rows = geometry.expected_rows(tokens)[0]
    per_expert, extrapolated = machine.partition_seconds(settings.solver, shape.width, fit_rows)
    n_experts = len(layers) * shape.num_experts
    core_seconds = n_experts * per_expert.wall
    workers = min(settings.workers or cores, cores, n_experts)
    worker_bytes = machine.worker_bytes(shape.width) + 3 * settings.max_rows * shape.width * 4
    partition_bytes = n_experts * (shape.width * 4 + settings.sub_experts * settings.gate_neurons * 4 + 2048)
    partition = StagePlan(
        "partition", seconds=core_seconds / workers, cpu_seconds=n_experts * per_expert.cpu,
        memory_bytes=machine.runtime_bytes + workers * worker_bytes, disk_bytes=partition_bytes,
        notes=[f"{settings.solver}: {per_expert.wall:.1f} s per expert of width {shape.width:,} with {fit_rows:,.0f} fit rows"
               + (" (extrapolated beyond the calibrated widths)" if extrapolated else ""),
               f"{n_experts:,} experts on {workers} worker{'s' if workers > 1 else ''}"],
    )

    # export: read the checkpoint, write it again (same dtype, E*N narrower experts)
    gate_bytes = n_experts * settings.sub_experts * settings.gate_neurons * 8
    shard = min(4 * 2**30, shape.checkpoint_bytes)
    layer_bytes = shape.num_experts * shape.expert_params * shape.checkpoint_bytes_per_param
    # Writing: the pending shard, the same bytes again as pages of the file safetensors writes through a
    # memory map, and one source layer being split. Checking exactness: one block in float32, plus its
    # tensors as stored and their mapped pages while it is built.
    writing = 2 * shard + layer_bytes
    checking = shape.num_experts * shape.expert_params * 4 + 2 * layer_bytes
    export_seconds = machine.startup_seconds + 2 * shape.checkpoint_bytes / machine.export_bytes_per_s
    export = StagePlan(
        "export", seconds=export_seconds, cpu_seconds=export_seconds,
        memory_bytes=machine.runtime_bytes + int(max(writing, checking)),
        disk_bytes=shape.checkpoint_bytes + gate_bytes,
        notes=[f"reads and writes {format_size(shape.checkpoint_bytes)}; in memory one output shard (at most 4 GiB, "
               "twice while it is written) and one MoE layer (in float32 while it is checked)"],
    )
    return Plan(shape=shape, settings=settings, stages=[profile, partition, export], partition_core_seconds=core_seconds,
                cores_for_an_hour=max(1, math.ceil(core_seconds / 3600)), cores_here=cores,
                memory_here=psutil.virtual_memory().total, disk_free_here=disk_free, costs_source=machine.source)


def _per_token(shape: ModelShape, settings: PlanSettings, unit: ProfileUnitCosts, *, last: int) -> Timed:
    """Cost of one token through the decoder layers up to ``last`` (the forward pass stops there).

    Layers outside the pass run the same experts path without recording: counted at the same cost.
    """
    # A dense layer costs what a MoE layer costs outside its experts, scaled by their parameters.
    moe_dense = shape.dense_params[shape.moe_layers[0]]
    layers = sum(shape.dense_params[i] / moe_dense for i in range(last + 1))
    calls = sum(shape.top_k for i in range(last + 1) if i in shape.moe_layers) / unit.tokens_per_call
    return Timed(layers * unit.dense_token.wall + calls * unit.expert_call.wall,
                 layers * unit.dense_token.cpu + calls * unit.expert_call.cpu)


def _disk_free(path: Path) -> int:
    import shutil

    return shutil.disk_usage(path).free


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_count(n: float) -> str:
    """A count in billions, millions or thousands (``12.3 M``), as model cards give parameters."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def machine_summary(machine: dict[str, Any]) -> str:
    return f"{machine.get('processor', '?')}, {machine.get('cores', '?')} cores, {format_size(machine.get('memory_bytes', 0))} RAM"


# ---- calibration (`prism plan calibrate`) ----------------------------------------------------------

#: The checkpoint that calibration loads and exports: OLMoE layout, one MoE layer of 400 MB (hidden 2048,
#: 32 experts of width 1024). Real MoE layers are this size or larger (OLMoE-1B-7B's take 805 MB), and
#: exporting costs more CPU per byte for big layers than for small ones (111 against 125 MB/s here for
#: 100 MB layers): the smaller layer would plan exports too short.
CALIBRATION_CONFIG = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 32, "num_experts_per_tok": 8,
    "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "norm_topk_prob": False,
}


#: Sub-experts each synthetic expert of ``prism plan calibrate`` is cut into.
CALIBRATION_SUB_EXPERTS = 4


def calibration_bytes(width: int, rows: int) -> int:
    """A rough upper bound on one calibration solve's memory: its rows (fit and held out, float32, a few copies)
    and the width x width float64 matrices a solver builds."""
    return 4 * (rows + rows // 4) * width * 4 + 3 * 8 * width * width


def _solve_one(solver: str, width: int, rows: int, heldout_rows: int, sub_experts: int) -> tuple[float, float, int]:
    """Solve one synthetic expert the way a `prism partition` worker does: (wall s, CPU s, peak bytes)."""
    from prism_cli.io import peak_rss_bytes
    from prism_cli.profiling.format import ExpertRows
    from prism_cli.solvers.base import hot_rate
    from prism_cli.solvers.runner import PartitionSettings, solve_expert
    from prism_cli.solvers.synthetic import realistic_rows

    data = realistic_rows(rows + heldout_rows, width, np.random.default_rng(width))
    expert = ExpertRows(layer=0, expert=0, fit_rows=data[:rows], heldout_rows=data[rows:], l1_mass=data[:rows].sum(0),
                        hot_rate=hot_rate(data[:rows]), tokens_routed=rows)
    wall, cpu = time.perf_counter(), time.process_time()
    solve_expert(expert, PartitionSettings(solver=solver, sub_experts=sub_experts))
    return time.perf_counter() - wall, time.process_time() - cpu, peak_rss_bytes()


def _partition_costs(solvers: list[str], widths: list[int], rows: int, on_step: Callable[[str], None]
                     ) -> tuple[dict[str, list[tuple[int, float, float]]], list[tuple[int, int]]]:
    """Each (solver, width) in a fresh single-threaded process, as `prism partition` runs its workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from prism_cli.solvers.runner import _single_threaded_children

    table: dict[str, list[tuple[int, float, float]]] = {s: [] for s in solvers}
    peak: dict[int, int] = {}
    for solver in solvers:
        for width in widths:
            on_step(f"partition: {solver} at width {width}")
            with _single_threaded_children(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                wall, cpu, rss = pool.submit(_solve_one, solver, width, rows, rows // 4, CALIBRATION_SUB_EXPERTS).result()
            table[solver].append((width, wall, cpu))
            peak[width] = max(peak.get(width, 0), rss)
    return table, sorted(peak.items())


def _runtime_cost() -> tuple[int, float]:
    """Resident memory and wall seconds of a fresh process once torch, transformers and the stages are
    imported (the best of three starts: the first may read the libraries from disk)."""
    import subprocess
    import sys

    code = ("import resource, torch, transformers, prism_cli.profiling.profiler, prism_cli.models.loading, "
            "prism_cli.export.builder; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    best, rss = math.inf, 0
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        best = min(best, time.perf_counter() - start)
        rss = int(out.strip().splitlines()[-1]) * 1024
    return rss, best


def _disk_write_rate(folder: Path, nbytes: int = 256 * 2**20) -> float:
    block = np.random.default_rng(0).bytes(4 * 2**20)
    with tempfile.NamedTemporaryFile(dir=folder) as fh:
        start = time.perf_counter()
        for _ in range(nbytes // len(block)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
        return nbytes / (time.perf_counter() - start)


def _export_and_load_rates(folder: Path) -> tuple[float, float]:
    """Load (for profiling) and export a synthetic checkpoint: bytes per second of each."""
    from prism_cli.export.builder import ExportSettings, export_model
    from prism_cli.models.loading import checkpoint_dir, config_fingerprint, load_config, load_model, weights_fingerprint
    from prism_cli.models.synthetic import write_synthetic_olmoe
    from prism_cli.solvers.format import ExpertPartition, Partition, write_partition

    source = write_synthetic_olmoe(folder / "model", CALIBRATION_CONFIG, CALIBRATION_CONFIG["num_hidden_layers"])
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    start = time.perf_counter()
    loaded = load_model(str(source), dtype="bfloat16", bounded_memory=True)
    load_rate = size / (time.perf_counter() - start)
    adapter = loaded.adapter
    del loaded
    # Export time does not depend on which neurons go where: an identity split is enough to time it.
    n, width = 4, adapter.width
    expert = ExpertPartition(permutation=np.arange(width), gate_positions=np.tile(np.arange(4), (n, 1)), fit_cost=0.0,
                             heldout_cost=0.0, fit_retained=np.zeros(n - 1), heldout_retained=np.zeros(n - 1), seconds=0.0)
    meta = {"model": str(source), "model_type": adapter.model_type, "config_hash": config_fingerprint(load_config(str(source))),
            "weights_hash": weights_fingerprint(checkpoint_dir(str(source)), adapter), "data_hash": "-", "tokens": 0,
            "num_experts": adapter.num_experts, "expert_width": width, "hidden_size": adapter.hidden_size,
            "top_k": adapter.top_k, "solver": "identity", "solver_settings": {}, "sub_experts": n, "keep": 1,
            "gate_neurons": 4, "gate_selection": "mass", "seed": 0, "profile": "-", "profile_hash": "-"}
    partition = Partition(meta=meta, experts={i: [expert] * adapter.num_experts for i in range(CALIBRATION_CONFIG["num_hidden_layers"])})
    write_partition(folder / "partition.h5", partition)
    start = time.process_time()  # CPU time: the export is single-threaded here, and steadier than wall time
    export_model(str(source), folder / "partition.h5", folder / "export", ExportSettings())
    seconds = time.process_time() - start
    written = sum(f.stat().st_size for f in (folder / "export").rglob("*") if f.is_file())
    return (size + written) / seconds, load_rate


def calibrate(*, solvers: list[str], widths: list[int], rows: int = 4096, work: Path | None = None,
              on_step: Callable[[str], None] | None = None) -> MachineCosts:
    """Measure the per-unit costs that take minutes (partition by solver and width, export, loading, disk)."""
    step = on_step or (lambda _: None)
    step("runtime memory")
    runtime, startup = _runtime_cost()
    table, worker = _partition_costs(solvers, sorted(widths), rows, step)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        step("disk writes")
        disk = _disk_write_rate(Path(tmp))
        step("loading and export")
        export_rate, load_rate = _export_and_load_rates(Path(tmp))
    return MachineCosts(machine=machine_info(), partition=table, partition_rows=rows, partition_worker_bytes=worker,
                        export_bytes_per_s=export_rate, load_bytes_per_s=load_rate, disk_write_bytes_per_s=disk,
                        runtime_bytes=runtime, startup_seconds=startup)
