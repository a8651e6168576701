"""Where exports are written and what they are read back from: ``--force`` replaces only an earlier export,
a full disk is one line with nothing left behind, weight files get the usual permissions, and damaged
exports and partitions (types the files should not hold) are one-line refusals, never internal errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_nothing_written, write_random_partition
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prism_cli.errors import PrismError
from prism_cli.io import atomic_dir
from prism_cli.runtime.elastic import load_elastic
from prism_cli.solvers.format import read_partition


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: the oracle for "nothing changed"."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir("olmoe")


@pytest.fixture(scope="module")
def partition(model, tmp_path_factory) -> Path:
    return write_random_partition(model, tmp_path_factory.mktemp("part") / "p.h5", seed=5)


# --- --force replaces an earlier export or an empty folder, never someone's folder ---------------------


def test_force_does_not_replace_a_folder_that_is_not_an_export(cli, model, partition, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my work")
    (mine / "sub" / "config.json").write_text('{"prism": {}}')  # an export inside is not the folder being one
    (mine / "config.json").write_text(json.dumps({"model_type": "olmoe"}))  # a checkpoint, but not a prism export
    before = _tree(mine)
    cli("export", model, partition, "--out", mine, "--force").assert_one_line_error(
        str(mine), "is not a prism export", "--force replaces only")
    assert _tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary beside it


def test_force_replaces_an_earlier_export_and_an_empty_folder(cli, model, partition, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("export", model, partition, "--out", empty, "--force", "--gate", "linear").code == 0
    assert json.loads((empty / "config.json").read_text())["prism"]["gate"] == "linear"
    result = cli("export", model, partition, "--out", empty, "--force", "--gate", "neurons")
    assert result.code == 0, result
    assert json.loads((empty / "config.json").read_text())["prism"]["gate"] == "neurons"


def test_tune_gate_and_select_routers_force_only_over_an_export(cli, tiny_export, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2,3\n")
    text = tmp_path / "train.txt"
    text.write_text("some training text " * 200)
    cli("tune-gate", tiny_export, "--out", mine, "--data", text, "--steps", "1", "--seq-len", "16", "--force",
        ).assert_one_line_error("is not a prism export")
    cli("select-routers", f"a={tiny_export}", f"b={tiny_export}", "--out", mine, "--tokens", "256", "--force",
        ).assert_one_line_error("is not a prism export")
    assert _tree(mine) == {"data.csv": b"1,2,3\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "train.txt"]


# --- a full disk -------------------------------------------------------------------------------------


def test_a_full_disk_is_refused_before_any_work(cli, model, partition, tmp_path, monkeypatch):
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))

    def disk_usage(path: Any) -> SimpleNamespace:
        return SimpleNamespace(total=10 * weights, used=10 * weights - weights // 2, free=weights // 2)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "out"
    cli("export", model, partition, "--out", out).assert_one_line_error(f"cannot write {out}", "free")
    assert_nothing_written(out)


def test_a_safetensors_write_error_is_one_line_and_leaves_nothing(cli, model, partition, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    cli("export", model, partition, "--out", out).assert_one_line_error(f"cannot write {out}: No space left on device")
    assert_nothing_written(out)


def test_atomic_dir_maps_safetensors_environment_errors_only(tmp_path):
    with pytest.raises(PrismError, match=r"^cannot write .*out: Disk quota exceeded$"), atomic_dir(tmp_path / "out"):
        raise SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    with pytest.raises(SafetensorError, match="invalid tensor"), atomic_dir(tmp_path / "out"):  # a bug stays one
        raise SafetensorError("invalid tensor")
    assert list(tmp_path.iterdir()) == []


# --- permissions and options ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_usual_permissions(umask, model, partition, tmp_path):
    from prism_cli.export.builder import ExportSettings, export_model

    old = os.umask(umask)
    try:
        export_model(str(model), partition, tmp_path / "out", ExportSettings(gate="neurons", max_shard_bytes=200_000))
    finally:
        os.umask(old)
    # what the export writes (the side files copied from the source keep the source's mode)
    files = [p for p in (tmp_path / "out").rglob("*") if p.suffix == ".safetensors" or p.name.startswith(("config.", "model."))]
    assert any(p.name.startswith("model-") for p in files) and any(p.parent.name == "prism" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_an_infinite_shard_size_is_refused(value, cli, model, partition, tmp_path):
    out = tmp_path / "out"
    cli("export", model, partition, "--out", out, "--max-shard-gb", value).assert_one_line_error("--max-shard-gb must be positive")
    assert_nothing_written(out)


# --- a config.json field of the wrong type --------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("num_experts_per_tok", "2"), ("dtype", "float99"), ("intermediate_size", 12.5)])
def test_a_config_field_of_the_wrong_type_is_one_line(field, value, cli, model, partition, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = cli("export", copy, partition, "--out", out).assert_one_line_error(str(copy), "config.json", field)
    assert repr(value) in line
    assert_nothing_written(out)


def test_a_hub_config_naming_no_torch_dtype_is_one_line(monkeypatch):
    """A hub id's config.json is not at hand to name the field: still one line, not a traceback."""
    import transformers

    from prism_cli.models.loading import load_config

    def bad_dtype(*_args, **_kwargs):
        raise AttributeError("module 'torch' has no attribute 'float99'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", bad_dtype)
    with pytest.raises(PrismError, match="cannot load model from some-org/some-moe: module 'torch' has no attribute 'float99'"):
        load_config("some-org/some-moe")


# --- damaged exports -------------------------------------------------------------------------------------


@pytest.fixture
def damaged(tiny_export, tmp_path):
    """``damaged(edit)``: a copy of the tiny export with ``edit(gate_positions, weights)`` applied to its
    gate-neuron and weight tensors (dicts, edited in place)."""
    def make(edit) -> Path:
        copy = tmp_path / "export"
        shutil.copytree(tiny_export, copy)
        gates, weights = load_file(str(copy / "prism/gate_neurons.safetensors")), load_file(str(copy / "model.safetensors"))
        edit(gates, weights)
        save_file(gates, str(copy / "prism/gate_neurons.safetensors"))
        save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
        return copy

    return make


def _first(gates: dict[str, torch.Tensor]) -> str:
    return sorted(gates)[0]


def _set(gates: dict[str, torch.Tensor], value: torch.Tensor) -> None:
    gates[_first(gates)] = value


GATE_EDITS = {
    "no positions": (lambda g, w: _set(g, torch.zeros(*g[_first(g)].shape[:2], 0, dtype=torch.int32)), "are 0 per sub-expert"),
    "floats": (lambda g, w: _set(g, g[_first(g)].float() + 0.5), "stored as float32, not integers"),
    "duplicates": (lambda g, w: g[_first(g)].__setitem__((0, 0), 1), "repeat a neuron"),
    "too many": (lambda g, w: _set(g, torch.arange(100, dtype=torch.int32).expand(*g[_first(g)].shape[:2], 100).clone()),
                 "are 100 per sub-expert"),
}


@pytest.mark.parametrize("edit, needle", GATE_EDITS.values(), ids=GATE_EDITS.keys())
def test_damaged_gate_neurons_are_one_line(edit, needle, damaged):
    export = damaged(edit)
    with pytest.raises(PrismError, match="gate_neurons.safetensors: layer ") as exc:
        load_elastic(str(export))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_an_integer_expert_tensor_in_an_export_is_refused(damaged):
    def edit(gates: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        key = sorted(k for k in weights if ".experts." in k)[0]
        weights[key] = weights[key].to(torch.int32)

    with pytest.raises(PrismError, match=r"expert tensor .*experts.* is stored as I32, not floating point"):
        load_elastic(str(damaged(edit)))


# --- damaged partitions -------------------------------------------------------------------------------


def _edited_partition(partition: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "p.h5"
    shutil.copy(partition, copy)
    with h5py.File(copy, "r+") as h5:
        edit(h5)
    return copy


def _replace_gates(h5: h5py.File, change) -> None:
    layer = sorted(h5["layers"], key=int)[0]
    gates = h5[f"layers/{layer}/gate_positions"][()]
    del h5[f"layers/{layer}/gate_positions"]
    h5[f"layers/{layer}/gate_positions"] = change(gates)


PARTITION_EDITS = {
    "floats": (lambda g: g.astype(np.float32) + 0.25, "stored as float32, not integers"),
    "duplicates": (lambda g: np.concatenate([g[..., :1], g[..., :1]], axis=-1), "repeat a neuron"),
    "too many": (lambda g: np.broadcast_to(np.arange(40, dtype=np.int32), (*g.shape[:2], 40)).copy(), "are 40 per sub-expert"),
}


@pytest.mark.parametrize("change, needle", PARTITION_EDITS.values(), ids=PARTITION_EDITS.keys())
def test_damaged_partition_gate_positions_are_refused(change, needle, partition, tmp_path):
    path = _edited_partition(partition, tmp_path, lambda h5: _replace_gates(h5, change))
    with pytest.raises(PrismError, match="is corrupt: layer .* gate positions") as exc:
        read_partition(path)
    assert needle in str(exc.value)


@pytest.mark.parametrize("value", ["two", 2.5, float("nan")])
def test_a_non_integer_format_version_is_one_line(value, cli, model, partition, tmp_path):
    path = _edited_partition(partition, tmp_path, lambda h5: h5.attrs.__setitem__("format_version", value))
    out = tmp_path / "out"
    cli("export", model, path, "--out", out).assert_one_line_error(str(path), "format_version", repr(value))
    assert_nothing_written(out)
