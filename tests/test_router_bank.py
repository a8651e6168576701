"""prism select-routers: a router per operating point, chosen on validation text.

The oracle for routing is each candidate export itself: at ``linear:K`` the bank export must give the
logits of the candidate chosen for K (loaded on its own), and a stock engine serving the checkpoint
at its ``num_experts_per_tok`` must run the router chosen for that K. Candidates are a tiny OLMoE's
untuned export and two exports with random, untied router rows written by tune-gate's writer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FULL, N_SUB, assert_nothing_written, logits_of, random_neurons_export, token_batch
from transformers import AutoModelForCausalLM

import prism_cli
from prism_cli.data import split_text
from prism_cli.errors import PrismError
from prism_cli.export.format import ROUTER_BANK_FILE
from prism_cli.models.adapters import adapter_for_config
from prism_cli.models.loading import load_config
from prism_cli.tuning.bank import BankChoice, choose, select_routers, write_bank
from prism_cli.tuning.trainer import TuneSettings, tune_gate
from prism_cli.tuning.writer import read_source_router, write_tuned_export


def _untied(export: Path, out: Path, seed: int) -> Path:
    adapter = adapter_for_config(load_config(str(export)))
    gen = torch.Generator().manual_seed(seed)
    rows = {layer: torch.randn(8 * N_SUB, 64, generator=gen) * 0.5 for layer in (0, 1)}
    write_tuned_export(export, out, rows, read_source_router(export, adapter, N_SUB), {"steps": 0, "seed": seed}, [], adapter)
    return out


@pytest.fixture(scope="module")
def candidates(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bank")
    export = random_neurons_export(tiny_model_dir("olmoe"), root, seed=5)
    return {"untuned": export, "a": _untied(export, root / "a", 1), "b": _untied(export, root / "b", 2)}


#: Hand-made choice: every K uses a different router from its neighbours.
BY_K = {k: ("untuned", "a", "b")[k % 3] for k in range(1, FULL + 1)}


@pytest.fixture(scope="module")
def bank(candidates, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bank-out") / "bank"
    curves = {name: {k: 1.0 for k in BY_K} for name in candidates}
    write_bank(candidates, BankChoice(BY_K, curves), out)
    return out


def test_choose_takes_the_lowest_per_k_and_ties_go_to_the_first():
    curves = {"untuned": {1: 90.0, 2: 50.0, 3: 40.0}, "t1": {1: 60.0, 2: 50.0, 3: 41.0}, "t2": {1: 70.0, 2: 49.0, 3: 40.0}}
    choice = choose(curves)
    assert choice.by_k == {1: "t1", 2: "t2", 3: "untuned"}
    assert choice.chosen == ["untuned", "t1", "t2"]
    assert choose({"u": {1: 5.0}, "t": {1: 6.0}}).chosen == ["u"]
    with pytest.raises(PrismError, match="different K"):
        choose({"u": {1: 5.0, 2: 4.0}, "t": {1: 6.0}})


@pytest.mark.parametrize("k", range(1, FULL + 1))
def test_each_k_routes_like_the_candidate_chosen_for_it(candidates, bank, k):
    ids = token_batch(seed=7)
    want = logits_of(prism_cli.load_elastic(str(candidates[BY_K[k]]), operating_point=f"linear:{k}"), ids)
    got = logits_of(prism_cli.load_elastic(str(bank), operating_point=f"linear:{k}"), ids)
    assert torch.equal(got, want)


def test_switching_k_in_place_switches_routers(candidates, bank):
    ids = token_batch(seed=8)
    model = prism_cli.load_elastic(str(bank), operating_point="linear:2")
    for k in (5, 1, FULL, 2):
        prism_cli.set_operating_point(model, f"linear:{k}")
        want = logits_of(prism_cli.load_elastic(str(candidates[BY_K[k]]), operating_point=f"linear:{k}"), ids)
        assert torch.equal(logits_of(model, ids), want)


def test_rows_of_one_batch_route_with_the_router_of_their_own_k(candidates, bank):
    """The ``mixed`` serving policy: every row at its own point in one forward, each with its K's router."""
    from prism_cli.operating_points import parse_operating_point
    from prism_cli.runtime.per_row import clear_row_points, set_row_points

    ids = token_batch(seed=11, batch=3)
    model = prism_cli.load_elastic(str(bank), operating_point=f"linear:{FULL}")
    points = [parse_operating_point(p, "neurons", N_SUB, 2) for p in ("linear:1", "linear:5", "topk:3")]
    with torch.inference_mode():
        set_row_points(model, points, ids.shape[1])
        got = model(input_ids=ids, use_cache=False).logits
        clear_row_points(model)
    for row, (point, owner) in enumerate(zip(points, (BY_K[1], BY_K[5], "untuned"), strict=True)):
        want = logits_of(prism_cli.load_elastic(str(candidates[owner]), operating_point=str(point)), ids[row : row + 1])
        torch.testing.assert_close(got[row : row + 1].float(), want, rtol=1e-4, atol=1e-4)
    # the model is back at its own point, with its own router
    want = logits_of(prism_cli.load_elastic(str(candidates[BY_K[FULL]]), operating_point=f"linear:{FULL}"), ids)
    assert torch.equal(logits_of(model, ids), want)


def test_stock_transformers_serves_the_router_chosen_for_its_k(candidates, bank, tmp_path):
    ids = token_batch(seed=9)
    stock = AutoModelForCausalLM.from_pretrained(str(bank), dtype=torch.float32)
    want = AutoModelForCausalLM.from_pretrained(str(candidates[BY_K[FULL]]), dtype=torch.float32)
    assert torch.equal(logits_of(stock, ids), logits_of(want, ids))
    served = tmp_path / "serve4"  # K = 4 routes with a tuned router: no tied copies for torch.topk to order
    curves = {name: {k: 1.0 for k in BY_K} for name in candidates}
    write_bank(candidates, BankChoice(BY_K, curves), served, serve_k=4)
    config = json.loads((served / "config.json").read_text())
    assert config["num_experts_per_tok"] == 4 and "K = 4" in " ".join(config["prism"]["serving"]["notes"])
    stock = AutoModelForCausalLM.from_pretrained(str(served), dtype=torch.float32)
    elastic = prism_cli.load_elastic(str(candidates[BY_K[4]]), operating_point="linear:4")
    got, want = logits_of(stock, ids), logits_of(elastic, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # torch.topk's order against prism's: same set


@pytest.mark.parametrize("point", ["topk:1", "topk:5", "threshold:0.7"])
def test_the_training_free_gate_keeps_the_original_router(candidates, bank, point):
    ids = token_batch(seed=10)
    want = logits_of(prism_cli.load_elastic(str(candidates["untuned"]), operating_point=point), ids)
    model = prism_cli.load_elastic(str(bank), operating_point="linear:1")
    prism_cli.set_operating_point(model, point)
    assert torch.equal(logits_of(model, ids), want)


def test_a_bank_without_the_source_router_is_refused(candidates, bank, tmp_path):
    """A bank's flat routers are tuned: without prism/source_router.safetensors its training-free gate would
    route with tuned rows, unsaid (a bank records no prism.tuning; the first check missed it). So is a tuned
    export whose copies are still tied, read by tune-gate or select-routers as a candidate."""
    from prism_cli.export.format import SOURCE_ROUTER_FILE

    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    (copy / SOURCE_ROUTER_FILE).unlink()
    with pytest.raises(PrismError, match=f"is a router-bank export but {SOURCE_ROUTER_FILE} .* is missing"):
        prism_cli.load_elastic(str(copy), operating_point="topk:2")
    tuned = tmp_path / "tuned"
    shutil.copytree(candidates["untuned"], tuned)
    config = json.loads((tuned / "config.json").read_text())
    config["prism"]["tuning"] = {"steps": 0}  # tuned, its copies still tied: they are not the source rows
    (tuned / "config.json").write_text(json.dumps(config))
    adapter = adapter_for_config(load_config(str(tuned)))
    with pytest.raises(PrismError, match=f"is a tuned export but {SOURCE_ROUTER_FILE} .* is missing"):
        read_source_router(tuned, adapter, N_SUB)


def test_the_bank_records_its_choice(candidates, bank):
    meta = json.loads((bank / "config.json").read_text())["prism"]
    assert meta["router_bank"]["by_k"] == {str(k): v for k, v in BY_K.items()}
    assert meta["router_bank"]["routers"]["a"]["tuning"]["seed"] == 1
    assert meta["router_bank"]["routers"]["untuned"]["tuning"] is None
    assert "tuning" not in meta and (bank / ROUTER_BANK_FILE).exists()
    table = json.loads((bank / "prism" / "router_bank.json").read_text())
    assert [row["chosen"] for row in table["rows"]] == [BY_K[k] for k in sorted(BY_K)]


def test_selection_measures_every_candidate_and_the_bank_reaches_the_minimum(candidates, tmp_path):
    """End to end on real text: the bank's own perplexity at each K is the lowest of the candidates'."""
    from prism_cli.tuning.benchmark import per_k_perplexity

    text = tmp_path / "valid.txt"
    text.write_text(split_text("calibration")[:6_000])
    seen: list[tuple[str, int]] = []
    choice, served = select_routers(candidates, tmp_path / "bank", data=str(text), tokens=256,
                                    on_point=lambda name, k: seen.append((name, k)))
    assert served == FULL and len(seen) == len(candidates) * FULL
    bank = per_k_perplexity(tmp_path / "bank", text.read_text(), 256)
    for k in range(1, FULL + 1):
        assert bank[k] == pytest.approx(min(c[k] for c in choice.curves.values()), rel=1e-5)


def test_bad_input_is_refused_before_any_work(candidates, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PrismError, match="evaluation split"):
        select_routers(candidates, out, data="builtin:eval")
    with pytest.raises(PrismError, match="at least two"):
        select_routers({"untuned": candidates["untuned"]}, out)
    with pytest.raises(PrismError, match="serve-k"):
        select_routers(candidates, out, serve_k=FULL + 1)
    with pytest.raises(PrismError, match="not a prism export"):
        select_routers({**candidates, "x": tmp_path}, out)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in candidates["a"].rglob("*"))
    with pytest.raises(PrismError, match="is the candidate a"):  # --force does not let a bank replace its own input
        select_routers(candidates, candidates["a"], force=True)
    with pytest.raises(PrismError, match="lies inside the candidate a"):  # replaced the candidate's prism/ folder
        select_routers(candidates, candidates["a"] / "prism", force=True)
    text = tmp_path / "calibration.txt"
    text.write_text(split_text("calibration")[:5_000])
    with pytest.raises(PrismError, match="is the data file"):
        select_routers(candidates, text, data=str(text), force=True)
    assert text.is_file()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in candidates["a"].rglob("*")) == before
    (tmp_path / "other").mkdir()
    other = random_neurons_export(tiny_model_dir("olmoe"), tmp_path / "other", seed=6)  # another partition
    with pytest.raises(PrismError, match="not a tuned copy of the same export"):
        select_routers({**candidates, "other": other}, out)
    assert_nothing_written(out)


def test_a_candidate_with_other_expert_weights_is_refused(candidates, tmp_path):
    """Only the config fields were compared: a tuned copy whose expert weights were edited (same metadata) was
    banked with the others, and its K routed over other experts than the bank's checkpoint holds."""
    from safetensors.torch import load_file, save_file

    edited = tmp_path / "edited"
    shutil.copytree(candidates["a"], edited)
    for shard in edited.glob("*.safetensors"):
        weights = load_file(str(shard))
        key = next(k for k in sorted(weights) if "experts" in k)
        weights[key] = weights[key] * 1.01
        save_file(weights, str(shard), metadata={"format": "pt"})
    with pytest.raises(PrismError, match="holds other weights than untuned beside its router"):
        select_routers({**candidates, "edited": edited}, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_layer_ranking_is_not_copied_into_the_bank(candidates, tmp_path):
    """The bank copied its base export's layer ranking, measured under another router."""
    base = tmp_path / "untuned"
    shutil.copytree(candidates["untuned"], base)
    (base / "layer_ranking.json").write_text("{}")  # not read: only (not) copied
    curves = {name: {k: 1.0 for k in BY_K} for name in candidates}
    out = tmp_path / "bank"
    write_bank({**candidates, "untuned": base}, BankChoice({k: "untuned" for k in BY_K}, curves), out)
    assert (out / "config.json").exists() and not (out / "layer_ranking.json").exists()


def test_a_bank_is_neither_a_candidate_nor_tuned_again(candidates, bank, tmp_path):
    with pytest.raises(PrismError, match="already carries a router bank"):
        select_routers({**candidates, "bank": bank}, tmp_path / "out")
    text = tmp_path / "train.txt"
    text.write_text(split_text("train")[:5_000])
    with pytest.raises(PrismError, match="switches routers with K"):
        tune_gate(bank, tmp_path / "tuned", TuneSettings(data=str(text), steps=1, init="copies"))


def test_cli_refuses_in_one_line(cli, candidates, bank, tmp_path):
    result = cli("select-routers", str(candidates["untuned"]), str(candidates["a"]), "--out", str(bank))
    result.assert_one_line_error("already exists")
    result = cli("select-routers", f"u={candidates['untuned']}", f"u={candidates['a']}", "--out", str(tmp_path / "o"))
    result.assert_one_line_error("two candidates are named 'u'")
    result = cli("select-routers", str(candidates["untuned"]), str(candidates["a"]), "--out", str(tmp_path / "o"),
                 "--data", "builtin:eval")
    result.assert_one_line_error("evaluation split")


def test_cli_writes_the_bank_and_prints_the_choice(cli, candidates, tmp_path):
    text = tmp_path / "valid.txt"
    text.write_text(split_text("calibration")[:4_000])
    out = tmp_path / "bank"
    args = ("select-routers", f"untuned={candidates['untuned']}", f"a={candidates['a']}", "--out", out, "--data", text)
    cli(*args, "--tokens", "128").assert_one_line_error("--tokens must be at least 256")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    cli(*args[:-1], short, "--tokens", "256").assert_one_line_error("fewer than one window")
    assert_nothing_written(out)
    result = cli(*args, "--tokens", "256", "--serve-k", "4")
    assert result.code == 0, result
    assert "chosen" in result.out and "the checkpoint serves K = 4" in result.out
    meta = json.loads((out / "config.json").read_text())
    assert meta["num_experts_per_tok"] == 4 and set(meta["prism"]["router_bank"]["by_k"]) == {str(k) for k in BY_K}


def test_each_router_routes_in_the_mode_its_copies_allow(candidates, bank):
    """Tied copies (the untuned router) route by whole blocks; a tuned router's untied rows by its own
    top-K (``ranked``), in a bank as on their own."""
    assert {r.mode for r in prism_cli.load_elastic(str(candidates["untuned"])).prism_state.flat_routers} == {"blocks"}
    assert {r.mode for r in prism_cli.load_elastic(str(candidates["a"])).prism_state.flat_routers} == {"ranked"}
    model = prism_cli.load_elastic(str(bank))
    for k, name in BY_K.items():
        prism_cli.set_operating_point(model, f"linear:{k}")
        assert {r.mode for r in model.prism_state.flat_routers} == {"blocks" if name == "untuned" else "ranked"}, k
