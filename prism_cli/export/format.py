"""The export's on-disk layout, shared by its writers (``export``, ``tune-gate``) and its reader (the runtime).

A flat export is a stock transformers checkpoint of the same model type with ``E*N`` experts of width
``I/N`` (see ``builder.py``); prism adds the ``prism`` section of ``config.json`` and the files below,
under ``prism/`` so that engines loading every top-level ``*.safetensors`` file see model weights only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism_cli.errors import PrismError
from prism_cli.io import Replaceable

#: Version of the export layout this prism writes and reads (2: gate neurons in a subfolder, ``prism.serving``;
#: 3: ``prism.source.weights_hash`` fingerprints every tensor).
EXPORT_FORMAT_VERSION = 3
#: The gate neurons of a neurons-gate export. In a subfolder: serving engines load every top-level
#: ``*.safetensors`` file of an unsharded checkpoint as model weights.
GATE_FILE = "prism/gate_neurons.safetensors"
#: The source model's own router rows (``layers.{i}.weight``, plus per-expert router tensors), written by
#: ``prism tune-gate``: once the flat router is tuned its copies differ, and every N-th row is no longer
#: the original router. Where this file exists, the training-free gate routes with these rows.
SOURCE_ROUTER_FILE = "prism/source_router.safetensors"
#: Several flat routers of one export, one per operating point chosen on validation text (``prism select-routers``):
#: ``{name}.layers.{i}.weight``; the config's ``prism.router_bank.by_k`` says which one each ``linear:K`` uses.
ROUTER_BANK_FILE = "prism/router_bank.safetensors"


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a prism export: a ``config.json`` with a ``prism`` section."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return False
    return isinstance(config, dict) and isinstance(config.get("prism"), dict)


#: What ``--force`` may replace with a new export (``prism export``, ``tune-gate``, ``select-routers``).
EXPORT_OUTPUT = Replaceable("a prism export", is_export)


def inexact_linear_gate(meta: dict[str, Any] | None) -> str | None:
    """For an export written with ``--allow-inexact`` (its linear points route only approximately like the
    source model), the words that say so, with the export's reason; None for any other."""
    if not isinstance(meta, dict) or meta.get("linear_gate_exact", True):
        return None
    return f"this export's linear gate is not exact ({meta.get('linear_gate_note') or 'see its export'})"


def read_source_router_file(directory: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The tensors of ``SOURCE_ROUTER_FILE`` of the export ``directory``, or None where the flat router's
    copies still hold the source rows (an untuned export). An export whose flat router was tuned
    (``prism.tuning``) or chosen per K (``prism.router_bank``) needs the file: without it the training-free
    gate would route with tuned rows, unsaid, so its absence is refused in one line."""
    path = Path(directory) / SOURCE_ROUTER_FILE
    if path.exists():
        from safetensors.torch import load_file

        from prism_cli.models.checkpoint_files import read_header

        read_header(path)  # a truncated file: one line
        return load_file(str(path))
    tuned = "tuning" if isinstance(meta.get("tuning"), dict) else "router_bank" if "router_bank" in meta else None
    if tuned is not None:
        kind = "a tuned export" if tuned == "tuning" else "a router-bank export"
        raise PrismError(f"{directory} is {kind} but {SOURCE_ROUTER_FILE} (the original router, which the training-free "
                         "gate routes with) is missing: copy the prism/ folder of the export, or make it again")
    return None
