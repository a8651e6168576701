"""Where grouped products stop paying on this CPU: the executor's size bounds, measured per machine.

``runtime/grouped_mm.py`` runs a call with grouped products or hands it to another executor depending on
its size (``choose_path``). Where the crossover lies depends on the processor's caches and on the thread
count: on the AMD EPYC this project was first measured on, grouped products over more than 2,048 rows of
prefix routing lost to the plan executor by up to 15 %; on an Intel Xeon with the same two threads they
won by 15 % at 4,096 rows (``make bench-executors``, results/executors.md). A constant tuned on one
machine is therefore wrong on the other, so the bounds are measured once per machine (processor, thread
count, torch version) by ``make bench-executors``, which saves them to ``bounds_path()``; the runtime
reads them from there, and falls back to ``DEFAULT`` on a machine with no entry. The crossover also
moves with the sub-experts' width (narrower sub-experts make narrower products: over arbitrary subsets
grouped products win up to 32,768 pairs at 64 neurons and 16,384 at 128), so an entry is kept per
sub-expert width measured; a width
never measured takes the machine's own entry (the first shape measured on it). Every results file
names the bounds it ran under (``environment()``), so a table is reproducible from its own record. The
bounds only choose among executors that compute the same sums (up to float summation order); they never
change what is computed.

Kept free of torch imports: ``environment()`` (which imports nothing heavy) records them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prism_cli.errors import PrismError

FORMAT = "prism-executor-bounds"
VERSION = 1


@dataclass(frozen=True)
class ExecutorBounds:
    """``min_tokens``: calls of fewer tokens take the plan executor (any device). On the CPU,
    ``max_prefix_rows``: prefix routing with more rows (a token's block of sub-experts is one row) takes
    the plan executor; ``max_pairs``: arbitrary subsets with more (token, sub-expert) pairs take one
    product per sub-expert (``flat-loop``). ``max_padded_rows``: prefix routing whose blocks differ in
    length (``linear:K`` with K not a multiple of N, rows at different points) in at most this many rows
    computes every block whole, with zero weights on the sub-experts it does not take, in one grouped
    product per projection (``prefix-padded``) instead of one per length: more arithmetic for fewer calls,
    which pays where calls set the time (decode steps). An entry measured before this bound existed
    takes ``DEFAULT``'s."""

    min_tokens: int
    max_prefix_rows: int
    max_pairs: int
    max_padded_rows: int = 0
    source: str = "default"

    def describe(self) -> str:
        return (f"min tokens {self.min_tokens}, max prefix rows {self.max_prefix_rows:,}, max pairs "
                f"{self.max_pairs:,}, max padded rows {self.max_padded_rows:,} ({self.source})")


#: Measured on the AMD EPYC build machine at 2 threads (results/executors.md of that run; ``max_padded_rows``
#: on the Intel Xeon, the first machine it was measured on); used where this machine has no measurement of
#: its own.
DEFAULT = ExecutorBounds(min_tokens=4, max_prefix_rows=2_048, max_pairs=4_096, max_padded_rows=512,
                         source="default")


def bounds_path() -> Path:
    """``$PRISM_EXECUTOR_BOUNDS`` when set (the test suite points it at an empty place, so tests run under
    ``DEFAULT`` whatever the machine measured), else ``$PRISM_CACHE/executor_bounds.json`` (default
    ``~/.cache/prism``), next to the compiled kernels."""
    return _path(os.environ.get("PRISM_EXECUTOR_BOUNDS"), os.environ.get("PRISM_CACHE"))


@functools.cache
def _path(explicit: str | None, cache: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    return Path(cache or Path.home() / ".cache" / "prism").expanduser() / "executor_bounds.json"


def _parse(entry: dict[str, Any], source: str = "default") -> ExecutorBounds:
    padded = int(entry.get("max_padded_rows", DEFAULT.max_padded_rows))
    return ExecutorBounds(int(entry["min_tokens"]), int(entry["max_prefix_rows"]), int(entry["max_pairs"]), padded, source)


def machine_key(threads: int | None = None, width: int | None = None) -> str:
    """What the bounds depend on: processor, torch's thread count and torch's version, and (an entry for
    one shape of experts) the sub-experts' width."""
    from prism_cli.environment import _torch_threads, _version, cpu_name

    key = f"{cpu_name()} | {threads if threads is not None else _torch_threads()} threads | torch {_version('torch')}"
    return key if width is None else f"{key} | sub-experts of {width}"


@functools.cache
def _entries(path: str) -> dict[str, dict[str, Any]]:
    file = Path(path)
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} file of version {VERSION}")
        machines = data["machines"]
        for entry in machines.values():
            _parse(entry)
        return dict(machines)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrismError(f"cannot read the executor bounds {file}: {exc}; delete it or rerun `make bench-executors`") from None


def current_bounds(width: int | None = None) -> ExecutorBounds:
    """The bounds measured on this machine at torch's current thread count for sub-experts of ``width``
    neurons, else the machine's entry for any width, else ``DEFAULT``. Called on every experts call: after
    the first, two environment lookups and a cache hit."""
    return _bounds_for(str(bounds_path()), _threads(), width)


def _threads() -> int | None:
    """torch's thread count where torch is loaded (this module stays torch-free)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


@functools.cache
def _bounds_for(path: str, threads: int | None, width: int | None) -> ExecutorBounds:
    entries = _entries(path)
    by_width = entries.get(machine_key(threads, width)) if width is not None else None
    if by_width is not None:
        return _parse(by_width, source=f"measured here for sub-experts of {width}, {path}")
    own = entries.get(machine_key(threads))
    return DEFAULT if own is None else _parse(own, source=f"measured here, {path}")


def describe_machine_bounds() -> str:
    """Every entry this machine has (its own and per sub-expert width), for a results file's record."""
    base = machine_key(_threads())
    widths = sorted(int(k.rsplit(" ", 1)[1]) for k in _entries(str(bounds_path())) if k.startswith(f"{base} | sub-experts of "))
    parts = [current_bounds().describe()] + [f"sub-experts of {w}: {current_bounds(w).describe()}" for w in widths]
    return "; ".join(parts)


def save_bounds(bounds: ExecutorBounds, key: str, path: Path | None = None, measured_by: str = "") -> Path:
    """Record ``bounds`` for machine ``key`` (other machines' entries are kept); atomic."""
    from prism_cli.io import write_json

    path = path or bounds_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    machines = dict(_entries(str(path)))
    entry = {k: v for k, v in asdict(bounds).items() if k != "source"}
    machines[key] = {**entry, "measured_by": measured_by}
    write_json(path, {"format": FORMAT, "version": VERSION, "machines": machines})
    _entries.cache_clear()
    _bounds_for.cache_clear()
    return path


@dataclass(frozen=True)
class Timing:
    """One measured call: ``tokens``; ``prefix`` routing (its ``size`` in rows) or arbitrary subsets
    (``size`` in pairs); median ms of the plan executor, of grouped products, (subsets) of ``flat-loop``
    and (prefix routing with blocks of different lengths) of ``prefix-padded``."""

    tokens: int
    prefix: bool
    size: int
    plan_ms: float
    mm_ms: float
    loop_ms: float | None = None
    padded_ms: float | None = None


#: A call whose two paths time within this log-ratio (3 %) is a tie: one layer's call timed alone cannot
#: order them (at 8,192 rows of prefix routing the two executors measured 0.92-1.02 of each other in
#: runs a day apart, and the bound moved between 4,096 and 8,192 with it).
TIE = math.log(1.03)


def _best_upper_bound(gains: list[tuple[int, float]]) -> int:
    """The size ``s`` (0 or a measured size) that maximises the summed ``gain`` of the calls of size <= s:
    grouped products for those, the alternative beyond. A gain within ``TIE`` counts as zero, and equal
    sums go to the larger size: where the timing cannot order the paths, grouped products keep the call.
    For whole experts they run the source model's own products (``grouped_mm.py``), which is what a
    comparison with the original at the same routing needs: with 8,192-row calls of ``linear:4`` handed to
    the plan executor on a 2 % loss in this timing, ``linear:4`` took 1.047x ``original:1`` at 32 x 256
    tokens in three of three runs, where grouped products had measured 0.99-1.00x."""
    best, best_total, total = 0, 0.0, 0.0
    for size in sorted({size for size, _ in gains}):
        total += sum(g for sz, g in gains if sz == size and abs(g) > TIE)
        if total >= best_total:
            best, best_total = size, total
    return best


def derive_bounds(timings: Iterable[Timing], source: str = "measured") -> ExecutorBounds:
    """The bounds a table of calls implies, each a threshold chosen to minimise the table's total time in
    relative terms: a call's gain from grouped products is ``log(alternative / grouped)`` (so every
    measured call weighs alike, a decode-sized call as much as a prefill), and each bound maximises the
    summed gain of the calls it gives to grouped products. ``min_tokens`` (against the plan executor, over
    all calls): the calls of at least that many tokens. Then, over those calls, ``max_prefix_rows``
    (prefix routing against the plan executor) and ``max_pairs`` (subsets against ``flat-loop``): the
    calls of at most that size; ``max_padded_rows`` (blocks of different lengths padded whole, against what
    runs them under the other bounds: grouped products up to ``max_prefix_rows`` rows, the plan executor
    beyond), over the same calls. A single noisy call near a crossover moves a bound by one measured size
    at most, where a rule like "stop at the first loss" could zero it."""
    timings = list(timings)
    if not timings:
        raise PrismError("no timed calls to derive executor bounds from")
    sizes = sorted({t.tokens for t in timings})
    suffix = {n: sum(math.log(t.plan_ms / t.mm_ms) for t in timings if t.tokens >= n) for n in sizes}
    min_tokens = max(sizes, key=lambda n: (suffix[n], -n))
    if suffix[min_tokens] <= 0:  # grouped products never pay on the whole: no call takes them
        min_tokens = sizes[-1] + 1
    kept = [t for t in timings if t.tokens >= min_tokens]
    prefix = [(t.size, math.log(t.plan_ms / t.mm_ms)) for t in kept if t.prefix]
    pairs = [(t.size, math.log(t.loop_ms / t.mm_ms)) for t in kept if not t.prefix and t.loop_ms is not None]
    max_prefix_rows = _best_upper_bound(prefix)
    padded = [(t.size, math.log((t.mm_ms if t.size <= max_prefix_rows else t.plan_ms) / t.padded_ms))
              for t in kept if t.prefix and t.padded_ms is not None]
    return ExecutorBounds(min_tokens, max_prefix_rows, _best_upper_bound(pairs), _best_upper_bound(padded), source)
