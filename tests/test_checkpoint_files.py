"""Safetensors headers and the weights fingerprint: what tells two checkpoints apart, what does not,
and one-line refusals of truncated or corrupt files (``prism_cli.models.checkpoint_files``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prism_cli.errors import PrismError
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint import CheckpointReader
from prism_cli.models.checkpoint_files import CHUNK_BYTES, SAMPLE_CHUNKS, check_checkpoint_files, read_header, tensors_fingerprint
from prism_cli.models.loading import load_config, weights_fingerprint


def fingerprint(model_dir: Path) -> str:
    return weights_fingerprint(model_dir, adapter_for_config(load_config(str(model_dir))))


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose single weights file went through ``edit(tensors)``."""
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def olmoe(tiny_model_dir) -> Path:
    return tiny_model_dir("olmoe")


def test_a_copy_and_a_resharded_copy_have_the_same_fingerprint(olmoe, tmp_path):
    shutil.copytree(olmoe, tmp_path / "copy")
    model = AutoModelForCausalLM.from_pretrained(str(olmoe), dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert fingerprint(tmp_path / "copy") == fingerprint(tmp_path / "sharded") == fingerprint(olmoe)


@pytest.mark.parametrize(
    "name, edit",
    [
        ("one number of layer 1's router", lambda t: t["model.layers.1.mlp.gate.weight"].__setitem__((3, 5), 0.25)),
        ("every expert weight x 1.01", lambda t: [t.__setitem__(k, t[k] * 1.01) for k in list(t) if ".experts." in k]),
        ("two experts swapped", lambda t: [t.__setitem__(f"model.layers.0.mlp.experts.{a}.up_proj.weight", v)
                                           for a, v in ((0, t["model.layers.0.mlp.experts.1.up_proj.weight"]),
                                                        (1, t["model.layers.0.mlp.experts.0.up_proj.weight"]))]),
        ("the embeddings", lambda t: t.__setitem__("model.embed_tokens.weight", t["model.embed_tokens.weight"] + 1e-3)),
        ("stored in float16", lambda t: [t.__setitem__(k, t[k].half()) for k in list(t)]),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_changed_checkpoint_has_another_fingerprint(olmoe, tmp_path, name, edit):
    assert fingerprint(edited_copy(olmoe, tmp_path / "edited", edit)) != fingerprint(olmoe), name


def _digest(path: Path, tensor: torch.Tensor, whole: bool) -> str:
    """Fingerprint of a file holding ``tensor`` alone, hashed whole (a router) or sampled."""
    save_file({"model.layers.0.mlp.experts.0.up_proj.weight": tensor}, str(path))
    return tensors_fingerprint(read_header(path), lambda _name: whole)


@pytest.mark.parametrize("whole", [False, True], ids=["sampled", "router"])
def test_a_large_tensor_is_sampled_at_both_ends_and_between(tmp_path, whole):
    """The documented limit: of a tensor larger than the sample, SAMPLE_CHUNKS evenly spaced chunks are
    read, the first and the last bytes among them; a change between two samples goes unnoticed unless
    the tensor is a router, which is hashed whole."""
    elements = 64 * CHUNK_BYTES // 4  # 256 KiB of float32, far larger than the 4 x 4 KiB sample
    assert SAMPLE_CHUNKS == 4  # the chunks start at 0, 1/3, 2/3 of the tensor and at its end
    base = torch.arange(elements, dtype=torch.float32)
    reference = _digest(tmp_path / "base.safetensors", base, whole)
    sampled = ((0, True), (elements - 1, True), (elements // 3, True), (2 * elements // 3, True))
    for element, seen in (*sampled, (elements // 6, whole), (elements // 2, whole)):
        changed = base.clone()
        changed[element] += 1
        assert (_digest(tmp_path / "changed.safetensors", changed, whole) != reference) is seen, element


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda b: b[: len(b) // 2], "is truncated"),
        (lambda b: b[:5], "is truncated"),
        (lambda b: b + b"\0" * 16, "past its last tensor"),
        (lambda b: b[:8] + b"{not json" + b[17:], "corrupt header"),
        (lambda b: (2**40).to_bytes(8, "little") + b[8:], "truncated or not safetensors"),
    ],
    ids=["half", "five-bytes", "extra-bytes", "bad-json", "huge-header-length"],
)
def test_damaged_weights_are_one_line_errors(olmoe, tmp_path, damage, needle):
    target = tmp_path / "damaged"
    shutil.copytree(olmoe, target)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(damage(data))
    with pytest.raises(PrismError, match=needle):
        check_checkpoint_files(target)
    with pytest.raises(PrismError, match=needle):
        fingerprint(target)


def test_an_index_naming_a_missing_shard_is_refused(olmoe, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(olmoe), dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / missing).unlink()
    with pytest.raises(PrismError, match=f"{missing} named in .* is missing"):
        check_checkpoint_files(tmp_path / "sharded")


def test_the_reader_reads_again_after_release_and_names_dtypes_from_the_header(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(4, dtype=torch.float32),
               "c": torch.arange(3, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    first = reader.get("a")
    reader.release()
    assert reader._handles == {}
    assert torch.equal(reader.get("a"), first) and torch.equal(reader.get("b"), tensors["b"])
    assert (reader.dtype("a"), reader.dtype("b"), reader.dtype("c")) == (torch.bfloat16, torch.float32, None)
    with pytest.raises(PrismError, match="missing"):
        reader.dtype("d")
