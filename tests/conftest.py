"""Shared fixtures and helpers: offline mode, tiny models of every family, an in-process CLI runner, tiny
exports from random partitions, a synthetic serving cost model. Test modules import helpers from here,
never from each other."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run under the executor's default bounds, not whatever `make bench-executors` measured on this machine.
os.environ["PRISM_EXECUTOR_BOUNDS"] = str(Path(tempfile.mkdtemp(prefix="prism-tests-")) / "executor_bounds.json")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, build_tiny, tiny_tokenizer

from prism_cli.export.builder import ExportSettings, export_model
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint import CheckpointReader
from prism_cli.models.loading import checkpoint_dir, config_fingerprint, load_config, weights_fingerprint
from prism_cli.serving.costmodel import CostModel, PointCost
from prism_cli.solvers.format import ExpertPartition, Partition, write_partition


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` -> folder of a tiny random model of that family (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """A neurons-gate export of the tiny OLMoE model (random partition): the serving tests' model."""
    return random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("serving"), seed=3)


@pytest.fixture(scope="session")
def served(tiny_export):
    """``tiny_export`` loaded for serving (``prism_cli.serving.executor.ServedModel``)."""
    from prism_cli.serving.executor import load_served_model

    return load_served_model(str(tiny_export))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err[-500:]!r})"

    def assert_one_line_error(self, *needles: str) -> str:
        """Non-zero exit, exactly one non-empty line on stderr (no traceback, not an internal error)
        that mentions every needle; returns that line."""
        assert self.code != 0, self
        assert "Traceback" not in self.err and "internal error" not in self.err, self.err
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert len(lines) == 1, self.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``prism ARGS`` in-process through the real entry point; returns exit code, stdout, stderr."""
    from prism_cli.app import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["prism", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main()
        captured = capsys.readouterr()
        code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
        return CliResult(code, captured.out, captured.err)

    return run


# The tests run tiny models: intra-op threads only contend with each other (and with any other job
# on the machine), which makes a 20 ms forward take seconds. One thread for the whole session.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


N_SUB = 4
TOP_K = 2  # every tiny model routes to 2 of 8 experts
FULL = N_SUB * TOP_K


# ---------------------------------------------------------------------------------------------
# Helpers shared by the test modules: tiny exports from random partitions, logits, one-line failures.


def moe_layers_on_disk(model_dir: Path) -> list[int]:
    """The MoE layers of a checkpoint, from its tensor names (what export compares the partition with)."""
    adapter = adapter_for_config(load_config(str(model_dir)))
    patterns = adapter.key_patterns()
    reader = CheckpointReader(checkpoint_dir(str(model_dir)))
    return sorted({int(m["layer"]) for key in reader.keys() if (m := patterns.experts.match(key))})


def random_partition(
    model_dir: Path, *, n_sub: int = N_SUB, seed: int = 0, gate_neurons: int = 2, layers: list[int] | None = None
) -> Partition:
    """A valid partition of ``model_dir`` with a random permutation per expert and random gate neurons,
    carrying the metadata export checks (config and weights fingerprints, shapes)."""
    config = load_config(str(model_dir))
    adapter = adapter_for_config(config)
    experts, width = adapter.num_experts, adapter.width
    size = width // n_sub
    rng = np.random.default_rng(seed)
    layers = moe_layers_on_disk(model_dir) if layers is None else layers
    parts: dict[int, list[ExpertPartition]] = {}
    for layer in layers:
        parts[layer] = []
        for _ in range(experts):
            perm = rng.permutation(width)
            # sub-expert slices are stored ascending (the file format's convention)
            perm = np.concatenate([np.sort(perm[n * size : (n + 1) * size]) for n in range(n_sub)])
            gates = np.stack([rng.choice(size, gate_neurons, replace=False) for _ in range(n_sub)])
            parts[layer].append(ExpertPartition(
                permutation=perm.astype(np.int32), gate_positions=gates.astype(np.int32), fit_cost=0.0,
                heldout_cost=0.0, fit_retained=np.zeros(n_sub - 1), heldout_retained=np.zeros(n_sub - 1), seconds=0.0,
            ))
    meta: dict[str, Any] = {
        "model": str(model_dir),
        "model_type": adapter.model_type,
        "num_experts": experts,
        "expert_width": width,
        "hidden_size": adapter.hidden_size,
        "top_k": adapter.top_k,
        "sub_experts": n_sub,
        "keep": n_sub - 1,
        "gate_neurons": gate_neurons,
        "seed": seed,
        "solver": "random-test",
        "solver_settings": {},
        "data_hash": "none",
        "tokens": 0,
        "profile": "none",
        "profile_hash": "none",
        "config_hash": config_fingerprint(config),
        "weights_hash": weights_fingerprint(checkpoint_dir(str(model_dir)), adapter),
    }
    return Partition(meta=meta, experts=parts)


def write_random_partition(model_dir: Path, path: Path, **kwargs: Any) -> Path:
    write_partition(path, random_partition(model_dir, **kwargs))
    return path


def random_neurons_export(model_dir: Path, root: Path, seed: int) -> Path:
    """A neurons-gate export of ``model_dir`` from a random partition, in ``root / "export"``."""
    part = write_random_partition(model_dir, root / "p.h5", seed=seed)
    export_model(str(model_dir), part, root / "export", ExportSettings(gate="neurons"))
    return root / "export"


def token_batch(seed: int = 0, batch: int = 3, length: int = 24) -> torch.Tensor:
    """A few token windows over the tiny tokenizer's whole vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tiny_tokenizer()), (batch, length), generator=gen)


@torch.inference_mode()
def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def original_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return logits_of(model, ids)


def assert_one_line_failure(result: Any, *needles: str) -> str:
    """A non-zero exit with exactly one line on stderr, no traceback; returns that line."""
    return result.assert_one_line_error(*needles)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def synthetic_cost_model(fixed: float = 10.0, per_row_per_k: float = 1.0) -> CostModel:
    """Decode ``C(b, K) = fixed + b * K * per_row_per_k`` ms (K = active sub-experts), prefill 0.01 ms a token x K."""
    points = {}
    for name, kind, k in [*[(f"linear:{k}", "elastic", k) for k in range(1, 9)], *[(f"topk:{k}", "elastic", k) for k in range(1, 9)],
                          ("original:1", "original", 4), ("original:2", "original", 8)]:
        points[name] = PointCost(name, kind, 100.0 / k, {b: fixed + b * k * per_row_per_k for b in (1, 8, 32)},
                                 {t: 0.01 * t * k for t in (64, 512)})
    return CostModel(points, 128, 64, "test machine")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the groups: the (a, b) label pairs form a bijection."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def h5_contents(path: Path, skip_suffixes: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """Root attributes (less the ``created`` timestamp) and every dataset of a prism HDF5 file, less the
    datasets whose name ends with one of ``skip_suffixes`` (timings)."""
    import h5py

    from prism_cli.io import h5_attr

    data: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        attrs = {k: h5_attr(v) for k, v in h5.attrs.items() if k != "created"}
        h5.visititems(lambda name, obj: data.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) and not name.endswith(skip_suffixes) else None)
    return attrs, data

