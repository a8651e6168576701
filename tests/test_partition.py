"""``prism partition``: solvers end to end on a tiny profile, the partition file, determinism, the compare
table, evolutionary solvers and their operators on synthetic rows (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import h5_contents, same_partition

from prism_cli.data import load_text
from prism_cli.errors import Interrupted, PrismError
from prism_cli.models.loading import load_model
from prism_cli.profiling.format import ProfileFile
from prism_cli.profiling.profiler import ProfileSettings, profile_model
from prism_cli.solvers import SOLVERS, PartitionProblem
from prism_cli.solvers import runner as runner_module
from prism_cli.solvers.alternating import (
    alternating_step,
    group_weights,
    improve,
    pair_step,
    scalarised,
    token_scale,
)
from prism_cli.solvers.evolutionary import BalanceRepair, PartitionObjectives, canonical, pick_near_best
from prism_cli.solvers.format import Partition, read_partition, write_partition
from prism_cli.solvers.heuristics import equal_labels
from prism_cli.solvers.objectives import group_loads, is_valid_partition, paper_cost, rank_weights, retained_mass
from prism_cli.solvers.runner import PartitionSettings, gate_positions, partition_profile, run_partition
from prism_cli.solvers.synthetic import planted_rows, realistic_rows

N = 4
WIDTH = 32
LAYERS = [0, 1]
FAST = {"nsga2": (("pop_size", 8), ("generations", 3)), "ga": (("pop_size", 8), ("generations", 3))}


def settings_for(solver: str, seed: int = 0, **kw) -> PartitionSettings:
    return PartitionSettings(solver=solver, sub_experts=N, seed=seed, solver_options=FAST.get(solver, ()), **kw)


@pytest.fixture(scope="module")
def profile_path(tiny_model_dir, tmp_path_factory) -> Path:
    """One profile of the tiny OLMoE (2 MoE layers x 8 experts of width 32), shared by the module."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    text, name = load_text(None, "calibration")
    path = tmp_path_factory.mktemp("partition") / "profile.h5"
    profile_model(loaded, text, name, ProfileSettings(tokens=2048, seq_len=32, max_rows=256, row_dtype="float32"), path)
    return path


@pytest.fixture(scope="module")
def solved(profile_path):
    """``solved(solver)``: ``partition_profile`` on the module profile, one worker, seed 0 (cached)."""
    cache: dict[str, Partition] = {}

    def get(solver: str) -> Partition:
        if solver not in cache:
            cache[solver] = partition_profile(profile_path, settings_for(solver), workers=1)
        return cache[solver]

    return get


def brute_force_scores(rows: np.ndarray, slices: np.ndarray) -> tuple[float, np.ndarray]:
    """Paper cost at keep=1 and R_1..R_{N-1}, in float64 loops: per token, the loads of the sub-experts (sums
    of |a| over each slice), sorted; cost = mass outside the largest over all mass; R_m = the mean over tokens
    with any mass of the m largest loads' share."""
    a = np.abs(rows).astype(np.float64)
    lost = total = 0.0
    shares = []
    for token in a:
        loads = sorted((float(token[list(s)].sum()) for s in slices), reverse=True)
        lost += sum(loads[1:])
        total += sum(loads)
        if sum(loads) > 0:
            shares.append([sum(loads[:m]) / sum(loads) for m in range(1, len(loads))])
    return lost / total, np.mean(np.array(shares), axis=0)


# --- end to end on a tiny profile -----------------------------------------------------------------


@pytest.mark.parametrize("solver", ["alternating", "nsga2", "rate-chunk"])
def test_partition_profile_is_valid_and_scored(profile_path, solved, solver: str) -> None:
    result = solved(solver)
    assert result.layers == LAYERS and result.n_sub == N
    assert result.meta["solver"] == solver and result.meta["sub_experts"] == N and result.meta["keep"] == 1
    assert result.meta["model_type"] == "olmoe"
    g = WIDTH // N
    with ProfileFile(profile_path) as pf:
        for layer in LAYERS:
            assert len(result.experts[layer]) == 8
            for e, x in enumerate(result.experts[layer]):
                rows = pf.expert(layer, e)
                perm = np.asarray(x.permutation)
                assert np.array_equal(np.sort(perm), np.arange(WIDTH))
                slices = perm.reshape(N, g)
                assert all(np.all(np.diff(s) > 0) for s in slices)  # each sub-expert's neurons ascending
                # Sub-experts are numbered by fit mass: sub-expert 0 carries the most.
                mass = np.abs(rows.fit_rows)[:, slices].sum(axis=(0, 2))
                assert np.all(np.diff(mass) <= 1e-6 * mass.max()), mass
                # Gate neurons: s positions per sub-expert, inside its slice, all different.
                gates = np.asarray(x.gate_positions)
                assert gates.shape == (N, 4) and gates.min() >= 0 and gates.max() < g
                assert all(len(set(row.tolist())) == 4 for row in gates)
                # The recorded scores, against a float64 brute force from the permutation's slices.
                fit_cost, fit_retained = brute_force_scores(rows.fit_rows, slices)
                held_cost, held_retained = brute_force_scores(rows.heldout_rows, slices)
                assert x.fit_cost == pytest.approx(fit_cost, rel=1e-5)
                assert x.heldout_cost == pytest.approx(held_cost, rel=1e-5)
                np.testing.assert_allclose(x.fit_retained, fit_retained, rtol=1e-5)
                np.testing.assert_allclose(x.heldout_retained, held_retained, rtol=1e-5)
                assert x.seconds > 0
                if solver == "nsga2":
                    assert x.front is not None and x.front.shape[1] == N  # paper cost, R_1..R_{N-1}
                else:
                    assert x.front is None


@pytest.mark.parametrize("solver", ["alternating", "nsga2"])
def test_partition_file_round_trips(solved, tmp_path, solver: str) -> None:
    result = solved(solver)
    path = tmp_path / "partition.h5"
    write_partition(path, result)
    back = read_partition(path)
    assert back.layers == result.layers and back.n_sub == result.n_sub
    for key, value in result.meta.items():
        assert back.meta[key] == (list(value) if isinstance(value, tuple) else value), key
    assert back.meta["solver_settings"] == SOLVERS.get(solver)(**dict(FAST.get(solver, ()))).settings()
    for layer in result.layers:
        for a, b in zip(result.experts[layer], back.experts[layer], strict=True):
            np.testing.assert_array_equal(a.permutation, b.permutation)
            np.testing.assert_array_equal(a.gate_positions, b.gate_positions)
            assert (a.fit_cost, a.heldout_cost, a.seconds) == (b.fit_cost, b.heldout_cost, b.seconds)
            np.testing.assert_array_equal(a.fit_retained, b.fit_retained)
            np.testing.assert_array_equal(a.heldout_retained, b.heldout_retained)
            if a.front is None:
                assert b.front is None
            else:
                np.testing.assert_array_equal(a.front, b.front)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition.h5"]  # no temp file left


def _same_results(a: Partition, b: Partition) -> bool:
    return all(
        np.array_equal(x.permutation, y.permutation) and np.array_equal(x.gate_positions, y.gate_positions)
        and x.fit_cost == y.fit_cost and x.heldout_cost == y.heldout_cost
        for layer in a.layers
        for x, y in zip(a.experts[layer], b.experts[layer], strict=True)
    )


def test_results_do_not_depend_on_workers(profile_path, solved) -> None:
    two = partition_profile(profile_path, settings_for("nsga2"), workers=2)
    assert two.layers == solved("nsga2").layers
    assert _same_results(solved("nsga2"), two)


def test_ray_executor_gives_the_local_result(profile_path, solved) -> None:
    """The same jobs on a local Ray instance (the test extra installs Ray; skipped where it is missing)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = partition_profile(profile_path, settings_for("nsga2"), executor="ray")
    finally:
        ray.shutdown()
    assert _same_results(solved("nsga2"), on_ray)


def test_ray_retries_a_lost_task(profile_path, solved, tmp_path, monkeypatch) -> None:
    """A worker that dies mid-task (once) is replaced and its task rerun: the run ends with the local result."""
    ray = pytest.importorskip("ray")
    marker = tmp_path / "died-once"
    real = runner_module.solve_expert

    def dies_once(rows, settings):
        if (rows.layer, rows.expert) == (1, 3) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process is gone, as if its node had failed
        return real(rows, settings)

    monkeypatch.setattr(runner_module, "solve_expert", dies_once)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "partition.h5"
        on_ray = run_partition(profile_path, settings_for("nsga2"), out, executor="ray")
    finally:
        ray.shutdown()
    assert marker.exists()  # the fault did happen
    assert _same_results(solved("nsga2"), on_ray) and _same_results(solved("nsga2"), read_partition(out))


def test_seed_changes_the_result(profile_path) -> None:
    a = partition_profile(profile_path, settings_for("random", seed=0), workers=1)
    b = partition_profile(profile_path, settings_for("random", seed=0), workers=1)
    c = partition_profile(profile_path, settings_for("random", seed=1), workers=1)
    assert _same_results(a, b)
    assert not _same_results(a, c)
    # Each expert draws from its own (seed, layer, expert) stream: no two experts share a split.
    perms = {a.experts[layer][e].permutation.tobytes() for layer in a.layers for e in range(8)}
    assert len(perms) == 16


def test_partition_cli_writes_the_file_and_prints_the_summary(cli, profile_path, tmp_path) -> None:
    out = tmp_path / "partition.h5"
    result = cli("partition", profile_path, "--solver", "alternating", "-N", "4", "--workers", "1", "--out", out)
    assert result.code == 0, result
    assert "partition: solver alternating" in result.out and f"written {out}" in result.out.replace("\n", "")
    back = read_partition(out)
    assert back.meta["solver"] == "alternating" and back.layers == LAYERS
    # The explicit `run` subcommand is the same command.
    out2 = tmp_path / "partition2.h5"
    result = cli("partition", "run", profile_path, "--solver", "alternating", "--workers", "1", "--out", out2)
    assert result.code == 0, result
    assert _same_results(back, read_partition(out2))


def test_partition_cli_solver_options(cli, profile_path, tmp_path) -> None:
    out = tmp_path / "partition.h5"
    result = cli("partition", profile_path, "--solver", "nsga2", "-O", "pop_size=8", "-O", "generations=2",
                 "--workers", "1", "--layers", "1", "--out", out)
    assert result.code == 0, result
    back = read_partition(out)
    assert back.layers == [1]
    assert back.meta["solver_settings"]["pop_size"] == 8 and back.meta["solver_settings"]["generations"] == 2


def test_compare_cli(cli, profile_path, tmp_path) -> None:
    stem = tmp_path / "cmp" / "solvers"
    result = cli("partition", "compare", profile_path, "--solvers", "random,contiguous,alternating",
                 "--workers", "1", "--out", stem)
    assert result.code == 0, result
    files = {p.suffix: p for p in stem.parent.iterdir()}
    assert sorted(files) == [".csv", ".json", ".md"]
    with open(files[".csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["solver"] for r in rows] == ["random", "contiguous", "alternating"]
    cost = {r["solver"]: float(r["held-out cost"]) for r in rows}
    assert all(0 < c < 1 for c in cost.values())
    assert cost["alternating"] < cost["random"] and cost["alternating"] < cost["contiguous"]
    assert all(int(r["experts"]) == 16 for r in rows)
    data = json.loads(files[".json"].read_text())
    assert [r["solver"] for r in data["rows"]] == ["random", "contiguous", "alternating"]
    assert {r["solver"]: r["held-out cost"] for r in data["rows"]} == pytest.approx(cost)
    assert set(data["per_expert"]) == {"random", "contiguous", "alternating"}
    assert all(len(v["heldout_cost"]) == 16 for v in data["per_expert"].values())
    markdown = files[".md"].read_text()
    assert all(f"| {name} |" in markdown for name in cost)
    assert "baselines, which do not optimise the cost: random, contiguous (" in markdown  # alternating is an optimiser


# --- resumable and distributed runs -----------------------------------------------------------------


def partition_data(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Root attributes and datasets of a partition file, less what only says when and how fast."""
    return h5_contents(path, skip_suffixes=("/seconds",))


def assert_same_partition_file(a: Path, b: Path) -> None:
    attrs_a, data_a = partition_data(a)
    attrs_b, data_b = partition_data(b)
    assert attrs_a == attrs_b
    assert sorted(data_a) == sorted(data_b)
    for name, value in data_a.items():
        np.testing.assert_array_equal(value, data_b[name], err_msg=name)


@pytest.fixture(scope="module")
def whole_run(profile_path, tmp_path_factory) -> Path:
    """An uninterrupted nsga2 run over every layer, written by ``run_partition``."""
    out = tmp_path_factory.mktemp("whole") / "partition.h5"
    run_partition(profile_path, settings_for("nsga2"), out, workers=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["partition.h5"]  # no work folder left
    return out


def test_a_flipped_byte_in_the_profile_rows_is_refused_as_corrupt(profile_path, tmp_path, cli) -> None:
    """Rows carry an HDF5 Fletcher-32 checksum: a byte flipped inside them (a bad disk or copy) was
    partitioned as data; now the read fails and the run says which dataset."""
    import h5py

    damaged = tmp_path / "profile.h5"
    damaged.write_bytes(profile_path.read_bytes())
    key = "layers/1/experts/2/fit_rows"
    with h5py.File(damaged, "r") as h5:
        dataset = h5[key].id
        if h5[key].chunks:
            offset, size = dataset.get_chunk_info(0).byte_offset, dataset.get_chunk_info(0).size
        else:  # a contiguous dataset (profiles written before the checksums)
            offset, size = dataset.get_offset(), dataset.get_storage_size()
    data = bytearray(damaged.read_bytes())
    data[offset + size // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    result = cli("partition", "run", damaged, "--out", tmp_path / "partition.h5", "--workers", "1")
    result.assert_one_line_error("is corrupt", f"cannot read {key}")
    assert not (tmp_path / "partition.h5").exists()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_run_stops_its_partition_workers(profile_path, tmp_path, signum) -> None:
    """SIGTERM reaches only the parent (Ctrl-C at a terminal reaches the whole group): the parent died and
    its two solver processes ran on, orphaned. Now it stops them and exits 143, keeping nothing (no expert
    was solved: no folder to resume from). SIGKILL runs no clean-up: the workers solved on, then waited for
    ever beside the --resume run; now they die with the run."""
    out = tmp_path / "partition.h5"
    proc = subprocess.Popen([sys.executable, "-m", "prism_cli", "partition", "run", str(profile_path), "--out", str(out),
                             "--workers", "2", "--solver", "nsga2", "-O", "generations=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 3 and time.monotonic() < deadline:  # two solvers and the resource tracker
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 3, "the partition workers did not start"
        time.sleep(1.0)  # past their start-up
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:  # a failing run must not leave solvers of 100000 generations behind
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIGTERM; this run left no output"), err
        assert list(tmp_path.iterdir()) == []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [pid for pid in workers if Path(f"/proc/{pid}/stat").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            break
        time.sleep(0.2)
    assert alive == [], "solver processes outlived the run"
    assert not out.exists()


def test_a_run_interrupted_before_any_expert_is_solved_leaves_no_folder(profile_path, tmp_path) -> None:
    """Its .partial folder held only a manifest, and a plain rerun was refused until --resume was given."""
    def ctrl_c(_total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_partition(profile_path, settings_for("alternating"), tmp_path / "p.h5", workers=1, on_start=ctrl_c)
    assert list(tmp_path.iterdir()) == []
    run_partition(profile_path, settings_for("alternating"), tmp_path / "p.h5", workers=1, layers=[0])  # no --resume needed


def test_interrupted_and_resumed_partition_is_the_uninterrupted_one(profile_path, whole_run, tmp_path) -> None:
    out = tmp_path / "partition.h5"
    finished = []

    def stop_after_five(layer, expert, result):
        finished.append((layer, expert))
        if len(finished) == 5:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="5 finished experts are kept"):
        run_partition(profile_path, settings_for("nsga2"), out, workers=1, on_done=stop_after_five)
    assert not out.exists() and len(list((tmp_path / "partition.h5.partial").glob("*.npz"))) == 5
    with pytest.raises(PrismError, match="--resume"):
        run_partition(profile_path, settings_for("nsga2"), out, workers=1)
    with pytest.raises(PrismError, match="seed = 0, this run has 1"):
        run_partition(profile_path, settings_for("nsga2", seed=1), out, workers=1, resume=True)
    saved = sorted((tmp_path / "partition.h5.partial").glob("*.npz"))[0]
    good = saved.read_bytes()
    saved.write_bytes(b"torn")
    with pytest.raises(PrismError, match=f"{saved.name} is damaged"):
        run_partition(profile_path, settings_for("nsga2"), out, workers=1, resume=True)
    saved.write_bytes(good)
    solved_now = []
    # Resumed on two workers: the other experts are solved in another order and other processes.
    run_partition(profile_path, settings_for("nsga2"), out, workers=2, resume=True,
                  on_done=lambda layer, expert, result: solved_now.append((layer, expert)))
    assert len(solved_now) == 16 and set(solved_now[:5]) == set(finished)  # 5 reloaded, 11 solved
    assert_same_partition_file(whole_run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition.h5"]


def test_layer_ranges_merged_are_one_run(cli, tiny_model_dir, profile_path, whole_run, tmp_path) -> None:
    for layer in (1, 0):
        result = cli("partition", profile_path, "--solver", "nsga2", "-O", "pop_size=8", "-O", "generations=3",
                     "-N", "4", "--workers", "1", "--layers", str(layer), "--out", tmp_path / f"part{layer}.h5")
        assert result.code == 0, result
    result = cli("partition", "merge", tmp_path / "part1.h5", tmp_path / "part0.h5", "--out", tmp_path / "merged.h5")
    assert result.code == 0, result
    assert "layers 0, 1 from 2 parts" in " ".join(result.out.split())
    assert_same_partition_file(whole_run, tmp_path / "merged.h5")
    result = cli("export", tiny_model_dir("olmoe"), tmp_path / "merged.h5", "--gate", "linear", "--out", tmp_path / "export")
    assert result.code == 0, result
    # One part alone does not cover the model: export refuses it.
    cli("export", tiny_model_dir("olmoe"), tmp_path / "part0.h5", "--out", tmp_path / "export0").assert_one_line_error(
        "covers layers [0]", "every MoE layer")


def test_layer_ranges_parse(profile_path, tmp_path) -> None:
    from prism_cli.commands.common import parse_layers

    assert parse_layers("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert parse_layers(None) is None
    with pytest.raises(PrismError, match="empty"):
        parse_layers("5-2")
    with pytest.raises(PrismError, match="ranges such as 0-7"):
        parse_layers("0-x")


def test_merge_refuses_to_write_over_a_part_or_their_profile(cli, profile_path, tmp_path) -> None:
    profile = tmp_path / "profile.h5"
    shutil.copy(profile_path, profile)
    parts = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for path, layer in zip(parts, (0, 1), strict=True):
        run_partition(profile, settings_for("alternating"), path, workers=1, layers=[layer])
    before = parts[0].read_bytes()
    cli("partition", "merge", *parts, "--out", parts[0]).assert_one_line_error("is the part", "choose another --out")
    assert parts[0].read_bytes() == before
    # The profile the parts were made from (which `partition PROFILE --out` refuses too) was replaced.
    before = profile.read_bytes()
    cli("partition", "merge", *parts, "--out", profile).assert_one_line_error("is the profile the parts were made from")
    assert profile.read_bytes() == before


@pytest.mark.parametrize(
    "case, needles",
    [
        ("overlap", ["both hold layer 0", "disjoint --layers"]),
        ("other-seed", ["does not belong with", "seed is 1 there and 0"]),
        ("other-solver", ["does not belong with", "solver is 'random' there"]),
        ("one-part", ["at least two"]),
        ("missing-part", ["does not exist"]),
        ("not-a-partition", ["not a readable HDF5 file"]),
    ],
)
def test_merge_bad_input_is_one_line_and_writes_nothing(cli, profile_path, tmp_path, case, needles) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()

    def part(name: str, layers: str, **kw) -> Path:
        path = parts / name
        run_partition(profile_path, settings_for(kw.pop("solver", "alternating"), **kw), path, workers=1,
                      layers=[int(x) for x in layers.split(",")])
        return path

    a = part("a.h5", "0")
    if case == "overlap":
        args = [a, part("b.h5", "0,1")]
    elif case == "other-seed":
        args = [a, part("b.h5", "1", seed=1)]
    elif case == "other-solver":
        args = [a, part("b.h5", "1", solver="random")]
    elif case == "one-part":
        args = [a]
    elif case == "missing-part":
        args = [a, parts / "nope.h5"]
    else:
        (parts / "junk.h5").write_bytes(b"not hdf5")
        args = [a, parts / "junk.h5"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("partition", "merge", *args, "--out", out_dir / "merged.h5")
    result.assert_one_line_error(*needles)
    assert list(out_dir.iterdir()) == []


# --- evolutionary solvers and their operators on synthetic rows ------------------------------------


@pytest.mark.parametrize("solver", ["nsga2", "ga"])
@pytest.mark.parametrize("n_groups, width, n_rows, noise", [(4, 64, 300, 0.2), (8, 64, 200, 0.3)])
def test_evolutionary_solvers_recover_planted_groups(solver, n_groups, width, n_rows, noise) -> None:
    for seed in range(3):
        rows, planted = planted_rows(n_rows, width, n_groups, np.random.default_rng(seed), noise=noise)
        problem = PartitionProblem(rows, n_groups, keep=1)
        solution = SOLVERS.get(solver)(pop_size=8, generations=3).solve(problem, np.random.default_rng(100 + seed))
        assert is_valid_partition(solution.labels, n_groups)
        assert same_partition(solution.labels, planted), (solver, seed)
        if solver == "nsga2":
            assert solution.front is not None and solution.front.shape[1] == n_groups  # cost, R_1..R_{N-1}
            assert np.all(np.diff(solution.front[:, 0]) >= 0)  # sorted by paper cost, best first


@pytest.mark.parametrize("solver", ["nsga2", "ga"])
def test_evolutionary_solvers_are_deterministic_and_keep_their_best(solver) -> None:
    rows = realistic_rows(200, 32, np.random.default_rng(5))
    problem = PartitionProblem(rows, 4, keep=1)
    make = lambda: SOLVERS.get(solver)(pop_size=8, generations=3)  # noqa: E731
    solution = make().solve(problem, np.random.default_rng(9))
    again = make().solve(problem, np.random.default_rng(9))
    labels = solution.labels
    assert np.array_equal(labels, again.labels) and is_valid_partition(labels, 4)
    if solver == "ga":
        # GA is elitist on the paper cost, and its population starts from the alternating optimum.
        weights, scale = rank_weights(4, 1), token_scale(problem.rows, per_token=False)
        start = SOLVERS.get("rate-chunk")().solve(problem, np.random.default_rng(0)).labels
        _, seed_value = improve(problem.rows, start, weights, scale, 30)
        assert scalarised(group_loads(problem.rows, labels, 4), weights, scale) >= seed_value * (1 - 1e-6)
    else:
        # NSGA-II returns the front (paper cost, R_1..R_3; by increasing cost) and, among the members
        # within cost_tolerance of the best cost, the one with the best mean R_m.
        loads = group_loads(problem.rows, labels, 4)
        mine = np.concatenate([[paper_cost(loads, 1)], retained_mass(loads)])
        front = solution.front
        assert front.shape[1] == 4 and np.all(np.diff(front[:, 0]) >= 0)
        assert np.any(np.all(np.isclose(front, mine, rtol=1e-6), axis=1))
        eligible = front[front[:, 0] <= front[0, 0] * 1.002]
        assert mine[0] <= front[0, 0] * 1.002 + 1e-12
        assert mine[1:].mean() >= eligible[:, 1:].mean(axis=1).max() - 1e-9


def test_canonical_makes_relabelled_partitions_equal() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.permutation(equal_labels(24, 4))
        renamed = rng.permutation(4)[labels]
        assert np.array_equal(canonical(labels), canonical(renamed))
        assert canonical(labels)[0] == 0 and np.all(np.diff(np.maximum.accumulate(canonical(labels))) <= 1)
        other = labels.copy()
        i, j = np.nonzero(labels != labels[0])[0][0], 0
        other[i], other[j] = other[j], other[i]
        assert not np.array_equal(canonical(labels), canonical(other))


def test_balance_repair_always_gives_equal_groups() -> None:
    rng = np.random.default_rng(1)
    for n_groups, width in [(2, 8), (4, 32), (8, 64)]:
        problem = PartitionObjectives(PartitionProblem(rng.random((5, width)), n_groups), "cost")
        x = rng.integers(0, n_groups, size=(30, width))
        x[0] = np.zeros(width)  # all in one group
        x[1] = rng.permutation(equal_labels(width, n_groups))  # already balanced
        repaired = BalanceRepair()._do(problem, x.copy(), random_state=np.random.default_rng(2))
        for before, after in zip(x, repaired, strict=True):
            assert is_valid_partition(after, n_groups)
            counts = np.bincount(before, minlength=n_groups)
            # Only neurons of over-full groups move.
            moved = before != after
            assert np.all(counts[before[moved]] > width // n_groups)
        assert np.array_equal(repaired[1], x[1])


def _random_weights(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sort(rng.random(n))[::-1].copy()  # non-increasing, as every rank-weighted objective is


@pytest.mark.parametrize("per_token", [False, True])
def test_pair_step_never_lowers_the_objective(per_token: bool) -> None:
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.choice([2, 4, 8]))
        rows = realistic_rows(60, 32, rng) if trial % 2 else rng.lognormal(size=(60, 32)).astype(np.float32)
        problem = PartitionProblem(rows, n)
        weights = [rank_weights(n, 1), rank_weights(n, None), _random_weights(rng, n)][trial % 3]
        scale = token_scale(problem.rows, per_token)
        labels = rng.permutation(equal_labels(32, n))
        f0 = scalarised(group_loads(problem.rows, labels, n), weights, scale)
        profit = problem.columns @ group_weights(problem.rows, labels, weights, scale)
        current = labels
        for _ in range(5):  # several steps sharing one profit matrix stay above the starting value
            a, b = rng.choice(n, size=2, replace=False)
            current = pair_step(current, profit, int(a), int(b))
            assert is_valid_partition(current, n)
            assert scalarised(group_loads(problem.rows, current, n), weights, scale) >= f0 - 1e-5 * abs(f0)


@pytest.mark.parametrize("per_token", [False, True])
def test_alternating_step_and_improve_are_monotone(per_token: bool) -> None:
    rng = np.random.default_rng(4)
    for trial in range(10):
        n = [2, 4, 8][trial % 3]
        rows = realistic_rows(80, 32, rng)
        weights = rank_weights(n, None) if trial % 2 else rank_weights(n, 1)
        scale = token_scale(rows, per_token)
        labels = rng.permutation(equal_labels(32, n))
        value = scalarised(group_loads(rows, labels, n), weights, scale)
        for _ in range(4):
            labels = alternating_step(rows, labels, weights, scale)
            assert is_valid_partition(labels, n)
            new = scalarised(group_loads(rows, labels, n), weights, scale)
            assert new >= value - 1e-5 * abs(value)
            value = new
        start = rng.permutation(equal_labels(32, n))
        start_value = scalarised(group_loads(rows, start, n), weights, scale)
        best, best_value = improve(rows, start, weights, scale, max_steps=20)
        assert is_valid_partition(best, n) and best_value >= start_value
        assert best_value == pytest.approx(float(scalarised(group_loads(rows, best, n), weights, scale)), rel=1e-6)


# --- the member kept from the front, gate neurons ---------------------------------------------------


def test_near_best_rule_prefers_mean_retained_mass_within_the_cost_tolerance() -> None:
    # columns: paper cost, R_1, R_2, R_3
    scores = np.array([
        [0.500, 0.50, 0.70, 0.88],  # best cost
        [0.5009, 0.51, 0.72, 0.89],  # within 0.2 %: higher mean R -> kept
        [0.520, 0.60, 0.80, 0.95],  # best mean R but 4 % worse cost: never kept
    ])
    assert pick_near_best(scores, 0.002) == 1
    assert pick_near_best(scores, 0.0) == 0
    assert pick_near_best(scores, 0.05) == 2


def test_gate_neurons_by_mass_and_by_coactivation() -> None:
    # One group of four neurons: 0 and 1 fire together on every row (strong co-activation, small
    # values); 2 fires alone with a large value; 3 is almost silent.
    rows = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.01], [0.0, 0.0, 9.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    problem = PartitionProblem(np.hstack([rows, rows]), 2)
    members = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(gate_positions(problem, members, 2, "mass"), [[0, 2], [0, 2]])  # ties: lowest index first
    coact = gate_positions(problem, members, 2, "coact")
    assert set(coact[0]) == {0, 1}, coact
