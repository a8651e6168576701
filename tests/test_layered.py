"""Layered operating points (``layered:K+j``) and ``prism rank-layers``.

Oracles: each MoE block's output at a layered point is compared with the same block run on the same
input with the whole model at ``linear:K`` or ``linear:K+1`` (the public point, not the layered code
path); the ranking's recorded perplexities are compared with the perplexity of the points they stand
for, measured through ``set_operating_point``; the active sub-experts per token are counted by hand.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FULL, N_SUB, TOP_K, assert_one_line_failure, random_neurons_export, token_batch

import prism_cli
from prism_cli.data import split_text
from prism_cli.data.windows import token_windows
from prism_cli.errors import PrismError
from prism_cli.evaluation.perplexity import perplexity
from prism_cli.models.loading import load_model
from prism_cli.operating_points import OperatingPoint, parse_operating_point
from prism_cli.runtime.layers import RANKING_FILE
from prism_cli.tuning.layers import rank_export

LAYERS = 2  # every tiny model has two MoE layers
SEQ = 32
TOKENS = 32 * SEQ


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("layered-text") / "calibration.txt"
    path.write_text(split_text("calibration")[:60_000])
    return path


@pytest.fixture(scope="module")
def ranked(tiny_model_dir, tmp_path_factory, text_file) -> Path:
    export = random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("layered"), seed=17)
    rank_export(export, data=str(text_file), tokens=TOKENS, seq_len=SEQ)
    return export


def test_layered_points_parse_and_print():
    op = parse_operating_point("layered:2+1", "neurons", N_SUB, TOP_K)
    assert op == OperatingPoint("layered", (2, 1)) and str(op) == "layered:2+1"
    assert parse_operating_point(op, "linear", N_SUB, TOP_K) == op
    for bad in ("layered:2", "layered:x+1", "layered:0+1", f"layered:{FULL}+1", "layered:2+0", "layered:2+-1"):
        with pytest.raises(PrismError, match="layered"):
            parse_operating_point(bad, "neurons", N_SUB, TOP_K)
    with pytest.raises(PrismError, match="not available"):
        parse_operating_point("layered:1+1", None, 1, TOP_K)


def test_the_ranking_is_the_order_of_its_perplexities_and_they_are_the_points_it_stands_for(ranked, text_file):
    """With two layers, ``layered:K+1`` is the best layer alone at K+1: its perplexity measured through the
    public point must be the lowest recorded for K, and ``linear:K`` must be the recorded base."""
    data = json.loads((ranked / RANKING_FILE).read_text())
    assert sorted(map(int, data["order"])) == list(range(1, FULL))
    loaded = load_model(str(ranked))  # for its tokenizer
    windows = token_windows(loaded.tokenizer, text_file.read_text(), SEQ, TOKENS)
    assert data["tokens"] == windows.numel() and data["data"] == str(text_file)
    model = prism_cli.load_elastic(str(ranked))
    for k in (1, 3, FULL - 1):
        row = data["perplexity"][str(k)]
        assert data["order"][str(k)] == sorted(range(LAYERS), key=lambda i, row=row: (row[i], i))
        prism_cli.set_operating_point(model, f"linear:{k}")
        assert perplexity(model, windows, 8).perplexity == pytest.approx(data["base"][str(k)], rel=1e-9)
        prism_cli.set_operating_point(model, f"layered:{k}+1")
        assert perplexity(model, windows, 8).perplexity == pytest.approx(min(row), rel=1e-9)


@pytest.mark.parametrize("k", [1, 2, FULL - 1])
def test_each_layer_computes_what_linear_k_or_k_plus_1_computes_there(ranked, k):
    model = prism_cli.load_elastic(str(ranked), operating_point=f"layered:{k}+1")
    blocks = [layer.block for layer in model.prism_state.layers]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0].clone(), _out(out).clone())))
             for i, b in enumerate(blocks)]
    with torch.inference_mode():
        model(input_ids=token_batch(seed=4), use_cache=False)
    for h in hooks:
        h.remove()
    first = json.loads((ranked / RANKING_FILE).read_text())["order"][str(k)][0]
    for i, block in enumerate(blocks):
        prism_cli.set_operating_point(model, f"linear:{k + 1 if i == first else k}")
        with torch.inference_mode():
            want = _out(block(seen[i][0]))
        assert torch.equal(seen[i][1], want), f"layer {i}"


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def test_an_export_with_a_ranking_offers_layered_points(ranked, tiny_export):
    points = [str(p) for p in prism_cli.load_elastic(str(ranked)).prism_state.points()]
    assert [p for p in points if p.startswith("layered:")] == [f"layered:{k}+{LAYERS // 2}" for k in range(1, FULL)]
    assert not any(str(p).startswith("layered:") for p in prism_cli.load_elastic(str(tiny_export)).prism_state.points())


def test_bench_counts_k_plus_j_over_l_sub_experts(cli, ranked, tmp_path):
    out = tmp_path / "bench"
    result = cli("bench", ranked, "--points", "layered:2+1;linear:2;linear:3", "--batch", "2", "--seq-len", "16",
                 "--tokens", "256", "--repeats", "2", "--max-repeats", "2", "--warmup", "0", "--out", out)
    assert result.code == 0, result
    active = {p["point"]: p["active"] for p in json.loads((out / "bench.json").read_text())["points"]}
    assert active["layered:2+1"] == pytest.approx(2 + 1 / LAYERS)
    assert (active["linear:2"], active["linear:3"]) == (2, 3)


def test_refusals(ranked, tiny_export, tmp_path):
    with pytest.raises(PrismError, match="rank-layers"):
        prism_cli.load_elastic(str(tiny_export), operating_point="layered:2+1")
    model = prism_cli.load_elastic(str(ranked), operating_point="linear:3")
    with pytest.raises(PrismError, match="within 1..1"):
        prism_cli.set_operating_point(model, f"layered:2+{LAYERS}")
    assert str(model.prism_state.point) == "linear:3"  # a refused point changes nothing
    from prism_cli.serving.floors import PointSpace

    with pytest.raises(PrismError, match="quality floor"):
        PointSpace("neurons", N_SUB, TOP_K).parse("layered:2+1")
    from prism_cli.runtime.per_row import set_row_points

    with pytest.raises(PrismError, match="row's point"):
        set_row_points(model, [parse_operating_point("layered:2+1", "neurons", N_SUB, TOP_K)], 4)


def test_an_export_refuses_a_layered_default_point(cli, tiny_model_dir, tmp_path):
    from conftest import write_random_partition

    part = write_random_partition(tiny_model_dir("olmoe"), tmp_path / "p.h5", seed=1)
    out = tmp_path / "export"
    assert_one_line_failure(cli("export", tiny_model_dir("olmoe"), part, "--out", out, "-K", "layered:2+1"), "rank-layers")
    assert not out.exists()


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "cannot read layer ranking"),
    ('{"format": 1, "data": "x", "tokens": 5, "order": {"1": [0]}, "perplexity": {}, "base": {}}', "does not fit"),
    ('{"format": 9}', "format 9"),
    ('{"format": 1, "order": 3}', "not a layer ranking"),
])
def test_a_broken_ranking_file_is_one_line(cli, ranked, tmp_path, content, needle):
    broken = tmp_path / "export"
    shutil.copytree(ranked, broken)
    (broken / RANKING_FILE).write_text(content)
    with pytest.raises(PrismError, match=needle):
        prism_cli.load_elastic(str(broken))
    assert_one_line_failure(cli("bench", broken, "--points", "linear:1", "--seq-len", "16", "--out", tmp_path / "b"), needle)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda r: r["order"].update({"1": [0.5, 1]}), "order.1 holds 0.5, not a whole number"),  # int(0.5) read layer 0
    (lambda r: r["perplexity"]["1"].__setitem__(0, "nan"), "perplexity.1 holds 'nan', not a perplexity"),
    (lambda r: r["perplexity"]["1"].__setitem__(0, float("inf")), "perplexity.1 holds inf"),
    (lambda r: r["base"].update({"1": -3.0}), "base.1 holds -3.0"),
    (lambda r: r.update(order={"1.0": r["order"]["1"]}), "order has key '1.0', not a K"),
    (lambda r: r.update(order=[1, 2]), "order is list, not an object"),
])
def test_a_ranking_with_values_of_the_wrong_kind_is_refused(ranked, tmp_path, edit, needle):
    """Found by fuzzing: layer indices were read with ``int()`` (0.5 became layer 0) and perplexities with
    ``float()`` (the string "nan" passed); each is now named in one line."""
    from prism_cli.runtime.layers import read_ranking

    layers, full = 2, FULL
    assert read_ranking(ranked, layers, full) is not None
    broken = tmp_path / "export"
    shutil.copytree(ranked, broken)
    ranking = json.loads((broken / RANKING_FILE).read_text())
    edit(ranking)
    (broken / RANKING_FILE).write_text(json.dumps(ranking))
    with pytest.raises(PrismError, match="not a layer ranking") as exc:
        read_ranking(broken, layers, full)
    assert needle in str(exc.value)


def test_rank_layers_replaces_a_damaged_ranking(cli, ranked, tmp_path, text_file):
    """A damaged ranking made rank-layers fail on reading it, while its message said to run rank-layers."""
    broken = tmp_path / "export"
    shutil.copytree(ranked, broken)
    (broken / RANKING_FILE).write_text('{"format": 1, "ord')
    result = cli("rank-layers", broken, "--data", text_file, "--tokens", str(4 * SEQ), "--seq-len", str(SEQ))
    assert result.code == 0, result
    assert prism_cli.load_elastic(str(broken)) is not None  # the new ranking reads


def test_rank_layers_cli(cli, tiny_model_dir, tmp_path, text_file):
    export = random_neurons_export(tiny_model_dir("qwen2_moe"), tmp_path, seed=2)
    result = cli("rank-layers", export, "--data", text_file, "--tokens", str(8 * SEQ), "--seq-len", str(SEQ))
    assert result.code == 0, result
    assert "order" in result.out and (export / RANKING_FILE).exists()
    ranking = json.loads((export / RANKING_FILE).read_text())
    assert all(math.isfinite(x) for row in ranking["perplexity"].values() for x in row)
    before = (export / RANKING_FILE).read_bytes()
    assert_one_line_failure(cli("rank-layers", export, "--data", "builtin:eval"), "evaluation split")
    assert_one_line_failure(cli("rank-layers", export, "--tokens", "10", "--seq-len", str(SEQ)), "--tokens")
    assert_one_line_failure(cli("rank-layers", tmp_path / "nope"), "does not exist")
    assert (export / RANKING_FILE).read_bytes() == before  # a refused run leaves the ranking as it was
