"""The family matrix: every MoE model type of the installed transformers, through prism end to end.

For each model type whose config counts experts (``prism_cli.models.tiny.moe_model_types``), a tiny
random checkpoint is built and taken through ``profile -> partition -> export`` with both gates; each
export measures its own exactness (``prism_cli.export.exactness``: every MoE block of the source and of
the export on probe inputs at the full operating point). A family prism does not handle ends at the
first step that refuses it, and its row carries that one-line refusal. A model type transformers
cannot build small (its smallest config is invalid, or it is not a causal LM) says so.

    python -m prism_cli.evaluation.families --out results/families     (make families)

writes ``families.md``, ``families.csv`` and ``families.json``: family, status, measured difference
per gate, MoE layers, expert layout and reason. ``tests/test_families.py`` runs the same matrix in the
fast suite and checks it against whole-model outputs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prism_cli.errors import PrismError

#: Statuses, best first.
EXACT_BOTH = "exact, both gates"
EXACT_NEURONS = "exact, neurons gate (linear refused)"
EXACT_LINEAR = "exact, linear gate (neurons refused)"
REFUSED = "refused"
NOT_BUILT = "not built small"
STATUSES = (EXACT_BOTH, EXACT_NEURONS, EXACT_LINEAR, REFUSED, NOT_BUILT)

#: The small pipeline each family goes through.
PROFILE = dict(tokens=2048, seq_len=64, batch_size=8, max_rows=128, row_dtype="float32")
N_SUB = 4
GATE_NEURONS = 2


@dataclass
class FamilyRow:
    """One model type's result."""

    model_type: str
    status: str
    linear: float | None = None
    neurons: float | None = None
    moe_layers: str = ""
    experts: str = ""
    layout: str = ""
    reason: str = ""
    seconds: float = 0.0


def _first_line(exc: BaseException) -> str:
    """The one-line message, without the list of supported families an unsupported one is told."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split("; supported: ")[0].split("; prism supports: ")[0]


def _layout(layers: list[Any]) -> str:
    layout = layers[0].layout
    parts = ["transposed" if layout.transposed else "", "interleaved" if layout.interleaved else "",
             "bias" if layout.bias else "", "own activation" if layout.custom_activation else ""]
    router = layers[0].router_name
    return ", ".join([p for p in parts if p] or ["standard"]) + ("" if router == "gate" else f", router '{router}'")


def run_family(model_type: str, workdir: Path, *, seed: int = 0) -> FamilyRow:
    """Take one model type through prism; any refusal becomes the row's reason."""
    from prism_cli.data import load_text
    from prism_cli.export.builder import ExportSettings, export_model
    from prism_cli.models.adapters import adapter_for_config
    from prism_cli.models.conversion import skeleton
    from prism_cli.models.loading import load_config, load_model
    from prism_cli.models.tiny import build_tiny_model, is_causal_lm, tiny_config
    from prism_cli.profiling.profiler import ProfileSettings, profile_model
    from prism_cli.solvers.format import write_partition
    from prism_cli.solvers.runner import PartitionSettings, partition_profile

    start = time.perf_counter()
    row = FamilyRow(model_type, NOT_BUILT)
    source = workdir / "source"
    if not is_causal_lm(model_type):
        # Nothing to build: what prism says about such a checkpoint is what it reads first, its config.
        source.mkdir(parents=True)
        try:
            tiny_config(model_type).save_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - the config class's own validation, whatever it raises
            row.reason = f"transformers cannot build its smallest config: {_first_line(exc)}"
            return row
        try:
            adapter_for_config(load_config(str(source)))
        except PrismError as exc:
            row.status, row.reason = REFUSED, _first_line(exc)
        row.seconds = time.perf_counter() - start
        return row
    try:
        # an unsupported family is refused before it is built, from the config its causal LM reads
        adapter_for_config(skeleton(tiny_config(model_type)).config)
    except PrismError as exc:
        row.status, row.reason = REFUSED, _first_line(exc)
        row.seconds = time.perf_counter() - start
        return row
    except Exception as exc:  # noqa: BLE001 - the config class's own validation, whatever it raises
        row.reason = f"transformers cannot build its smallest config: {_first_line(exc)}"
        return row
    try:
        build_tiny_model(model_type, source, seed=seed)
    except Exception as exc:  # noqa: BLE001 - a family transformers cannot build small, whatever it raises
        row.reason = f"transformers cannot build it small: {_first_line(exc)}"
        return row
    row.status = REFUSED
    try:
        loaded = load_model(str(source))
        layers = loaded.adapter.moe_layers(loaded.model)
        total = getattr(loaded.model.config.get_text_config(), "num_hidden_layers", None)
        row.moe_layers = f"{','.join(str(layer.index) for layer in layers)} of {total}"
        row.layout = _layout(layers)
        row.experts = f"{loaded.adapter.num_experts} x {loaded.adapter.width}, top-{loaded.adapter.top_k}"
        text, data = load_text(None, "calibration")
        profile_model(loaded, text, data, ProfileSettings(**PROFILE, seed=seed), workdir / "profile.h5")
        settings = PartitionSettings(solver="greedy", sub_experts=N_SUB, gate_neurons=GATE_NEURONS, gate_selection="mass",
                                     seed=seed)
        write_partition(workdir / "partition.h5", partition_profile(workdir / "profile.h5", settings, workers=1))
    except PrismError as exc:
        row.reason = _first_line(exc)
        row.seconds = time.perf_counter() - start
        return row
    except Exception as exc:  # noqa: BLE001 - the tiny model's own forward failing (an invalid smallest config)
        row.status, row.reason = NOT_BUILT, f"the tiny model does not run in transformers: {_first_line(exc)}"
        return row
    outcomes: dict[str, str | None] = {}
    for gate in ("linear", "neurons"):
        try:
            result = export_model(str(source), workdir / "partition.h5", workdir / gate, ExportSettings(gate=gate))
            outcomes[gate] = None
            checks = result.exactness
        except PrismError as exc:
            outcomes[gate] = _first_line(exc)
            checks = _measure_anyway(source, workdir, gate)
        if checks:
            row.linear = checks["linear"]["max_rel_diff"] if gate == "linear" or row.linear is None else row.linear
            if "neurons" in checks:
                row.neurons = checks["neurons"]["max_rel_diff"]
    linear, neurons = outcomes["linear"], outcomes["neurons"]
    row.status = {(None, None): EXACT_BOTH, (None, "x"): EXACT_LINEAR, ("x", None): EXACT_NEURONS}.get(
        (None if linear is None else "x", None if neurons is None else "x"), REFUSED)
    row.reason = linear if linear == neurons else "; ".join(
        f"{gate}: {why}" for gate, why in (("linear", linear), ("neurons", neurons)) if why)
    row.seconds = time.perf_counter() - start
    return row


def _measure_anyway(source: Path, workdir: Path, gate: str) -> dict[str, Any] | None:
    """A refused export's measured difference, where it got that far (exported with --allow-inexact)."""
    from prism_cli.export.builder import ExportSettings, export_model

    try:
        result = export_model(str(source), workdir / "partition.h5", workdir / f"{gate}-inexact",
                              ExportSettings(gate=gate, allow_inexact=True))
    except PrismError:
        return None
    return result.exactness


def run_matrix(model_types: list[str] | None = None, *, workdir: Path | None = None, on_row=None) -> list[FamilyRow]:
    """The matrix over ``model_types`` (default: every MoE model type of the installed transformers).

    Each family works in ``workdir / model_type`` (``source``, ``profile.h5``, ``partition.h5`` and the
    ``linear`` / ``neurons`` exports); without ``workdir``, in a temporary folder removed at the end.
    """
    from transformers.utils import logging as hf_logging

    from prism_cli.models.tiny import moe_model_types

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prism-families-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in model_types or moe_model_types():
            folder = Path(workdir or tmp) / model_type
            folder.mkdir(parents=True)
            row = run_family(model_type, folder)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def write_matrix(rows: list[FamilyRow], out: Path) -> list[Path]:
    """``families.md`` / ``.csv`` / ``.json`` under ``out`` (a path prefix)."""
    import transformers

    from prism_cli.report import ResultTable

    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    table = ResultTable(
        f"MoE families of transformers {transformers.__version__}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        ["family", "status", "linear diff", "neurons diff", "MoE layers", "experts", "layout", "reason"],
    )
    order = {s: i for i, s in enumerate(STATUSES)}
    for r in sorted(rows, key=lambda r: (order[r.status], r.model_type)):
        table.add(r.model_type, r.status, _number(r.linear), _number(r.neurons), r.moe_layers, r.experts, r.layout,
                  r.reason)
    table.notes += [
        "diff: the largest |export - source| over every MoE block's output relative to the largest |source| output, "
        "measured by `prism export` on 256 unit-RMS probe tokens per block at the full operating point "
        "(linear: the flat checkpoint under stock transformers; neurons: prism's runtime at topk:N*k); exact means "
        "at most 1e-4. A refused gate's difference is measured with --allow-inexact where the export gets that far.",
        f"Each family: a tiny random checkpoint (prism_cli/models/tiny.py: 2 layers, hidden 64, 8 experts of width 32, "
        f"top-2), profiled on {PROFILE['tokens']} calibration tokens, partitioned by the greedy solver into N = {N_SUB}, "
        "exported with each gate.",
        "Command: python -m prism_cli.evaluation.families --out results/families (make families).",
    ]
    return table.save(out, extra={"transformers": transformers.__version__, "torch": torch.__version__,
                                  "families": [asdict(r) for r in rows]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/families"))
    parser.add_argument("--families", default=None, help="comma-separated model types (default: every MoE family)")
    args = parser.parse_args()
    from prism_cli.console import console

    torch.set_num_threads(1)
    rows = run_matrix(args.families.split(",") if args.families else None,
                      on_row=lambda r: console.print(f"{r.model_type}: {r.status} {r.reason}"[:200]))
    for path in write_matrix(rows, args.out):
        console.print(f"written {path}")


if __name__ == "__main__":
    main()
