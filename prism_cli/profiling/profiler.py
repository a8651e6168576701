"""``prism profile``: run calibration text through an MoE model and record its experts' activations."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch

from prism_cli import __version__
from prism_cli.data import text_hash
from prism_cli.errors import PrismError
from prism_cli.evaluation.perplexity import token_windows
from prism_cli.io import atomic_path
from prism_cli.models.adapters import MoELayer
from prism_cli.models.loading import LoadedModel, checkpoint_dir, config_fingerprint, load_config, model_label, weights_fingerprint
from prism_cli.profiling.format import FORMAT, FORMAT_VERSION
from prism_cli.profiling.recorder import PROFILE_IMPLEMENTATION, ActivationRecorder

ROW_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ProfileSettings:
    """What to profile and how much to keep."""

    tokens: int = 131_072
    seq_len: int = 256
    batch_size: int = 8
    max_rows: int = 5_120
    holdout_fraction: float = 0.2
    seed: int = 0
    layers: list[int] | None = None
    row_dtype: str = "float16"

    def validate(self) -> None:
        if self.tokens <= 0:
            raise PrismError(f"--tokens must be positive, got {self.tokens}")
        if self.seq_len < 2 or self.seq_len > 1_048_576:
            raise PrismError(f"--seq-len must be between 2 and 1048576, got {self.seq_len}")
        if self.batch_size <= 0 or self.batch_size > 65_536:
            raise PrismError(f"--batch-size must be between 1 and 65536, got {self.batch_size}")
        if self.max_rows < 2 or self.max_rows > 10_000_000:
            raise PrismError(f"--max-rows must be between 2 and 10000000, got {self.max_rows}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise PrismError(f"--holdout must be strictly between 0 and 1, got {self.holdout_fraction}")
        if self.row_dtype not in ROW_DTYPES:
            raise PrismError(f"--row-dtype must be one of {', '.join(ROW_DTYPES)}, got {self.row_dtype!r}")


@dataclass
class ProfileSummary:
    """What a profiling run did, for the summary table."""

    tokens: int
    seconds: float
    layers: list[int]
    routed: dict[int, list[int]] = field(default_factory=dict)
    fit_rows: dict[int, list[int]] = field(default_factory=dict)
    heldout_rows: dict[int, list[int]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def select_layers(all_layers: list[MoELayer], wanted: list[int] | None) -> list[MoELayer]:
    if not wanted:
        return all_layers
    known = {layer.index: layer for layer in all_layers}
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise PrismError(f"--layers {missing} are not MoE layers of this model (MoE layers: {sorted(known)})")
    return [known[i] for i in sorted(set(wanted))]


def holdout_mask(n_windows: int, fraction: float, seed: int) -> np.ndarray:
    """Which calibration sequences feed the held-out reservoirs: a seeded share, at least one of each kind."""
    if n_windows < 2:
        raise PrismError(
            f"the calibration data gives only {n_windows} sequence(s); profiling needs at least 2 "
            "(one to fit partitions, one held out): give more text or a shorter --seq-len"
        )
    rng = np.random.default_rng([seed, 0x70726F66])
    mask = rng.random(n_windows) < fraction
    if mask.all() or not mask.any():
        mask[:] = False
        mask[rng.integers(n_windows)] = True
    return mask


@contextlib.contextmanager
def recording(model: torch.nn.Module, layers: list[MoELayer], recorder: ActivationRecorder) -> Iterator[None]:
    """Route the model's experts through the recording implementation for the duration of the block."""
    previous = model.config._experts_implementation
    model.set_experts_implementation(PROFILE_IMPLEMENTATION)
    for layer in layers:
        layer.experts._prism_recorder = recorder
        layer.experts._prism_layer = layer.index
    try:
        yield
    finally:
        for layer in layers:
            del layer.experts._prism_recorder, layer.experts._prism_layer
        model.set_experts_implementation(previous)


def profile_model(
    loaded: LoadedModel,
    text: str,
    data_name: str,
    settings: ProfileSettings,
    out_path,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ProfileSummary:
    """Profile ``loaded`` on ``text`` and write the profile to ``out_path`` (atomically).

    ``on_start(total_tokens)`` is called once every check has passed (data tokenized, checkpoint
    fingerprinted), just before the first batch; ``on_batch(tokens)`` after each batch.
    """
    settings.validate()
    adapter = loaded.adapter
    assert adapter is not None
    layers = select_layers(adapter.moe_layers(loaded.model), settings.layers)
    try:
        windows = token_windows(loaded.tokenizer, text, settings.seq_len, settings.tokens)
    except ValueError as exc:
        raise PrismError(str(exc)) from None
    held_windows = holdout_mask(windows.shape[0], settings.holdout_fraction, settings.seed)
    device = loaded.device
    recorder = ActivationRecorder(
        [layer.index for layer in layers],
        adapter.num_experts,
        adapter.width,
        max_rows=settings.max_rows,
        holdout_fraction=settings.holdout_fraction,
        row_dtype=ROW_DTYPES[settings.row_dtype],
        seed=settings.seed,
        device=device,
    )
    total = windows.numel()
    # Everything that can refuse this run (fingerprints read from the checkpoint files included) is
    # done before the first batch, so a refusal never comes after a long profiling run.
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prism_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_label(loaded.name),
        "model_type": adapter.model_type,
        "config_hash": config_fingerprint(load_config(loaded.name)),
        "weights_hash": weights_fingerprint(checkpoint_dir(loaded.name), adapter),
        "data": data_name,
        "data_hash": text_hash(text),
        "tokens": total,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "max_rows": settings.max_rows,
        "holdout_fraction": settings.holdout_fraction,
        "row_dtype": settings.row_dtype,
        "num_experts": adapter.num_experts,
        "expert_width": adapter.width,
        "hidden_size": adapter.hidden_size,
        "top_k": adapter.top_k,
        "layers": [layer.index for layer in layers],
    }
    if on_start is not None:
        on_start(total)
    start = time.perf_counter()
    with atomic_path(out_path) as tmp, recording(loaded.model, layers, recorder), torch.inference_mode():
        for first in range(0, windows.shape[0], settings.batch_size):
            batch = windows[first : first + settings.batch_size]
            held = torch.from_numpy(np.repeat(held_windows[first : first + batch.shape[0]], settings.seq_len))
            recorder.begin_batch(first * settings.seq_len, held.to(device))
            loaded.model(input_ids=batch.to(device), use_cache=False)
            if on_batch is not None:
                on_batch(batch.numel())
        seconds = time.perf_counter() - start
        write_profile(tmp, recorder, meta)
    summary = ProfileSummary(tokens=total, seconds=seconds, layers=[layer.index for layer in layers])
    for layer in summary.layers:
        summary.routed[layer] = recorder.routed[layer].tolist()
        summary.fit_rows[layer] = [recorder.fit[layer, e].rows.shape[0] for e in range(adapter.num_experts)]
        summary.heldout_rows[layer] = [recorder.heldout[layer, e].rows.shape[0] for e in range(adapter.num_experts)]
    return summary


def write_profile(path, recorder: ActivationRecorder, meta: dict) -> None:
    """Write the layout documented in ``prism_cli.profiling.format``."""
    with h5py.File(path, "w") as h5:
        for key, value in meta.items():
            h5.attrs[key] = value
        for layer in recorder.layers:
            group = h5.create_group(f"layers/{layer}")
            group["tokens_routed"] = recorder.routed[layer].cpu().numpy()
            group["router_weight_sum"] = recorder.weight_sum[layer].cpu().numpy()
            group["l1_mass"] = recorder.l1_mass[layer].cpu().numpy()
            group["hot_count"] = recorder.hot_count[layer].cpu().numpy()
            for e in range(recorder.num_experts):
                eg = group.create_group(f"experts/{e}")
                for prefix, res in (("fit", recorder.fit[layer, e]), ("heldout", recorder.heldout[layer, e])):
                    eg[f"{prefix}_rows"] = res.rows.numpy()
                    eg[f"{prefix}_token"] = res.tokens.numpy()
                    eg[f"{prefix}_weight"] = res.weights.numpy()
