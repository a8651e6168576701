"""Shared fixtures: offline mode, tiny models of every family, and an in-process CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch
from tiny_models import FAMILIES, build_tiny


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
    from test_export import random_neurons_export

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
