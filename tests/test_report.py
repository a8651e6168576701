"""Result tables: every format written, names kept as given."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from prism_cli.report import ResultTable


@pytest.mark.parametrize("name, stem", [("compare", "compare"), ("run.v2", "run.v2"), ("table.md", "table"), ("table.csv", "table")])
def test_save_writes_markdown_csv_and_json_next_to_the_stem(tmp_path: Path, name: str, stem: str) -> None:
    table = ResultTable("solvers", ["solver", "cost"])
    table.add("anneal", 0.5)
    paths = table.save(tmp_path / "out" / name, extra={"seed": 3})
    assert [p.name for p in paths] == [f"{stem}.md", f"{stem}.csv", f"{stem}.json"]
    assert "| anneal |" in paths[0].read_text()
    assert list(csv.DictReader(paths[1].open())) == [{"solver": "anneal", "cost": "0.5"}]
    data = json.loads(paths[2].read_text())
    assert data["rows"] == [{"solver": "anneal", "cost": 0.5}] and data["seed"] == 3
    assert data["environment"]["processor"] and "source" in data["environment"]  # where the caller gave none
    given = json.loads(table.save(tmp_path / "given", extra={"environment": {"gpu": "x"}})[2].read_text())
    assert given["environment"] == {"gpu": "x"}


def test_the_environment_names_the_commit_that_ran(tmp_path: Path) -> None:
    """Against git itself: the commit of a checkout, ``+dirty`` once a tracked file changes, None outside one."""
    import shutil
    import subprocess

    from prism_cli.environment import source_revision

    if shutil.which("git") is None:
        pytest.skip("needs git")
    assert source_revision(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "new.txt").write_text("untracked files do not count")
    assert source_revision(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert source_revision(tmp_path) == head + "+dirty"
