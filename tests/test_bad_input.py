"""Bad input to every command: the expected exit code, one line on stderr naming the problem, and
nothing written or deleted.

Each case is a command line built from a small world of inputs (a tiny OLMoE checkpoint, its profile,
a partition, a neurons-gate export), the exit code, phrases of the message, and the guarantee that the
tree under the output's parent (every input lives there too) is the same after the run as before:
no new file or folder, none deleted, none modified. The inputs are copied into each case's own folder,
so a case that destroyed one could not hide it from the next. Where a case names a ``never``
function (the solver, the profiler, the bench sweep), that function must not even start: the refusal
comes before the work. New commands add their cases to ``CASES``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import random_neurons_export, random_partition, synthetic_cost_model, write_random_partition
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from prism_cli.data import load_text
from prism_cli.models.loading import load_model
from prism_cli.profiling.profiler import ProfileSettings, profile_model
from prism_cli.solvers.format import write_partition

ROOT = Path(__file__).resolve().parent.parent
PROFILE_SETTINGS = ["--tokens", "2048", "--seq-len", "32", "--max-rows", "256", "--row-dtype", "float32"]
WIDTH = 32  # the tiny OLMoE's expert width (8 experts, top-2, 2 MoE layers, 128 positions)


# ---------------------------------------------------------------------------------------------
# The inputs: built once per module, copied into every case's folder on first use.


@dataclass
class Sources:
    model: Path
    profile: Path
    partition: Path
    export: Path
    dense: Path


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> Sources:
    model = tiny_model_dir("olmoe")
    root = tmp_path_factory.mktemp("bad-input-sources")
    loaded = load_model(str(model))
    text, name = load_text(None, "calibration")
    profile_model(loaded, text, name, ProfileSettings(tokens=2048, seq_len=32, max_rows=256, row_dtype="float32"),
                  root / "profile.h5")
    partition = write_random_partition(model, root / "partition.h5", seed=0)
    (root / "exported").mkdir()
    export = random_neurons_export(model, root / "exported", seed=1)
    dense = root / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=32, vocab_size=128, max_position_embeddings=64)).save_pretrained(dense)
    return Sources(model, root / "profile.h5", partition, export, dense)


class World:
    """One case's folder and its inputs (copied on first use); ``root`` is the output's parent."""

    def __init__(self, root: Path, sources: Sources, tiny_model_dir: Callable[[str], Path]) -> None:
        self.root = root
        self.sources = sources
        self.tiny_model_dir = tiny_model_dir

    def _copy(self, source: Path, name: str) -> Path:
        target = self.root / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        return target

    @cached_property
    def model(self) -> Path:
        return self._copy(self.sources.model, "model")

    @cached_property
    def profile(self) -> Path:
        return self._copy(self.sources.profile, "profile.h5")

    @cached_property
    def partition(self) -> Path:
        return self._copy(self.sources.partition, "partition.h5")

    @cached_property
    def export(self) -> Path:
        return self._copy(self.sources.export, "export")

    @property
    def out(self) -> Path:
        """A new output folder inside the world."""
        return self.root / "out"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def folder(self, name: str) -> Path:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return self.root / name

    # ---- variants of the inputs ---------------------------------------------------------------
    def model_with(self, change: str) -> Path:
        """A copy of the model with one change to its weights (the config untouched)."""
        target = self._copy(self.sources.model, f"model-{change}")
        tensors = load_file(str(target / "model.safetensors"))
        if change == "truncated":
            data = (target / "model.safetensors").read_bytes()
            (target / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
            return target
        if change == "no-tokenizer":  # transformers then makes an empty tokenizer without a word
            for path in target.glob("tokenizer*"):
                path.unlink()
            return target
        if change == "no-tokenizer-json":  # tokenizer_config.json left: transformers cannot build the tokenizer
            (target / "tokenizer.json").unlink()
            return target
        for key in tensors:
            if change == "router-1" and key == "model.layers.1.mlp.gate.weight":
                tensors[key] = tensors[key].clone()
                tensors[key][3, 5] += 0.5  # one number of layer 1's router
            elif change == "experts" and ".mlp.experts." in key:
                tensors[key] = tensors[key] * 1.01  # a light fine-tune of the experts only
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        return target

    def export_with(self, **fields: Any) -> Path:
        """A copy of the export with config.json fields set (``prism__sub_experts=3`` for prism.sub_experts)."""
        target = self._copy(self.sources.export, "edited-export")
        config = json.loads((target / "config.json").read_text())
        for dotted, value in fields.items():
            *parents, last = dotted.split("__")
            node = config
            for part in parents:
                node = node[part]
            node[last] = value
        (target / "config.json").write_text(json.dumps(config))
        return target

    def export_with_nan_weight(self) -> Path:
        """A copy of the export whose final norm is NaN (every logit NaN; the config untouched)."""
        target = self._copy(self.sources.export, "nan-export")
        for shard in target.glob("*.safetensors"):
            tensors = load_file(str(shard))
            if "model.norm.weight" in tensors:
                tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
                save_file(tensors, str(shard), metadata={"format": "pt"})
        return target

    def export_with_config_text(self, text: str) -> Path:
        """A copy of the export whose config.json holds ``text``."""
        target = self._copy(self.sources.export, "export-config-text")
        (target / "config.json").write_text(text)
        return target

    def profile_with_version(self, version: int) -> Path:
        target = self._copy(self.sources.profile, f"profile-v{version}.h5")
        with h5py.File(target, "r+") as h5:
            h5.attrs["format_version"] = version
        return target

    def partition_with_version(self, version: int) -> Path:
        target = self._copy(self.sources.partition, f"partition-v{version}.h5")
        with h5py.File(target, "r+") as h5:
            h5.attrs["format_version"] = version
        return target

    def profile_without_rows(self) -> Path:
        """The profile with no rows for layer 1 experts 3 (fit) and 5 (held-out)."""
        target = self._copy(self.sources.profile, "holes.h5")
        with h5py.File(target, "r+") as h5:
            for expert, kind in ((3, "fit"), (5, "heldout")):
                group = h5[f"layers/1/experts/{expert}"]
                for name, shape in ((f"{kind}_rows", (0, WIDTH)), (f"{kind}_token", (0,)), (f"{kind}_weight", (0,))):
                    dtype = group[name].dtype
                    del group[name]
                    group.create_dataset(name, shape=shape, dtype=dtype)
        return target

    def partition_of(self, model: Path, name: str, **kwargs: Any) -> Path:
        return write_random_partition(model, self.root / name, **kwargs)

    def partition_with_n3(self) -> Path:
        partition = random_partition(self.sources.model, n_sub=4)
        partition.meta["sub_experts"] = 3  # 32 neurons cannot split into 3 equal sub-experts
        for experts in partition.experts.values():
            for expert in experts:
                expert.gate_positions = expert.gate_positions[:3]
        write_partition(self.root / "n3.h5", partition)
        return self.root / "n3.h5"

    def broken_partition(self, kind: str) -> Path:
        path = self.root / f"{kind}.h5"
        if kind == "garbage":
            path.write_bytes(b"\x89HDF\r\n" + bytes(range(256)) * 8)
        elif kind == "truncated":
            path.write_bytes(self.sources.partition.read_bytes()[:3000])
        elif kind == "not-a-permutation":
            path.write_bytes(self.sources.partition.read_bytes())
            with h5py.File(path, "r+") as h5:
                data = h5["layers/0/permutation"][()]
                data[0, 0] = data[0, 1]
                h5["layers/0/permutation"][...] = data
        elif kind == "short-retained":
            path.write_bytes(self.sources.partition.read_bytes())
            with h5py.File(path, "r+") as h5:
                data = h5["layers/0/fit_retained"][()]
                del h5["layers/0/fit_retained"]
                h5["layers/0/fit_retained"] = data[:, :-1]
        elif kind == "no-permutation":
            path.write_bytes(self.sources.partition.read_bytes())
            with h5py.File(path, "r+") as h5:
                del h5["layers/1/permutation"]
        elif kind in ("permutation-group", "permutation-text"):
            path.write_bytes(self.sources.partition.read_bytes())
            with h5py.File(path, "r+") as h5:
                del h5["layers/1/permutation"]
                if kind == "permutation-group":
                    h5.create_group("layers/1/permutation")
                else:
                    h5["layers/1/permutation"] = "0 1 2 3"
        return path

    def edited_profile(self, kind: str) -> Path:
        """The profile damaged in one way: rows of the wrong width, a NaN row, an expert width it does not hold."""
        target = self._copy(self.sources.profile, f"profile-{kind}.h5")
        with h5py.File(target, "r+") as h5:
            rows = h5["layers/1/experts/2/fit_rows"]
            if kind == "narrow-rows":
                data = rows[()][:, : WIDTH - 4]
                del h5["layers/1/experts/2/fit_rows"]
                h5["layers/1/experts/2/fit_rows"] = data
            elif kind == "nan-row":
                data = rows[()]
                data[0, 0] = np.nan
                rows[...] = data
            elif kind == "width-attr":
                h5.attrs["expert_width"] = WIDTH // 2
            elif kind == "experts-attr":
                h5.attrs["num_experts"] = int(h5.attrs["num_experts"]) // 2
        return target

    def edited_partition(self, **attrs: Any) -> Path:
        """The partition with root attributes overwritten."""
        target = self._copy(self.sources.partition, "edited-partition.h5")
        with h5py.File(target, "r+") as h5:
            for key, value in attrs.items():
                h5.attrs[key] = value
        return target

    def foreign_hdf5(self) -> Path:
        path = self.root / "foreign.h5"
        with h5py.File(path, "w") as h5:
            h5["data"] = np.arange(10)
            h5.attrs["creator"] = "someone else"
        return path

    def incomplete_profile(self) -> Path:
        target = self._copy(self.sources.profile, "incomplete.h5")
        with h5py.File(target, "r+") as h5:
            del h5.attrs["weights_hash"]
        return target

    def short_text(self, repeats: int) -> Path:
        """``repeats`` copies of a phrase of about 22 tokens of the tiny tokenizer."""
        return self.write(f"short-{repeats}.txt", " ".join(["It is a truth universally acknowledged"] * repeats) + "\n")

    def unwritable(self) -> Path:
        """A folder nothing can be written in: a read-only folder, or (as root, whom modes do not stop)
        a pseudo file system; the case is skipped where neither refuses writes."""
        folder = self.folder("read-only")
        folder.chmod(0o555)
        for candidate in (folder, Path("/sys")):
            try:
                fd, name = tempfile.mkstemp(dir=candidate)
            except OSError:
                return candidate
            os.close(fd)
            os.unlink(name)
        pytest.skip("no unwritable folder on this machine")


# ---------------------------------------------------------------------------------------------
# The cases.


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World], list[Any]]
    phrases: tuple[str, ...]
    code: int = 2
    #: A function (module, attribute) that must not run: the refusal comes before the work.
    never: tuple[str, str] | None = None
    #: Run from this folder of the world (``--out .``).
    cwd: str | None = None
    marks: tuple[Any, ...] = field(default_factory=tuple)
    #: Phrases the message must not hold (advice to use an option the command does not have).
    absent: tuple[str, ...] = ()


NEVER_PROFILE = ("prism_cli.profiling.profiler", "profile_model")
NEVER_SOLVE = ("prism_cli.solvers.runner", "_run_local")
NEVER_BENCH = ("prism_cli.evaluation.bench", "run_bench")
NEVER_TABLES = ("prism_cli.pipeline.tables", "regenerate")


def export_args(w: World, *extra: Any, model: Path | None = None, partition: Path | None = None) -> list[Any]:
    return ["export", model or w.model, partition or w.partition, "--out", w.out, *extra]


def profile_args(w: World, *extra: Any, model: Any = None, out: Path | None = None) -> list[Any]:
    return ["profile", model or w.model, *PROFILE_SETTINGS, *extra, "--out", out or w.root / "profile-out.h5"]


def partition_args(w: World, *extra: Any, profile: Path | None = None, out: Path | None = None) -> list[Any]:
    return ["partition", profile or w.profile, "--solver", "alternating", "--workers", "1", *extra,
            "--out", out or w.root / "partition-out.h5"]


def bench_args(w: World, *extra: Any, model: Any = None, out: Path | None = None) -> list[Any]:
    return ["bench", model or w.export, *extra, "--out", out or w.out]


def config(w: World, text: str) -> Path:
    return w.write("run.yaml", text)


def cost_model(w: World, name: str = "cm.json", point: str = "linear:2", batch: int = 1, ms: float | None = None) -> Path:
    """The synthetic cost model in the world, with ``point``'s decode time at ``batch`` set to ``ms``."""
    model = synthetic_cost_model()
    if ms is not None:
        model.points[point].decode_ms[batch] = ms
    model.save(w.root / name)
    return w.root / name


def schedule_args(w: World, *extra: Any, model: Path | None = None) -> list[Any]:
    lengths = [] if "--trace" in extra else ["--max-output", "8", "--max-prompt", "32"]  # a trace gives its own
    return ["schedule", w.export, "--sim", "--cost-model", model or cost_model(w), *lengths, *extra, "--out", w.out]


def sweep_args(w: World, *extra: Any) -> list[Any]:
    return ["schedule", "sweep", w.export, "--sim", "--cost-model", cost_model(w), "--max-output", "8", "--max-prompt", "32",
            "--floors", "linear:2=0.5,linear:8=0.5", *extra, "--out", w.out]


def trace(w: World, arrival: str) -> Path:
    return w.write("trace.jsonl", f'{{"arrival": 0, "prompt": "a b", "max_tokens": 4}}\n'
                                  f'{{"arrival": {arrival}, "prompt": "a b", "max_tokens": 4}}\n')


NEVER_OFFLOAD = ("prism_cli.offload.bench", "run_offload_bench")
NEVER_REPLAY = ("prism_cli.offload.replay", "replay")
NEVER_LIVE = ("prism_cli.runtime.elastic", "load_elastic_model")


def offload_args(w: World, *extra: Any, budgets: str = "50%", points: str = "topk:2") -> list[Any]:
    return ["offload-bench", w.export, "--device-memory", budgets, "--points", points, "--tokens", "2", "--warmup", "0",
            "--context", "4", "--quality-tokens", "16", "--out", w.out, *extra]


def offload_trace(w: World, change: str) -> Path:
    """A hand-made routing trace (2 layers, 64 tokens, top-2 of 8 experts, N = 4) with one defect."""
    from prism_cli.offload.trace import TRACE_FORMAT_VERSION, RoutingTrace

    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(64)]) for _ in range(2)]).astype(np.int32)
    weights = rng.random((2, 64, 2), dtype=np.float32)
    scores = rng.random((2, 64, 2, 4), dtype=np.float32)
    if change == "expert-9999":
        experts[1, 5, 0] = 9999
    elif change == "expert-negative":
        experts[0, 3, 1] = -3
    elif change == "nan-weight":
        weights[0, 7, 0] = np.nan
    meta = {"format_version": TRACE_FORMAT_VERSION, "source": "hand-made", "sub_experts": 4, "num_experts": 8,
            "top_k": 2, "tokens": 64, "seq_len": 64, "text": ""}
    path = w.root / f"trace-{change}.npz"
    RoutingTrace(experts, weights, scores, experts[1:].copy(), weights[1:].copy(), scores[1:].copy(), meta).save(path)
    if change == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


CASES = [
    # --- export: inputs are never outputs (issue 13.1) ---------------------------------------------
    Case("export-out-is-the-source", lambda w: ["export", w.model, w.partition, "--out", w.model, "--force"],
         ("--out", "is the source model", "choose another --out")),
    Case("export-out-holds-the-partition",
         lambda w: ["export", w.model, w.write("held/p.h5", w.sources.partition.read_bytes()), "--out", w.root / "held", "--force"],
         ("holds the partition", "choose another --out")),
    Case("export-out-inside-the-source", lambda w: ["export", w.model, w.partition, "--out", w.model / "export"],
         ("lies inside the source model",)),
    Case("export-out-is-the-config",
         lambda w: ["export", w.model, w.partition, "--config", config(w, "export:\n  gate: linear\n"), "--out", w.root / "run.yaml",
                    "--force"], ("is the config file",)),
    Case("export-out-dot-holding-inputs", lambda w: ["export", w.model, w.partition, "--out", ".", "--force"],
         ("--out .", "holds the source model"), cwd="."),
    Case("export-out-dot-empty-folder", lambda w: (w.folder("here"), ["export", w.model, w.partition, "--out", ".", "--force"])[1],
         ("is or holds the current folder", "new folder"), cwd="here"),
    Case("export-out-is-a-file-even-with-force",
         lambda w: ["export", w.model, w.partition, "--out", w.write("notes.txt", "mine"), "--force"],
         ("output", "notes.txt is a file, not a folder")),
    Case("select-routers-candidate-is-a-file", lambda w: ["select-routers", w.export, w.write("notes.txt", "mine"), "--out", w.out],
         ("notes.txt' is a file", "export folder")),
    Case("export-out-read-only", lambda w: ["export", w.model, w.partition, "--out", w.unwritable() / "export"], ("not writable",)),
    Case("export-existing-output-needs-force", lambda w: (w.write("out/keep.txt", "mine"), export_args(w))[1],
         ("already exists", "--force")),
    # --- export: a partition of another checkpoint (issue 13.2) -------------------------------------
    Case("export-layer-1-router-changed", lambda w: export_args(w, model=w.model_with("router-1")),
         ("another model", "weights_hash")),
    Case("export-expert-weights-changed", lambda w: export_args(w, model=w.model_with("experts")),
         ("another model", "weights_hash")),
    Case("export-another-seed", lambda w: export_args(w, model=build_tiny("olmoe", w.root / "seed1", seed=1)),
         ("another model", "weights_hash")),
    Case("export-another-family", lambda w: export_args(w, model=w.tiny_model_dir("qwen3_moe")),
         ("another model", "model_type")),
    Case("export-another-expert-width",
         lambda w: export_args(w, partition=w.partition_of(build_tiny("olmoe", w.root / "wide", intermediate_size=64), "wide.h5")),
         ("expert_width",)),
    Case("export-old-partition-format", lambda w: export_args(w, partition=w.partition_with_version(1)),
         ("partition format version 1", "prism profile and prism partition")),
    Case("export-n-does-not-divide-the-width", lambda w: export_args(w, partition=w.partition_with_n3()),
         ("sub_experts 3 does not divide expert_width 32",)),
    Case("export-partition-misses-a-layer", lambda w: export_args(w, partition=w.partition_of(w.model, "l0.h5", layers=[0])),
         ("layers [0]", "[0, 1]")),
    Case("export-garbage-partition", lambda w: export_args(w, partition=w.broken_partition("garbage")), ("not a readable HDF5",)),
    Case("export-truncated-partition", lambda w: export_args(w, partition=w.broken_partition("truncated")), ()),
    Case("export-partition-not-a-permutation", lambda w: export_args(w, partition=w.broken_partition("not-a-permutation")),
         ("corrupt",)),
    Case("export-partition-without-a-permutation", lambda w: export_args(w, partition=w.broken_partition("no-permutation")),
         ("is corrupt", "dataset layers/1/permutation is missing")),  # was h5py's "Unable to synchronously open object"
    Case("merge-partition-permutation-is-a-group",
         lambda w: ["partition", "merge", w.broken_partition("permutation-group"), w.partition, "--out", w.root / "merged.h5"],
         ("is corrupt", "layers/1/permutation is not an array of numbers")),  # was an internal error (TypeError)
    Case("merge-partition-permutation-is-text",
         lambda w: ["partition", "merge", w.broken_partition("permutation-text"), w.partition, "--out", w.root / "merged.h5"],
         ("is corrupt", "layers/1/permutation is not an array of numbers")),  # was an internal error (AttributeError)
    Case("export-partition-short-retained", lambda w: export_args(w, partition=w.broken_partition("short-retained")),
         ("is corrupt", "layer 0 fit_retained has shape (8, 2), not (8, 3)")),  # was exported
    Case("export-partition-sub-experts-edited", lambda w: export_args(w, partition=w.edited_partition(sub_experts=2)),
         ("is corrupt", "gate positions have shape (8, 4, ", "not (8, 2, gate neurons)")),
    Case("export-partition-sub-experts-not-a-number", lambda w: export_args(w, partition=w.edited_partition(sub_experts="four")),
         ("is corrupt", "sub_experts", "'four'")),
    Case("export-partition-lists-a-missing-layer", lambda w: export_args(w, partition=w.edited_partition(layers=[0, 1, 5])),
         ("is incomplete", "layers [5]")),
    Case("export-missing-partition", lambda w: export_args(w, partition=w.root / "missing.h5"), ("does not exist",)),
    # --- export: options ---------------------------------------------------------------------------
    Case("export-max-shard-gb-0", lambda w: export_args(w, "--max-shard-gb", "0"), ("--max-shard-gb must be positive",)),
    Case("export-max-shard-gb-nan", lambda w: export_args(w, "--max-shard-gb", "nan"), ("--max-shard-gb must be positive",)),
    Case("export-unknown-gate", lambda w: export_args(w, "--gate", "magic"), ("unknown gate",)),
    Case("export-truncated-weights", lambda w: export_args(w, model=w.model_with("truncated")), ("truncated", "download")),
    Case("export-deepseek-v3-linear-without-allow-inexact",
         lambda w: export_args(w, "--gate", "linear", model=w.tiny_model_dir("deepseek_v3"),
                               partition=w.partition_of(w.tiny_model_dir("deepseek_v3"), "v3.h5")), ("--allow-inexact",)),
    *[Case(f"export-operating-point-{gate}-{point}", lambda w, g=gate, p=point: export_args(w, "--gate", g, "-K", p), (needle,))
      for gate, point, needle in [
          ("neurons", "0", "outside 1..8"), ("neurons", "99", "outside 1..8"), ("neurons", "topk:99", "outside 1..8"),
          ("linear", "linear:0", "outside 1..8"), ("neurons", "pattern:5,1", "pattern"), ("linear", "topk:4", "not available"),
          ("neurons", "threshold:1.5", "(0, 1]"), ("neurons", "threshold:0", "(0, 1]"),
          ("neurons", "threshold:high", "not a number"), ("neurons", "nonsense:3", "not available")]],
    # --- an export validated against its own weights on load (issue 13.5) ----------------------------
    Case("eval-empty-operating-point", lambda w: ["eval", w.export, "-K", "", "--tokens", "64", "--seq-len", "64"],
         ("-K needs an operating point",)),
    Case("eval-export-sub-experts-edited", lambda w: ["eval", w.export_with(prism__sub_experts=3), "--tokens", "64", "--seq-len", "64"],
         ("prism.sub_experts is 3", "set prism.sub_experts back to 4")),
    Case("eval-export-num-experts-edited", lambda w: ["eval", w.export_with(num_experts=16), "--tokens", "64", "--seq-len", "64"],
         ("num_experts is 16", "set num_experts back to 32")),
    Case("eval-export-width-edited", lambda w: ["eval", w.export_with(intermediate_size=16), "--tokens", "64", "--seq-len", "64"],
         ("intermediate_size is 16", "back to 8")),
    Case("eval-export-source-experts-edited",
         lambda w: ["eval", w.export_with(prism__source__num_experts=5), "--tokens", "64", "--seq-len", "64"],
         ("prism.source.num_experts is 5",)),
    Case("eval-export-layers-edited", lambda w: ["eval", w.export_with(prism__layers=[0]), "--tokens", "64", "--seq-len", "64"],
         ("prism.layers", "[0, 1]")),
    # fewer layers: transformers loaded the first and dropped the rest without a word (perplexity 164 for 51);
    # more: it would start the missing ones from random weights
    Case("eval-export-fewer-layers", lambda w: ["eval", w.export_with(num_hidden_layers=1), "--tokens", "64", "--seq-len", "64"],
         ("builds MoE layers 0 (num_hidden_layers 1)", "weights hold MoE layers 0-1")),
    Case("eval-export-more-layers", lambda w: ["eval", w.export_with(num_hidden_layers=3), "--tokens", "64", "--seq-len", "64"],
         ("builds MoE layers 0-2 (num_hidden_layers 3)", "weights hold MoE layers 0-1")),
    # a NaN passed the comparison with the weights' scale (eval then gave perplexity nan)
    Case("eval-export-down-scale-nan",
         lambda w: ["eval", w.export_with(prism__down_scale=float("nan")), "--tokens", "64", "--seq-len", "64"],
         ("prism.down_scale is nan", "set it back to")),
    # a config.json cut short was taken for a plain model ("--operating-point needs a prism export")
    Case("eval-export-config-truncated", lambda w: ["eval", w.export_with_config_text('{"architectures": ["Olmo'), "-K", "topk:2",
                                                    "--tokens", "64", "--seq-len", "64"], ("config.json: not valid JSON (line 1",)),
    Case("eval-export-old-format", lambda w: ["eval", w.export_with(prism__format_version=2), "--tokens", "64", "--seq-len", "64"],
         ("export format version 2", "export it again")),
    # a string version read "has export format version 3; this prism reads 3"
    Case("eval-export-format-version-string",
         lambda w: ["eval", w.export_with(prism__format_version="3"), "--tokens", "64", "--seq-len", "64"],
         ("export format version '3', not an integer",)),
    # "operating point 'None': 'None' is not an integer"
    Case("eval-export-default-point-missing",
         lambda w: ["eval", w.export_with(prism__default_operating_point=None), "--tokens", "64", "--seq-len", "64"],
         ("prism.default_operating_point is missing",)),
    # nothing in the weights records the source's top-k: points past it were offered and ran
    Case("eval-export-source-top-k-edited",
         lambda w: ["eval", w.export_with(prism__source__top_k=3), "--tokens", "64", "--seq-len", "64"],
         ("prism.source.top_k x prism.sub_experts is 12", "checked exact at its full point", "set prism.source.top_k back")),
    Case("bench-export-num-experts-edited", lambda w: bench_args(w, "--seq-len", "16", model=w.export_with(num_experts=16)),
         ("num_experts is 16",)),
    # --- truncated weights, context length (issue 13.5, 13.6) ---------------------------------------
    Case("profile-truncated-weights", lambda w: profile_args(w, model=w.model_with("truncated")), ("truncated", "download"),
         never=NEVER_PROFILE),
    Case("eval-truncated-weights", lambda w: ["eval", w.model_with("truncated"), "--tokens", "64", "--seq-len", "64"], ("truncated",)),
    Case("eval-seq-len-past-the-positions", lambda w: ["eval", w.model, "--seq-len", "5000"],
         ("--seq-len 5000", "128 positions", "--seq-len 128 or less")),
    Case("profile-seq-len-past-the-positions", lambda w: profile_args(w, "--seq-len", "500"), ("128 positions",),
         never=NEVER_PROFILE),
    Case("bench-seq-len-past-the-positions", lambda w: bench_args(w, "--seq-len", "500"), ("128 positions",), never=NEVER_BENCH),
    # --- outputs checked before any work (issue 13.3) ------------------------------------------------
    Case("bench-out-is-a-file", lambda w: bench_args(w, out=w.write("results", "not a folder")), ("is a file, not a folder",),
         never=NEVER_BENCH),
    Case("bench-out-read-only", lambda w: bench_args(w, out=w.unwritable() / "results"), ("not writable",), never=NEVER_BENCH),
    Case("partition-out-read-only", lambda w: partition_args(w, out=w.unwritable() / "p.h5"), ("not writable",),
         never=NEVER_SOLVE),
    Case("partition-out-is-the-profile", lambda w: partition_args(w, out=w.profile), ("is the profile",), never=NEVER_SOLVE),
    Case("partition-out-is-a-folder", lambda w: partition_args(w, out=w.folder("a-folder")), ("is a folder",), never=NEVER_SOLVE),
    Case("compare-out-read-only", lambda w: ["partition", "compare", w.profile, "--solvers", "random", "--out",
                                             w.unwritable() / "cmp"], ("not writable",), never=NEVER_SOLVE),
    Case("profile-out-read-only", lambda w: profile_args(w, out=w.unwritable() / "p.h5"), ("not writable",), never=NEVER_PROFILE),
    Case("profile-out-in-the-model-folder", lambda w: profile_args(w, out=w.model / "profile.h5"),
         ("lies inside the model folder",), never=NEVER_PROFILE),
    Case("profile-out-in-missing-folder", lambda w: profile_args(w, out=w.root / "missing" / "profile.h5"), ("does not exist",)),
    Case("profile-out-is-folder", lambda w: profile_args(w, out=w.folder("a-folder")), ("is a folder",)),
    # An existing file that is not an earlier result of the command: `--out README.md` replaced it, exit 0.
    Case("profile-out-replaces-a-users-file", lambda w: profile_args(w, out=w.write("notes.txt", "mine")),
         ("--out", "notes.txt exists and is not a prism profile",), never=NEVER_PROFILE),
    Case("profile-out-replaces-a-partition", lambda w: profile_args(w, out=w.partition), ("is not a prism profile",),
         never=NEVER_PROFILE),
    Case("partition-out-replaces-a-users-file", lambda w: partition_args(w, out=w.write("notes.txt", "mine")),
         ("notes.txt exists and is not a prism partition",), never=NEVER_SOLVE),
    Case("merge-out-replaces-a-users-file",
         lambda w: ["partition", "merge", w.partition_of(w.model, "l0.h5", layers=[0]),
                    w.partition_of(w.model, "l1.h5", layers=[1]), "--out", w.write("notes.txt", "mine")],
         ("notes.txt exists and is not a prism partition",)),
    Case("cost-model-out-is-the-decode-bench",  # the input named as such (it was "not a prism cost model: move it")
         lambda w: (lambda args: [*args[:-1], args[args.index("--decode") + 1]])(cost_model_args(w, w.export, 4)),
         ("is the decode bench",)),
    Case("cost-model-out-replaces-a-users-file",
         lambda w: [*cost_model_args(w, w.export, 4)[:-1], w.write("cm.json", '{"mine": 1}')],
         ("cm.json exists and is not a prism cost model",)),
    Case("profile-budget-below-minimum", lambda w: profile_args(w, "--max-memory", "1K"),
         ("--max-memory 1.00 KiB", "minimum", "activations", "raise --max-memory")),
    # A budget past the machine's memory: refused before the banner and the work folder (it had failed
    # when the row buffer could not be allocated).
    Case("profile-budget-beyond-the-machine", lambda w: profile_args(w, "--max-memory", "1000000T"),
         ("--max-memory", "more than this machine's", "give less")),
    Case("profile-bad-budget", lambda w: profile_args(w, "--max-memory", "lots"), ("--max-memory must be a size", "'lots'"),
         never=NEVER_PROFILE),
    Case("profile-checkpoint-every-0", lambda w: profile_args(w, "--checkpoint-every", "0"), ("--checkpoint-every", "positive"),
         never=NEVER_PROFILE),
    Case("tables-out-is-a-file",
         lambda w: ["tables", "--config", ROOT / "configs" / "builtin.yaml", "--out", w.write("tables", "x"), "--work", w.out],
         ("is a file, not a folder",), never=NEVER_TABLES),
    Case("tables-work-read-only",
         lambda w: ["tables", "--config", ROOT / "configs" / "builtin.yaml", "--out", w.out, "--work", w.unwritable() / "work"],
         ("not writable",), never=NEVER_TABLES),
    # --- run configurations (issue 13.4, 13.5) -------------------------------------------------------
    Case("config-mistyped-section", lambda w: export_args(w, "--config", config(w, "partiton:\n  solver: random\n")),
         ("unknown section 'partiton'", "did you mean 'partition'?")),
    Case("config-mistyped-option", lambda w: profile_args(w, "--config", config(w, "profile:\n  tokenz: 5\n")),
         ("section 'profile' has unknown option 'tokenz'", "did you mean 'tokens'?")),
    Case("config-mistyped-shared-key", lambda w: profile_args(w, "--config", config(w, "sed: 1\n")),
         ("unknown key 'sed'", "did you mean 'seed'?")),
    Case("config-option-of-another-section", lambda w: profile_args(w, "--config", config(w, "partition:\n  tokens: 5\n")),
         ("section 'partition' has unknown option 'tokens'",)),
    Case("config-table-section", lambda w: ["tables", "--config", config(w, "name: t\nbench:\n  mdoe: decode\n"), "--out", w.out],
         ("unknown option 'mdoe'", "did you mean 'mode'?"), never=NEVER_TABLES),
    Case("config-is-a-folder", lambda w: profile_args(w, "--config", w.folder("configs")), ("is a folder", "YAML file")),
    Case("config-section-not-a-mapping", lambda w: profile_args(w, "--config", config(w, "profile: [1, 2]\n")),
         ("section 'profile' must be a mapping",)),
    Case("config-not-a-mapping", lambda w: profile_args(w, "--config", config(w, "- just\n- a list\n")), ("must hold a mapping",)),
    # PyYAML's first line named only the construct ("while parsing a flow sequence"), not what or where
    Case("config-invalid-yaml", lambda w: profile_args(w, "--config", config(w, "profile: {tokens: [unclosed\n")),
         ("not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1",)),
    Case("config-missing", lambda w: profile_args(w, "--config", w.root / "nope.yaml"), ("config file", "does not exist")),
    Case("config-empty-for-tables", lambda w: ["tables", "--config", config(w, "# nothing but a comment\n"), "--out", w.out],
         ("config file", "is empty")),
    Case("config-empty-mapping", lambda w: profile_args(w, "--config", config(w, "{}\n")), ("is empty",)),
    # --- profile ---------------------------------------------------------------------------------------
    Case("profile-missing-model", lambda w: profile_args(w, model=w.root / "no-such-model"), ("does not exist",)),
    Case("profile-not-a-checkpoint", lambda w: profile_args(w, model=w.write("just-a-folder/notes.txt", "hello").parent),
         ("not a transformers checkpoint", "config.json")),
    Case("profile-model-without-tokenizer", lambda w: profile_args(w, model=w.model_with("no-tokenizer")),
         ("no usable tokenizer", "tokenizer files")),
    Case("profile-model-without-tokenizer-json", lambda w: profile_args(w, model=w.model_with("no-tokenizer-json")),
         ("cannot load the tokenizer", "tokenizer files missing or damaged", "slow tokenizer")),  # was cut at "one of:"
    # transformers said only "look at the above report", and printed none
    Case("eval-export-vocab-edited", lambda w: ["eval", w.export_with(vocab_size=130), "--tokens", "64", "--seq-len", "64"],
         ("weights do not match config.json", "lm_head.weight is [512, 64] in the weights, [130, 64]")),
    Case("profile-data-is-a-folder", lambda w: profile_args(w, "--data", w.folder("texts")), ("is a folder", "text file")),
    Case("profile-dense-model", lambda w: profile_args(w, model=w.sources.dense), ("not a Mixture-of-Experts model", "'llama'")),
    Case("profile-empty-data", lambda w: profile_args(w, "--data", w.write("empty.txt", "")), ("is empty",)),
    Case("profile-tiny-data", lambda w: profile_args(w, "--data", w.short_text(1)), ("fewer than one window",)),
    # About 45 tokens: one 32-token window, not the two that fit and held-out rows need.
    Case("profile-short-data", lambda w: profile_args(w, "--data", w.short_text(2)), ("only 1 sequence", "at least 2")),
    Case("profile-seed-past-the-generators", lambda w: profile_args(w, "--seed", str(2**64)), ("--seed must be between 0",),
         never=NEVER_PROFILE),
    Case("profile-layers-with-an-empty-item", lambda w: profile_args(w, "--layers", "0,,1"), ("--layers", "'0,,1'"),
         never=NEVER_PROFILE),
    Case("profile-tokens-0", lambda w: profile_args(w, "--tokens", "0"), ("--tokens", "positive")),
    Case("profile-negative-max-rows", lambda w: profile_args(w, "--max-rows", "-5"), ("--max-rows", "-5")),
    Case("profile-holdout-1.5", lambda w: profile_args(w, "--holdout", "1.5"), ("--holdout", "1.5")),
    Case("profile-layers-not-moe", lambda w: profile_args(w, "--layers", "0,7"), ("--layers 7 are not MoE layers", "MoE layers: 0-1)")),
    Case("profile-bad-dtype", lambda w: profile_args(w, "--dtype", "float64"), ("unknown dtype 'float64'",)),
    Case("profile-bad-row-dtype", lambda w: profile_args(w, "--row-dtype", "int8"), ("--row-dtype", "int8")),
    # --- partition -------------------------------------------------------------------------------------
    Case("partition-one-neuron-per-sub-expert", lambda w: partition_args(w, "-N", "32"),
         ("--sub-experts 32 leaves 1 neuron per sub-expert", "--sub-experts 8 or fewer"), never=NEVER_SOLVE),
    Case("partition-gate-neurons-above-the-sub-expert", lambda w: partition_args(w, "-N", "4", "--gate-neurons", "9"),
         ("--gate-neurons", "between 1 and 8"), never=NEVER_SOLVE),
    Case("partition-gate-neurons-0", lambda w: partition_args(w, "--gate-neurons", "0"), ("--gate-neurons must be at least 1",)),
    Case("partition-old-profile-format", lambda w: partition_args(w, profile=w.profile_with_version(1)),
         ("profile format version 1", "prism profile")),
    Case("partition-n-not-divisor", lambda w: partition_args(w, "-N", "3"), ("--sub-experts 3", "width 32", "2, 4, 8, 16, 32")),
    Case("partition-n-below-2", lambda w: partition_args(w, "-N", "1"), ("--sub-experts", "at least 2")),
    Case("partition-keep-too-large", lambda w: partition_args(w, "-N", "4", "--keep", "4"), ("--keep", "4")),
    Case("partition-experts-without-rows", lambda w: partition_args(w, profile=w.profile_without_rows()),
         ("layer 1: experts 3, 5", "profile more tokens")),
    Case("partition-corrupt-hdf5", lambda w: partition_args(w, profile=w.write("corrupt.h5", np.random.default_rng(0).bytes(4096))),
         ("not a readable HDF5 file",)),
    Case("partition-profile-rows-of-another-width", lambda w: partition_args(w, profile=w.edited_profile("narrow-rows")),
         ("is corrupt", "layers/1/experts/2/fit_rows", f"rows x {WIDTH}")),
    Case("partition-profile-nan-row", lambda w: partition_args(w, profile=w.edited_profile("nan-row")),
         ("is corrupt", "layers/1/experts/2/fit_rows", "NaN")),
    Case("partition-profile-width-it-does-not-hold", lambda w: partition_args(w, profile=w.edited_profile("width-attr")),
         ("is corrupt", f"width {WIDTH // 2}")),
    # found once the run had opened OUT.partial/, which it left behind: the rerun was told to --resume
    Case("partition-profile-experts-it-does-not-hold", lambda w: partition_args(w, profile=w.edited_profile("experts-attr")),
         ("is corrupt", "tokens_routed has shape")),
    Case("partition-foreign-hdf5", lambda w: partition_args(w, profile=w.foreign_hdf5()), ("not a prism profile",)),
    Case("partition-incomplete-profile", lambda w: partition_args(w, profile=w.incomplete_profile()), ("is incomplete", "weights_hash")),
    Case("partition-missing-profile", lambda w: partition_args(w, profile=w.root / "nope.h5"), ("does not exist",)),
    Case("partition-negative-seed", lambda w: partition_args(w, "--seed", "-1"), ("--seed must be between 0",), never=NEVER_SOLVE),
    Case("partition-unknown-solver", lambda w: partition_args(w, "--solver", "magic"), ("unknown solver 'magic'", "alternating", "nsga2")),
    Case("partition-workers-0", lambda w: partition_args(w, "--workers", "0"), ("--workers", "at least 1")),
    Case("partition-bad-solver-option", lambda w: partition_args(w, "-O", "badoption=1"),
         ("badoption", "alternating", "objective, restarts, max_steps")),
    Case("partition-bad-solver-value", lambda w: partition_args(w, "-O", "objective=sideways"), ("objective must be",)),
    Case("partition-bad-solver-type", lambda w: partition_args(w, "--solver", "nsga2", "-O", "generations=ten"),
         ("option generations must be int", "'ten'")),
    Case("partition-layers-not-profiled", lambda w: partition_args(w, "--layers", "1,5"), ("--layers 5 are not", "profiled layers: 0-1)")),
    Case("partition-layers-range-not-profiled", lambda w: partition_args(w, "--layers", "0-99"),
         ("--layers 2-99 are not in the profile", "profiled layers: 0-1)")),
    Case("partition-layers-past-any-model", lambda w: partition_args(w, "--layers", "0-100000000"),
         ("--layers 0-100000000", "up to 1,000 decoder layers")),
    Case("partition-bad-executor", lambda w: partition_args(w, "--executor", "spark"), ("unknown executor 'spark'", "local, ray")),
    Case("compare-out-stem-onto-the-profile",
         lambda w: ["partition", "compare", w.write("prof.json", w.profile.read_bytes()), "--solvers", "random", "--out", w.root / "prof"],
         ("is the profile",), never=NEVER_SOLVE),
    Case("compare-unknown-solver", lambda w: ["partition", "compare", w.profile, "--solvers", "random,magic", "--out", w.out],
         ("unknown solver 'magic'",)),
    Case("compare-n-not-divisor", lambda w: ["partition", "compare", w.profile, "--solvers", "random", "-N", "5", "--out", w.out],
         ("--sub-experts 5",)),
    # --- schedule --------------------------------------------------------------------------------------
    Case("schedule-floor-share-nan", lambda w: schedule_args(w, "--floors", "linear:2=nan"), ("share 'nan'", "linear:2")),
    Case("schedule-floor-share-inf", lambda w: schedule_args(w, "--floors", "linear:2=inf,linear:8=1"), ("share 'inf'", "linear:2")),
    Case("schedule-floor-share-zero", lambda w: schedule_args(w, "--floors", "linear:2=0.5,linear:8=0"), ("share '0'", "linear:8")),
    Case("sweep-floor-share-nan", lambda w: sweep_args(w, "--rates", "1", "--floors", "linear:2=0.5,linear:8=nan"),
         ("share 'nan'", "linear:8")),
    Case("schedule-no-request-arrives", lambda w: schedule_args(w, "--duration", "0.001"), ("no request arrived", "--duration")),
    Case("sweep-no-request-arrives", lambda w: sweep_args(w, "--duration", "0.001", "--rates", "1"),
         ("no request arrived", "--duration")),
    Case("schedule-rate-inf", lambda w: schedule_args(w, "--rate", "inf"), ("--rate must be a finite positive number",)),
    Case("schedule-rate-nan", lambda w: schedule_args(w, "--rate", "nan"), ("--rate must be a finite positive number",)),
    Case("schedule-duration-inf", lambda w: schedule_args(w, "--duration", "inf"), ("--duration must be a positive number",)),
    Case("schedule-rate-1e9", lambda w: schedule_args(w, "--rate", "1e9", "--duration", "5"), ("5e+09 requests", "at most")),
    Case("schedule-duration-1e12", lambda w: schedule_args(w, "--duration", "1e12"), ("--duration", "at most 1e+09")),
    Case("sweep-rates-inf", lambda w: sweep_args(w, "--rates", "1,inf"), ("--rates must be a finite positive number",)),
    Case("sweep-rates-1e9", lambda w: sweep_args(w, "--rates", "1e9", "--duration", "5"), ("5e+09 requests",)),
    Case("schedule-trace-arrival-nan", lambda w: schedule_args(w, "--trace", trace(w, "NaN")), ("line 2", "arrival", "nan")),
    Case("schedule-trace-arrival-inf", lambda w: schedule_args(w, "--trace", trace(w, "Infinity")), ("line 2", "arrival", "inf")),
    Case("schedule-trace-arrival-1e300", lambda w: schedule_args(w, "--trace", trace(w, "1e300")), ("line 2", "arrival")),
    Case("schedule-cost-model-negative-decode", lambda w: schedule_args(w, model=cost_model(w, "neg.json", ms=-1.0)),
         ("neg.json", "points.linear:2.decode_ms[1]", "-1 ms")),
    Case("schedule-cost-model-zero-decode", lambda w: schedule_args(w, model=cost_model(w, "zero.json", "linear:8", 8, 0.0)),
         ("zero.json", "points.linear:8.decode_ms[8]", "> 0")),
    Case("schedule-cost-model-batch-0", lambda w: schedule_args(w, model=cost_model(w, "b0.json", batch=0, ms=5.0)),
         ("b0.json", "points.linear:2.decode_ms", "key 0")),
    Case("sweep-cost-model-negative-decode", lambda w: ["schedule", "sweep", w.export, "--sim", "--rates", "1", "--cost-model",
                                                        cost_model(w, "neg.json", ms=-1.0), "--out", w.out], ("neg.json", "-1 ms")),
    Case("schedule-negative-seed", lambda w: schedule_args(w, "--seed", "-1"), ("--seed must be between 0",)),
    # Found by the third fuzz round: --out onto a user's files replaced them; a lone surrogate or a deeply nested line in
    # a trace was an internal error; a number as a trace's floor was read as topk:N (the server reads a perplexity).
    Case("schedule-out-onto-own-notes", lambda w: schedule_out_args(w, w.write("notes.md", "mine").with_suffix("")),
         ("would replace", "notes.md", "not an earlier result")),
    Case("schedule-out-onto-own-json", lambda w: schedule_out_args(w, w.write("data.json", '{"a": 1}')),
         ("would replace", "data.json")),
    Case("schedule-trace-lone-surrogate", lambda w: schedule_args(
        w, "--trace", w.write("t.jsonl", '{"arrival": 0, "prompt": "a\\ud800b", "max_tokens": 4}\n')), ("line 1", "lone surrogate")),
    Case("schedule-trace-nested-too-deeply", lambda w: schedule_args(
        w, "--trace", w.write("t.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")), ("line 1", "nested too deeply")),
    # errors found once the model is known (the context, a ceiling no point reaches) named no line
    Case("schedule-trace-past-the-context", lambda w: schedule_args(w, "--trace", w.write(
        "t.jsonl", '{"arrival": 0, "prompt": "a b", "max_tokens": 4}\n{"arrival": 1, "prompt": "a b", "max_tokens": 100000}\n')),
        ("line 2", "exceeds the model's context")),
    Case("schedule-trace-ceiling-no-point-reaches", lambda w: schedule_args(w, "--trace", w.write(
        "t.jsonl", '{"arrival": 0, "prompt": "a b", "max_tokens": 4, "floor": 1.5}\n')), ("line 1", "no operating point reaches")),
    Case("schedule-trace-negative-ceiling", lambda w: schedule_args(
        w, "--trace", w.write("t.jsonl", '{"arrival": 0, "prompt": "a b", "max_tokens": 4, "floor": -3}\n')),
         ("line 1", "perplexity ceiling must be a positive, finite number")),
    Case("schedule-on-a-file", lambda w: schedule_args(w)[:1] + [w.write("notes.txt", "x")] + schedule_args(w)[2:],
         ("is a file, not a prism export folder",)),
    Case("schedule-on-a-folder-without-config", lambda w: schedule_args(w)[:1] + [w.folder("empty")] + schedule_args(w)[2:],
         ("has no config.json",)),
    Case("schedule-cost-model-without-machine", lambda w: schedule_args(w, model=w.write("cm-nomachine.json", json.dumps(
        {k: v for k, v in json.loads(cost_model(w).read_text()).items() if k != "machine"}))), ("has no 'machine' field",)),
    Case("sweep-negative-seed", lambda w: sweep_args(w, "--rates", "1", "--seed", "-1"), ("--seed must be between 0",)),
    # --- bench -----------------------------------------------------------------------------------------
    Case("bench-batch-with-an-empty-item", lambda w: bench_args(w, "--batch", "1,,8"), ("--batch", "'1,,8'"), never=NEVER_BENCH),
    Case("bench-negative-seed", lambda w: bench_args(w, "--seed", "-1"), ("--seed must be between 0",), never=NEVER_BENCH),
    Case("bench-points-on-a-plain-model", lambda w: bench_args(w, "--points", "topk:2", "--seq-len", "16", model=w.model),
         ("--points", "plain MoE model")),
    Case("bench-not-a-checkpoint", lambda w: bench_args(w, model=w.folder("empty")), ("config.json",)),
    Case("bench-missing-model", lambda w: bench_args(w, model=w.root / "nowhere"), ("does not exist",)),
    Case("bench-budget-not-a-time", lambda w: bench_args(w, "--budget", "fast"), ("budget",)),
    Case("bench-negative-budget", lambda w: bench_args(w, "--budget", "-1"), ("budget",)),
    Case("bench-min-quality-0", lambda w: bench_args(w, "--min-quality", "0"), ("--min-quality",)),
    Case("bench-batch-0", lambda w: bench_args(w, "--batch", "0"), ("--batch",)),
    Case("bench-unknown-mode", lambda w: bench_args(w, "--mode", "sideways"), ("--mode",)),
    Case("bench-infinite-budget", lambda w: bench_args(w, "--budget", "1e400ms"), ("budget must be a positive, finite time",),
         never=NEVER_BENCH),
    Case("bench-min-quality-nan", lambda w: bench_args(w, "--min-quality", "nan"), ("--min-quality must be a positive, finite",),
         never=NEVER_BENCH),
    Case("bench-points-name-no-point", lambda w: bench_args(w, "--points", ";;"), ("--points ';;' names no operating point",),
         never=NEVER_BENCH),
    Case("bench-unknown-dtype", lambda w: bench_args(w, "--dtype", "bf17"), ("--dtype bf17 is not a dtype prism runs",),
         never=NEVER_BENCH),
    Case("bench-repeats-0", lambda w: bench_args(w, "--repeats", "0"), ("--repeats must be at least 1, got 0",), never=NEVER_BENCH),
    Case("bench-cuda-without-cuda", lambda w: bench_args(w, "--device", "cuda"), ("CUDA",),
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),)),
    Case("bench-out-is-the-export", lambda w: bench_args(w, out=w.export), ("is the model",), never=NEVER_BENCH),
    Case("bench-out-inside-the-export", lambda w: bench_args(w, out=w.export / "prism"), ("lies inside the model",),
         never=NEVER_BENCH),
    Case("bench-out-holds-the-export", lambda w: bench_args(w, out=w.export.parent), ("holds the model",), never=NEVER_BENCH),
    Case("bench-out-holds-the-users-bench-md", lambda w: bench_args(w, out=w.write("mine/bench.md", "my notes").parent),
         ("would replace", "bench.md", "not an earlier result"), never=NEVER_BENCH),
    Case("bench-out-holds-another-tables-json", lambda w: bench_args(w, out=w.write(
        "mine/bench.json", json.dumps({"title": "t", "rows": []})).parent), ("would replace", "bench.json"), never=NEVER_BENCH),
    Case("bench-out-has-a-folder-for-the-plot", lambda w: bench_args(w, out=w.folder("o/bench.png").parent),
         ("bench.png", "is a folder"), never=NEVER_BENCH),
    Case("bench-repeated-batch", lambda w: bench_args(w, "--batch", "1,8,1"), ("--batch repeats 1", "1,8"), never=NEVER_BENCH),
    *[Case(f"bench-device-{name}", lambda w, name=name: bench_args(w, "--device", name), (f"unknown device {name!r}",),
           never=NEVER_BENCH) for name in ("mps", "xpu", "meta")],
    Case("eval-device-mps", lambda w: ["eval", w.export, "--device", "mps", "--tokens", "64", "--seq-len", "64"],
         ("unknown device 'mps'",)),
    Case("offload-bench-device-mps", lambda w: offload_args(w, "--device", "mps"), ("unknown device 'mps'",),
         never=NEVER_OFFLOAD),
    # --- offload-bench ----------------------------------------------------------------------------------
    Case("offload-bench-out-inside-the-export", lambda w: offload_args(w, "--out", w.export / "prism"),
         ("lies inside the model",), never=NEVER_OFFLOAD),
    Case("offload-bench-out-is-a-file", lambda w: offload_args(w, "--out", w.write("results.txt", "x")),
         ("is a file, not a folder",), never=NEVER_OFFLOAD),
    Case("offload-bench-empty-policy", lambda w: offload_args(w, "--policy", ""), ("--policy needs at least one value",),
         never=NEVER_OFFLOAD),
    Case("offload-bench-policy-with-an-empty-item", lambda w: offload_args(w, "--policy", "lru,,lfu"),
         ("--policy 'lru,,lfu'", "empty item"), never=NEVER_OFFLOAD),
    Case("offload-bench-budget-with-an-empty-item", lambda w: offload_args(w, budgets="50%,,60%"),
         ("--device-memory '50%,,60%'", "empty item"), never=NEVER_OFFLOAD),
    Case("offload-bench-points-with-an-empty-item", lambda w: offload_args(w, points="topk:2,,linear:4"),
         ("--points 'topk:2,,linear:4'", "empty item"), never=NEVER_OFFLOAD),
    Case("offload-bench-quality-tokens-0", lambda w: offload_args(w, "--quality-tokens", "0"),
         ("--quality-tokens must be at least 2",), never=NEVER_OFFLOAD),
    Case("offload-bench-unknown-compute-without-shape", lambda w: offload_args(w, "--compute", "bogus"),
         ("unknown compute model 'bogus'",), never=NEVER_OFFLOAD),
    Case("offload-bench-replay-reserve-not-a-share", lambda w: offload_args(w, "--shape", "source", "--reserve", "abc%"),
         ("cannot read --reserve 'abc%'",), never=NEVER_OFFLOAD),
    Case("offload-bench-trace-tokens-within-the-warm-up", lambda w: offload_args(w, "--shape", "source", "--trace-tokens", "100"),
         ("--trace-tokens (100) must exceed",), never=NEVER_OFFLOAD),
    Case("offload-bench-context-past-the-positions", lambda w: offload_args(w, "--context", "500"),
         ("--context 500", "128 positions", "--context 126 or less"), never=NEVER_LIVE),
    Case("offload-bench-trace-is-a-folder", lambda w: offload_args(w, "--shape", "olmoe-1b-7b", "--trace", w.folder("traces")),
         ("is a folder, not an .npz routing trace",), never=NEVER_OFFLOAD),
    Case("offload-bench-trace-is-text", lambda w: offload_args(w, "--shape", "olmoe-1b-7b", "--trace", w.write("t.npz", "hi\n")),
         ("not a prism routing trace", "not a readable .npz archive"), never=NEVER_REPLAY),
    *[Case(f"offload-bench-trace-{change}",
           lambda w, c=change: offload_args(w, "--shape", "olmoe-1b-7b", "--trace", offload_trace(w, c)), phrases,
           never=NEVER_REPLAY)
      for change, phrases in [("truncated", ("not a readable .npz archive",)), ("expert-9999", ("expert id 9999", "0..7")),
                              ("expert-negative", ("expert id -3", "0..7")), ("nan-weight", ("weights hold NaN",))]],
    # --- schedule: loads, --out before the run, benches of another export, plan --out ----------------
    Case("sweep-loads-empty", lambda w: sweep_args(w, "--loads", ""), ("--loads names no load", "low, medium, high"),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("sweep-loads-blank-items", lambda w: sweep_args(w, "--loads", " , "), ("--loads names no load", "low, medium, high"),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("sweep-loads-unknown", lambda w: sweep_args(w, "--loads", "low,peak"), ("unknown load peak", "low, medium, high"),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("sweep-rates-blank-items", lambda w: sweep_args(w, "--rates", " , "), ("--rates", "no arrival rate"),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("sweep-loads-twice", lambda w: sweep_args(w, "--loads", "low,low"), ("--loads names low more than once",),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("sweep-rates-twice", lambda w: sweep_args(w, "--rates", "1,1.0"), ("--rates names 1.0 more than once",),
         never=("prism_cli.serving.sweep", "run_sweep")),
    Case("schedule-floor-twice", lambda w: schedule_args(w, "--floors", "linear:2=0.5,linear:2=0.5"),
         ("--floors names linear:2 twice",), never=("prism_cli.serving.runner", "run_schedule")),
    Case("schedule-static-point-unknown", lambda w: schedule_args(w, "--policy", "static", "--point", "foo"),
         ("--point foo", "operating point 'foo'")),
    Case("schedule-lengths-past-the-context", lambda w: schedule_args(w, "--min-output", "2000", "--max-output", "5000"),
         ("exceeds the model's context", "--max-output")),
    Case("schedule-floor-spelt-twice", lambda w: schedule_args(w, "--floors", "linear:2=0.5,linear:02=0.5"),
         ("--floors names linear:2 and linear:02, one floor",), never=("prism_cli.serving.runner", "run_schedule")),
    Case("schedule-ceiling-spelt-twice", lambda w: schedule_args(w, "--floors", "ppl:45=0.5,ppl:45.0=0.5"),
         ("--floors names ppl:45 and ppl:45.0, one floor",), never=("prism_cli.serving.runner", "run_schedule")),
    Case("schedule-out-is-a-folder", lambda w: schedule_out_args(w, w.folder("res.json").parent / "res"), ("res.json", "is a folder"),
         never=("prism_cli.serving.runner", "run_schedule")),
    Case("schedule-out-read-only", lambda w: schedule_out_args(w, w.unwritable() / "res"), ("not writable",),
         never=("prism_cli.serving.runner", "run_schedule")),
    Case("schedule-out-under-a-file", lambda w: schedule_out_args(w, w.write("a-file", "x") / "sub" / "res"),
         ("is a file, not a folder",), never=("prism_cli.serving.runner", "run_schedule")),
    Case("plan-out-read-only", lambda w: ["plan", w.model, "--seq-len", "32", "--out", w.unwritable() / "plan"], ("not writable",),
         never=("prism_cli.planner", "measure_profile_costs")),
    Case("plan-out-is-a-folder", lambda w: ["plan", w.model, "--seq-len", "32", "--out", w.folder("plan.md").parent / "plan"],
         ("plan.md", "is a folder"), never=("prism_cli.planner", "measure_profile_costs")),
    Case("schedule-cost-model-bench-of-another-export",
         lambda w: cost_model_args(w, w.root / "elsewhere" / "export-n8", n_sub=8),
         ("measured on", "export-n8", "not on", "N=8", "N=4"), never=("prism_cli.serving.calibrate", "calibrate_engine")),
    Case("schedule-cost-model-out-in-a-missing-folder",
         lambda w: [*cost_model_args(w, w.export, n_sub=4)[:-1], w.root / "missing" / "cost.json"],
         ("cannot write", "does not exist"), never=("prism_cli.serving.calibrate", "calibrate_engine")),
    Case("schedule-cost-model-bench-of-another-export-folder",
         lambda w: cost_model_args(w, other_export(w), n_sub=4),
         ("measured on", "other-export", "not on", "export"), never=("prism_cli.serving.calibrate", "calibrate_engine")),
    # --- non-finite sizes and floats ------------------------------------------------------------------
    Case("eval-device-memory-infinite", lambda w: ["eval", w.export, "--device-memory", "1e400GB", "--tokens", "64",
                                                   "--seq-len", "64"], ("device memory '1e400GB'", "too large"),
         never=NEVER_LIVE),
    Case("offload-bench-device-memory-infinite", lambda w: offload_args(w, budgets="1e400GB"),
         ("device memory '1e400GB'", "too large"), never=NEVER_OFFLOAD),
    # past int64: accepted, and it trained for ever
    Case("tune-gate-steps-huge", lambda w: ["tune-gate", w.export, "--out", w.out, "--steps", str(10**20)],
         ("--steps must be between 1 and 1,000,000,000",)),
    # with --init copies the probe's --init-tokens are not read: the message named them, not the context
    Case("tune-gate-seq-len-past-the-positions-copies",
         lambda w: ["tune-gate", w.export, "--out", w.out, "--steps", "2", "--init", "copies", "--seq-len", "100000"],
         ("--seq-len 100000", "128 positions")),
    Case("tune-gate-init-alpha-nan", lambda w: ["tune-gate", w.export, "--out", w.out, "--steps", "2", "--init-alpha", "nan"],
         ("--init-alpha", "nan"), never=("prism_cli.tuning.trainer", "load_text")),
    Case("tune-gate-checkpoint-minutes-nan",
         lambda w: ["tune-gate", w.export, "--out", w.out, "--steps", "2", "--checkpoint-minutes", "nan"],
         ("--checkpoint-minutes", "nan"), never=("prism_cli.tuning.trainer", "load_text")),
    # --- run configurations ---------------------------------------------------------------------------
    Case("config-one-element-list-for-tokens",
         lambda w: ["eval", w.export, "--config", w.write("e1.yaml", "eval:\n  tokens: [64]\n  seq-len: 64\n")],
         ("'tokens' in section 'eval'", "not a list"), never=NEVER_LIVE),
    Case("config-one-element-list-for-a-shared-key",
         lambda w: ["eval", w.export, "--config", w.write("e2.yaml", "device: [cpu]\n")], ("'device'", "not a list"),
         never=NEVER_LIVE),
    Case("config-one-element-list-in-another-section",
         lambda w: ["eval", w.export, "--config", w.write("e3.yaml", "partition:\n  sub_experts: [4]\n")],
         ("'sub_experts' in section 'partition'", "not a list"), never=NEVER_LIVE),
    Case("config-duplicate-key",
         lambda w: ["eval", w.export, "--config", w.write("e4.yaml", "eval:\n  tokens: 64\n  tokens: 128\n")],
         ("'tokens' is given twice",), never=NEVER_LIVE),
    Case("config-mapping-for-an-option",
         lambda w: ["eval", w.export, "--config", w.write("e6.yaml", "eval:\n  tokens: {a: 1}\n")],
         ("'tokens' in section 'eval' takes a value, not a mapping",), never=NEVER_LIVE),
    Case("config-one-option-in-two-spellings",
         lambda w: ["eval", w.export, "--config", w.write("e5.yaml", "eval:\n  seq-len: 64\n  seq_len: 32\n")],
         ("'seq-len' and 'seq_len' are the same option",), never=NEVER_LIVE),
    # --- explicit empty paths (an unset shell variable) are not "the default" -----------------------
    Case("eval-empty-model", lambda w: ["eval", "", "--tokens", "64", "--seq-len", "64"], ("the model is empty",)),
    Case("profile-empty-model", lambda w: ["profile", "", "--out", w.root / "p.h5", "--tokens", "256"],
         ("the model is empty",), never=("prism_cli.profiling.profiler", "profile_model")),
    Case("bench-empty-model", lambda w: ["bench", "", "--out", w.out], ("the model is empty",),
         never=("prism_cli.evaluation.bench", "run_bench")),
    Case("eval-empty-data", lambda w: ["eval", w.export, "--data", "", "--tokens", "64", "--seq-len", "64"],
         ("--data is empty",), never=("prism_cli.commands.eval", "load_elastic_or_plain")),
    Case("rank-layers-empty-data", lambda w: ["rank-layers", w.export, "--data", ""], ("--data is empty",),
         never=("prism_cli.tuning.layers", "load_elastic_model")),
    Case("select-routers-empty-data",
         lambda w: ["select-routers", w.export, w._copy(w.sources.export, "export-b"), "--out", w.out, "--data", ""],
         ("--data is empty",), never=("prism_cli.tuning.benchmark", "per_k_perplexity")),
    # --- a fourth fuzz round -----------------------------------------------------------------------------
    # an empty positional path was read as '.' (rank-layers ranked the current folder's export)
    Case("rank-layers-empty-export", lambda w: ["rank-layers", ""], ("EXPORT is empty",),
         never=("prism_cli.tuning.layers", "load_elastic_model")),
    Case("export-empty-partition", lambda w: ["export", w.model, "", "--out", w.out], ("PARTITION is empty",)),
    # `prism partition PROFILE` runs the group's default command, whose path options went unchecked
    Case("partition-empty-out", lambda w: ["partition", w.profile, "--out", ""], ("--out is empty",), never=NEVER_SOLVE),
    Case("profile-empty-layers", lambda w: ["profile", w.model, "--layers", "", "--out", w.root / "p.h5", *PROFILE_SETTINGS],
         ("--layers is empty",), never=("prism_cli.profiling.profiler", "profile_model")),
    Case("rank-layers-folder-without-config", lambda w: ["rank-layers", w.folder("empty")],
         ("is not a prism export (it has no config.json)",)),
    # the built-in model's name, where an export is wanted: "builtin does not exist" said nothing of why
    Case("rank-layers-builtin-model", lambda w: ["rank-layers", "builtin"], ("names the built-in model, not an export",),
         never=("prism_cli.tuning.layers", "load_elastic_model")),
    # rich printed ':x:' as an emoji: the path in the message was not the path given
    Case("eval-emoji-code-in-a-path", lambda w: ["eval", w.root / "a:x:", "--tokens", "64"], ("a:x: does not exist",)),
    # YAML's null ran the option's default without a word
    Case("config-null-option", lambda w: ["eval", w.export, "--config", w.write("n.yaml", "eval:\n  tokens:\n")],
         ("'tokens' in section 'eval' has no value",), never=NEVER_LIVE),
    # NaN weights gave "perplexity nan" and exit 0
    Case("eval-nan-weights", lambda w: ["eval", w.export_with_nan_weight(), "--tokens", "64", "--seq-len", "64"],
         ("outputs are NaN",)),
    # --- partition compare ----------------------------------------------------------------------------
    Case("compare-out-is-an-existing-folder",
         lambda w: ["partition", "compare", w.profile, "--solvers", "random", "--out", w.folder("results")],
         ("is a folder", "file stem"), never=NEVER_SOLVE),
    Case("compare-duplicate-solvers",
         lambda w: ["partition", "compare", w.profile, "--solvers", "random,random", "--out", w.out],
         ("--solvers names random more than once",), never=NEVER_SOLVE),
    # --- too few tokens for one window: say what limited them (the text, or --tokens), advise only the
    # command's own options ---------------------------------------------------------------------------
    # the quality windows are 256 tokens whatever --seq-len is: --tokens 100 ran the models, then blamed the text
    Case("bench-tokens-below-a-quality-window", lambda w: bench_args(w, "--seq-len", "16", "--tokens", "100"),
         ("--tokens 100 is less than one quality window (256 tokens)",), never=NEVER_BENCH, absent=("--seq-len",)),
    Case("bench-text-shorter-than-a-quality-window",
         lambda w: bench_args(w, "--points", "topk:2", "--batch", "1", "--seq-len", "16", "--tokens", "512",
                              "--data", w.short_text(1)),
         ("the text gives", "fewer than one quality window (256 tokens); give more text"), absent=("--seq-len",)),
    # --tokens cut the text, and the message said the text gave 1 token
    Case("eval-tokens-below-a-window", lambda w: ["eval", w.export, "--data", w.short_text(40), "--tokens", "1", "--seq-len", "64"],
         ("--tokens 1 is less than one window (--seq-len 64)",), absent=("the text gives",)),
    Case("eval-text-shorter-than-a-window", lambda w: ["eval", w.export, "--data", w.short_text(1), "--seq-len", "64"],
         ("the text gives", "fewer than one window (--seq-len 64); give more text or a shorter --seq-len",)),
    # select-routers has no --seq-len (its validation windows are 256 tokens), yet the message advised one
    Case("select-routers-text-shorter-than-a-window",
         lambda w: ["select-routers", w.export, w._copy(w.sources.export, "export-b"), "--out", w.out, "--data", w.short_text(1)],
         ("validation text", "the text gives", "fewer than one window (256 tokens); give more text"), absent=("--seq-len",)),
]


def _tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root``: a file's size and modification time, None for a folder (whose own
    time a write probe may touch without writing anything)."""
    tree: dict[str, tuple[int, int] | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[str((Path(dirpath) / name).relative_to(root))] = None
        for name in filenames:
            st = (Path(dirpath) / name).lstat()
            tree[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return tree


def _output(argv: list[Any], cwd: Path) -> Path | None:
    if "--out" not in argv:
        return None
    return (cwd / str(argv[argv.index("--out") + 1])).resolve()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, cli, sources, tiny_model_dir, tmp_path, monkeypatch) -> None:
    world = World(tmp_path / "world", sources, tiny_model_dir)
    world.root.mkdir()
    argv = case.argv(world)
    cwd = world.root / (case.cwd or ".")
    monkeypatch.chdir(cwd)
    out = _output(argv, cwd)
    # The output (and so its parent, or with `--out .` the output itself) lies in the watched world,
    # unless it is on a system file system that nothing can write.
    assert out is None or out.is_relative_to(world.root.resolve()) or not out.is_relative_to(tmp_path), out
    if case.never is not None:
        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise AssertionError(f"{case.never[1]} ran: the input should have been refused before any work")

        monkeypatch.setattr(f"{case.never[0]}.{case.never[1]}", refuse)
    before = _tree(world.root)
    result = cli(*argv)
    if (world.root / "read-only").exists():
        (world.root / "read-only").chmod(0o755)  # so that pytest can clean up
    assert result.code == case.code, result
    line = result.assert_one_line_error(*case.phrases)
    assert not [phrase for phrase in case.absent if phrase in line], line
    after = _tree(world.root)
    assert after == before, "the run wrote, deleted or changed files"


# Helpers of the cases appended above.


def schedule_out_args(w: World, out: Path) -> list[Any]:
    return ["schedule", w.export, "--sim", "--cost-model", cost_model(w), "--max-output", "8", "--max-prompt", "32",
            "--duration", "1", "--out", out]


def other_export(w: World) -> Path:
    """A folder that claims to be another export: the world's export's config with another partition."""
    config = json.loads((w.export / "config.json").read_text())
    config["prism"]["partition"] = {**config["prism"].get("partition", {}), "hash": "0123456789abcdef"}
    return w.write("other-export/config.json", json.dumps(config)).parent


def cost_model_args(w: World, target: Path, n_sub: int) -> list[Any]:
    """``schedule cost-model`` of the world's export (N=4, top-2) from benches that record ``target``, with the
    points of an export of ``n_sub`` sub-experts (``original:k`` counts N*k active sub-experts)."""
    def bench(mode: str) -> Path:
        points = [{"point": p, "kind": kind, "perplexity": 40.0, "active": active,
                   "latency": {"1": {"median_ms": 5.0, "p90_ms": 5.0}, "8": {"median_ms": 9.0, "p90_ms": 9.0}}}
                  for p, kind, active in ((f"linear:{2 * n_sub}", "elastic", 2.0 * n_sub), ("original:1", "original", n_sub),
                                          ("original:2", "original", 2 * n_sub))]
        return w.write(f"bench-{mode}/bench.json", json.dumps({
            "target": str(target), "settings": {"mode": mode, "seq_len": 16}, "points": points,
            "environment": {"processor": "cpu", "torch_threads": 2}}))

    return ["schedule", "cost-model", w.export, "--decode", bench("decode"), "--prefill", bench("prefill"),
            "--out", w.root / "cm.json"]


@pytest.mark.parametrize(("count", "name", "phrase"), [(1, "cuda:1", "has 1 CUDA device (cuda:0)"),
                                                       (2, "cuda:7", "has 2 CUDA devices (cuda:0 to cuda:1)")])
def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch: pytest.MonkeyPatch, count: int, name: str, phrase: str) -> None:
    """``cuda:N`` past the last GPU is one line naming the devices there are (torch failed later, at the
    first tensor moved); ``cuda`` and the last index are accepted. CUDA is faked: only the count is read."""
    from prism_cli.errors import PrismError
    from prism_cli.models.loading import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(PrismError, match=f"device '{name}' does not exist: this machine {phrase.replace('(', '[(]').replace(')', '[)]')}"):
        parse_device(name)
    assert parse_device("cuda").type == "cuda" and parse_device(f"cuda:{count - 1}").index == count - 1
