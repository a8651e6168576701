"""``prism plan``: model shapes from published configs against their model cards, the plan's arithmetic
against a hand computation, the cost tables, the command and its bad input; the synthetic checkpoint
writer that the scale benchmarks use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import CONFIGS

from prism_cli.models.adapters import adapter_for_config
from prism_cli.planner import (
    MachineCosts,
    PlanSettings,
    ProfileUnitCosts,
    Timed,
    _loglog,
    format_count,
    make_plan,
    measure_profile_costs,
    model_shape,
    read_config,
    shrunk_config,
)
from prism_cli.profiling.budget import ProfileGeometry

DATA = Path(__file__).parent / "data"

# Total parameters as the model cards state them (DeepSeek-V3: 671B main model, its 14B multi-token
# prediction module aside; Mixtral-8x7B: 46.7B; Qwen3-30B-A3B: 30.5B; OLMoE-1B-7B: 6.9B).
CARDS = {
    "olmoe-1b-7b": dict(params=6.92e9, moe_layers=16, experts=64, width=1024, top_k=8),
    "qwen3-30b-a3b": dict(params=30.5e9, moe_layers=48, experts=128, width=768, top_k=8),
    "mixtral-8x7b": dict(params=46.7e9, moe_layers=32, experts=8, width=14336, top_k=2),
    "deepseek-v3": dict(params=671e9, moe_layers=58, experts=256, width=2048, top_k=8),
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_shapes_of_published_configs_match_their_model_cards(name: str) -> None:
    shape = model_shape(*read_config(str(DATA / f"{name}.json")))
    card = CARDS[name]
    assert shape.params == pytest.approx(card["params"], rel=0.005)
    assert (len(shape.moe_layers), shape.num_experts, shape.width, shape.top_k) == (
        card["moe_layers"], card["experts"], card["width"], card["top_k"])
    # Decoder layers (outside and inside the routed experts) + embeddings, head and final norm: every parameter.
    config = json.loads((DATA / f"{name}.json").read_text())
    outer = 2 * config["vocab_size"] * config["hidden_size"] + config["hidden_size"]
    routed = len(shape.moe_layers) * shape.num_experts * 3 * config["hidden_size"] * card["width"]
    assert sum(shape.dense_params) + routed + outer == shape.params
    if name == "deepseek-v3":
        assert shape.moe_layers[0] == 3 and shape.checkpoint_bytes_per_param == 1  # 3 dense layers; FP8 weights
    else:
        assert shape.checkpoint_bytes_per_param == 2


def test_loglog_interpolation_recovers_a_power_law() -> None:
    points = [(256, 2.0 * 256**1.5), (1024, 2.0 * 1024**1.5)]
    assert _loglog(points, 512) == pytest.approx(2.0 * 512**1.5)
    assert _loglog(points, 4096) == pytest.approx(2.0 * 4096**1.5)  # extrapolated along the end segment
    assert _loglog([(100, 3.0)], 300) == pytest.approx(9.0)  # one point: proportional


def _machine(**kw) -> MachineCosts:
    values = dict(machine={"processor": "test", "cores": 4, "memory_bytes": 2**34},
                  partition={"alternating": [(16, 1.0, 0.8), (64, 4.0, 3.2)]}, partition_rows=100,
                  partition_worker_bytes=[(16, 100 * 2**20), (64, 200 * 2**20)], export_bytes_per_s=100e6,
                  load_bytes_per_s=50e6, disk_write_bytes_per_s=200e6, runtime_bytes=300 * 2**20, startup_seconds=3.0,
                  source="test")
    return MachineCosts(**{**values, **kw})


def test_plan_arithmetic_by_hand(tiny_model_dir) -> None:
    """A tiny OLMoE (2 MoE layers x 8 experts of width 32, top-2) with hand-set unit costs."""
    config, name = read_config(str(tiny_model_dir("olmoe")))
    shape = model_shape(config, name)
    assert shape.moe_layers == [0, 1] and shape.dense_params[0] == shape.dense_params[1]
    unit = ProfileUnitCosts(dense_token=Timed(2e-4, 1e-4), expert_call=Timed(0.01, 0.008), tokens_per_call=64)
    settings = PlanSettings(tokens=4096 + 10, seq_len=32, batch_size=8, max_rows=256, solver="alternating", workers=2,
                            max_memory=2**30)
    plan = make_plan(shape, settings, unit, _machine(), available_memory=2**33, cores=4, disk_free=2**40)
    tokens = 4096  # whole windows of 32
    # Per token: 2 layers outside the experts + 2 layers x top-2 expert calls of 64 tokens.
    forward = tokens * (2 * 2e-4 + 2 * 2 * 0.01 / 64)
    # Activations: 24 float32 copies of 8 x 32 tokens x hidden 64, attention scores 3 x 8 x 4 heads x 32^2 x 4 bytes.
    activations = 24 * 256 * 64 * 4 + 3 * 8 * 4 * 32 * 32 * 4
    geometry = ProfileGeometry(num_experts=8, width=32, top_k=2, n_layers=2, max_rows=256, holdout_fraction=0.2, row_bytes=2,
                               forward_bytes=activations)
    fit, held = geometry.expected_rows(tokens)  # 1024 routed per expert: capped at 205 and 51
    assert (fit, held) == (205, 51)
    rows = 2 * 8 * (fit + held) * 32 * 2
    io = (rows + geometry.profile_bytes(tokens)) / 200e6
    load = 3.0 + shape.params * 4 / 50e6  # a new process starts, then reads the checkpoint (stored in float32)
    profile = plan.stage("profile")
    assert profile.seconds == pytest.approx(load + forward + io)
    assert profile.cpu_seconds == pytest.approx(load + tokens * (2 * 1e-4 + 2 * 2 * 0.008 / 64) + io)
    need = activations + 2 * geometry.layer_state_bytes + rows + geometry.reservoir_bytes
    model_bytes = shape.params * 4  # float32
    assert profile.memory_bytes == model_bytes + 300 * 2**20 + min(2**30, need)
    # The work folder: the rows, two layers' states and a journal, which the 1 GiB budget's buffer would size
    # at about 1 GiB but which never holds more than every routed row (2 layers x 4096 tokens x top-2 x 32 x 2 B).
    assert plan_buffer(geometry, 2**30) > 2**29
    work = rows + 2 * geometry.layer_state_bytes + 2 * 4096 * 2 * 32 * 2
    assert profile.disk_bytes == geometry.profile_bytes(tokens) + work
    # Partition: width 32 lies between the calibrated 16 and 64 (a power law of exponent 1 through them).
    per_expert = 32 / 16 * 1.0 * fit / 100
    partition = plan.stage("partition")
    assert partition.seconds == pytest.approx(16 * per_expert / 2)
    assert plan.partition_core_seconds == pytest.approx(16 * per_expert)
    assert plan.cores_for_an_hour == 1
    # Export: a new process, and the checkpoint (float32 here) read and written.
    assert plan.stage("export").seconds == pytest.approx(3.0 + 2 * shape.params * 4 / 100e6)


def plan_buffer(geometry: ProfileGeometry, budget: int) -> int:
    from prism_cli.profiling.budget import plan_memory

    return plan_memory(geometry, budget).buffer_bytes


def test_cores_for_an_hour_is_the_work_over_an_hour() -> None:
    config, name = read_config(str(DATA / "olmoe-1b-7b.json"))
    shape = model_shape(config, name)
    unit = ProfileUnitCosts(dense_token=Timed(1e-3, 1e-3), expert_call=Timed(0.1, 0.1), tokens_per_call=256)
    machine = _machine(partition={"nsga2": [(512, 6.0, 6.0), (2048, 24.0, 24.0)]}, partition_rows=4096)
    plan = make_plan(shape, PlanSettings(dtype="bfloat16"), unit, machine, available_memory=2**36, cores=2, disk_free=2**42)
    # 16 x 64 experts x 12 s (width 1024, 4,096 fit rows) = 12,288 s: 4 cores for an hour.
    assert plan.partition_core_seconds == pytest.approx(16 * 64 * 12.0)
    assert plan.cores_for_an_hour == math.ceil(16 * 64 * 12.0 / 3600) == 4
    assert plan.stage("partition").seconds == pytest.approx(16 * 64 * 12.0 / 2)


def test_unit_costs_are_measured_at_the_models_shapes(tiny_model_dir) -> None:
    config, name = read_config(str(tiny_model_dir("qwen3_moe")))
    shape = model_shape(config, name)
    unit = measure_profile_costs(shape, config, dtype="float32", device="cpu", batch_size=2, seq_len=16, max_rows=64,
                                 holdout_fraction=0.2, min_seconds=0.05)
    assert unit.tokens_per_call == round(2 * 16 * 2 / 8)
    assert unit.dense_token.wall > 0 and unit.expert_call.wall > 0 and unit.expert_call.cpu > 0


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shrunk_config_keeps_one_moe_layer(tiny_model_dir, family: str) -> None:
    from transformers import AutoModelForCausalLM

    config, _ = read_config(str(tiny_model_dir(family)))
    small = shrunk_config(config, adapter_for_config(config))
    model = AutoModelForCausalLM.from_config(small)
    layers = adapter_for_config(small).moe_layers(model)
    assert [layer.index for layer in layers] == [0] and len(model.model.layers) == 1
    with torch.no_grad():  # it runs (the planner times its forward pass): a group-limited router still routes
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    # Attention keeps its shapes.
    original = AutoModelForCausalLM.from_config(config)
    attn = lambda m: sum(p.numel() for p in m.model.layers[-1].self_attn.parameters())  # noqa: E731
    assert attn(model) == attn(original)


# --- the command --------------------------------------------------------------------------------------


@pytest.fixture
def costs_file(tmp_path) -> Path:
    path = tmp_path / "costs.json"
    _machine(partition={"nsga2": [(16, 1.0, 1.0), (64, 4.0, 4.0)]}).save(path)
    return path


def test_plan_cli(cli, tiny_model_dir, costs_file, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir("olmoe") / "config.json").read_text())
    result = cli("plan", config, "--costs", costs_file, "--tokens", "4096", "--seq-len", "32", "--max-rows", "256",
                 "--out", tmp_path / "plan")
    assert result.code == 0, result
    text = " ".join(result.out.split())
    for needle in ("profile", "partition", "export", "partitioning within an hour", "fits here"):
        assert needle in text
    assert f"{format_count(model_shape(*read_config(str(config))).params)} parameters" in text
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [row["stage"] for row in data["rows"]] == ["profile", "partition", "export"]
    assert data["cores_for_an_hour"] >= 1


def test_parameter_counts_are_given_in_a_readable_unit() -> None:
    assert [format_count(n) for n in (512, 12_300, 15.7e6, 6.92e9, 671e9)] == ["512", "12.3 K", "15.7 M", "6.9 B", "671.0 B"]


@pytest.mark.parametrize(
    "source, fields, needles",
    [
        ("builtin", {"num_experts": 0}, ["'num_experts' is 0"]),
        ("builtin", {"hidden_size": -256}, ["'hidden_size' is -256"]),
        ("builtin", {"hidden_size": 10**9}, ["hidden_size 1,000,000,000", "free on cpu"]),
        ("builtin", {"hidden_size": "256"}, ["'hidden_size' expected int"]),
        ("builtin", {"num_experts": 8.5}, ["'num_experts' expected int"]),
        ("builtin", {"num_attention_heads": 3, "num_key_value_heads": 3},
         ["'num_attention_heads' (3) does not divide 'hidden_size' (256)"]),
        ("builtin", {"num_key_value_heads": 3}, ["'num_key_value_heads' is 3", "'num_attention_heads' (4)"]),
        ("builtin", {"num_hidden_layers": 10**7}, ["'num_hidden_layers' is 10,000,000", "up to 1,000"]),
        ("builtin", {"num_experts_per_tok": 16}, ["'num_experts_per_tok' is 16", "8 experts of 'num_experts'"]),
        ("builtin", {"num_experts_per_tok": 0}, ["'num_experts_per_tok' is 0"]),
        ("deepseek-v3", {"n_routed_experts": 0}, ["'n_routed_experts' is 0"]),  # each family's own key
        ("mixtral-8x7b", {"num_experts_per_tok": 9}, ["'num_experts_per_tok' is 9", "8 experts of 'num_local_experts'"]),
        ("builtin", {"head_dim": 0}, ["'head_dim' is 0"]),  # ZeroDivisionError
        ("builtin", {"head_dim": True}, ["'head_dim' is True"]),  # a tensor size error
        ("builtin", {"max_position_embeddings": 0}, ["'max_position_embeddings' is 0"]),  # blamed --seq-len
        ("qwen3-30b-a3b", {"decoder_sparse_step": 0}, ["'decoder_sparse_step' is 0"]),  # ZeroDivisionError
        ("builtin", {"hidden_size": 2**40}, ["cannot build a layer", "Storage size calculation overflowed"]),
        # OLMoE normalises q over hidden_size: 3 heads of 64 build but cannot run (the family's own limit)
        ("builtin", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 64},
         ["cannot run a layer of config", "must match the size"]),
    ],
    ids=["experts-0", "hidden-negative", "hidden-1e9", "hidden-string", "experts-float", "heads-not-dividing",
         "kv-heads-not-dividing", "layers-1e7", "top-k-above-experts", "top-k-0", "deepseek-experts-0", "mixtral-top-k",
         "head-dim-0", "head-dim-bool", "positions-0", "sparse-step-0", "hidden-2e40", "heads-times-head-dim-not-hidden"],
)
def test_plan_refuses_bad_config_values_naming_the_field(cli, costs_file, tmp_path, source, fields, needles) -> None:
    from prism_cli.models.loading import builtin_model_dir

    path = builtin_model_dir() / "config.json" if source == "builtin" else DATA / f"{source}.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    result = cli("plan", config, "--costs", costs_file, "--tokens", "2048", "--seq-len", "32", "--max-rows", "64")
    result.assert_one_line_error(*needles)
    assert result.code == 2


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing", ["does not exist"]),
        ("not-json", ["not a model config.json"]),
        ("dense", ["not a Mixture-of-Experts model"]),
        ("bad-costs", ["not a prism plan costs file", "prism plan calibrate"]),
        ("missing-costs", ["does not exist", "prism plan calibrate"]),
        ("uncalibrated-solver", ["no calibrated partition cost for solver 'anneal'"]),
        ("n-not-divisor", ["--sub-experts 5", "width 32"]),
        ("bad-memory", ["--max-memory must be a size"]),
        ("bad-layers", ["--layers 7 are not MoE layers", "MoE layers: 0-1)"]),
        ("n-0", ["--sub-experts must be at least 2, got 0"]),
        ("n-1", ["--sub-experts must be at least 2, got 1"]),
        ("seq-len-past-the-positions", ["--seq-len 100000", "positions"]),
        # explicitly empty: not all layers, not the current folder (typer reads '' as '.')
        ("empty-layers", ["--layers is empty", "leave --layers out for all"]),
        ("empty-out", ["--out is empty: give a path"]),
        ("empty-costs", ["--costs is empty: give a path"]),
    ],
)
def test_plan_bad_input_is_one_line(cli, tiny_model_dir, costs_file, tmp_path, monkeypatch, case, needles) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir("olmoe") / "config.json").read_text())
    args: list = [config, "--costs", costs_file, "--tokens", "2048", "--seq-len", "32", "--max-rows", "64"]
    if case == "missing":
        args[0] = tmp_path / "nope" / "config.json"
    elif case == "not-json":
        (tmp_path / "x.json").write_text("{not json")
        args[0] = tmp_path / "x.json"
    elif case == "dense":
        (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        args[0] = tmp_path / "llama.json"
    elif case == "bad-costs":
        (tmp_path / "bad.json").write_text("{}")
        args[2] = tmp_path / "bad.json"
    elif case == "missing-costs":
        args[2] = tmp_path / "none.json"
    elif case == "uncalibrated-solver":
        args += ["--solver", "anneal"]
    elif case == "n-not-divisor":
        args += ["-N", "5"]
    elif case == "bad-memory":
        args += ["--max-memory", "plenty"]
    elif case == "bad-layers":
        args += ["--layers", "7"]
    elif case in ("n-0", "n-1"):
        args += ["-N", case[-1]]
    elif case == "seq-len-past-the-positions":
        args[args.index("--seq-len") + 1] = "100000"
    elif case == "empty-layers":
        args += ["--layers", ""]
    elif case == "empty-out":
        args += ["--out", ""]
    elif case == "empty-costs":
        args[2] = ""
    before = sorted(tmp_path.iterdir())
    cli("plan", *args).assert_one_line_error(*needles)
    assert sorted(tmp_path.iterdir()) == before  # nothing written here (the current folder)


def test_plan_counts_a_layer_named_twice_once(cli, tiny_model_dir, costs_file, tmp_path) -> None:
    """``--layers 0,0,0,0`` planned 4 MoE layers of a 2-layer model (profile and partition take layer 0 once)."""
    args = [tiny_model_dir("olmoe"), "--costs", costs_file, "--tokens", "2048", "--seq-len", "32", "--max-rows", "64"]
    for layers in ("0", "0,0,0,0", "0-0,0"):
        result = cli("plan", *args, "--layers", layers, "--out", tmp_path / "p")
        assert result.code == 0, result
        assert json.loads((tmp_path / "p.json").read_text())["settings"]["layers"] == [0]
        assert "1 MoE layers" in " ".join(result.out.split())


def test_plan_refuses_what_profile_would(cli, tiny_model_dir, costs_file, tmp_path, monkeypatch) -> None:
    """A --max-memory whose row buffer exceeds the machine's memory (profile refuses it; plan said it fits,
    with a work folder as large as the budget), and an --out inside the checkpoint planned: both before
    the costs are measured."""
    import psutil

    def never(*_args, **_kwargs):
        raise AssertionError("the costs were measured before the input was refused")

    monkeypatch.setattr("prism_cli.planner.measure_profile_costs", never)

    model = tiny_model_dir("olmoe")
    args = [model, "--costs", costs_file, "--tokens", "2048", "--seq-len", "32", "--max-rows", "64"]
    too_much = f"{2 * psutil.virtual_memory().total // 2**30 + 1}G"
    cli("plan", *args, "--max-memory", too_much).assert_one_line_error(f"--max-memory {too_much[:-1]}", "row buffer", "memory")
    before = sorted(model.iterdir())
    cli("plan", *args, "--out", model / "plan").assert_one_line_error("lies inside the model")
    assert sorted(model.iterdir()) == before


def test_calibrate_bad_input_is_one_line(cli, tmp_path) -> None:
    cli("plan", "calibrate", "--solvers", "magic", "--out", tmp_path / "c.json").assert_one_line_error("unknown solver 'magic'")
    for widths in ("4", "10", "8", "-1"):  # 8 passed the old bound and crashed in the solver
        cli("plan", "calibrate", "--widths", widths, "--out", tmp_path / "c.json").assert_one_line_error(
            f"--widths {widths}", "multiple of 4", "at least 16")
    cli("plan", "calibrate", "--widths", "256,256", "--out", tmp_path / "c.json").assert_one_line_error("--widths names 256 more than once")
    cli("plan", "calibrate", "--solvers", "greedy,greedy", "--out", tmp_path / "c.json").assert_one_line_error("greedy more than once")
    cli("plan", "calibrate", "--solvers", " ", "--out", tmp_path / "c.json").assert_one_line_error("--solvers names no solver")
    cli("plan", "calibrate", "--rows", "0", "--out", tmp_path / "c.json").assert_one_line_error("--rows must be at least 8, got 0")
    cli("plan", "calibrate", "--widths", "99999996", "--out", tmp_path / "c.json").assert_one_line_error("GiB is free")
    assert list(tmp_path.iterdir()) == []
    other = tmp_path / "other.json"
    other.write_text('{"mine": true}')
    cli("plan", "calibrate", "--solvers", "greedy", "--widths", "16", "--out", other).assert_one_line_error(
        f"--out {other} exists and is not a plan costs file: refusing to replace it")
    assert other.read_text() == '{"mine": true}'  # not overwritten
    cli("plan", "calibrate", "--out", other / "c.json").assert_one_line_error("is a file, not a folder")


PACKAGED = json.loads((Path(__file__).parent.parent / "prism_cli" / "data" / "plan_costs.json").read_text())


def _with(**fields) -> dict:
    """The packaged costs with ``fields`` replaced (``partition_nsga2`` stands for ``partition["nsga2"]``)."""
    data = json.loads(json.dumps(PACKAGED))
    if "partition_nsga2" in fields:
        data["partition"]["nsga2"] = fields.pop("partition_nsga2")
    return {**data, **fields}


def _without(name: str) -> dict:
    return {k: v for k, v in PACKAGED.items() if k != name}


nsga2 = PACKAGED["partition"]["nsga2"]


@pytest.mark.parametrize(
    "data, problem",
    [
        (_with(export_bytes_per_s=0), "export_bytes_per_s must be a finite number > 0, got 0"),  # ZeroDivisionError
        (_with(export_bytes_per_s=-1), "export_bytes_per_s must be a finite number > 0, got -1"),  # negative time
        (_with(partition_rows=0), "partition_rows must be an integer > 0, got 0"),  # ZeroDivisionError
        (_with(partition_rows=4096.5), "partition_rows must be an integer > 0, got 4096.5"),
        (_with(partition_nsga2=[[0, *nsga2[0][1:]], *nsga2[1:]]),
         "partition.nsga2[0][0] (a width) must be an integer > 0, got 0"),  # ZeroDivisionError
        (_with(partition_nsga2=[]), "partition.nsga2 must be a non-empty list of [width, wall seconds, CPU seconds], "
                                    "got []"),  # IndexError
        (_with(partition_nsga2=[[256, -1, -1]]), "partition.nsga2[0][1] (wall seconds) must be a finite number > 0, got -1"),
        (_with(partition_nsga2=[[256, 1.5]]), "partition.nsga2[0] must be [width, wall seconds, CPU seconds], got [256, 1.5]"),
        (_with(partition_nsga2=[nsga2[0], nsga2[0]]), "partition.nsga2 gives width 256 more than once"),  # log(1) = 0
        (_with(partition_worker_bytes=[]), "partition_worker_bytes must be a non-empty list of [width, bytes], got []"),
        (_with(partition_worker_bytes=[[256, "lots"]]),
         'partition_worker_bytes[0][1] (bytes) must be an integer > 0, got "lots"'),
        (_with(runtime_bytes="x"), 'runtime_bytes must be an integer > 0, got "x"'),  # TypeError
        (_with(startup_seconds=-5), "startup_seconds must be a finite number >= 0, got -5"),  # negative time
        (_with(load_bytes_per_s=math.nan), "load_bytes_per_s must be a finite number > 0, got NaN"),  # nan time
        (_with(disk_write_bytes_per_s=math.inf), "disk_write_bytes_per_s must be a finite number > 0, got Infinity"),
        (_with(machine="here"), 'machine must be an object (processor, cores, memory_bytes ...), got "here"'),
        (_with(partition=[]), "partition must be an object of solver: [[width, wall seconds, CPU seconds], ...], got []"),
        (_with(speed=1), "it has an unknown field 'speed'"),
        (_without("runtime_bytes"), "field runtime_bytes is missing"),
    ],
    ids=["export-0", "export-negative", "rows-0", "rows-float", "width-0", "no-widths", "seconds-negative", "short-row",
         "width-twice", "no-worker-bytes", "worker-bytes-string", "runtime-string", "startup-negative", "load-nan",
         "disk-inf", "machine-string", "partition-list", "unknown-field", "missing-field"],
)
def test_plan_refuses_a_bad_costs_file_naming_the_field(cli, tiny_model_dir, tmp_path, data, problem) -> None:
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir("olmoe") / "config.json").read_text())
    costs = tmp_path / "c.json"
    costs.write_text(json.dumps(data))
    result = cli("plan", config, "--costs", costs, "--tokens", "2048", "--seq-len", "32", "--max-rows", "64")
    result.assert_one_line_error(f"{costs} is not a valid plan costs file: {problem}; measure them again with "
                                 f"`prism plan calibrate --out {costs}`")
    assert result.code == 2


def test_plan_refuses_a_bad_costs_file_in_the_cache(cli, tmp_path, monkeypatch) -> None:
    """The costs `prism plan` finds by itself: a bad one is named, not a crash of plain `prism plan builtin`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "prism").mkdir()
    cache = tmp_path / "prism" / "plan_costs.json"
    cache.write_text(json.dumps(_with(export_bytes_per_s=0)))
    cli("plan", "builtin", "--seq-len", "32").assert_one_line_error(
        f"{cache} is not a valid plan costs file: export_bytes_per_s must be a finite number > 0, got 0")
    cache.write_text("3")  # JSON, not an object
    cli("plan", "builtin", "--seq-len", "32").assert_one_line_error(f"{cache} is not a prism plan costs file")


def test_plan_refuses_costs_that_extend_to_no_finite_time(cli, tiny_model_dir, tmp_path) -> None:
    """Width 32 lies far below the table: its steep end segment (1e-300 s at width 4, 1e300 s at 8) gives no float."""
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir("olmoe") / "config.json").read_text())
    costs = tmp_path / "c.json"
    costs.write_text(json.dumps(_with(partition_nsga2=[[4, 1e-300, 1e-300], [8, 1e300, 1e300]])))
    cli("plan", config, "--costs", costs, "--tokens", "2048", "--seq-len", "32").assert_one_line_error(
        f"{costs}: partition.nsga2 extended to expert width 32 gives no finite value")


def test_costs_tables_are_read_in_width_order(tmp_path) -> None:
    backwards = tmp_path / "c.json"
    backwards.write_text(json.dumps(_with(partition_nsga2=nsga2[::-1])))
    assert MachineCosts.load(backwards).partition["nsga2"] == [tuple(row) for row in nsga2]
    # 1,024 lies inside the table, 4,096 beyond it
    assert not MachineCosts.load(backwards).partition_seconds("nsga2", 1024, 4096)[1]
    assert MachineCosts.load(backwards).partition_seconds("nsga2", 1024, 4096)[0].wall == pytest.approx(nsga2[2][1])


@pytest.fixture
def fake_calibration(monkeypatch):
    """`prism plan calibrate` without its minutes of measurements: ``calls`` records each call's work folder;
    ``interrupt`` makes the next one stop as Ctrl-C does."""
    import prism_cli.planner

    state = {"calls": [], "interrupt": False}

    def calibrate(*, solvers, widths, rows, work, on_step):
        state["calls"].append(work)
        if state["interrupt"]:
            raise KeyboardInterrupt
        return _machine(partition={"greedy": [(16, 1.0, 1.0)]}, source="")

    monkeypatch.setattr(prism_cli.planner, "calibrate", calibrate)
    return state


def test_calibrate_refuses_an_out_in_a_missing_folder(cli, tmp_path, fake_calibration) -> None:
    fake_calibration["interrupt"] = True  # were it to run: the run stops, as by Ctrl-C
    out = tmp_path / "missing" / "c.json"
    cli("plan", "calibrate", "--solvers", "greedy", "--widths", "16", "--out", out).assert_one_line_error(
        f"folder {tmp_path / 'missing'} does not exist")
    assert fake_calibration["calls"] == [] and list(tmp_path.iterdir()) == []  # refused before any work


def test_calibrate_makes_the_cache_folder_only_with_the_costs(cli, tmp_path, monkeypatch, fake_calibration) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake_calibration["interrupt"] = True
    result = cli("plan", "calibrate", "--solvers", "greedy", "--widths", "16")
    assert result.code == 130, result
    assert fake_calibration["calls"] == [tmp_path]  # measured in the nearest folder that exists
    assert list(tmp_path.iterdir()) == []  # no cache folder left behind
    fake_calibration["interrupt"] = False
    assert cli("plan", "calibrate", "--solvers", "greedy", "--widths", "16").code == 0
    assert MachineCosts.load(tmp_path / "cache" / "prism" / "plan_costs.json").partition == {"greedy": [(16, 1.0, 1.0)]}


def test_calibrate_out_names_what_it_refuses(cli, tmp_path, fake_calibration) -> None:
    folder = tmp_path / "emptydir"
    folder.mkdir()
    cli("plan", "calibrate", "--out", folder).assert_one_line_error(f"--out {folder} is a folder")
    text = tmp_path / "text.txt"
    text.write_text("notes")
    line = cli("plan", "calibrate", "--out", text).assert_one_line_error(
        f"--out {text} exists and is not a plan costs file: refusing to replace it")
    assert "prism plan calibrate --out" not in line  # not the command the user just ran
    assert text.read_text() == "notes" and fake_calibration["calls"] == []
    # A costs file, even one `prism plan` refuses, is what calibrate replaces.
    costs = tmp_path / "c.json"
    costs.write_text(json.dumps(_with(export_bytes_per_s=0)))
    assert cli("plan", "calibrate", "--solvers", "greedy", "--widths", "16", "--out", costs).code == 0
    assert MachineCosts.load(costs).export_bytes_per_s == 100e6


# --- the synthetic checkpoint writer -------------------------------------------------------------------


def test_synthetic_olmoe_loads_as_a_stock_checkpoint(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from prism_cli.models.synthetic import write_synthetic_olmoe

    base = json.loads((DATA / "olmoe-1b-7b.json").read_text())
    base.update(hidden_size=64, intermediate_size=32, num_experts=8, num_attention_heads=4, num_key_value_heads=4)
    a = write_synthetic_olmoe(tmp_path / "a", base, 2, seed=1)
    b = write_synthetic_olmoe(tmp_path / "b", base, 2, seed=1)
    model, info = AutoModelForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2 and model.config.num_experts == 8
    other = AutoModelForCausalLM.from_pretrained(b)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) == 3  # embeddings and head, then one shard per layer
    experts = model.model.layers[1].mlp.experts.gate_up_proj.float()
    assert experts.std().item() == pytest.approx(64**-0.5, rel=0.05)  # 1/sqrt(fan_in)
