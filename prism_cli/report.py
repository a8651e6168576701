"""Result tables: one object rendered as a rich table on screen and saved as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from prism_cli.console import console
from prism_cli.environment import environment
from prism_cli.errors import PrismError
from prism_cli.io import check_not_input, check_output_folder, write_json, write_text


def fmt(value: Any, digits: int = 4) -> str:
    """Human formatting for table cells: floats to ``digits`` significant places, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


@dataclass
class ResultTable:
    """A titled table with named columns; ``notes`` are printed under it and kept in every file."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"row has {len(values)} values for {len(self.columns)} columns")
        self.rows.append(list(values))

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def rich(self) -> RichTable:
        table = RichTable(title=self.title, caption="\n".join(self.notes) or None, caption_justify="left")
        for col in self.columns:
            table.add_column(col, justify="left" if not self.rows or isinstance(self.rows[0][self.columns.index(col)], str) else "right")
        for row in self.rows:
            table.add_row(*(fmt(v) for v in row))
        return table

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"{note}  " for note in self.notes]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return buf.getvalue()

    @staticmethod
    def stem(stem: Path) -> Path:
        """``stem`` less a ``.md``, ``.csv`` or ``.json`` suffix (`--out results/table.md` names the stem too)."""
        stem = Path(stem)
        return stem.with_suffix("") if stem.suffix in (".md", ".csv", ".json") else stem

    @classmethod
    def paths(cls, stem: Path) -> list[Path]:
        """The ``.md``, ``.csv`` and ``.json`` files ``save(stem)`` writes."""
        stem = cls.stem(stem)
        return [stem.with_name(stem.name + ext) for ext in (".md", ".csv", ".json")]  # keep dots in the stem

    @classmethod
    def check_writable(cls, stem: Path, inputs: dict[str, Path] | None = None, others: tuple[str, ...] = ()) -> None:
        """Fail before long work if ``save(stem)`` could not write its files, or would write one over or
        inside one of the run's ``inputs`` (``{"export": DIR, "cost model": FILE}``).

        A stem that is an existing folder (``--out results``) is refused: the files would land beside it
        as ``results.md`` ..., not in it. Commands that write into a folder take ``--out DIR`` instead.
        ``others``: suffixes of further files the command writes beside them (``".png"``, ``"_targets.json"``).
        Files already there are replaced only where they are an earlier result of this stem (its ``.json`` is a
        result table's): a stem that names a user's own notes.md or data.json is refused, not written over.
        """
        if Path(stem).is_dir():
            raise PrismError(f"--out {stem} is a folder; give a file stem such as {Path(stem) / 'table'} "
                             f"(writes .md, .csv and .json)")
        paths = cls.paths(stem)
        base = cls.stem(stem)
        paths += [base.with_name(base.name + suffix) for suffix in others]
        check_output_folder(paths[0].parent)
        for path in paths:
            if path.is_dir():
                raise PrismError(f"cannot write {path}: it is a folder")
            check_not_input(path, inputs or {}, inside=True)
        existing = next((p for p in paths if p.is_file()), None)
        if existing is not None and not cls.is_result(paths[2]):
            raise PrismError(f"--out {stem} would replace {existing}, which is not an earlier result of this stem "
                             f"({paths[2].name} is not a prism result table); move it or choose another --out")

    @staticmethod
    def is_result(path: Path) -> bool:
        """Whether ``path`` is the JSON of a result table (``save`` writes its title and rows)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and "title" in data and isinstance(data.get("rows"), list)

    def save(self, stem: Path, extra: dict[str, Any] | None = None) -> list[Path]:
        """Write ``stem.md``, ``stem.csv`` and ``stem.json`` (the JSON also carries ``extra``, and where that has
        none, the ``environment()`` it was written in: every results file names its machine and commit)."""
        paths = self.paths(stem)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        write_text(paths[0], self.markdown())
        write_text(paths[1], self.csv())
        data = {"title": self.title, "notes": self.notes, "rows": self.records(), **(extra or {})}
        data.setdefault("environment", environment())
        write_json(paths[2], data)
        return paths

    def publish(self, stem: Path) -> None:
        """``save(stem)``, then print the table and where it went (the benchmark scripts' last step)."""
        self.save(stem)
        console.print(self.rich())
        console.print(f"written {stem}.md, .csv, .json")
