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
