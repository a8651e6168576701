"""``prism tables``: a table config is checked whole before any stage runs, and the run never writes
outside its folders nor replaces what is not its own.

Every bad value is refused in one line naming the config file and the key, with exit code 2, before
the model is loaded or anything written (the stages are replaced by functions that fail the test if
called); a run refused or failed leaves no work folder behind; a work folder whose ``export/`` is not a
prism export is refused, not emptied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from prism_cli.errors import PrismError
from prism_cli.pipeline.tables import TableConfig, bench_settings

ROOT = Path(__file__).resolve().parent.parent

#: A small valid table config of the built-in model (the fuzz tester's base).
BASE: dict[str, Any] = {
    "name": "small",
    "model": "builtin",
    "seed": 0,
    "profile": {"data": "builtin:calibration", "tokens": 2048, "max_rows": 256},
    "partition": {"solver": "greedy", "sub_experts": 4, "gate_neurons": 8, "gate_selection": "mass"},
    "export": {"gate": "neurons"},
    "bench": {"data": "builtin:eval", "tokens": 256, "mode": "prefill", "batch": "1", "seq_len": 32, "repeats": 1,
              "max_repeats": 1, "warmup": 0, "settle": 0, "points": "topk:1"},
}

#: The stages of a table run: none may run when the config or the work folder is refused.
STAGES = ("load_model", "profile_model", "partition_profile", "write_partition", "export_model", "rank_export", "run_bench")


def write_config(folder: Path, **changes: Any) -> Path:
    """BASE with ``changes`` (``bench__mode="x"`` sets bench.mode; ``rank_layers=...`` the rank-layers section)."""
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, _, option = key.partition("__")
        section = section.replace("_", "-") if section == "rank_layers" else section
        if option:
            data.setdefault(section, {})[option] = value
        else:
            data[section] = value
    path = folder / "t.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def no_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any stage of the pipeline that is called fails the test."""
    for name in STAGES:
        def called(*_args: Any, _name: str = name, **_kwargs: Any) -> None:
            raise AssertionError(f"{_name} ran: the run should have been refused before any stage")
        monkeypatch.setattr(f"prism_cli.pipeline.tables.{name}", called)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


BAD_VALUES = [
    # (changes, phrases the one error line must hold besides the config file)
    ({"name": 123}, ("'name'", "not 123")),
    ({"name": 1.10}, ("'name'", "takes a string")),
    ({"name": "../ESCAPED"}, ("'name'", "one folder name", "'../ESCAPED'")),
    ({"name": "/tmp/ESCAPED-prism-test"}, ("'name'", "one folder name")),
    ({"name": "a/b"}, ("'name'", "one folder name")),
    ({"name": ""}, ("'name'", "one folder name")),
    ({"name": "."}, ("'name'", "one folder name")),
    ({"name": ".."}, ("'name'", "one folder name")),
    ({"seed": "abc"}, ("'seed'", "integer", "'abc'")),
    ({"seed": 1.5}, ("'seed'", "integer", "1.5")),
    ({"seed": -1}, ("'seed'", "between 0")),
    ({"device": "tpu"}, ("device 'tpu'", "unknown device")),
    ({"model": "/nonexistent/model"}, ("model '/nonexistent/model'", "does not exist")),
    ({"profile__tokens": "lots"}, ("section 'profile'", "'tokens'", "'lots'")),
    ({"profile__tokens": -5}, ("section 'profile'", "--tokens", "-5")),
    ({"profile__holdout": 1.5}, ("section 'profile'", "--holdout")),
    ({"profile__data": "no-such-file.txt"}, ("section 'profile'", "no-such-file.txt", "does not exist")),
    ({"partition__sub_experts": "four"}, ("section 'partition'", "'sub_experts'", "'four'")),
    ({"partition__sub_experts": 3}, ("section 'partition'", "--sub-experts 3", "does not divide")),
    ({"partition__solver": "bogus"}, ("section 'partition'", "solver 'bogus'")),
    ({"partition__workers": 0}, ("section 'partition'", "--workers")),
    ({"export__gate": "bogus"}, ("section 'export'", "gate 'bogus'")),
    ({"export__operating_point": "topk:99"}, ("section 'export'", "topk:99")),
    ({"bench__batch": "8,x"}, ("section 'bench'", "'batch'", "'x'")),
    ({"bench__batch": 0}, ("section 'bench'", "--batch")),
    ({"bench__mode": "sideways"}, ("section 'bench'", "--mode", "'sideways'")),
    ({"bench__points": "foo:1"}, ("section 'bench'", "'foo:1'")),
    ({"bench__points": ";"}, ("section 'bench'", "'points'", "names no operating point")),
    ({"bench__repeats": True}, ("section 'bench'", "'repeats'", "true")),
    ({"bench__seq_len": 999999}, ("section 'bench'", "--seq-len 999999", "positions")),
    ({"bench__data": "builtin:nope"}, ("section 'bench'", "'nope'")),
    ({"rank_layers": {"tokens": 8, "seq_len": 64}}, ("section 'rank-layers'", "--tokens")),
    ({"rank_layers": {"tokenz": 8}}, ("section 'rank-layers'", "'tokenz'")),
]


@pytest.mark.parametrize(("changes", "phrases"), BAD_VALUES, ids=[str(c) for c, _ in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_before_any_stage(tmp_path: Path, cli, no_stages, changes, phrases) -> None:
    config = write_config(tmp_path, **changes)
    before = tree(tmp_path)
    result = cli("tables", "--config", config, "--out", tmp_path / "sub" / "out", "--work", tmp_path / "sub" / "work")
    assert result.code == 2, result
    result.assert_one_line_error(f"config file {config}", *phrases)
    assert tree(tmp_path) == before  # no work folder, no table, nothing outside --out (name: ../ESCAPED)
    assert not Path("/tmp/ESCAPED-prism-test").exists()


def test_a_bad_value_is_refused_by_load_itself(tmp_path: Path) -> None:
    """The library call checks as the CLI does (``regenerate`` and ``pipeline.stability`` load configs too)."""
    with pytest.raises(PrismError, match=r"section 'bench': .*'batch' takes an integer, not 'x'"):
        TableConfig.load(write_config(tmp_path, bench__batch="8,x"))


def test_list_values_are_read_as_on_the_command_line(tmp_path: Path) -> None:
    """``batch`` and ``points`` take a YAML list or the command line's separated string alike."""
    listed = TableConfig.load(write_config(tmp_path, bench__batch=[8, 32], bench__points=["topk:1", "linear:4"]))
    settings, _ = bench_settings(listed)
    assert settings.batches == [8, 32] and settings.points == ["topk:1", "linear:4"]
    typed = TableConfig.load(write_config(tmp_path, bench__batch="8,32", bench__points="topk:1;linear:4"))
    assert bench_settings(typed)[0].batches == [8, 32] and bench_settings(typed)[0].points == ["topk:1", "linear:4"]


@pytest.mark.parametrize("config", ["builtin.yaml", "builtin-n8.yaml"])
def test_the_committed_configs_load_and_round_trip(tmp_path: Path, config: str) -> None:
    loaded = TableConfig.load(ROOT / "configs" / config)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(loaded.as_file(), sort_keys=False))
    assert TableConfig.load(again) == loaded
    assert TableConfig.load(ROOT / "tables" / loaded.name / "config.yaml") == loaded


@pytest.mark.parametrize("content", ["mine.txt", "config.json", "file"])
def test_a_work_folder_export_of_the_users_is_refused_not_replaced(tmp_path: Path, cli, no_stages, content: str) -> None:
    """``--work wk`` with ``wk/export`` holding the user's files (or a config.json without a prism section, or
    a file named export): refused in one line before any stage, every file kept."""
    work = tmp_path / "wk"
    work.mkdir()
    if content == "file":
        (work / "export").write_text("mine")
    else:
        (work / "export").mkdir()
        (work / "export" / content).write_text('{"model_type": "olmoe"}' if content == "config.json" else "mine")
    config = write_config(tmp_path)
    before = tree(tmp_path)
    result = cli("tables", "--config", config, "--out", tmp_path / "out", "--work", work)
    assert result.code == 2, result
    result.assert_one_line_error(f"{work / 'export'}", "not a prism export", "--work")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("name", "content"), [("profile.h5", "notes"), ("partition.h5", "hdf5"), ("profile.h5", "partition"),
                                              ("partition.h5", "folder")])
def test_a_work_folder_profile_or_partition_of_the_users_is_refused(tmp_path: Path, cli, no_stages, name: str,
                                                                     content: str) -> None:
    """``wk/profile.h5`` or ``wk/partition.h5`` that is not a prism file of that kind (a text file, another HDF5
    file, a partition where the profile goes, a folder): refused in one line before any stage, nothing touched.
    A rerun's own files, written by prism, are the run's to replace."""
    import h5py

    work = tmp_path / "wk"
    work.mkdir()
    path = work / name
    if content == "notes":
        path.write_text("mine")
    elif content == "folder":
        path.mkdir()
    else:
        with h5py.File(path, "w") as h5:
            h5.attrs["format"] = "prism-partition" if content == "partition" else "someone-elses"
    config = write_config(tmp_path)
    before = tree(tmp_path)
    result = cli("tables", "--config", config, "--out", tmp_path / "out", "--work", work)
    assert result.code == 2, result
    kind = name.removesuffix(".h5")
    result.assert_one_line_error(f"{path}", f"not a prism {kind}", "--work")
    assert tree(tmp_path) == before


def test_a_prism_export_in_the_work_folder_is_the_tables_own(tmp_path: Path) -> None:
    """An earlier run's export (config.json with a prism section) is the run's to replace: a rerun works."""
    from prism_cli.pipeline.tables import check_work_folder

    (tmp_path / "export").mkdir()
    check_work_folder(tmp_path)  # empty: as `export --force` would replace it
    (tmp_path / "export" / "config.json").write_text(json.dumps({"model_type": "olmoe", "prism": {"format_version": 1}}))
    check_work_folder(tmp_path)
    check_work_folder(tmp_path / "missing")
    import h5py

    for name, fmt in (("profile.h5", "prism-profile"), ("partition.h5", "prism-partition")):
        with h5py.File(tmp_path / name, "w") as h5:  # an earlier run's (of any format version)
            h5.attrs["format"] = fmt
    check_work_folder(tmp_path)


def test_a_reused_partition_needs_no_profile_text(tmp_path: Path) -> None:
    """With --partition no profiling runs: the profile section's text need not exist (a CI job reusing a
    committed partition, without the calibration file), though its keys are still checked."""
    config = write_config(tmp_path, profile__data=str(tmp_path / "gone.txt"))
    with pytest.raises(PrismError, match="gone.txt does not exist"):
        TableConfig.load(config)
    TableConfig.load(config, profiles=False)
    with pytest.raises(PrismError, match="'tokenz'"):
        TableConfig.load(write_config(tmp_path, profile__tokenz=5), profiles=False)


def test_rank_layers_windows_are_checked_with_its_default_tokens(tmp_path: Path) -> None:
    """A seq_len past rank-layers' default 16,384 tokens, with no tokens given, is refused before any stage
    (the early check had taken tokens = seq_len, and rank-layers refused only after the export)."""
    from prism_cli.pipeline.tables import rank_settings
    from prism_cli.tuning.layers import TOKENS

    config = TableConfig(name="t", layers={"seq_len": TOKENS + 1})
    with pytest.raises(PrismError, match="--tokens must be at least --seq-len"):
        rank_settings(config)
    assert rank_settings(TableConfig(name="t", layers={"seq_len": TOKENS}))["seq_len"] == TOKENS


def test_a_run_that_fails_leaves_no_work_folder(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails once the checks have passed (here: loading the model) removes the work folder
    (and its parents) it created empty."""
    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise PrismError("the model could not be loaded")

    monkeypatch.setattr("prism_cli.pipeline.tables.load_model", fail)
    config = write_config(tmp_path)
    before = tree(tmp_path)
    result = cli("tables", "--config", config, "--out", tmp_path / "out", "--work", tmp_path / "a" / "work")
    assert result.code == 2, result
    result.assert_one_line_error("the model could not be loaded")
    assert tree(tmp_path) == before


def test_a_copy_stopped_midway_keeps_the_tables_partition_whole(tmp_path, monkeypatch) -> None:
    """The table's partition.h5 was copied in place: a Ctrl-C mid-copy left a truncated committed file."""
    import shutil

    from prism_cli.pipeline import tables

    table = tmp_path / "table"
    table.mkdir()
    (table / "partition.h5").write_bytes(b"old partition")
    new = tmp_path / "partition.h5"
    new.write_bytes(b"new partition, longer")

    def stopped(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", stopped)
    with pytest.raises(KeyboardInterrupt):
        tables.keep_partition(new, table)
    assert [p.name for p in table.iterdir()] == ["partition.h5"]
    assert (table / "partition.h5").read_bytes() == b"old partition"
    monkeypatch.undo()
    tables.keep_partition(new, table)
    assert (table / "partition.h5").read_bytes() == b"new partition, longer"
    tables.keep_partition(table / "partition.h5", table)  # the table's own: nothing to copy
    assert (table / "partition.h5").read_bytes() == b"new partition, longer"


def test_a_shared_data_key_is_each_stages_text_unless_its_section_names_one(tmp_path: Path) -> None:
    """A top-level ``data`` is read as each command reads it from the same file (the default of its --data):
    the profile, rank-layers and bench text where their sections name none (it had been ignored)."""
    text = tmp_path / "mine.txt"
    text.write_text("plain words for every stage. " * 50)
    config = write_config(tmp_path, data=str(text), rank_layers={"tokens": 256})
    raw = yaml.safe_load(config.read_text())
    del raw["profile"]["data"], raw["bench"]["data"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    loaded = TableConfig.load(config)
    assert loaded.profile["data"] == loaded.bench["data"] == loaded.layers["data"] == str(text)
    raw["bench"]["data"] = "builtin:eval"  # a section's own text wins
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert TableConfig.load(config).bench["data"] == "builtin:eval"
    assert TableConfig.load(config).profile["data"] == str(text)
