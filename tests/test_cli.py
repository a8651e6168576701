"""The ``prism`` command itself: help and version, run configurations, and what the user sees when
something goes wrong (usage errors, internal errors, PRISM_DEBUG)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from prism_cli import __version__
from prism_cli.app import app
from prism_cli.config import defaults_for, load_run_config, schema
from prism_cli.errors import PrismError
from prism_cli.io import atomic_dir, atomic_path
from prism_cli.profiling.format import ProfileFile
from prism_cli.solvers.format import read_partition


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand of ``prism``, walked from the app itself (new commands are covered)."""
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(command, path: tuple[str, ...]) -> None:
        ctx = type(root).context_class(command, info_name=path[-1] if path else "prism")
        names = command.list_commands(ctx) if hasattr(command, "list_commands") else []
        for name in names:
            paths.append((*path, name))
            walk(command.get_command(ctx, name), (*path, name))

    walk(root, ())
    return paths


COMMANDS = _command_paths()


# --- help and version -----------------------------------------------------------------------------


def test_help(cli) -> None:
    result = cli("--help")
    assert result.code == 0, result
    for name in ("profile", "partition", "export", "bench", "eval", "tables", "kernels", "doctor"):
        assert name in result.out


def test_version(cli) -> None:
    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"prism {__version__}"


def test_python_dash_m_version() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "prism_cli", "--version"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"prism {__version__}"


def test_ctrl_c_while_prism_starts_is_one_line(tmp_path) -> None:
    """Ctrl-C while ``prism`` imports its commands (about a second) printed a 25-line traceback. The console
    script is run as installed, with a Ctrl-C raised at the import of the commands."""
    script = tmp_path / "console.py"
    script.write_text(
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'prism_cli.commands':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "entry = next(e for e in entry_points(group='console_scripts') if e.name == 'prism')\n"
        "sys.argv = ['prism', 'eval', 'builtin']\n"
        "sys.exit(entry.load()())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 130, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), done.stderr


@pytest.mark.parametrize("argv, signum, code", [
    (["--version"], signal.SIGINT, 0),  # a finished run: its outputs are in place, a late signal must not undo it
    (["--version"], signal.SIGTERM, 0),
    (["eval", "/nonexistent"], signal.SIGTERM, -signal.SIGTERM),  # a failed run stays killable to the end
], ids=["success-sigint", "success-sigterm", "failure-sigterm"])
def test_a_signal_after_the_command_ends(tmp_path, argv, signum, code) -> None:
    """A signal landing while the interpreter shuts down (here: from an exit handler, so deterministically
    after the command returned) made a finished run exit as if killed."""
    script = tmp_path / "console.py"
    script.write_text(
        "import atexit, os, sys, time\n"
        f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), time.sleep(0.5)))\n"
        f"sys.argv = ['prism', *{argv!r}]\n"
        "from prism_cli.cli import main\n"
        "main()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_every_command_is_walked() -> None:
    assert {("profile",), ("partition",), ("partition", "run"), ("partition", "compare"), ("export",), ("bench",),
            ("eval",), ("tables",), ("doctor",), ("kernels",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_subcommand_help(cli, path: tuple[str, ...]) -> None:
    result = cli(*path, "--help")
    assert result.code == 0, result
    assert "Usage" in result.out and path[-1] in result.out
    assert "Traceback" not in result.err


def test_usage_errors_are_one_line_not_internal_errors(cli) -> None:
    """A mistyped option or command is a usage error (exit 2) in one line naming the problem and where
    help is, not an "internal error" (exit 1) nor click's four lines of usage."""
    cases = {
        ("profile", "--tokns", "5"): ("--tokns", "prism profile --help"),
        ("profile", "--tokens", "many"): ("--tokens", "prism profile --help"),
        ("no-such-command",): ("no-such-command", "prism --help"),
        ("schedule", "run"): ("directory", "prism schedule run --help"),
    }
    for args, words in cases.items():
        result = cli(*args)
        assert result.code == 2, (args, result)
        assert "internal error" not in result.err and "Traceback" not in result.err
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.err)
        assert all(word in lines[0] for word in words), (args, lines)


def test_no_arguments_still_shows_help(cli) -> None:
    for args in ((), ("partition",)):
        result = cli(*args)
        assert "Usage" in result.out + result.err and "Commands" in result.out + result.err, (args, result)


@pytest.mark.parametrize("written", [0, 1, 2])
def test_ctrl_c_says_what_was_written_before_it(written, cli, monkeypatch, tmp_path) -> None:
    """Ctrl-C in the last moments of a command, after its output was renamed into place, must not say
    that nothing was kept; an output written into a temporary folder that was dropped is not named."""
    from prism_cli import cuda
    from prism_cli.io import write_text

    outputs = [tmp_path / f"out{i}.md" for i in range(written)]

    def toolkit_info() -> dict[str, str]:
        with atomic_dir(tmp_path / "dropped") as folder:
            write_text(folder / "inner.md", "x")  # renamed inside the folder, which Ctrl-C then drops
            for path in outputs:
                write_text(path, "done")
            raise KeyboardInterrupt

    monkeypatch.setattr(cuda, "toolkit_info", toolkit_info)
    result = cli("doctor")
    assert result.code == 130, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), result.err
    assert "inner.md" not in lines[0] and not (tmp_path / "dropped").exists()
    if written == 0:
        assert "this run left no output" in lines[0]
    else:
        assert str(outputs[-1]) in lines[0] and "nothing half-written" in lines[0]
        assert (written == 2) == ("2 outputs" in lines[0])


def test_sigterm_cleans_up_as_ctrl_c_does_and_exits_143(cli, monkeypatch, tmp_path) -> None:
    """SIGTERM (``kill``, ``timeout``, a job scheduler) killed the process where it stood: an export left its
    temporary folder (a whole model) beside --out. It now raises where Ctrl-C would."""
    import signal
    import time

    from prism_cli import cuda

    def toolkit_info() -> dict[str, str]:
        with atomic_dir(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cuda, "toolkit_info", toolkit_info)
    result = cli("doctor")
    assert result.code == 143, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIGTERM; this run left no output"), result.err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only while a command runs


@pytest.mark.parametrize("args", [
    ("bench", "EXPORT", "--out", ""), ("schedule", "sweep", "EXPORT", "--sim", "--out="),
    ("partition", "compare", "PROFILE", "--out", " "), ("profile", "--out", ""), ("eval", "--config", ""),
], ids=lambda a: " ".join(x for x in a if x.strip() and x.upper() != x))
def test_an_empty_path_or_config_is_refused_before_any_work(args, cli, monkeypatch, tmp_path) -> None:
    """typer reads --out '' as '.': bench wrote its tables into the current folder and eval ignored
    --config ''; an empty value now stops the command in one line, before anything is loaded."""
    import prism_cli.models.loading as loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "resolve_model", lambda *a: pytest.fail("work started"))
    args = tuple({"EXPORT": str(tmp_path), "PROFILE": str(tmp_path / "p.h5")}.get(a, a) for a in args)
    result = cli(*args)
    assert result.code == 2, result
    option = "--config" if "--config" in args else "--out"
    assert result.err.strip().splitlines() == [next(line for line in result.err.splitlines() if line.strip())]
    assert result.err.startswith(f"error: {option} is empty"), result.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "needle"), [
    (("--dtype", "float64"), "unknown dtype 'float64'"), (("--device", "tpu"), "unknown device 'tpu'"),
    (("--seq-len", "1"), "--seq-len must be at least 2"), (("-K", "bogus"), "operating point 'bogus'"),
    (("-K", "topk:99"), "topk:99 is outside 1..8"), (("--device-memory", "50%", "--cache-policy", "mru"), "unknown cache policy 'mru'"),
])
def test_eval_refuses_impossible_options_before_loading_the_model(args, needle, cli, tiny_export, monkeypatch) -> None:
    """Found by fuzzing: these were refused only after the model had loaded (10-18 s on this machine)."""
    import prism_cli.commands.eval as eval_command

    monkeypatch.setattr(eval_command, "load_elastic_or_plain", lambda *a, **k: pytest.fail("the model was loaded"))
    cli("eval", tiny_export, "--tokens", "64", *args).assert_one_line_error(needle)


# --- run configurations ---------------------------------------------------------------------------


def test_config_supplies_defaults_and_the_command_line_wins(cli, tiny_model_dir, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    out = tmp_path / "profile.h5"
    config.write_text(
        f"model: {tiny_model_dir('olmoe')}\n"  # shared keys: used by every command that has the option
        "seed: 3\n"
        "profile:\n"
        "  tokens: 1024\n"
        "  seq-len: 16\n"  # '-' or '_' both work
        "  max_rows: 64\n"
        "  row_dtype: float32\n"
        f"  out: {out}\n"
        "partition:\n"
        "  solver: nsga2\n"
        "  solver-option: [pop_size=8, generations=2]\n"  # a repeatable option takes a list
        "  layers: [1]\n"  # a comma-separated option takes a list too
        "  workers: 1\n"
    )
    result = cli("profile", "--config", config, "--seq-len", "32")
    assert result.code == 0, result
    with ProfileFile(out) as pf:
        meta = pf.meta
        fit, held = pf.row_counts(pf.layers[0])
    assert meta["model"] == str(tiny_model_dir("olmoe"))
    assert (meta["tokens"], meta["seq_len"], meta["max_rows"], meta["seed"]) == (1024, 32, 64, 3)
    assert meta["row_dtype"] == "float32" and (fit + held).max() <= 64
    # `prism partition PROFILE --config` reads the partition section through the implicit `run`.
    part = tmp_path / "partition.h5"
    result = cli("partition", out, "--config", config, "--out", part)
    assert result.code == 0, result
    meta = read_partition(part).meta
    assert (meta["solver"], meta["seed"], meta["layers"]) == ("nsga2", 3, [1])
    assert (meta["solver_settings"]["pop_size"], meta["solver_settings"]["generations"]) == (8, 2)


def test_config_values_for_list_options() -> None:
    """``defaults_for`` hands a repeatable option a list and any other option the command-line string."""
    root = typer.main.get_command(app)
    ctx = type(root).context_class(root, info_name="prism")
    partition = root.get_command(ctx, "partition")
    run = partition.get_command(type(root).context_class(partition, info_name="partition"), "run")
    defaults = defaults_for({"partition": {"solver-option": "generations=2", "layers": [0, 1], "keep": 2}}, "partition",
                            run.params)
    assert defaults == {"solver_option": ["generations=2"], "layers": "0,1", "keep": 2}


def test_unknown_shared_keys_are_ignored(cli, tmp_path) -> None:
    """Top-level keys are shared by all commands, so one that this command lacks is not an error."""
    config = tmp_path / "run.yaml"
    config.write_text("solver: alternating\nprofile:\n  tokens: 0\n")
    result = cli("profile", "--config", config)
    result.assert_one_line_error("--tokens must be positive")  # the section applied; `solver` was ignored


@pytest.mark.parametrize(("text", "phrases"), [
    ("eval:\n  tokens: [512]\n", ("'tokens' in section 'eval'", "not a list")),
    ("eval:\n  dtype: [float32]\n", ("'dtype' in section 'eval'", "not a list")),
    ("device: [cpu]\n", ("'device'", "top level", "not a list")),
    ("partition:\n  sub_experts: [4]\n", ("'sub_experts' in section 'partition'", "not a list")),
    ("eval:\n  tokens: true\n", ("'tokens' takes int, not true",)),  # YAML's true reached click as --tokens 1
    ("eval:\n  seq_len: false\n", ("'seq_len' takes int, not false",)),
    # typer's own message for these named the option but not the file the value came from
    ("eval:\n  tokens: 2.5\n", ("config file", "'tokens' takes an integer, not 2.5")),
    ("eval:\n  tokens: many\n", ("config file", "'tokens' takes an integer, not 'many'")),
    ("tokens: 1e3\n", ("config file", "'tokens' takes an integer, not '1e3'")),
    ("eval:\n  tokens: 512\n  tokens: 64\n", ("'tokens' is given twice",)),
    ("eval:\n  tokens: 512\neval:\n  seq_len: 64\n", ("'eval' is given twice",)),
])
def test_config_lists_for_single_values_and_duplicate_keys_are_refused(cli, tmp_path, text, phrases) -> None:
    """A one-element list is not taken as its element, nor does the last of two equal keys silently win."""
    config = tmp_path / "run.yaml"
    config.write_text(text)
    result = cli("eval", "--config", config)
    assert result.code == 2
    result.assert_one_line_error(*phrases)


def _params(name: str) -> list:
    root = typer.main.get_command(app)
    return root.get_command(type(root).context_class(root, info_name="prism"), name).params


@pytest.mark.parametrize("section, refused", [
    ({"steps": 3.0, "lr": "1e-3", "warmup": "12", "init_alpha": 2}, None),
    ({"lr": "fast"}, "'lr' takes a number, not 'fast'"),
    ({"lr": [0.1]}, "not a list"),
    ({"warmup": 1.5}, "'warmup' takes an integer, not 1.5"),
])
def test_config_numbers_are_checked_with_the_file_named(section, refused) -> None:
    """Integers written as 3.0 or "12" and numbers as "1e-3" (YAML 1.1 reads that as a string) pass as typed."""
    if refused is None:
        assert defaults_for({"tune-gate": section}, "tune-gate", _params("tune-gate"), "run.yaml") == section
        return
    with pytest.raises(PrismError, match="config file run.yaml") as info:
        defaults_for({"tune-gate": section}, "tune-gate", _params("tune-gate"), "run.yaml")
    assert refused in str(info.value)


def test_config_lists_stay_accepted_for_list_options(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("layers: [0, 1]\npartition:\n  layers: [0]\n  solver-option: [generations=2]\ncompare:\n"
                      "  solvers: [random, greedy]\noffload-bench:\n  device-memory: [30%, 60%]\n")
    assert load_run_config(config)["compare"]["solvers"] == ["random", "greedy"]


def test_a_yaml_list_is_typed_as_on_the_command_line() -> None:
    """bench --points takes ';' (a pattern point holds commas), its --batch and every other list ','."""
    root = typer.main.get_command(app)
    bench = root.get_command(type(root).context_class(root, info_name="prism"), "bench")
    got = defaults_for({"bench": {"points": ["pattern:4,3", "linear:2"], "batch": [8, 32]}}, "bench", bench.params)
    assert got == {"points": "pattern:4,3;linear:2", "batch": "8,32"}


def test_every_list_option_is_an_option_of_its_command() -> None:
    """``LIST_OPTIONS`` is kept by hand: a renamed option must not leave a stale entry behind."""
    from prism_cli.config import LIST_OPTIONS, _commands

    commands = _commands()
    for section, options in LIST_OPTIONS.items():
        assert section in commands, section
        assert set(options) <= {p.name for p in commands[section].params}, section


def test_a_shared_list_is_refused_where_the_command_takes_one_value() -> None:
    """``batch: [8]`` at the top level suits ``bench`` (batch sizes) but not ``tune-gate`` (windows per step)."""
    root = typer.main.get_command(app)
    tune = root.get_command(type(root).context_class(root, info_name="prism"), "tune-gate")
    with pytest.raises(PrismError, match="'batch'.*tune-gate.*not a list"):
        defaults_for({"batch": [8]}, "tune-gate", tune.params)


# --- internal errors ------------------------------------------------------------------------------


def _boom(*_args, **_kwargs):
    raise ValueError("something [unexpected] went wrong " + "and kept going " * 12 + "\nsecond line of detail")


def test_internal_error_is_one_line(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("PRISM_DEBUG", raising=False)
    monkeypatch.setattr("prism_cli.commands.profile.load_text", _boom)
    result = cli("profile", "--out", tmp_path / "profile.h5")
    assert result.code == 1
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("internal error: ValueError: something [unexpected] went wrong")
    assert "PRISM_DEBUG" in lines[0] and "second line" not in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_prism_debug_shows_the_exception(cli, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PRISM_DEBUG", "1")
    monkeypatch.setattr("prism_cli.commands.profile.load_text", _boom)
    with pytest.raises(ValueError, match="something"):
        cli("profile", "--out", tmp_path / "profile.h5")


def test_error_messages_keep_brackets(cli, tmp_path) -> None:
    """User errors print as text: a path with [brackets] is not eaten as console markup."""
    weird = tmp_path / "[bold]data.txt"
    result = cli("profile", "--data", weird, "--out", tmp_path / "profile.h5")
    result.assert_one_line_error(f"{weird} does not exist")


# --- output files ---------------------------------------------------------------------------------


def test_outputs_get_the_usual_permissions(tmp_path) -> None:
    """Atomic writes go through private temp files; the results must not stay private (0600 / 0700)."""
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.h5") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "file.h5").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.h5", "folder"]


def test_a_failed_last_rename_puts_the_old_output_back(tmp_path, monkeypatch) -> None:
    """atomic_dir(force=True): if the new folder cannot be renamed into place, the old one is restored and
    no temporary (``.out.*.tmp`` or ``.out.*.old``) is left behind."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # the new folder's rename into place
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PrismError, match="No space left"), atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_fit_the_schema(path: Path) -> None:
    data = load_run_config(path)  # refuses unknown sections and keys
    assert set(data) - set(schema()) <= {"name", "model", "seed", "device", "data"}


def test_the_schema_has_a_section_per_command_with_a_config() -> None:
    sections = schema()
    assert set(sections) == {"profile", "partition", "merge", "compare", "export", "bench", "eval", "schedule", "sweep", "offload-bench",
                             "tune-gate", "rank-layers", "plan", "calibrate", "select-routers"}
    assert {"solver", "sub_experts", "gate_neurons"} <= sections["partition"]
    assert "solvers" in sections["compare"] and "config" not in sections["profile"]
