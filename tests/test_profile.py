"""``prism profile``: recorded rows against an independent recomputation, statistics, metadata, the held-out
split, the row reservoirs and their memory bound, and Ctrl-C leaving nothing behind (bad input:
tests/test_bad_input.py)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from prism_cli import __version__
from prism_cli.data import load_text, text_hash
from prism_cli.evaluation.perplexity import token_windows
from prism_cli.io import h5_attr
from prism_cli.models.loading import LoadedModel, config_fingerprint, load_config, load_model
from prism_cli.profiling import recorder as recorder_module
from prism_cli.profiling.format import FORMAT, FORMAT_VERSION, ProfileFile
from prism_cli.profiling.profiler import ProfileSettings, holdout_mask, profile_model
from prism_cli.profiling.recorder import Reservoir
from prism_cli.solvers.base import top_fraction_mask

SETTINGS = dict(tokens=2048, seq_len=32, max_rows=256, row_dtype="float32")
CLI_SETTINGS = ["--tokens", "2048", "--seq-len", "32", "--max-rows", "256", "--row-dtype", "float32"]
MOE_LAYERS = {"deepseek_v2": [1], "deepseek_v3": [1]}


@dataclass
class Profiled:
    """A tiny model, the calibration text and the profile written from them."""

    loaded: LoadedModel
    text: str
    path: Path
    settings: ProfileSettings


@dataclass
class Reference:
    """What a plain forward pass over the same windows saw at one MoE block."""

    hidden: torch.Tensor  # [T, H] block input, T = all calibration tokens in stream order
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]


@pytest.fixture(scope="module")
def profiled(tiny_model_dir, tmp_path_factory):
    """``profiled(family)``: profile the tiny model once per module with the small settings."""
    cache: dict[str, Profiled] = {}

    def get(family: str) -> Profiled:
        if family not in cache:
            loaded = load_model(str(tiny_model_dir(family)))
            text, name = load_text(None, "calibration")
            settings = ProfileSettings(**SETTINGS)
            path = tmp_path_factory.mktemp(f"profile-{family}") / "profile.h5"
            profile_model(loaded, text, name, settings, path)
            cache[family] = Profiled(loaded, text, path, settings)
        return cache[family]

    return get


def reference_pass(p: Profiled) -> dict[int, Reference]:
    """Plain forward over the profile's token windows, hooking every MoE block's input and routing."""
    model = p.loaded.model
    layers = p.loaded.adapter.moe_layers(model)
    windows = token_windows(p.loaded.tokenizer, p.text, p.settings.seq_len, p.settings.tokens)
    seen: dict[int, dict[str, list[torch.Tensor]]] = {layer.index: {"x": [], "idx": [], "w": []} for layer in layers}
    handles = []
    for layer in layers:
        store = seen[layer.index]

        def block_hook(_module, args, kwargs, store=store):
            x = args[0] if args else kwargs["hidden_states"]
            store["x"].append(x.detach().reshape(-1, x.shape[-1]).clone())

        def experts_hook(_module, args, kwargs, store=store):
            idx, w = (args[1], args[2]) if len(args) >= 3 else (kwargs["top_k_index"], kwargs["top_k_weights"])
            store["idx"].append(idx.detach().clone())
            store["w"].append(w.detach().clone())

        handles.append(layer.block.register_forward_pre_hook(block_hook, with_kwargs=True))
        handles.append(layer.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            for first in range(0, windows.shape[0], p.settings.batch_size):
                model(input_ids=windows[first : first + p.settings.batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: Reference(torch.cat(s["x"]), torch.cat(s["idx"]), torch.cat(s["w"]).float()) for i, s in seen.items()}


def swiglu(experts: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``silu(x W_gate^T) * (x W_up^T)`` from the fused weights (gate rows first)."""
    gate_up = experts.gate_up_proj[expert].detach().float()
    width = gate_up.shape[0] // 2
    return torch.nn.functional.silu(x @ gate_up[:width].T) * (x @ gate_up[width:].T)


# --- every family ---------------------------------------------------------------------------------


def test_profile_cli_runs(cli, tiny_model_dir, family: str, tmp_path) -> None:
    out = tmp_path / "profile.h5"
    result = cli("profile", tiny_model_dir(family), *CLI_SETTINGS, "--out", out)
    assert result.code == 0, result
    assert "written" in result.out and "tokens" in result.out
    with ProfileFile(out) as pf:
        assert pf.layers == MOE_LAYERS.get(family, [0, 1])
        assert pf.meta["tokens"] == 2048 and pf.meta["model_type"] == family
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.h5"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()  # not the temp file's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rows_match_recomputation(profiled, family: str) -> None:
    p = profiled(family)
    ref = reference_pass(p)
    layers = {layer.index: layer for layer in p.loaded.adapter.moe_layers(p.loaded.model)}
    with h5py.File(p.path, "r") as h5:
        for index, r in ref.items():
            experts = layers[index].experts
            for e in range(8):
                group = h5[f"layers/{index}/experts/{e}"]
                for kind in ("fit", "heldout"):
                    rows = torch.from_numpy(group[f"{kind}_rows"][()])
                    tokens = torch.from_numpy(group[f"{kind}_token"][()])
                    weights = torch.from_numpy(group[f"{kind}_weight"][()])
                    assert rows.dtype == torch.float32 and rows.shape[0] > 0, (index, e, kind)
                    assert rows.shape == (tokens.shape[0], 32)
                    want = swiglu(experts, e, r.hidden[tokens])
                    assert (rows - want).abs().max().item() <= 1e-5, (index, e, kind)
                    # Each row's token was routed to e, and its recorded weight is that routing weight.
                    hit = r.top_k_index[tokens] == e
                    assert bool(hit.any(dim=1).all()), (index, e, kind)
                    torch.testing.assert_close(weights, r.top_k_weights[tokens][hit], rtol=1e-5, atol=1e-6)


def test_statistics_match_recomputation(profiled, family: str) -> None:
    p = profiled(family)
    ref = reference_pass(p)
    layers = {layer.index: layer for layer in p.loaded.adapter.moe_layers(p.loaded.model)}
    top_k = p.loaded.adapter.top_k
    with h5py.File(p.path, "r") as h5:
        tokens = int(h5.attrs["tokens"])
        for index, r in ref.items():
            g = h5[f"layers/{index}"]
            routed = g["tokens_routed"][()]
            assert routed.sum() == tokens * top_k
            np.testing.assert_array_equal(routed, torch.bincount(r.top_k_index.reshape(-1), minlength=8).numpy())
            weight_sum = [float(r.top_k_weights[r.top_k_index == e].double().sum()) for e in range(8)]
            np.testing.assert_allclose(g["router_weight_sum"][()], weight_sum, rtol=1e-5)
            for e in range(8):
                mine = (r.top_k_index == e).any(dim=1)
                act = swiglu(layers[index].experts, e, r.hidden[mine]).abs()
                np.testing.assert_allclose(g["l1_mass"][e], act.double().sum(0).numpy(), rtol=1e-4, atol=1e-5)
                # "hot": among the top quarter of the expert's neurons for that token (as hot_rate counts it).
                hot = top_fraction_mask(act.numpy(), 0.25).sum(axis=0)
                assert g["hot_count"][e].sum() == 8 * routed[e]  # exactly a quarter of 32 neurons per token
                assert np.abs(g["hot_count"][e] - hot).max() <= 1, (index, e)  # rounding at the threshold only


def test_metadata(profiled, family: str) -> None:
    p = profiled(family)
    with h5py.File(p.path, "r") as h5:
        meta = {k: h5_attr(v) for k, v in h5.attrs.items()}
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["prism_version"] == __version__
    assert meta["model"] == p.loaded.name and meta["model_type"] == family
    assert meta["config_hash"] == config_fingerprint(load_config(p.loaded.name))
    assert re.fullmatch(r"[0-9a-f]{16}", meta["weights_hash"])
    assert meta["data"] == "builtin:calibration" and meta["data_hash"] == text_hash(p.text)
    assert (meta["tokens"], meta["seq_len"], meta["seed"], meta["max_rows"]) == (2048, 32, 0, 256)
    assert meta["holdout_fraction"] == pytest.approx(0.2) and meta["row_dtype"] == "float32"
    assert (meta["num_experts"], meta["expert_width"], meta["hidden_size"], meta["top_k"]) == (8, 32, 64, 2)
    assert meta["layers"] == MOE_LAYERS.get(family, [0, 1])
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["created"])


def test_fit_and_heldout_are_disjoint(profiled, family: str) -> None:
    p = profiled(family)
    seq_len = p.settings.seq_len
    held_windows = holdout_mask(2048 // seq_len, p.settings.holdout_fraction, p.settings.seed)
    fit_tokens, held_tokens = set(), set()
    with h5py.File(p.path, "r") as h5:
        for layer in h5.attrs["layers"]:
            for e in range(8):
                group = h5[f"layers/{layer}/experts/{e}"]
                fit_tokens |= set(group["fit_token"][()].tolist())
                held_tokens |= set(group["heldout_token"][()].tolist())
    assert fit_tokens and held_tokens and not fit_tokens & held_tokens
    fit_seqs = {t // seq_len for t in fit_tokens}
    held_seqs = {t // seq_len for t in held_tokens}
    assert not fit_seqs & held_seqs
    # The held-out sequences are exactly the seeded share chosen by holdout_mask.
    assert held_seqs <= set(np.nonzero(held_windows)[0].tolist())
    assert fit_seqs <= set(np.nonzero(~held_windows)[0].tolist())
    assert all(0 <= t < 2048 for t in fit_tokens | held_tokens)


# --- the reservoirs -------------------------------------------------------------------------------


def offer_stream(res: Reservoir, n: int, batches: list[int]) -> None:
    """Offer stream elements 0..n-1 in the given batch sizes; row i is [i, i, i], weight i / 10."""
    start = 0
    for size in batches:
        idx = torch.arange(start, min(start + size, n))
        res.offer(idx[:, None].repeat(1, 3).float(), idx, idx.float() / 10)
        start += idx.numel()
    assert start == n


def test_reservoir_respects_capacity_and_keeps_rows_aligned() -> None:
    res = Reservoir(10, 3, torch.float32, np.random.default_rng(0))
    seen = 0
    for size in [3, 0, 5, 1, 20, 7, 64]:
        idx = torch.arange(seen, seen + size)
        res.offer(idx[:, None].repeat(1, 3).float(), idx, idx.float() / 10)
        seen += size
        assert res.seen == seen
        assert res.rows.shape == (min(10, seen), 3)
        tokens = res.tokens.tolist()
        assert len(set(tokens)) == len(tokens) and all(0 <= t < seen for t in tokens)
        torch.testing.assert_close(res.rows, res.tokens[:, None].repeat(1, 3).float())
        torch.testing.assert_close(res.weights, res.tokens.float() / 10)


def test_reservoir_zero_capacity_counts_but_keeps_nothing() -> None:
    res = Reservoir(0, 3, torch.float32, np.random.default_rng(0))
    offer_stream(res, 50, [20, 30])
    assert res.seen == 50 and res.rows.shape == (0, 3)


def test_reservoir_is_deterministic_and_batch_invariant() -> None:
    def sample(seed: int, batches: list[int]) -> list[int]:
        res = Reservoir(8, 3, torch.float32, np.random.default_rng(seed))
        offer_stream(res, 100, batches)
        return res.tokens.tolist()

    one_batch = sample(7, [100])
    assert sample(7, [100]) == one_batch
    # Algorithm R one row at a time and vectorised per batch draw the same slots.
    assert sample(7, [1] * 100) == one_batch
    assert sample(7, [3, 9, 40, 1, 47]) == one_batch
    assert sample(8, [100]) != one_batch


def test_reservoir_is_uniform() -> None:
    """Every stream element is kept with probability capacity / n, wherever it sits in the stream."""
    n, capacity, trials = 40, 8, 1000
    counts = np.zeros(n)
    batch_rng = np.random.default_rng(123)
    for seed in np.random.SeedSequence(99).spawn(trials):
        res = Reservoir(capacity, 3, torch.float32, np.random.default_rng(seed))
        cuts = np.sort(batch_rng.choice(np.arange(1, n), size=4, replace=False))
        offer_stream(res, n, np.diff(np.concatenate([[0], cuts, [n]])).tolist())
        counts[res.tokens.numpy()] += 1
    assert counts.sum() == trials * capacity
    expected = trials * capacity / n  # 200; binomial sd about 12.6
    assert np.abs(counts - expected).max() < 0.25 * expected, counts
    # No drift along the stream: the first and the last quarter are kept equally often.
    assert abs(counts[: n // 4].mean() - counts[-n // 4 :].mean()) < 0.08 * expected


def test_memory_bound_rows_do_not_grow_with_tokens(tiny_model_dir, tmp_path) -> None:
    loaded = load_model(str(tiny_model_dir("olmoe")))
    text, name = load_text(None, "calibration")
    counts = {}
    for tokens in (2048, 4096):
        settings = ProfileSettings(tokens=tokens, seq_len=32, max_rows=32, holdout_fraction=0.25, row_dtype="float32")
        out = tmp_path / f"profile-{tokens}.h5"
        profile_model(loaded, text, name, settings, out)
        with ProfileFile(out) as pf:
            fit, held = zip(*(pf.row_counts(layer) for layer in pf.layers), strict=True)
            routed = sum(int(pf.tokens_routed(layer).sum()) for layer in pf.layers)
        counts[tokens] = (np.concatenate(fit), np.concatenate(held), routed)
    for fit, held, _ in counts.values():
        assert fit.max() <= 24 and held.max() <= 8  # fit + held-out caps add up to --max-rows
    # Twice the tokens: twice the routed tokens, yet the full reservoirs keep exactly the cap.
    assert counts[4096][2] == 2 * counts[2048][2]
    assert np.all(counts[4096][0] == 24) and np.all(counts[4096][1] == 8)
    assert np.all(counts[4096][0] >= counts[2048][0])


# --- the short-data guard, Ctrl-C (the other bad input: tests/test_bad_input.py) ---------------------


def _short_text(tmp_path: Path, repeats: int) -> Path:
    """A text file of ``repeats`` copies of a phrase of about 22 tokens (of the tiny tokenizer)."""
    path = tmp_path / f"short-{repeats}.txt"
    path.write_text(" ".join(["It is a truth universally acknowledged"] * repeats) + "\n", encoding="utf-8")
    return path


def test_short_data_really_gives_one_window(tiny_model_dir, tmp_path) -> None:
    """Guard for the "profile-short-data" case of test_bad_input.py: the text must give exactly one 32-token window."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    text = _short_text(tmp_path, 2).read_text()
    assert token_windows(loaded.tokenizer, text, 32, 2048).shape[0] == 1


def test_ctrl_c_mid_run_leaves_nothing(cli, tiny_model_dir, tmp_path, monkeypatch) -> None:
    calls = {"record": 0}
    original = recorder_module.ActivationRecorder.record

    def record(self, *args, **kwargs):
        calls["record"] += 1
        if self._token_offset > 0:  # the second batch, inside the model's forward pass
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(recorder_module.ActivationRecorder, "record", record)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("profile", tiny_model_dir("olmoe"), *CLI_SETTINGS, "--batch-size", "4", "--out", out_dir / "profile.h5")
    assert result.code == 130, result
    assert calls["record"] > 1
    assert "Traceback" not in result.err
    # The progress bar may leave its last state; besides it, one line says what happened.
    lines = [line for line in result.err.splitlines() if line.strip() and not line.startswith("profiling")]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), result.err
    assert list(out_dir.iterdir()) == []


def test_interrupt_restores_the_model(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A library caller that catches the interrupt gets its model back unchanged, with no temp file left."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    before = loaded.model.config._experts_implementation

    def record(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder_module.ActivationRecorder, "record", record)
    text, name = load_text(None, "calibration")
    with pytest.raises(KeyboardInterrupt):
        profile_model(loaded, text, name, ProfileSettings(**SETTINGS), tmp_path / "profile.h5")
    assert list(tmp_path.iterdir()) == []
    assert loaded.model.config._experts_implementation == before
    layer = loaded.adapter.moe_layers(loaded.model)[0]
    assert not hasattr(layer.experts, "_prism_recorder")

