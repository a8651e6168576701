"""A router per operating point: the best of several routers at each K, chosen on validation text.

No single tuned router wins everywhere (results/tune_gate.md): a router tuned from the mass probe
makes ``linear:1`` usable but, once an expert's copies no longer share its weight equally, loses at
the full K, where the untuned router *is* the original model. The flat router is 0.2 % of the
model's parameters, so an export can carry several and switch with the operating point as
``set_operating_point`` already switches policies. ``select_routers`` measures every candidate
export (the untuned one and tuned runs of the same export: same experts, only router rows differ)
at every K on validation text (the calibration split unless told otherwise; never the evaluation
split), keeps the lowest perplexity at each K, and writes one export:

* the checkpoint's router is the one chosen for its ``num_experts_per_tok`` (``serve_k``), so a stock
  engine serving the checkpoint runs prism's ``linear:serve_k``;
* ``ROUTER_BANK_FILE`` holds each chosen router (``{name}.layers.{i}.weight``), and the config's
  ``prism.router_bank`` maps every K to one of them, with the validation curves it was chosen on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prism_cli.data import data_file, load_selection_text
from prism_cli.errors import PrismError
from prism_cli.export.format import EXPORT_OUTPUT, ROUTER_BANK_FILE
from prism_cli.io import check_new_folder, check_not_input, save_tensors
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.checkpoint import CheckpointReader
from prism_cli.models.loading import load_config, weights_fingerprint_without_routers
from prism_cli.report import ResultTable
from prism_cli.runtime.elastic import read_export_meta
from prism_cli.tuning.writer import CURVE_FILE, read_source_router, router_keys, write_router_export

#: Tokens per validation window (the ``make tune-gate`` validation's).
VALIDATION_SEQ_LEN = 256
#: The choice table in the bank export (``.md``, ``.csv``, ``.json``).
ROUTER_BANK_REPORT = "prism/router_bank"
#: Fields of the ``prism`` section that two exports of the same experts share.
_SAME_EXPERTS = (("source", "weights_hash"), ("partition", "hash"), ("sub_experts",), ("gate",), ("down_scale",))


@dataclass(frozen=True)
class BankChoice:
    """The router chosen at each K (``by_k``) from validation perplexities ``curves[name][k]``."""

    by_k: dict[int, str]
    curves: dict[str, dict[int, float]]

    @property
    def chosen(self) -> list[str]:
        """The routers the bank keeps, in candidate order."""
        return [name for name in self.curves if name in set(self.by_k.values())]


def choose(curves: dict[str, dict[int, float]]) -> BankChoice:
    """At each K the candidate of lowest perplexity; ties go to the earlier candidate (list the untuned
    export first, so a tuned router must do strictly better to replace it)."""
    ks = sorted(next(iter(curves.values())))
    if any(sorted(c) != ks for c in curves.values()):
        raise PrismError("the candidates were measured at different K")
    names = list(curves)
    return BankChoice({k: min(names, key=lambda n: (curves[n][k], names.index(n))) for k in ks}, curves)


def choice_table(choice: BankChoice, serve_k: int, data: str | None = None) -> ResultTable:
    """Validation perplexity of every candidate at every K, and the router each K uses."""
    names = list(choice.curves)
    table = ResultTable(f"validation perplexity of linear:K per router ({data or 'validation text'})",
                        ["K", *names, "chosen"])
    for k, name in choice.by_k.items():
        table.add(k, *(choice.curves[n][k] for n in names), name)
    table.notes.append(f"each K routes with its lowest-perplexity router (ties: the earlier one); the checkpoint's "
                       f"router is the one for K = {serve_k} (what a stock engine serves)")
    return table


def check_candidates(candidates: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The ``prism`` sections of the candidates, refusing what cannot share one bank (one line each)."""
    if len(candidates) < 2:
        raise PrismError("give at least two candidate exports (the untuned export and a tuned run of it)")
    metas: dict[str, dict[str, Any]] = {}
    for name, directory in candidates.items():
        meta = read_export_meta(directory, f"candidate {name}")
        if "router_bank" in meta:
            raise PrismError(f"candidate {name}: {directory} already carries a router bank; give the exports it was built from")
        metas[name] = meta
    first, reference = next(iter(metas.items()))
    for name, meta in metas.items():
        for path in _SAME_EXPERTS:
            mine, theirs = _get(meta, path), _get(reference, path)
            if mine != theirs:
                raise PrismError(f"candidate {name} is not a tuned copy of the same export as {first}: prism."
                                 f"{'.'.join(path)} is {mine!r} against {theirs!r}; a bank switches routers over the same experts")
    # The config fields say what each export was made from; the weights say whether they are still that.
    adapter = adapter_for_config(load_config(str(candidates[first])))
    expected = weights_fingerprint_without_routers(candidates[first], adapter)
    for name, directory in candidates.items():
        if name != first and weights_fingerprint_without_routers(directory, adapter) != expected:
            raise PrismError(f"candidate {name} ({directory}) holds other weights than {first} beside its router; a bank "
                             "switches routers over the same experts (tune-gate changes only the router)")
    return metas


def _get(meta: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = meta
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _router_rows(directory: Path, adapter: Any) -> dict[int, torch.Tensor]:
    reader = CheckpointReader(directory)
    return {layer: reader.get(key) for key, (layer, name) in router_keys(directory, adapter).items() if name == "weight"}


def select_routers(candidates: dict[str, Path], out: Path, *, data: str | None = None, tokens: int = 16_384,
                   serve_k: int | None = None, force: bool = False,
                   on_start: Callable[[int], None] | None = None, on_point: Callable[[str, int], None] | None = None,
                   ) -> tuple[BankChoice, int]:
    """Measure every candidate at every ``linear:K`` on validation text, choose per K, write the bank
    export to ``out``; returns the choice and the K the checkpoint's router serves."""
    from prism_cli.tuning.benchmark import per_k_perplexity

    metas = check_candidates(candidates)
    if tokens < VALIDATION_SEQ_LEN:
        raise PrismError(f"--tokens must be at least {VALIDATION_SEQ_LEN} (one window of validation text), got {tokens}")
    text, data_name = load_selection_text(data, "choose routers")
    check_not_input(out, {**{f"candidate {name}": directory for name, directory in candidates.items()}, **data_file(data)},
                    inside=True)  # before --force's advice
    if out.exists() and not force:
        raise PrismError(f"{out} already exists; pass --force to replace it, or give a new folder")
    check_new_folder(out, True, EXPORT_OUTPUT)  # an old export only; its folder can be written: before the measuring
    meta = next(iter(metas.values()))
    points = int(meta["sub_experts"]) * int(meta["source"]["top_k"])
    if serve_k is not None and not 1 <= serve_k <= points:
        raise PrismError(f"--serve-k must be within 1..{points} (the export's operating points), got {serve_k}")
    if on_start is not None:
        on_start(len(candidates) * points)
    try:
        curves = {name: per_k_perplexity(directory, text, tokens, VALIDATION_SEQ_LEN, on_point=None if on_point is None
                                         else (lambda k, name=name: on_point(name, k)))
                  for name, directory in candidates.items()}
    except ValueError as exc:  # the text is shorter than one window
        raise PrismError(f"validation text {data_name}: {exc}") from None
    choice = choose(curves)
    served = write_bank(candidates, choice, out, serve_k=serve_k, force=force, metas=metas,
                        validation={"data": data_name, "tokens": tokens})
    return choice, served


def write_bank(candidates: dict[str, Path], choice: BankChoice, out: Path, *, serve_k: int | None = None,
               metas: dict[str, dict[str, Any]] | None = None,
               validation: dict[str, Any] | None = None, force: bool = False) -> int:
    """Write the bank export to ``out``; returns the K whose router the checkpoint holds."""
    metas = metas or check_candidates(candidates)  # checked already by ``select_routers`` (weights are read)
    first = next(iter(candidates.values()))
    config = load_config(str(first))
    adapter = adapter_for_config(config)
    n_sub = int(metas[next(iter(metas))]["sub_experts"])
    serve = adapter.top_k if serve_k is None else serve_k
    if serve not in choice.by_k:
        raise PrismError(f"no router was chosen for K = {serve}")
    base = candidates[choice.by_k[serve]]
    rows = {name: _router_rows(candidates[name], adapter) for name in choice.chosen}
    source_rows = read_source_router(first, adapter, n_sub)

    def record(config: dict[str, Any], tmp: Path) -> None:
        prism = config["prism"]
        if serve != adapter.top_k:
            config[adapter.top_k_key] = serve
        bank = {f"{name}.layers.{layer}.weight": w.contiguous() for name, layers in rows.items() for layer, w in layers.items()}
        save_tensors(bank, tmp / ROUTER_BANK_FILE)
        choice_table(choice, serve, (validation or {}).get("data")).save(tmp / ROUTER_BANK_REPORT)
        (tmp / CURVE_FILE).unlink(missing_ok=True)  # each router's own record is kept below
        prism.pop("tuning", None)
        prism["router_bank"] = {
            "file": ROUTER_BANK_FILE,
            "by_k": {str(k): name for k, name in choice.by_k.items()},
            "serve_k": serve,
            "routers": {name: {"export": str(candidates[name]), "tuning": metas[name].get("tuning")} for name in choice.chosen},
            "validation": {**(validation or {}), "perplexity": {n: {str(k): v for k, v in c.items()}
                                                                for n, c in choice.curves.items()}},
        }

    write_router_export(base, out, rows[choice.by_k[serve]], source_rows, adapter, record, force=force)
    return serve
