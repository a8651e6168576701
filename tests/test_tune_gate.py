"""prism tune-gate: K schedules, gradients through the linear gate, the tuned export (only router rows
change; stock transformers serves its own top-K; the training-free gate keeps the original router),
distillation, Ctrl-C and resume, and one-line refusals of bad input.

Runs on a tiny random OLMoE (2 MoE layers, 8 experts of width 32, top-2) exported with N = 4, trained on
a few thousand characters of the training split for a few steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FULL, N_SUB, logits_of, random_neurons_export, token_batch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prism_cli.data import split_text
from prism_cli.errors import Interrupted, PrismError
from prism_cli.export.format import GATE_FILE, SOURCE_ROUTER_FILE
from prism_cli.tuning.schedules import SCHEDULES, LinearSchedule, UniformSchedule
from prism_cli.tuning.trainer import TrainBatches, Trainee, TuneSettings, checkpoint_path, step_loss, tune_gate
from prism_cli.tuning.writer import CURVE_FILE, read_source_router, write_tuned_export

ROUTER_SUFFIX = "mlp.gate.weight"


@pytest.fixture(scope="module")
def export(tiny_model_dir, tmp_path_factory) -> Path:
    return random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("tune"), seed=3)


@pytest.fixture(scope="module")
def train_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(split_text("train")[:20_000])
    return path


def settings(text: Path, **overrides) -> TuneSettings:
    base = dict(data=str(text), steps=3, lr=3e-2, warmup=1, batch=2, seq_len=32, seed=0, init="copies")
    return TuneSettings(**{**base, **overrides})


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def tuned(export, train_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    result = tune_gate(export, out, settings(train_text, steps=4))
    return out, result


# ---------------------------------------------------------------------------------------------
# K schedules.


def test_linear_schedule_climbs_in_equal_stretches():
    ks = [LinearSchedule(1, 4, 8, seed=0).k_at(s) for s in range(8)]
    assert ks == [1, 1, 2, 2, 3, 3, 4, 4]
    ks = [LinearSchedule(2, 8, 100, seed=0).k_at(s) for s in range(100)]
    assert ks[0] == 2 and ks[-1] == 8 and ks == sorted(ks)
    counts = [ks.count(k) for k in range(2, 9)]
    assert max(counts) - min(counts) <= 1


def test_uniform_schedule_covers_the_range_and_depends_only_on_seed_and_step():
    draws = [UniformSchedule(2, 6, 500, seed=1).k_at(s) for s in range(500)]
    assert set(draws) == {2, 3, 4, 5, 6}
    assert all(abs(draws.count(k) / 500 - 0.2) < 0.06 for k in range(2, 7))
    again = UniformSchedule(2, 6, 500, seed=1)
    assert [again.k_at(s) for s in reversed(range(500))] == draws[::-1]  # no hidden state: any order, same K
    assert [UniformSchedule(2, 6, 500, seed=2).k_at(s) for s in range(500)] != draws
    assert set(SCHEDULES.names()) >= {"linear", "uniform"}


def test_batches_are_windows_of_the_text_and_reproducible():
    ids = np.arange(1000)
    batches = TrainBatches(ids, batch=4, seq_len=9, seed=5)
    a, b = batches.at(7), batches.at(7)
    assert torch.equal(a, b) and a.shape == (4, 10)
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in a)  # consecutive tokens
    assert not torch.equal(batches.at(8), a)
    with pytest.raises(PrismError, match="fewer than one batch"):
        TrainBatches(np.arange(39), batch=4, seq_len=9, seed=0)


def test_the_probe_windows_are_capped_by_the_text():
    """Asked for more tokens than the text holds, the probe takes each of the text's windows once: random
    starts drew tokens // seq_len windows with replacement (--init-tokens 10,000,000 ran for minutes on a
    page of text, and the default 32,768 probed a short text's windows a thousand times each)."""
    batches = TrainBatches(np.arange(105), batch=2, seq_len=10, seed=0)
    whole = torch.arange(100).view(10, 10)  # the 5-token tail fills no window
    assert torch.equal(batches.probe_windows(100_000), whole)
    assert torch.equal(batches.probe_windows(100), whole)  # all the text holds: each window once, not 10 draws
    assert batches.probe_count(100_000) == batches.probe_count(100) == 10
    fewer = batches.probe_windows(40)  # within the text: random starts, as before
    assert fewer.shape == (4, 10) and all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in fewer)


# ---------------------------------------------------------------------------------------------
# Gradients: only the flat routers train, and autograd through the linear gate is right.


def test_only_the_flat_routers_are_trainable(export):
    trainee = Trainee.load(export, "grouped_mm", "float32", "cpu")
    stock = AutoModelForCausalLM.from_pretrained(str(export))
    trainable = {name for name, p in trainee.model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(trainee.params) == 2  # one router per MoE layer of the tiny model
    assert trainee.total == sum(p.numel() for p in stock.parameters())
    assert [tuple(p.shape) for p in trainee.params] == [(8 * N_SUB, 64)] * 2


@pytest.mark.parametrize("k", [1, 3, FULL])
def test_router_gradient_matches_finite_differences(untied, train_text, k):
    """The gradient autograd gives the router rows, against central differences of the loss (an
    independent oracle: only forward passes) along a random direction in every layer at once, with the
    model in float64 (the stock router still rounds its softmax to float32, hence a step of 1e-4 and a
    tolerance of 2e-3: measured errors 2e-5 to 5e-4).
    On untied rows, and checked that no token changes its sub-experts within the step: routing is
    piecewise constant, so a finite difference across a change of selection would mean nothing."""
    trainee = Trainee.load(untied, "eager", "float32", "cpu")
    model, params = trainee.model.double(), trainee.params
    assert all(p.dtype == torch.float64 and p.requires_grad for p in params)
    window = torch.from_numpy(np.asarray(trainee.tokenizer(train_text.read_text()[:3000])["input_ids"][:66])).view(2, 33)
    selected: list[torch.Tensor] = []
    hooks = [router.register_forward_hook(lambda _m, _i, out: selected.append(out[2].sort(dim=-1).values))
             for router in model.prism_state.elastic_routers]
    loss, _, _ = step_loss(model, model, window, k, params, None, 0.0)
    loss.backward()
    gen = torch.Generator().manual_seed(k)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    eps = 1e-4

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            value = float(step_loss(model, model, window, k, params, None, 0.0)[0])
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    for h in hooks:
        h.remove()
    layers = len(params)
    assert all(torch.equal(selected[i], selected[i % layers]) for i in range(len(selected))), "a selection changed"
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-3)


def test_distillation_is_zero_where_the_student_is_the_original(export, train_text, tmp_path):
    """At K = N*k with untouched router rows the model is the original: the KL term must vanish at step 1."""
    full = tune_gate(export, tmp_path / "full", settings(train_text, steps=1, k_start=FULL, distill=1.0))
    assert full.curve[0].kl == pytest.approx(0.0, abs=1e-6)
    assert full.curve[0].loss == pytest.approx(full.curve[0].ce, abs=1e-6)
    low = tune_gate(export, tmp_path / "low", settings(train_text, steps=1, k_end=1, distill=0.5))
    assert low.curve[0].kl > 1e-3
    assert low.curve[0].loss == pytest.approx(low.curve[0].ce + 0.5 * low.curve[0].kl, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The tuned export.


def test_only_router_rows_change(export, tuned):
    out, result = tuned
    before, after = tensors(export), tensors(out)
    assert before.keys() == after.keys()
    routers = [k for k in before if k.endswith(ROUTER_SUFFIX)]
    assert len(routers) == 2
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key], before[key]) != (key in routers), key
    for name in ("tokenizer.json", GATE_FILE):
        assert (out / name).read_bytes() == (export / name).read_bytes()
    source = load_file(str(out / SOURCE_ROUTER_FILE))
    for key in routers:
        layer = key.split(".")[2]
        assert torch.equal(source[f"layers.{layer}.weight"], before[key][::N_SUB])
    assert result.trainable == 2 * 8 * N_SUB * 64 and 0 < result.trainable_share < 0.05


def test_tuning_is_recorded(export, tuned, train_text):
    out, result = tuned
    meta = json.loads((out / "config.json").read_text())["prism"]
    tuning = meta["tuning"]
    assert tuning["steps"] == 4 and tuning["schedule"] == "uniform" and tuning["seed"] == 0
    assert (tuning["k_start"], tuning["k_end"]) == (1, FULL)
    assert tuning["data_hash"] and tuning["data"] == str(train_text)
    curve = json.loads((out / tuning["curve"]).read_text())
    assert [r["step"] for r in curve] == [1, 2, 3, 4] and tuning["curve"] == CURVE_FILE
    assert all(np.isfinite(r["loss"]) for r in curve)
    assert "fine-tuned" in meta["serving"]["notes"][0]
    assert meta["format_version"] == json.loads((export / "config.json").read_text())["prism"]["format_version"]
    assert not checkpoint_path(out).exists()


def test_same_seed_same_router(export, train_text, tuned, tmp_path):
    out, _ = tuned
    tune_gate(export, tmp_path / "again", settings(train_text, steps=4))
    a, b = tensors(out), tensors(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    tune_gate(export, tmp_path / "other", settings(train_text, steps=4, seed=1))
    c = tensors(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a if k.endswith(ROUTER_SUFFIX))


@pytest.fixture(scope="module")
def untied(export, tmp_path_factory):
    """A tuned export with random, untied router rows (what tuning converges to), written by the writer."""
    from prism_cli.models.adapters import adapter_for_config
    from prism_cli.models.loading import load_config

    adapter = adapter_for_config(load_config(str(export)))
    gen = torch.Generator().manual_seed(0)
    rows = {layer: torch.randn(8 * N_SUB, 64, generator=gen) * 0.5 for layer in (0, 1)}
    out = tmp_path_factory.mktemp("untied") / "out"
    write_tuned_export(export, out, rows, read_source_router(export, adapter, N_SUB), {"steps": 0}, [], adapter)
    return out


def test_a_tuned_export_without_its_source_router_is_refused(untied, tmp_path):
    """Without prism/source_router.safetensors a tuned export's training-free gate would route with the tuned
    rows, unsaid (the config records the file): loading it is one line naming the file."""
    import prism_cli

    assert json.loads((untied / "config.json").read_text())["prism"]["tuning"]["source_router"] == SOURCE_ROUTER_FILE
    copy = tmp_path / "copy"
    shutil.copytree(untied, copy)
    (copy / SOURCE_ROUTER_FILE).unlink()
    with pytest.raises(PrismError, match=f"is a tuned export but {SOURCE_ROUTER_FILE} .* is missing"):
        prism_cli.load_elastic(str(copy), operating_point="topk:2")


@pytest.mark.parametrize("k", [1, 3, 5, FULL])
def test_linear_k_is_what_stock_transformers_serves_at_k(untied, k):
    """With untied copies, prism's linear:K equals plain transformers (torch.topk, the engines' rule) at
    num_experts_per_tok = K: the tuned router's own top-K."""
    import prism_cli

    ids = token_batch(seed=2)
    elastic = prism_cli.load_elastic(str(untied), operating_point=f"linear:{k}")
    stock = AutoModelForCausalLM.from_pretrained(str(untied), num_experts_per_tok=k, dtype=torch.float32)
    want, got = logits_of(stock, ids), logits_of(elastic, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("k", [3, 5, FULL])
def test_training_routes_the_rows_it_trains_as_they_will_be_served(export, k):
    """An untuned export starts training with tied copies, and the first step unties them: from then on
    linear:K in training must be the router's own top-K (what the tuned export serves, as stock
    transformers at num_experts_per_tok = K), not the tied copies' whole-block shortcut."""
    from prism_cli.runtime.elastic import set_operating_point

    trainee = Trainee.load(export, "eager", "float32", "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainee.params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)  # what a few optimizer steps do
    stock = AutoModelForCausalLM.from_pretrained(str(export), num_experts_per_tok=k, dtype=torch.float32)
    for layer, p in zip(trainee.adapter.moe_layers(stock), trainee.params, strict=True):
        layer.router.weight.data.copy_(p.detach())
    set_operating_point(trainee.model, f"linear:{k}")
    ids = token_batch(seed=5)
    want, got = logits_of(stock, ids), logits_of(trainee.model, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("point", ["topk:1", "topk:5", "threshold:0.7"])
def test_training_free_gate_keeps_the_original_router(export, untied, point):
    """The neurons gate of a tuned export routes with the stored source router: same logits as the
    untuned export, even after a load_state_dict round trip."""
    import prism_cli

    ids = token_batch(seed=4)
    want = logits_of(prism_cli.load_elastic(str(export), operating_point=point), ids)
    model = prism_cli.load_elastic(str(untied), operating_point=point)
    assert torch.equal(logits_of(model, ids), want)
    model.load_state_dict(model.state_dict())
    assert torch.equal(logits_of(model, ids), want)
    prism_cli.set_operating_point(model, f"linear:{FULL}")
    assert not torch.allclose(logits_of(model, ids), want)


def test_a_tuned_export_tunes_again_from_the_original(untied, train_text, tmp_path):
    """Its copies differ, so the original router comes from the stored file (and distillation uses it)."""
    out = tmp_path / "twice"
    result = tune_gate(untied, out, settings(train_text, steps=1, k_start=FULL, distill=1.0))
    assert result.curve[0].kl > 1e-3  # the random rows are far from the original
    assert torch.equal(load_file(str(out / SOURCE_ROUTER_FILE))["layers.0.weight"],
                       load_file(str(untied / SOURCE_ROUTER_FILE))["layers.0.weight"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C, checkpoints and resume.


def _interrupt_at(step: int):
    def on_step(record) -> None:
        if record.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_a_damaged_checkpoint_is_refused_in_words_of_its_own(export, train_text, tmp_path):
    """A checkpoint that is JSON, or a torch file cut short: one line that says so and how to start over, not
    torch's advice to load it with ``weights_only=False`` (which would run the code a file holds)."""
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        tune_gate(export, out, settings(train_text, steps=4), on_step=_interrupt_at(2))
    good = checkpoint_path(out).read_bytes()
    for damaged in (b'{"step": 2}', good[: len(good) // 2]):
        checkpoint_path(out).write_bytes(damaged)
        with pytest.raises(PrismError) as info:
            tune_gate(export, out, settings(train_text, steps=4), resume=True)
        message = str(info.value)
        assert "damaged or not a tune-gate checkpoint" in message and "--force" in message
        assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("edit, needle", [
    (lambda st: st.update(step=-3), "step -3"),
    (lambda st: st.update(step="x"), "step 'x'"),
    (lambda st: st.update(step=500), "step 500 is not one of 0..4"),  # trained past --steps, exit 0
    (lambda st: st.update(routers=st["routers"][:1]), "routers"),
    (lambda st: st["routers"].__setitem__(0, st["routers"][0][:5]), "shape"),
    (lambda st: st["routers"][0].fill_(math.nan), "finite"),  # resumed into a NaN export, exit 0
    (lambda st: st.pop("optimizer"), "optimizer"),
    (lambda st: st.update(curve=[]), "loss curve"),
], ids=["negative-step", "text-step", "step-past-steps", "one-router-short", "router-cut", "nan-router", "no-optimizer",
        "curve-short"])
def test_a_checkpoint_edited_into_nonsense_is_refused_as_damaged(export, train_text, tmp_path, edit, needle):
    """A checkpoint torch reads but whose parts do not fit the run: internal errors inside torch, or a run past
    --steps or from NaN routers that wrote an export and exited 0."""
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        tune_gate(export, out, settings(train_text, steps=4), on_step=_interrupt_at(2))
    state = torch.load(checkpoint_path(out), weights_only=True)
    edit(state)
    torch.save(state, checkpoint_path(out))
    with pytest.raises(PrismError, match="damaged") as info:
        tune_gate(export, out, settings(train_text, steps=4), resume=True)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_a_run_that_diverges_writes_nothing(export, train_text, tmp_path):
    """A distillation weight of 1e300 makes the loss infinite once the student moves (as --lr 1e10 or --init-alpha
    1e30 do on the built-in export): the run trained on NaN, wrote an export whose routers were all NaN, and
    exited 0."""
    out = tmp_path / "out"
    with pytest.raises(PrismError, match="training diverged at step"):
        tune_gate(export, out, settings(train_text, steps=3, distill=1e300))
    assert not out.exists() and not checkpoint_path(out).exists()


def test_the_layer_ranking_is_not_copied_into_a_tuned_export(cli, export, train_text, tmp_path):
    """A ranking measured under the untuned router was copied byte for byte into the tuned export, whose
    layered:K+j points then followed it."""
    source = tmp_path / "ranked"
    shutil.copytree(export, source)
    from prism_cli.tuning.layers import rank_export

    rank_export(source, data=str(train_text), tokens=64, seq_len=32)
    out = tmp_path / "out"
    result = cli("tune-gate", source, "--out", out, "--data", train_text, "--steps", "1", "--batch", "2", "--seq-len", "16")
    assert result.code == 0, result
    assert not (out / "layer_ranking.json").exists() and (out / "config.json").exists()
    assert "rank-layers" in result.out


def test_ctrl_c_checkpoints_and_resume_repeats_the_uninterrupted_run(export, train_text, tuned, tmp_path):
    out_full, full = tuned
    out = tmp_path / "out"
    with pytest.raises(Interrupted, match="--resume"):
        tune_gate(export, out, settings(train_text, steps=4), on_step=_interrupt_at(2))
    assert not out.exists() and checkpoint_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_path(out).name]  # no temporary files left
    with pytest.raises(PrismError, match="--resume"):
        tune_gate(export, out, settings(train_text, steps=4))  # a fresh start would discard the checkpoint
    with pytest.raises(PrismError, match="lr"):
        tune_gate(export, out, settings(train_text, steps=4, lr=1e-2), resume=True)
    result = tune_gate(export, out, settings(train_text, steps=4), resume=True)
    assert result.resumed_at == 2 and not checkpoint_path(out).exists()
    assert [(r.step, r.k, r.loss) for r in result.curve] == [(r.step, r.k, r.loss) for r in full.curve]
    a, b = tensors(out_full), tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The command: output, and one-line refusals of bad input.


def test_cli_tunes_and_reports_the_trainable_share(cli, export, train_text, tmp_path):
    out = tmp_path / "out"
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--steps", "2", "--batch", "2", "--seq-len", "16",
                 "--schedule", "linear")
    assert result.code == 0, result
    assert "flat router only" in result.out and "%" in result.out
    assert json.loads((out / "config.json").read_text())["prism"]["tuning"]["schedule"] == "linear"
    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None


def test_cli_says_where_the_text_caps_init_tokens(cli, export, train_text, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(export))(train_text.read_text(), add_special_tokens=False)["input_ids"]
    text_tokens = len(ids) // 16 * 16
    assert text_tokens < 50_000
    out = tmp_path / "out"
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--steps", "1", "--batch", "2", "--seq-len", "16",
                 "--init-tokens", "50000")
    assert result.code == 0, result
    said = " ".join(result.out.split())  # the console wraps long lines
    assert f"note: --init-tokens 50,000 is capped by the training text: the probe fits on all {text_tokens:,} tokens" in said
    # the default --warmup 10 over one step: the learning rate never peaks, and the run says so
    assert "note: --warmup 10 is not below --steps 1: the learning rate rises for the whole run and never reaches --lr" in said
    tuning = json.loads((out / "config.json").read_text())["prism"]["tuning"]
    assert tuning["init_tokens"] == 50_000 and tuning["init_tokens_used"] == text_tokens
    # within the text: no note, and the probe fits on what was asked
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--steps", "2", "--warmup", "1", "--batch", "2",
                 "--seq-len", "16", "--init-tokens", "1000", "--force")
    assert result.code == 0, result
    assert "--init-tokens" not in result.out and "--warmup" not in result.out
    assert json.loads((out / "config.json").read_text())["prism"]["tuning"]["init_tokens_used"] == 992  # 62 windows of 16


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_cli_ctrl_c_or_sigterm_checkpoints_and_keeps_only_the_checkpoint(cli, export, train_text, tmp_path, monkeypatch,
                                                                         signum, code):
    """SIGTERM (a job scheduler's stop) checkpoints as Ctrl-C does; it killed the run before, losing the steps."""
    from prism_cli.tuning import trainer

    calls = []
    original = trainer.TrainBatches.at

    def at(self, step):
        calls.append(step)
        if step == 1:
            os.kill(os.getpid(), signum)
        return original(self, step)

    monkeypatch.setattr(trainer.TrainBatches, "at", at)
    out = tmp_path / "out"
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--steps", "3", "--batch", "2", "--seq-len", "16")
    assert result.code == code and "Traceback" not in result.err
    last = [line for line in result.err.splitlines() if line.strip()][-1]  # under the progress bar's last state
    assert "step 2 of 3" in last and "--resume" in last and checkpoint_path(out).name in last
    assert not out.exists() and checkpoint_path(out).exists() and calls == [0, 1]


BAD = [
    (["--k-start", "0"], "outside 1..8"),
    (["--k-end", "9"], "outside 1..8"),
    (["--k-start", "5", "--k-end", "3"], "above --k-end"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--schedule", "cosine"], "unknown K schedule"),
    (["--data", "builtin:eval"], "held-out"),
    (["--data", "builtin:calibration"], "held-out"),
    (["--seq-len", "4000"], "128 positions"),
    (["--seq-len", "127", "--batch", "100000"], "fewer than one batch"),
    (["--experts-impl", "prism"], "autograd"),
    (["--resume"], "no checkpoint"),
    (["--distill", "-1"], "--distill"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "1e38"], "--lr must be in (0, 1]"),  # float32 overflow inside the optimizer: an internal error
    (["--init-alpha", "nan"], "--init-alpha"),
    (["--init-alpha", "-inf"], "--init-alpha"),
    (["--distill", "nan"], "--distill"),
    (["--distill", "inf"], "--distill"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    (["--checkpoint-minutes", "inf"], "--checkpoint-minutes"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_setting_refuses_non_finite_values(value):
    """NaN fails every comparison, so a range check alone lets it through: each float option says no."""
    floats = [f.name for f in dataclasses.fields(TuneSettings) if f.type in ("float", float)]
    assert {"lr", "init_alpha", "distill", "checkpoint_minutes"} <= set(floats)
    for name in floats:
        with pytest.raises(PrismError, match=f"--{name.replace('_', '-')}"):
            TuneSettings(**{name: value}).validate()


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_are_refused(cli, export, train_text, tmp_path, args, needle):
    out = tmp_path / "out"
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--seq-len", "64", *args)
    assert result.code == 2
    result.assert_one_line_error(needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("split", ["calibration", "eval"])
def test_a_copy_of_held_out_text_is_not_trained_on(cli, export, tmp_path, split):
    """``--data builtin:calibration`` was refused, but a file holding the same text was trained on."""
    from prism_cli.data import split_text

    copy = tmp_path / "copy.txt"
    copy.write_text(split_text(split))
    result = cli("tune-gate", export, "--out", tmp_path / "out", "--data", copy, "--seq-len", "64")
    assert result.code == 2
    result.assert_one_line_error(f"holds text of the built-in {'evaluation' if split == 'eval' else split} split")
    assert not (tmp_path / "out").exists()


def test_not_an_export_is_refused(cli, tiny_model_dir, train_text, tmp_path):
    for target, needle in ((tiny_model_dir("olmoe"), "not a prism export"), (tmp_path / "missing", "does not exist"),
                           (train_text, "not a folder")):
        result = cli("tune-gate", target, "--out", tmp_path / "out", "--data", train_text)
        assert result.code == 2
        result.assert_one_line_error(needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,needle", [({"sub_experts": 3}, "prism.sub_experts is 3"), (None, "no 'prism' object")],
                         ids=["sub-experts-edited", "prism-not-an-object"])
def test_edited_export_config_is_refused(cli, export, train_text, tmp_path, edit, needle):
    """An export whose config.json no longer matches its weights (or whose prism section is not an object)
    is refused in one line before any training, as loading it elsewhere is."""
    edited = tmp_path / "edited"
    shutil.copytree(export, edited)
    config = json.loads((edited / "config.json").read_text())
    if edit is None:
        config["prism"] = "x"
    else:
        config["prism"].update(edit)
    (edited / "config.json").write_text(json.dumps(config))
    result = cli("tune-gate", edited, "--out", tmp_path / "out", "--data", train_text, "--steps", "1")
    assert result.code == 2
    result.assert_one_line_error(needle)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(cli, export, train_text, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = cli("tune-gate", export, "--out", out, "--data", train_text, "--steps", "1", "--seq-len", "64")
    result.assert_one_line_error("already exists", "--force")
    assert (out / "keep").read_text() == "x"


def test_an_out_that_is_holds_or_lies_in_an_input_is_refused_even_with_force(cli, export, train_text, tmp_path):
    """--out inside the export replaced its prism/ folder, and --out its parent replaced the export itself:
    both ran and exited 0 with --force (only --out equal to the export was refused)."""
    source = tmp_path / "holder" / "exp"
    shutil.copytree(export, source)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    result = cli("tune-gate", source, "--out", source, "--data", train_text, "--steps", "1", "--seq-len", "64")
    result.assert_one_line_error("is the export being tuned")  # not "pass --force", which it would refuse too
    for out, needle in [(source, "is the export being tuned"), (source / "prism", "lies inside the export being tuned"),
                        (source.parent, "holds the export being tuned"), (train_text, "is the data file"),
                        (train_text.parent, "holds the data file")]:
        result = cli("tune-gate", source, "--out", out, "--data", train_text, "--force", "--steps", "1", "--seq-len", "64")
        result.assert_one_line_error(needle)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
    assert train_text.is_file()


# ---------------------------------------------------------------------------------------------
# The committed table: joining two bench runs.


def _bench(target: Path, points: dict[str, tuple[float, float]], full: float) -> dict:
    """A bench.json with ``point -> (perplexity, latency ms)``, p90 5 % above the median."""
    return {
        "target": str(target), "full_perplexity": full, "settings": {"batches": [8]},
        "points": [{"point": name, "kind": "original" if name.startswith("original") else "elastic", "perplexity": ppl,
                    "tokens": 1000, "latency": {"8": {"median_ms": ms, "p90_ms": 1.05 * ms}}}
                   for name, (ppl, ms) in points.items()],
        "counts": {"8": {"frontier": ["linear:1", "original:2"], "counted": ["linear:1", "original:2"], "elastic": 1,
                         "original_alone": ["original:1", "original:2"], "ratio": 1.0}},
    }


def test_table_joins_the_runs_and_checks_the_targets(export, tmp_path):
    from prism_cli.tuning.benchmark import table

    full = 40.0
    tuned = {f"linear:{k}": (100.0 / k + 38.0, 10.0 * k) for k in range(1, FULL + 1)}  # 138, 88, 71.3, 63, ..., 50.5
    tuned |= {f"topk:{k}": (90.0 / k + 39.0, 11.0 * k) for k in range(1, FULL + 1)}
    tuned |= {"original:1": (62.0, 41.0), "original:2": (full, 81.0)}
    untuned = {f"linear:{k}": (120.0 / k + 39.0, 10.0 * k) for k in range(1, FULL + 1)}
    paths = []
    for name, points in (("tuned", tuned), ("untuned", untuned)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_bench(export, points, full)))
    result = table(paths[0], paths[1], tmp_path / "out")
    rows = {row[0]: row for row in result.rows}
    assert rows[4][2] == 62.0 and rows[8][2] == full and rows[3][2] is None  # original only at multiples of N
    assert rows[4][5] == pytest.approx(63.0) and rows[4][6] == pytest.approx(1.0) and rows[2][7] == pytest.approx(-11.0)
    notes = "\n".join(result.notes)
    assert "linear:4 < original:1: 63.00 vs 62.00 (NOT met)" in notes
    assert "linear:8 <= original:2: 50.50 vs 40.00 (NOT met)" in notes
    assert "linear:1 <= 1.5 x full (60.00): 138.00 (NOT met)" in notes
    assert "falls with K: met" in notes
    counts = json.loads((tmp_path / "out" / "tuned_operating_points.json").read_text())["distinct"]
    # every set is on its own frontier (slower is always better here); <= 60 perplexity and >= 3 % apart
    assert counts["tuned (linear)"]["8"] == [f"linear:{k}" for k in range(5, FULL + 1)]
    assert counts["original"]["8"] == ["original:2"]


# ---------------------------------------------------------------------------------------------
# The mass-probe initialisation.


@pytest.fixture(scope="module")
def probed(export, train_text):
    """The probe's rows at alpha 1 and 0, with the tokens it saw and the trainee it ran on."""
    from prism_cli.tuning.init import probe_init

    trainee = Trainee.load(export, "grouped_mm", "float32", "cpu")
    ids = np.asarray(trainee.tokenizer(train_text.read_text(), add_special_tokens=False)["input_ids"])
    windows = TrainBatches(ids, 2, 32, seed=0).probe_windows(2048)
    source = read_source_router(export, trainee.adapter, N_SUB)
    return trainee, windows, source, probe_init(trainee, windows, source, 1.0), probe_init(trainee, windows, source, 0.0)


def test_probe_deviations_sum_to_zero_over_an_experts_copies(probed):
    trainee, _, source, rows, untouched = probed
    for layer, flat, zero in zip(trainee.layers, rows, untouched, strict=True):
        src = source[f"layers.{layer.index}.weight"].float()
        assert torch.equal(zero, src.repeat_interleave(N_SUB, dim=0))
        copies = flat.view(-1, N_SUB, flat.shape[-1])
        assert torch.allclose(copies.mean(dim=1), src, atol=1e-5)
        assert (copies - src[:, None]).abs().max() > 1e-2  # the copies are told apart


def test_probe_ranks_sub_experts_by_their_output(probed):
    """Per routed token, the copy the probed router scores highest is the sub-expert with the largest output
    (norm of what the stock experts module returns for that sub-expert alone) far more often than chance."""
    trainee, windows, source, rows, _ = probed
    inputs = {}

    def keep(index: int):
        def hook(_module, args, _output) -> None:
            inputs[index] = args[0].reshape(-1, 64)

        return hook

    hooks = [layer.block.gate.register_forward_hook(keep(layer.index)) for layer in trainee.layers]
    import prism_cli

    prism_cli.set_operating_point(trainee.model, f"linear:{FULL}")
    with torch.no_grad():
        trainee.model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    for layer, flat in zip(trainee.layers, rows, strict=True):
        x = inputs[layer.index].detach()
        top = (x @ source[f"layers.{layer.index}.weight"].float().T).argmax(dim=-1)  # each token's top-1 expert
        ids = top[:, None] * N_SUB + torch.arange(N_SUB)
        with torch.no_grad():
            norms = torch.stack([layer.experts(x, ids[:, n : n + 1], torch.ones(len(x), 1)).norm(dim=-1) for n in range(N_SUB)], -1)
        scores = (x @ flat.T).gather(1, ids)
        agree = float((scores.argmax(-1) == norms.argmax(-1)).float().mean())
        assert agree > 0.5, agree  # chance is 1/4
