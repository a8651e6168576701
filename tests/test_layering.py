"""The package's imports run one way: profile -> solvers -> export -> runtime -> evaluation -> the
online half -> the whole-pipeline runs -> the CLI. Read from the source with ``ast`` (nothing is
imported), so a new import against the order fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prism_cli"

#: Layers, lowest first. A module may import its own layer and the ones below it.
LAYERS: list[set[str]] = [
    {"errors", "registry", "io", "report", "console", "allocator", "environment", "operating_points", "data", "layers"},
    {"models"},
    {"profiling"},
    {"solvers"},
    {"export"},
    {"cuda"},
    {"runtime"},
    {"evaluation"},
    {"offload"},
    {"tuning"},
    {"serving"},
    {"planner"},
    {"config"},
    {"pipeline"},
    {"commands"},
    {"app", "cli", "__main__", "__init__"},
]

#: Imports against the order that are allowed, each inside a function only (so importing the lower
#: module never loads the higher one), with the reason.
ALLOWED_LAZY = {
    ("export", "runtime"): "export measures the written folder through the runtime before renaming it into place",
    ("runtime", "offload"): "load_elastic(offload=...) attaches the sub-expert cache when asked for",
    ("evaluation", "offload"): "bench --device-memory attaches the sub-expert cache when asked for",
    ("environment", "runtime"): "every report records the executor bounds it ran under (runtime/bounds.py, torch-free)",
    ("config", "app"): "the config file's schema is the CLI's own options",
}


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"prism_cli.{name} is in no layer of tests/test_layering.py: place it")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level prism_cli package imported, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            lazy = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "prism_cli":  # `from prism_cli import cuda`, not `__version__`
                    names = [a.name for a in child.names
                             if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()]
                elif child.module.startswith("prism_cli."):
                    names = [child.module.split(".")[1]]
            elif isinstance(child, ast.Import):
                names = [a.name.split(".")[1] for a in child.names if a.name.startswith("prism_cli.")]
            found.extend((name, child.lineno, in_function) for name in names)
            visit(child, lazy)

    visit(tree, False)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_every_module_has_a_layer() -> None:
    for path in _modules():
        _layer(_package_of(path))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    src = _package_of(path)
    for dst, line, lazy in _imports(path):
        if dst == src or _layer(dst) <= _layer(src):
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports prism_cli.{dst}"
        assert (src, dst) in ALLOWED_LAZY, f"{where}, a later layer than prism_cli.{src}"
        assert lazy, f"{where} at module level: allowed inside a function only ({ALLOWED_LAZY[src, dst]})"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The reader finds module-level and function-level imports (so a passing run means something)."""
    module = tmp_path / "m.py"
    module.write_text("from prism_cli.runtime.elastic import x\n\ndef f():\n    from prism_cli import commands\n")
    assert _imports(module) == [("runtime", 1, False), ("commands", 4, True)]


def test_the_library_never_imports_the_cli() -> None:
    cli = {"commands", "app", "cli", "__main__"}
    for path in _modules():
        src = _package_of(path)
        if src in cli or (src == "config"):
            continue
        bad = [line for dst, line, _ in _imports(path) if dst in cli]
        assert not bad, f"{path.relative_to(PACKAGE.parent)}:{bad[0]} imports the CLI"
