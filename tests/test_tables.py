"""The committed operating-point table of the built-in model must match what the code produces now.

The quality columns are regenerated from the committed partition (export + quality sweep, no timing)
and compared with ``tables/builtin/operating_points.csv``: a change that moves quality without
regenerating the table (``make tables``) fails here. Latency columns are machine-dependent and are
not compared. The slow test regenerates every row from scratch, the profile and partition included.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from prism_cli.errors import Interrupted, PrismError
from prism_cli.pipeline.tables import QUALITY_COLUMNS, TableConfig, quality_table, regenerate

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tables" / "builtin"
CONFIG = ROOT / "configs" / "builtin.yaml"


def _committed() -> list[dict[str, str]]:
    with open(TABLE / "operating_points.csv", newline="") as fh:
        return [{c: row[c] for c in QUALITY_COLUMNS} for row in csv.DictReader(fh)]


def _assert_same_quality(fresh: list[dict], committed: list[dict[str, str]], *, subset: bool = False) -> None:
    if subset:
        by_point = {r["point"]: r for r in committed}
        assert all(r["point"] in by_point for r in fresh), "the table lacks points: run make tables"
        committed = [by_point[r["point"]] for r in fresh]
    assert [r["point"] for r in fresh] == [r["point"] for r in committed], "the table lists other points: run make tables"
    for new, old in zip(fresh, committed, strict=True):
        assert new["kind"] == old["kind"]
        # Perplexity to 1e-4 relative, KL and agreement to 1e-4 absolute: float summation can differ in
        # the last digits between CPUs; a real change to the pipeline moves them far more.
        assert float(new["perplexity"]) == pytest.approx(float(old["perplexity"]), rel=1e-4), new["point"]
        assert float(new["KL"]) == pytest.approx(float(old["KL"]), abs=1e-4), new["point"]
        assert float(new["top-1 agree"]) == pytest.approx(float(old["top-1 agree"]), abs=1e-4), new["point"]
        assert float(new["active sub-experts"]) == pytest.approx(float(old["active sub-experts"]), rel=1e-4), new["point"]


#: One row of each kind of point (about 10 s each on 2 cores); the slow test checks every row.
QUICK_POINTS = ["linear:3", "layered:2+2", "topk:1", "topk:5", "threshold:0.9"]  # the original top-1..k rows come with any sweep


def test_quality_columns_match_the_committed_table(tmp_path: Path) -> None:
    config = TableConfig.load(CONFIG)
    _, report = regenerate(config, tmp_path / "tables", tmp_path / "work", partition=TABLE / "partition.h5",
                           quality_only=True, points=QUICK_POINTS)
    _assert_same_quality(quality_table(report).records(), _committed(), subset=True)


def test_a_partition_of_another_config_is_refused_before_any_work(tmp_path: Path) -> None:
    """The committed N = 8 partition (8 sub-experts, 2 gate neurons) under the N = 4 config (4 and 8)."""
    config = TableConfig.load(CONFIG)
    with pytest.raises(PrismError, match=r"sub_experts 8 \(config: 4\), gate_neurons 2 \(config: 8\)"):
        regenerate(config, tmp_path / "tables", tmp_path / "work", partition=ROOT / "tables" / "builtin-n8" / "partition.h5",
                   quality_only=True, points=QUICK_POINTS)
    assert not (tmp_path / "work").exists() and not (tmp_path / "tables").exists()


@pytest.mark.slow
def test_the_whole_table_regenerates(tmp_path: Path) -> None:
    """Profile, partition (NSGA-II), export and the quality sweep from scratch: every quality column
    of the committed table (timing is skipped: it is machine-dependent and not compared)."""
    config = TableConfig.load(CONFIG)
    _, report = regenerate(config, tmp_path / "tables", tmp_path / "work", quality_only=True)
    _assert_same_quality(quality_table(report).records(), _committed())


def test_an_interrupted_table_run_continues_when_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while profiling keeps the progress in the table's work folder, and the same command run again
    continues it (``prism tables`` has no --resume: its work folder is its own); no table folder is left."""
    config = TableConfig.load(CONFIG)
    config.profile = {**config.profile, "tokens": 4096}

    def stages(name: str, _total: int):
        def advance(n: int, total: int | None = None) -> None:
            if name == "profile" and n > 0:
                raise KeyboardInterrupt
        return advance

    work = tmp_path / "work"
    with pytest.raises(Interrupted, match="rerun the same command to continue"):
        regenerate(config, tmp_path / "tables", work, on_stage=stages)
    assert (work / "profile.h5.partial").is_dir()

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr("prism_cli.pipeline.tables.partition_profile", stop)  # the profile is what is checked
    with pytest.raises(Stop):
        regenerate(config, tmp_path / "tables", work)
    assert (work / "profile.h5").is_file() and not (work / "profile.h5.partial").exists()
    assert not (tmp_path / "tables").exists()
