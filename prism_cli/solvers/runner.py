"""Running a solver over every (layer, expert) of a profile, in parallel, and scoring the results.

Per expert: solve on the fit rows, number the groups by importance (sub-expert 0 carries the most
fit mass), choose each sub-expert's gate neurons (SPEC 3.4a) and score the partition on the fit and
the held-out rows with the shared objectives. Every expert gets its own generator seeded by
``(seed, layer, expert)``, so results do not depend on the number of workers, their scheduling, the
layers run together, or whether a run was interrupted and resumed (``run_partition`` writes each
expert as it finishes, ``checkpoint.py``). Layer ranges run on different machines are joined by
``format.merge_partitions``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_cli import __version__
from prism_cli.errors import Interrupted, PrismError
from prism_cli.io import check_replaceable, check_writable
from prism_cli.layers import format_layers
from prism_cli.profiling.format import ExpertRows, ProfileFile
from prism_cli.solvers.base import SOLVERS, PartitionProblem
from prism_cli.solvers.checkpoint import ResultStore, work_dir_for
from prism_cli.solvers.format import FORMAT, MODEL_KEYS, ExpertPartition, Partition, file_hash, write_partition
from prism_cli.solvers.objectives import group_loads, is_valid_partition, paper_cost, retained_mass

EXECUTORS = ("local", "ray")
#: Times Ray reruns a task whose worker or node died before it returned (application errors are not retried).
RAY_MAX_RETRIES = 3
GATE_SELECTIONS = ("coact", "mass")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class PartitionSettings:
    """Everything that decides a partition, recorded in the output."""

    solver: str = "nsga2"
    sub_experts: int = 4
    keep: int = 1
    gate_neurons: int = 4
    gate_selection: str = "coact"
    seed: int = 0
    solver_options: tuple[tuple[str, Any], ...] = ()

    def validate(self, width: int) -> None:
        if self.sub_experts < 2:
            raise PrismError(f"--sub-experts must be at least 2, got {self.sub_experts}")
        if width % self.sub_experts:
            divisors = [d for d in range(2, min(width, 64) + 1) if width % d == 0]
            raise PrismError(
                f"--sub-experts {self.sub_experts} does not divide the expert width {width}; "
                f"choose one of {', '.join(map(str, divisors))}{' ...' if width > 64 else ''}"
            )
        if not 1 <= self.keep < self.sub_experts:
            raise PrismError(f"--keep must be between 1 and {self.sub_experts - 1} (fewer than --sub-experts), got {self.keep}")
        size = width // self.sub_experts
        if self.gate_neurons < 1:
            raise PrismError(f"--gate-neurons must be at least 1, got {self.gate_neurons}")
        if self.gate_neurons > size:
            # The cause is the sub-expert size as much as the gate count: name both, and what fits.
            fits = max((n for n in range(2, width + 1) if width % n == 0 and width // n >= self.gate_neurons), default=None)
            fewer = f"--sub-experts {fits} or fewer, or " if fits else ""
            raise PrismError(
                f"--sub-experts {self.sub_experts} leaves {size} neuron{'s' if size > 1 else ''} per sub-expert "
                f"(expert width {width}), fewer than the {self.gate_neurons} gate neurons each needs (--gate-neurons, "
                f"chosen inside each sub-expert); use {fewer}--gate-neurons "
                + (f"between 1 and {size}" if size > 1 else "1")
            )
        if self.gate_selection not in GATE_SELECTIONS:
            raise PrismError(f"--gate-selection must be one of {', '.join(GATE_SELECTIONS)}, got {self.gate_selection!r}")
        SOLVERS.get(self.solver)  # unknown names fail here, listing the known ones
        self.make_solver()

    def make_solver(self):
        """The configured solver; an unknown option or a value it refuses is a one-line error."""
        cls = SOLVERS.get(self.solver)
        params = [] if cls.__init__ is object.__init__ else list(inspect.signature(cls.__init__).parameters.values())
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            known = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
            unknown = [name for name, _ in self.solver_options if name not in known]
            if unknown:
                raise PrismError(
                    f"solver {self.solver!r} has no option {', '.join(map(repr, unknown))}; "
                    f"its options: {', '.join(known) or 'none'}"
                )
            # Solvers only use their settings once they run, inside a worker: check the types here
            # against the defaults, so `-O generations=ten` is refused at once.
            for name, value in self.solver_options:
                want = _option_type(known[name])
                if want is not None and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
                    raise PrismError(
                        f"solver {self.solver!r} option {name} must be {want[0].__name__}, got {value!r}"
                    )
        try:
            return cls(**dict(self.solver_options))
        except (TypeError, ValueError) as exc:  # solvers check their settings in __init__
            raise PrismError(f"bad option for solver {self.solver!r}: {exc}") from None


def _option_type(default: Any) -> tuple[type, ...] | None:
    """Types a solver option accepts, judged by its default (None or no default: anything)."""
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    return (type(default),)


def gate_positions(problem: PartitionProblem, members: np.ndarray, count: int, selection: str = "coact") -> np.ndarray:
    """Each group's ``count`` gate neurons, as positions into its row of ``members [N, G]`` (ascending).

    ``coact`` (the paper's rule, SPEC 3.4a): the neurons with the largest summed co-activation with
    the rest of their group. ``mass``: the neurons carrying the most activation mass on the fit rows,
    whose ``|a_j|`` then make up the largest share of the group's norm that the score estimates.
    """
    out = np.empty((members.shape[0], count), dtype=np.int64)
    for n, group in enumerate(members):
        if selection == "mass":
            score = problem.rows[:, group].sum(axis=0, dtype=np.float64)
        else:
            block = problem.coactivation[np.ix_(group, group)]
            score = block.sum(axis=1) - np.diag(block)
        out[n] = np.sort(np.argsort(-score, kind="stable")[:count])
    return out


def score_solution(
    problem: PartitionProblem, labels: np.ndarray, heldout: np.ndarray, settings: PartitionSettings
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Importance numbering, gate neurons and fit / held-out scores for a solver's labels."""
    n = problem.n_groups
    if not is_valid_partition(labels, n):
        raise RuntimeError(f"solver {settings.solver!r} returned an invalid partition")
    mass = group_loads(problem.rows, labels, n).sum(axis=0)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-mass, kind="stable")] = np.arange(n)
    labels = rank[labels]
    members = np.stack([np.nonzero(labels == g)[0] for g in range(n)])
    fit_loads = group_loads(problem.rows, labels, n)
    held_loads = group_loads(np.abs(heldout).astype(np.float32), labels, n)
    scores = {
        "fit_cost": paper_cost(fit_loads, problem.keep),
        "heldout_cost": paper_cost(held_loads, problem.keep),
        "fit_retained": retained_mass(fit_loads),
        "heldout_retained": retained_mass(held_loads),
    }
    return members.reshape(-1), gate_positions(problem, members, settings.gate_neurons, settings.gate_selection), scores


def solve_expert(rows: ExpertRows, settings: PartitionSettings) -> ExpertPartition:
    """Solve, number, gate and score one expert (runs inside a worker)."""
    problem = PartitionProblem(
        rows=rows.fit_rows, n_groups=settings.sub_experts, keep=settings.keep, l1_mass=rows.l1_mass, rate=rows.hot_rate
    )
    rng = np.random.default_rng([settings.seed, rows.layer, rows.expert])
    start = time.perf_counter()
    solution = settings.make_solver().solve(problem, rng)
    seconds = time.perf_counter() - start
    permutation, gates, scores = score_solution(problem, solution.labels, rows.heldout_rows, settings)
    return ExpertPartition(permutation=permutation, gate_positions=gates, seconds=seconds, front=solution.front, **scores)


def _solve_from_file(path: str, layer: int, expert: int, settings: PartitionSettings) -> tuple[int, int, ExpertPartition]:
    with ProfileFile(path) as profile:
        rows = profile.expert(layer, expert)
    return layer, expert, solve_expert(rows, settings)


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Workers each get one BLAS thread: parallelism comes from processes, not oversubscribed threads."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_rows(profile: ProfileFile, layers: list[int], settings: PartitionSettings) -> None:
    """Refuse experts without enough rows, naming them and the remedy."""
    short: list[str] = []
    for layer in layers:
        fit, held = profile.row_counts(layer)
        bad = [e for e in range(profile.num_experts) if fit[e] < settings.sub_experts or held[e] < 1]
        if bad:
            short.append(f"layer {layer}: experts {', '.join(map(str, bad))}")
    if short:
        raise PrismError(
            "too few calibration rows to partition (" + "; ".join(short) + "): profile more tokens (--tokens) "
            "or a larger --max-rows"
        )


def check_workers(workers: int | None) -> None:
    """A worker count of at least 1 (None: one per core)."""
    if workers is not None and workers < 1:
        raise PrismError(f"--workers must be at least 1, got {workers}")


def check_run(
    profile_path: str | Path, settings: PartitionSettings, layers: list[int] | None, workers: int | None, executor: str
) -> tuple[list[int], dict[str, Any], int]:
    """Every check a run makes before its first expert: (layers to run, the profile's model metadata, experts per layer)."""
    check_workers(workers)
    if executor not in EXECUTORS:
        raise PrismError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise PrismError("--executor ray needs Ray: pip install 'prism-cli[ray]'")
    with ProfileFile(profile_path) as profile:
        settings.validate(profile.width)
        chosen = layers or profile.layers
        missing = sorted(set(chosen) - set(profile.layers))
        if missing:
            raise PrismError(f"--layers {format_layers(missing)} are not in the profile (profiled layers: {format_layers(profile.layers)})")
        check_rows(profile, chosen, settings)
        return list(chosen), {k: profile.meta[k] for k in MODEL_KEYS}, profile.num_experts


def partition_profile(
    profile_path: str | Path,
    settings: PartitionSettings,
    *,
    layers: list[int] | None = None,
    workers: int | None = None,
    executor: str = "local",
    on_done: Callable[[int, int, ExpertPartition], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    store: ResultStore | None = None,
    profile_hash: str | None = None,
) -> Partition:
    """Partition every expert of the profiled ``layers`` (default: all) with ``settings``.

    ``on_start(n_experts)`` is called once the profile and the settings have passed every check, just
    before the first expert is solved; ``on_done(layer, expert, result)`` after each expert (at once
    for those a ``store`` already holds). Each result is saved to ``store`` as it finishes.
    """
    chosen, meta, n_experts = check_run(profile_path, settings, layers, workers, executor)
    jobs = [(layer, e) for layer in chosen for e in range(n_experts)]
    if on_start is not None:
        on_start(len(jobs))
    results: dict[tuple[int, int], ExpertPartition] = {}

    def done(layer: int, expert: int, result: ExpertPartition) -> None:
        if store is not None:
            store.save(layer, expert, result)
        results[layer, expert] = result
        if on_done is not None:
            on_done(layer, expert, result)

    if store is not None:
        wanted = set(jobs)
        for (layer, e), result in store.finished().items():
            if (layer, e) in wanted:
                results[layer, e] = result
                if on_done is not None:
                    on_done(layer, e, result)
        jobs = [job for job in jobs if job not in results]

    if executor == "ray":
        _run_ray(str(profile_path), jobs, settings, done)
    else:
        _run_local(str(profile_path), jobs, settings, workers or os.cpu_count() or 1, done)

    meta.update(
        solver=settings.solver,
        solver_settings=settings.make_solver().settings(),
        sub_experts=settings.sub_experts,
        keep=settings.keep,
        gate_neurons=settings.gate_neurons,
        gate_selection=settings.gate_selection,
        seed=settings.seed,
        profile=str(profile_path),
        profile_hash=profile_hash or file_hash(profile_path),
    )
    partition = Partition(meta=meta)
    for layer in chosen:
        partition.experts[layer] = [results[layer, e] for e in range(n_experts)]
    return partition


def _run_local(path: str, jobs: list[tuple[int, int]], settings: PartitionSettings, workers: int, done: Callable) -> None:
    if workers == 1:
        for layer, e in jobs:
            done(*_solve_from_file(path, layer, e, settings))
        return
    with _single_threaded_children(), ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with_parent, initargs=(os.getpid(),),
    ) as pool:
        futures = [pool.submit(_solve_from_file, path, layer, e, settings) for layer, e in jobs]
        try:
            for future in as_completed(futures):
                done(*future.result())
        except BaseException:
            # Stop the workers: leaving the block waits for every expert queued, and after SIGTERM (which, unlike
            # Ctrl-C at a terminal, reaches only this process) they would run on. The pool has no public way
            # (Python 3.14 adds ``terminate_workers``); it then fails the queued futures itself (cancelling them
            # first races with that on Python 3.11 and prints a traceback).
            for process in list(pool._processes.values()):
                process.terminate()
            raise


def _die_with_parent(parent: int) -> None:
    """A worker ends when the run that started it dies, even by SIGKILL, which runs no cleanup: it would solve on
    for nothing, then wait for ever, beside the ``--resume`` run the user starts next. Linux only (prctl)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the run died before the call above
        os._exit(1)


def _run_ray(path: str, jobs: list[tuple[int, int]], settings: PartitionSettings, done: Callable) -> None:
    """Same jobs as Ray tasks; rows travel through Ray's object store, so workers need no shared disk.

    At most two tasks per cluster CPU are in flight, so the driver never holds more than that many
    experts' rows. A task whose worker or node dies is rerun by Ray (``RAY_MAX_RETRIES``); one that
    still fails stops the run, with every expert finished so far kept by the caller's store.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(solve_expert)
    limit = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(reversed(jobs))
    pending: dict[Any, tuple[int, int]] = {}
    with ProfileFile(path) as profile:
        while queue or pending:
            while queue and len(pending) < limit:
                layer, e = queue.pop()
                pending[remote.remote(profile.expert(layer, e), settings)] = (layer, e)
            ready, _ = ray.wait(list(pending), num_returns=1)
            layer, e = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise PrismError(
                    f"the Ray task for layer {layer} expert {e} failed ({first}; a lost worker is retried "
                    f"{RAY_MAX_RETRIES} times); finished experts are kept: rerun with --resume"
                ) from None
            done(layer, e, result)


def run_partition(
    profile_path: str | Path,
    settings: PartitionSettings,
    out: str | Path,
    *,
    resume: bool = False,
    layers: list[int] | None = None,
    workers: int | None = None,
    executor: str = "local",
    on_done: Callable[[int, int, ExpertPartition], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Partition:
    """``partition_profile`` that writes each expert as it finishes, then the partition file at ``out``.

    Finished experts live in ``<out>.partial/`` until the file is written; after a kill, Ctrl-C or a
    failure, ``resume=True`` solves only the experts that are missing there. The result is the one an
    uninterrupted run gives (the solver times aside).
    """
    out = Path(out)
    check_writable(out)
    check_replaceable(out, FORMAT, "partition")
    chosen = sorted(set(check_run(profile_path, settings, layers, workers, executor)[0]))
    profile_hash = file_hash(profile_path)
    identity = {
        "prism_version": __version__, "profile_hash": profile_hash, "layers": chosen, "solver": settings.solver,
        "solver_settings": settings.make_solver().settings(), "sub_experts": settings.sub_experts, "keep": settings.keep,
        "gate_neurons": settings.gate_neurons, "gate_selection": settings.gate_selection, "seed": settings.seed,
    }
    store = ResultStore(work_dir_for(out), json.loads(json.dumps(identity)), resume=resume)
    try:
        partition = partition_profile(profile_path, settings, layers=chosen, workers=workers, executor=executor,
                                      on_done=on_done, on_start=on_start, store=store, profile_hash=profile_hash)
        write_partition(out, partition)
    except BaseException as exc:
        # Stopped or failed before any expert was solved (a corrupt profile found once the run began, a Ctrl-C
        # at once): no folder is left to block a plain rerun. Finished experts are kept for --resume.
        saved = store.count()
        if not saved:
            store.remove()
        if isinstance(exc, KeyboardInterrupt) and saved:
            raise Interrupted(
                f"{saved} finished experts are kept in {store.folder}; rerun the same command with --resume to continue") from None
        if isinstance(exc, BrokenProcessPool):
            kept = f"{saved} finished experts are kept in {store.folder}: rerun with --resume" if saved else "rerun"
            raise PrismError(f"a partition worker process died (out of memory?); {kept}, with fewer --workers if "
                             "memory is short") from None
        raise
    store.remove()
    return partition
