"""Bad input to ``prism schedule run|sweep`` and ``prism plan run`` found by fuzzing: each case is refused in
one line before any run (``run_schedule`` / ``run_sweep`` replaced by a function that fails the test), or,
where it is served, its output is checked against what the input says."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import synthetic_cost_model

from prism_cli.errors import PrismError
from prism_cli.planner import model_shape, read_config
from prism_cli.serving.costmodel import CostModel
from prism_cli.serving.engine import Limits
from prism_cli.serving.runner import check_load

DATA = Path(__file__).parent / "data"


def _never(*_args, **_kwargs):
    raise AssertionError("the run started: the input should have been refused first")


@pytest.fixture
def no_run(monkeypatch):
    """Any run of ``schedule run`` or ``sweep`` fails the test (sweep imports run_schedule from runner)."""
    monkeypatch.setattr("prism_cli.serving.sweep.run_sweep", _never)
    monkeypatch.setattr("prism_cli.serving.runner.run_schedule", _never)


@pytest.fixture
def cost(tmp_path) -> Path:
    path = tmp_path / "cm.json"
    synthetic_cost_model().save(path)
    return path


def _strict_json(path: Path) -> dict:
    """The file's JSON, failing on NaN or Infinity (which ``json.loads`` accepts, and JSON has not)."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- --t-max -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_max", [math.inf, 1e300, 1e9 * 1.01, math.nan, 0.0])
def test_t_max_must_be_finite_and_at_most_the_latest_arrival(t_max):
    """``--t-max inf`` (or 1e300) made fullbatch wait for ever: the simulator's clock stood still."""
    with pytest.raises(PrismError, match="--t-max"):
        Limits(t_max=t_max).validate()
    Limits(t_max=1e9).validate()


@pytest.mark.parametrize("command", [["run", "--rate", "1", "--policy", "fullbatch"], ["sweep", "--rates", "1"]])
@pytest.mark.parametrize("t_max", ["inf", "1e300"])
def test_schedule_refuses_an_endless_t_max(cli, tiny_export, cost, tmp_path, no_run, command, t_max):
    cli("schedule", *command[:1], tiny_export, *command[1:], "--sim", "--cost-model", cost, "--duration", "3",
        "--t-max", t_max, "--out", tmp_path / "r").assert_one_line_error("--t-max", "1e+09")


def test_a_config_files_endless_t_max_is_refused(cli, tiny_export, cost, tmp_path, no_run):
    config = tmp_path / "c.yaml"
    config.write_text("schedule:\n  t_max: .inf\n")
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--config", config).assert_one_line_error("--t-max")


def test_fullbatch_at_the_largest_t_max_ends(cli, tiny_export, cost, tmp_path):
    """At the bound itself the simulator still moves: fullbatch waits 1e9 s for a batch that never fills, then
    serves every request, each waiting t_max (its TTFT is at least 1e9 s)."""
    result = cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--duration", "3", "--rate", "1",
                 "--policy", "fullbatch", "--t-max", "1e9", "--max-output", "4", "--max-prompt", "32", "--out", tmp_path / "r")
    assert result.code == 0, result.err
    metrics = _strict_json(tmp_path / "r.json")["metrics"]
    assert metrics["completed"] == metrics["requests"] >= 1
    assert metrics["ttft_s"]["p50"] >= 1e9


# --- cost-model magnitudes and finite outputs ---------------------------------------------------------

def test_a_cost_model_with_absurd_times_is_refused(cli, tiny_export, tmp_path, no_run):
    """Every linear:2 time 1e308 ms gave NaN metrics, written as bare NaN into the JSON, exit 0."""
    model = synthetic_cost_model()
    for table in (model.points["linear:2"].decode_ms, model.points["linear:2"].prefill_ms):
        for key in table:
            table[key] = 1e308
    model.save(tmp_path / "huge.json")
    with pytest.raises(PrismError, match="at most 1e"):
        CostModel.load(tmp_path / "huge.json")
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", tmp_path / "huge.json", "--duration", "1",
        "--out", tmp_path / "r").assert_one_line_error("linear:2", "at most")
    assert not (tmp_path / "r.json").exists()


def test_a_cost_model_at_the_bound_gives_finite_json(cli, tiny_export, tmp_path):
    """Times at the largest allowed (1e9 ms a step) still give finite metrics: a request served at linear:2 takes
    at least one prefill of 1e9 ms, so its end-to-end time is at least 1e6 s."""
    model = synthetic_cost_model()
    for table in (model.points["linear:2"].decode_ms, model.points["linear:2"].prefill_ms):
        for key in table:
            table[key] = 1e9
    model.save(tmp_path / "big.json")
    result = cli("schedule", "run", tiny_export, "--sim", "--cost-model", tmp_path / "big.json", "--duration", "2",
                 "--rate", "2", "--policy", "static", "--point", "linear:2", "--floors", "linear:2=1", "--max-output", "4",
                 "--max-prompt", "32", "--out", tmp_path / "r")
    assert result.code == 0, result.err
    data = _strict_json(tmp_path / "r.json")
    assert data["metrics"]["completed"] == data["metrics"]["requests"]
    assert min(r["e2e"] for r in data["requests"]) >= 1e6


def test_metrics_that_are_not_finite_are_refused_naming_the_metric():
    from prism_cli.serving.runner import check_finite

    check_finite({"a": 1.0, "b": {"c": None, "d": 2}})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(PrismError, match="b.d"):
            check_finite({"a": 1.0, "b": {"c": None, "d": bad}})


# --- the simulator's tokenizer ------------------------------------------------------------------------

def test_sim_on_an_export_without_tokenizer_says_so(cli, tiny_export, cost, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_export, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "vocab*",
                                                                     "merges*", "chat_template*"))
    cli("schedule", "run", bare, "--sim", "--cost-model", cost, "--duration", "1").assert_one_line_error(
        "has no usable tokenizer", "copy them from the model")


# --- traces, option combinations, lists, workload size -----------------------------------------------

def test_a_trace_line_with_an_unknown_field_is_refused(cli, tiny_export, cost, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": "The whale", "max_tokens": 4}\n'
                     '{"arrival": 0, "prompt": "Hello there", "max_tokens": 8, "flor": "linear:2"}\n')
    # read before the run: run_schedule is real here, so the refusal comes from reading the trace
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--trace", trace).assert_one_line_error(
        "line 2", "'flor'")


def test_a_trace_integer_past_the_digit_limit_names_the_line(cli, tiny_export, cost, tmp_path):
    """json.loads raises ValueError (not JSONDecodeError) for an integer of more than 4,300 digits: exit 1,
    an internal error, no line."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": "The whale", "max_tokens": 4}\n'
                     f'{{"arrival": 0, "prompt": "Hello", "max_tokens": {"9" * 5000}}}\n')
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--trace", trace).assert_one_line_error(
        "line 2", "digits")


def test_a_trace_floor_the_cost_model_has_not_timed_names_the_line(cli, tiny_export, tmp_path):
    cost = synthetic_cost_model()
    del cost.points["linear:3"]
    cost.save(tmp_path / "cm.json")
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": "The whale", "max_tokens": 4}\n'
                     '{"arrival": 0, "prompt": "Hello", "max_tokens": 4, "floor": "linear:3"}\n')
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", tmp_path / "cm.json", "--trace", trace).assert_one_line_error(
        "line 2", "no timing of linear:3")


@pytest.mark.parametrize("duration", ["1.01e9", "1e300"])
def test_a_duration_past_the_latest_arrival_is_refused(cli, tiny_export, cost, no_run, duration):
    """``--rate 1e-300 --duration 1e300`` ran: two requests at 6.8e299 s, every latency 0 (the clock no longer
    resolves a step), as a trace's arrival past 1e9 s is refused for."""
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--rate", "1e-300", "--duration",
        duration).assert_one_line_error("--duration", "at most 1e+09")


def test_point_is_refused_with_another_policy_unless_a_config_file_gives_it(cli, tiny_export, cost, tmp_path):
    sim = ("--sim", "--cost-model", cost, "--duration", "1", "--rate", "4", "--max-output", "4", "--max-prompt", "32")
    cli("schedule", "run", tiny_export, *sim, "--policy", "fifo", "--point", "linear:4").assert_one_line_error(
        "--point linear:4", "fifo", "--policy static")
    config = tmp_path / "c.yaml"
    config.write_text("schedule:\n  point: linear:8\n")
    result = cli("schedule", "run", tiny_export, *sim, "--config", config, "--policy", "fifo", "--out", tmp_path / "f")
    assert result.code == 0, result.err
    assert _strict_json(tmp_path / "f.json")["settings"]["point"] is None  # the config's point is the static policy's
    result = cli("schedule", "run", tiny_export, *sim, "--config", config, "--policy", "static", "--floors", "linear:2=1",
                 "--out", tmp_path / "s")
    assert result.code == 0, result.err
    assert _strict_json(tmp_path / "s.json")["metrics"]["decode_rows_by_point"].keys() == {"linear:8"}


def test_sweep_refuses_rates_with_loads_unless_a_config_file_gives_the_loads(cli, tiny_export, cost, tmp_path, no_run):
    sim = ("--sim", "--cost-model", cost, "--duration", "1")
    cli("schedule", "sweep", tiny_export, *sim, "--rates", "3", "--loads", "high").assert_one_line_error(
        "--rates", "--loads", "not both")
    config = tmp_path / "c.yaml"
    config.write_text("sweep:\n  loads: high\n")
    result = cli("schedule", "sweep", tiny_export, *sim, "--config", config, "--rates", "3", "--out", tmp_path / "sw")
    assert "the run started" in result.err, result  # accepted: it reached the (replaced) sweep


@pytest.mark.parametrize("command, needles", [
    (["run", "--floors", "linear:2=0.5,,linear:8=0.5"], ["--floors", "empty item"]),
    (["run", "--floors", "linear:2=1,"], ["--floors", "empty item"]),
    (["sweep", "--rates", "1,,2"], ["--rates", "empty item"]),
    (["sweep", "--loads", "low,,high"], ["--loads", "empty item"]),
])
def test_empty_list_items_are_refused(cli, tiny_export, cost, tmp_path, no_run, command, needles):
    cli("schedule", command[0], tiny_export, *command[1:], "--sim", "--cost-model", cost, "--duration", "1",
        "--out", tmp_path / "r").assert_one_line_error(*needles)


def test_a_workload_of_more_than_100000_requests_is_refused(cli, tiny_export, cost, no_run):
    check_load(1000.0, 100.0)  # 100,000 expected: the bound itself
    with pytest.raises(PrismError, match="100,000"):
        check_load(1000.0, 100.1)
    cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--rate", "1e6", "--duration", "1").assert_one_line_error(
        "1e+06 requests", "100,000")


@pytest.mark.parametrize("command", [["run"], ["sweep", "--rates", "1"]])
def test_a_missing_out_folder_is_refused_and_not_made(cli, tiny_export, cost, tmp_path, no_run, command):
    out = tmp_path / "nodir" / "sub" / "x"
    cli("schedule", command[0], tiny_export, *command[1:], "--sim", "--cost-model", cost, "--duration", "1",
        "--out", out).assert_one_line_error("does not exist", "nodir")
    assert not (tmp_path / "nodir").exists()


def test_a_simulation_says_whose_times_it_gives(cli, tiny_export, tmp_path):
    """A cost model measured on another CPU simulates that machine: the run says so (on this AMD machine the
    committed Intel cost model simulated decode steps 3.4x faster than the real engine ran them)."""
    from prism_cli.environment import this_cpu_label

    elsewhere = synthetic_cost_model()
    elsewhere.machine = "Some Other CPU, 2 threads"
    elsewhere.save(tmp_path / "cm.json")
    args = ["schedule", "run", tiny_export, "--sim", "--cost-model", tmp_path / "cm.json", "--duration", "1", "--rate", "3",
            "--max-prompt", "16", "--max-output", "8"]
    result = cli(*args, "--out", tmp_path / "r")
    assert result.code == 0, result
    assert "measured on Some Other CPU, 2 threads, not on this machine" in " ".join(result.err.split())
    assert "simulated on the cost model measured on Some Other CPU, 2 threads" in (tmp_path / "r.md").read_text()
    here = synthetic_cost_model()
    here.machine = this_cpu_label()
    here.save(tmp_path / "cm.json")
    result = cli(*args)
    assert result.code == 0 and "not on this machine" not in result.err, result


# --- plan run -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["[1, 2]", '"olmoe"', "3", '{"model_type": 3}', '{"hidden_size": 8}'])
def test_plan_refuses_json_that_is_not_a_model_config(cli, tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    cli("plan", "run", path).assert_one_line_error("is not a model config.json")


def test_plan_names_an_unknown_model_type_in_a_short_line(cli, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**json.loads((DATA / "qwen3-30b-a3b.json").read_text()), "model_type": "qwen3_mo"}))
    line = cli("plan", "run", path).assert_one_line_error("'qwen3_mo'", "'qwen3_moe'")
    assert len(line) < 400, line


def _qwen3(tmp_path: Path, **edits) -> Path:
    data = json.loads((DATA / "qwen3-30b-a3b.json").read_text())
    data.update(edits)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "qwen3.json"
    path.write_text(json.dumps(data))
    return path


def test_plan_bounds_the_expert_count(tmp_path):
    """1e9 experts planned 0.0 s per expert and 14 h in all; 65,536 is the bound, as num_hidden_layers has one."""
    with pytest.raises(PrismError, match="'num_experts' is 1,000,000,000.*65,536"):
        model_shape(*read_config(str(_qwen3(tmp_path, num_experts=1_000_000_000))))


def test_plan_names_the_sizes_a_config_leaves_to_transformers_defaults(tmp_path):
    from prism_cli.models.adapters import adapter_for_config
    from prism_cli.planner import defaulted_fields

    given = _qwen3(tmp_path)
    assert defaulted_fields(str(given), adapter_for_config(read_config(str(given))[0], quantized=True)) == []
    missing = _qwen3(tmp_path, num_experts=None, vocab_size=None)
    config, _ = read_config(str(missing))
    assert defaulted_fields(str(missing), adapter_for_config(config, quantized=True)) == ["vocab_size", "num_experts"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(missing, folder / "config.json")
    assert defaulted_fields(str(folder), adapter_for_config(config, quantized=True)) == ["vocab_size", "num_experts"]


@pytest.mark.parametrize("ceiling, best, shown", [
    (40.27, 40.2700840, ("40.27", "40.2701")),  # printed "40.27 ... at 40.27": the message contradicted itself
    (45.0, 45.5, ("45", "45.5")),
    (3.0, 3.0, ("3", "3")),
])
def test_an_unreachable_ceiling_and_the_best_point_are_printed_apart(ceiling, best, shown) -> None:
    from prism_cli.serving.runner import _distinct

    assert _distinct(ceiling, best) == shown
