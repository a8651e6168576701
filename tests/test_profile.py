"""``prism profile``: recorded rows against an independent recomputation, statistics, metadata, the held-out
split, the row reservoirs and their memory bound, and Ctrl-C leaving nothing behind (bad input:
tests/test_bad_input.py)."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import h5_contents

from prism_cli import __version__
from prism_cli.data import load_text, text_hash
from prism_cli.data.windows import token_windows
from prism_cli.errors import Interrupted, PrismError
from prism_cli.io import h5_attr
from prism_cli.models.loading import LoadedModel, config_fingerprint, load_config, load_model
from prism_cli.profiling import recorder as recorder_module
from prism_cli.profiling import spill as spill_module
from prism_cli.profiling.budget import ProfileGeometry, forward_bytes, parse_size, plan_memory
from prism_cli.profiling.format import FORMAT, FORMAT_VERSION, ProfileFile
from prism_cli.profiling.heap import limit_kernel_cache
from prism_cli.profiling.profiler import ProfileSettings, holdout_mask, profile_model
from prism_cli.profiling.recorder import Reservoir, rng_state, set_rng_state
from prism_cli.profiling.spill import LayerSpill

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


def test_profile_cli_names_the_layers_it_profiles(cli, tiny_model_dir, tmp_path) -> None:
    """With --layers, the banner says which of the model's MoE layers run (it said "all 2 decoder layers")."""
    result = cli("profile", tiny_model_dir("olmoe"), *CLI_SETTINGS, "--layers", "1", "--out", tmp_path / "p.h5")
    assert result.code == 0, result
    assert "MoE layers: all 2 decoder layers; --layers profiles only 1" in result.out


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
                # "hot": among the 8 largest |a| of the expert's 32 neurons for that token. Oracle: each token's
                # neurons sorted by |a|, ranks 0..7 counted; exact, except that a token whose 8th and 9th values
                # nearly tie (the profiler's own |a| may round either way) gives those two neurons a slack of one.
                assert g["hot_count"][e].sum() == 8 * routed[e]  # exactly a quarter of 32 neurons per token
                hot, slack = np.zeros(act.shape[1], dtype=np.int64), np.zeros(act.shape[1], dtype=np.int64)
                for row in act.double().numpy():
                    order = sorted(range(row.size), key=lambda j: -row[j])
                    hot[order[:8]] += 1
                    if row[order[7]] - row[order[8]] <= 1e-5 * max(row[order[0]], 1e-30):
                        slack[order[7:9]] += 1
                assert slack.sum() <= 0.1 * max(int(routed[e]), 10), (index, e)  # near-ties are rare: the check is exact almost everywhere
                assert np.all(np.abs(g["hot_count"][e] - hot) <= slack), (index, e)


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


class Stored:
    """A reservoir plus the rows the caller stores for it: what ``offer``'s (slots, src) say to write."""

    def __init__(self, capacity: int, seed) -> None:
        self.res = Reservoir(capacity, np.random.default_rng(seed))
        self.rows = np.full((capacity, 3), -1.0)

    def offer(self, idx: np.ndarray) -> None:
        """Offer elements ``idx``: row i is [i, i, i], token i, weight i / 10."""
        slots, src = self.res.offer(idx, idx.astype(np.float32) / 10)
        assert np.all(np.diff(slots) > 0)  # distinct and ascending
        self.rows[slots] = idx[src][:, None]

    @property
    def tokens(self) -> np.ndarray:
        return self.res.tokens[: self.res.count]


def offer_stream(stored: Stored, n: int, batches: list[int]) -> None:
    """Offer stream elements 0..n-1 in the given batch sizes."""
    start = 0
    for size in batches:
        idx = np.arange(start, min(start + size, n))
        stored.offer(idx)
        start += idx.size
    assert start == n


def test_reservoir_respects_capacity_and_keeps_rows_aligned() -> None:
    stored = Stored(10, 0)
    seen = 0
    for size in [3, 0, 5, 1, 20, 7, 64]:
        stored.offer(np.arange(seen, seen + size))
        seen += size
        res = stored.res
        assert res.seen == seen and res.count == min(10, seen)
        tokens = stored.tokens.tolist()
        assert len(set(tokens)) == len(tokens) and all(0 <= t < seen for t in tokens)
        np.testing.assert_array_equal(stored.rows[: res.count], stored.tokens[:, None].repeat(3, axis=1))
        np.testing.assert_allclose(res.weights[: res.count], stored.tokens / 10, rtol=1e-6)


def test_reservoir_zero_capacity_counts_but_keeps_nothing() -> None:
    stored = Stored(0, 0)
    offer_stream(stored, 50, [20, 30])
    assert stored.res.seen == 50 and stored.res.count == 0


def test_reservoir_is_deterministic_and_batch_invariant() -> None:
    def sample(seed: int, batches: list[int]) -> list[int]:
        stored = Stored(8, seed)
        offer_stream(stored, 100, batches)
        np.testing.assert_array_equal(stored.rows[:, 0], stored.tokens)
        return stored.tokens.tolist()

    one_batch = sample(7, [100])
    assert sample(7, [100]) == one_batch
    # Algorithm R one row at a time and vectorised per batch draw the same slots.
    assert sample(7, [1] * 100) == one_batch
    assert sample(7, [3, 9, 40, 1, 47]) == one_batch
    assert sample(8, [100]) != one_batch


def test_reservoir_resumes_from_its_saved_state() -> None:
    """Saving the state mid-stream and continuing in a fresh reservoir draws exactly what one reservoir would."""
    whole = Stored(8, 5)
    offer_stream(whole, 100, [30, 70])
    first = Stored(8, 5)
    offer_stream(first, 30, [30])
    saved = (first.res.tokens.copy(), first.res.weights.copy(), first.res.count, first.res.seen, rng_state(first.res.rng))
    second = Stored(8, 999)  # another seed: everything must come from the saved state
    second.res.tokens[:], second.res.weights[:], second.res.count, second.res.seen = saved[:4]
    set_rng_state(second.res.rng, saved[4])
    second.rows = first.rows.copy()
    second.offer(np.arange(30, 100))
    np.testing.assert_array_equal(second.tokens, whole.tokens)
    np.testing.assert_array_equal(second.rows, whole.rows)


def test_reservoir_is_uniform() -> None:
    """Every stream element is kept with probability capacity / n, wherever it sits in the stream."""
    n, capacity, trials = 40, 8, 1000
    counts = np.zeros(n)
    batch_rng = np.random.default_rng(123)
    for seed in np.random.SeedSequence(99).spawn(trials):
        stored = Stored(capacity, seed)
        cuts = np.sort(batch_rng.choice(np.arange(1, n), size=4, replace=False))
        offer_stream(stored, n, np.diff(np.concatenate([[0], cuts, [n]])).tolist())
        counts[stored.tokens] += 1
    assert counts.sum() == trials * capacity
    expected = trials * capacity / n  # 200; binomial sd about 12.6
    assert np.abs(counts - expected).max() < 0.25 * expected, counts
    # No drift along the stream: the first and the last quarter are kept equally often.
    assert abs(counts[: n // 4].mean() - counts[-n // 4 :].mean()) < 0.08 * expected


_HEAP_SCENARIO = """
import sys
from prism_cli.profiling.heap import release_free_heap

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

big, pins = [], []
for _ in range(3000):
    big.append(bytearray(64 * 1024))
    pins.append(bytearray(1024))
del big
held = rss()
if not release_free_heap():
    sys.exit(3)
print(held, rss(), len(pins))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs procfs")
def test_release_free_heap_returns_freed_fragments_to_the_system() -> None:
    # In a fresh process (a long-lived one's heap layout depends on everything it did before): 3,000
    # blocks of 64 KiB (below glibc's mmap threshold: they come from the heap) pinned apart by small live
    # blocks, so freeing them leaves holes that glibc does not give back by itself.
    run = subprocess.run([sys.executable, "-c", _HEAP_SCENARIO], capture_output=True, text=True, timeout=120)
    if run.returncode == 3:
        pytest.skip("this C library has no malloc_trim")
    assert run.returncode == 0, run.stderr
    held, after, pins = (int(v) for v in run.stdout.split())
    assert held - after > 100 * 2**20  # about 190 MiB were freed; most of it must leave the process
    assert pins == 3000


def test_limit_kernel_cache_keeps_a_value_the_user_set(monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    limit_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    limit_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


def test_memory_bound_rows_do_not_grow_with_tokens(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
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
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"  # a kernel per expert shape is not cached


# --- the short-data guard, Ctrl-C (the other bad input: tests/test_bad_input.py) ---------------------


def _short_text(tmp_path: Path, repeats: int) -> Path:
    """A text file of ``repeats`` copies of a phrase of about 22 tokens (of the tiny tokenizer)."""
    path = tmp_path / f"short-{repeats}.txt"
    path.write_text(" ".join(["It is a truth universally acknowledged"] * repeats) + "\n", encoding="utf-8")
    return path


def test_resume_through_the_cli(cli, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A leftover work folder: refused without --resume, refused with other settings (naming the
    difference), continued with the same ones; the estimate and the measured numbers are printed."""
    model, out = tiny_model_dir("olmoe"), tmp_path / "profile.h5"
    with monkeypatch.context() as patch:
        def record(self, *args):
            raise KeyboardInterrupt

        patch.setattr(recorder_module.ActivationRecorder, "record", record)
        assert cli("profile", model, *CLI_SETTINGS, "--out", out).code == 130
    cli("profile", model, *CLI_SETTINGS, "--out", out).assert_one_line_error("profile.h5.partial", "--resume")
    cli("profile", model, *CLI_SETTINGS, "--seed", "3", "--resume", "--out", out).assert_one_line_error(
        "--resume", "seed = 0, this run has 3")
    result = cli("profile", model, *CLI_SETTINGS, "--resume", "--out", out)
    assert result.code == 0, result
    text = " ".join(result.out.split())
    assert text.startswith("resuming") and "memory (estimate)" in text and "disk (estimate)" in text
    assert "measured: peak RSS" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.h5"]


@contextlib.contextmanager
def _stopped_at_batch_2(monkeypatch) -> Iterator[None]:
    """Ctrl-C when the profiler records batch 2, after two checkpointed batches."""
    original = recorder_module.ActivationRecorder.record

    def record(self, *args):
        if self._batch == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(recorder_module.ActivationRecorder, "record", record)
        yield


def test_resume_refuses_a_truncated_row_file(cli, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A row file cut short after a checkpoint (a full disk, a user): --resume refuses in one line naming
    the file and both row counts, before the plan is printed, and keeps refusing (opening the file must not
    extend it with zeros that would pass for rows); a file longer than its checkpoint needs is fine."""
    model, out = tiny_model_dir("olmoe"), tmp_path / "profile.h5"
    settings = [*CLI_SETTINGS, "--checkpoint-every", "1e-9", "--out", out]
    with _stopped_at_batch_2(monkeypatch):
        assert cli("profile", model, *settings).code == 130
    rows = tmp_path / "profile.h5.partial" / "layer0.rows"
    full = rows.stat().st_size
    row_bytes = 4 * load_config(model).intermediate_size  # float32 rows of one expert's width
    with open(rows, "r+b") as fh:
        fh.truncate(3 * row_bytes + 5)  # a partial row counts as missing
    for _ in range(2):
        result = cli("profile", model, *settings, "--resume")
        line = result.assert_one_line_error("profile.h5.partial", "layer0.rows holds 3 rows", "layer 0 records",
                                            "delete the folder")
        assert line.startswith("error:") and "resuming" not in result.out  # refused before the plan
        assert rows.stat().st_size == 3 * row_bytes + 5
    with open(rows, "r+b") as fh:
        fh.truncate(full + 7 * row_bytes)  # longer than recorded: the extra rows are unwritten slots
    result = cli("profile", model, *settings, "--resume")
    assert result.code == 0, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.h5"]


def test_short_data_really_gives_one_window(tiny_model_dir, tmp_path) -> None:
    """Guard for the "profile-short-data" case of test_bad_input.py: the text must give exactly one 32-token window."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    text = _short_text(tmp_path, 2).read_text()
    assert token_windows(loaded.tokenizer, text, 32, 2048).shape[0] == 1


def test_ctrl_c_mid_run_keeps_resumable_progress_only(cli, tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Ctrl-C: no profile, the work folder kept, one line naming it and --resume (exit 130)."""
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
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "--resume" in lines[0], result.err
    assert [p.name for p in out_dir.iterdir()] == ["profile.h5.partial"]


def test_interrupt_restores_the_model(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A library caller that catches the interrupt gets its model back unchanged, with no temp file left."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    before = loaded.model.config._experts_implementation

    def record(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder_module.ActivationRecorder, "record", record)
    text, name = load_text(None, "calibration")
    with pytest.raises(Interrupted, match="--resume"):
        profile_model(loaded, text, name, ProfileSettings(**SETTINGS), tmp_path / "profile.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["profile.h5.partial"]
    assert loaded.model.config._experts_implementation == before
    layer = loaded.adapter.moe_layers(loaded.model)[0]
    assert not hasattr(layer.experts, "_prism_recorder")
    assert not layer.block._forward_hooks  # the hook that stops the forward pass is gone too


# --- bounded memory, passes and resume ---------------------------------------------------------------


def profile_data(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Root attributes (less the timestamp) and every dataset of a profile."""
    return h5_contents(path)


def assert_same_profile(a: Path, b: Path) -> None:
    attrs_a, data_a = profile_data(a)
    attrs_b, data_b = profile_data(b)
    assert attrs_a == attrs_b
    assert sorted(data_a) == sorted(data_b)
    for name, value in data_a.items():
        assert value.dtype == data_b[name].dtype, name
        np.testing.assert_array_equal(value, data_b[name], err_msg=name)


@pytest.fixture(scope="module")
def olmoe_run(tiny_model_dir, tmp_path_factory):
    """The tiny OLMoE, its calibration text, and an uninterrupted profile with the default budget."""
    loaded = load_model(str(tiny_model_dir("olmoe")))
    text, name = load_text(None, "calibration")
    path = tmp_path_factory.mktemp("reference") / "profile.h5"
    profile_model(loaded, text, name, ProfileSettings(**SETTINGS), path)
    return loaded, text, name, path


def geometry_of(loaded: LoadedModel, **overrides) -> ProfileGeometry:
    a = loaded.adapter
    # Activations of a batch of 8 x 32 tokens: 24 float32 copies of hidden 64, 3 of the scores of 4 heads.
    forward = 24 * 8 * 32 * 64 * 4 + 3 * 8 * 4 * 32 * 32 * 4
    values = dict(num_experts=a.num_experts, width=a.width, top_k=a.top_k, n_layers=2, max_rows=SETTINGS["max_rows"],
                  holdout_fraction=0.2, row_bytes=4, forward_bytes=forward)
    return ProfileGeometry(**{**values, **overrides})


def test_several_passes_and_a_small_buffer_give_the_same_profile(olmoe_run, tmp_path, monkeypatch) -> None:
    loaded, text, name, reference = olmoe_run
    geometry = geometry_of(loaded)
    budget = geometry.minimum_budget + geometry.layer_state_bytes // 2  # one layer per pass, a tiny buffer
    plan = plan_memory(geometry, budget)
    assert (plan.passes, plan.layers_per_pass) == (2, 1)
    # The buffered rows never exceed the buffer (one reservoir here), which forces many checkpoints.
    seen = {"max": 0}
    spills: list[LayerSpill] = []
    original = LayerSpill.write

    def write(self, *args):
        original(self, *args)
        if self not in spills:
            spills.append(self)
        seen["max"] = max(seen["max"], sum(s.pending_rows for s in spills if s._fd >= 0))

    monkeypatch.setattr(LayerSpill, "write", write)
    starts = []
    summary = profile_model(loaded, text, name, ProfileSettings(**SETTINGS, max_memory=budget), tmp_path / "p.h5",
                            on_start=starts.append)
    assert starts[0].memory == plan and starts[0].total_tokens == 2 * 2048
    assert 0 < seen["max"] <= max(geometry.max_rows, plan.buffer_bytes // (geometry.row_size + 8))
    assert summary.checkpoints > 10
    assert_same_profile(reference, tmp_path / "p.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]  # the work folder is gone


@pytest.mark.parametrize("where", ["mid-layer", "between-batches", "before-journal-applied"])
def test_interrupted_and_resumed_gives_the_same_profile(olmoe_run, tmp_path, monkeypatch, where: str) -> None:
    """Interrupt a run (after some checkpoints), resume it: the very file an uninterrupted run writes."""
    loaded, text, name, reference = olmoe_run
    geometry = geometry_of(loaded)
    settings = ProfileSettings(**SETTINGS, max_memory=geometry.minimum_budget * 3, checkpoint_seconds=1e-9)
    out = tmp_path / "p.h5"
    with monkeypatch.context() as patch:
        if where == "before-journal-applied":
            # Die right after a state is renamed into place, before its journal reaches the row file.
            calls = {"n": 0}
            original = spill_module.fsync_dir

            def fsync_dir(folder):
                original(folder)
                calls["n"] += 1
                if calls["n"] == 9:
                    raise KeyboardInterrupt

            patch.setattr(spill_module, "fsync_dir", fsync_dir)
        else:
            original = recorder_module.ActivationRecorder.record

            def record(self, layer, expert, *args):
                if self._batch == 4 and (layer == 1 and expert >= 3 if where == "mid-layer" else layer == 0):
                    raise KeyboardInterrupt
                return original(self, layer, expert, *args)

            patch.setattr(recorder_module.ActivationRecorder, "record", record)
        with pytest.raises(Interrupted):
            profile_model(loaded, text, name, settings, out)
    work = tmp_path / "p.h5.partial"
    assert not out.exists() and any(work.glob("layer1.state.npz"))
    if where == "before-journal-applied":
        assert any(work.glob("layer*.journal*"))
    with pytest.raises(PrismError, match="--resume"):  # a fresh run does not discard the work
        profile_model(loaded, text, name, settings, out)
    resumed = []
    profile_model(loaded, text, name, settings, out, resume=True, on_start=resumed.append)
    assert resumed[0].resumed
    assert_same_profile(reference, out)
    assert not work.exists()


def test_resume_refuses_other_settings_naming_the_difference(olmoe_run, tmp_path, monkeypatch) -> None:
    loaded, text, name, _ = olmoe_run
    settings = ProfileSettings(**SETTINGS, checkpoint_seconds=1e-9)
    with _stopped_at_batch_2(monkeypatch):
        with pytest.raises(Interrupted):
            profile_model(loaded, text, name, settings, tmp_path / "p.h5")
    other = ProfileSettings(**{**SETTINGS, "max_rows": 128})
    with pytest.raises(PrismError, match=r"max_rows = 256, this run has 128"):
        profile_model(loaded, text, name, other, tmp_path / "p.h5", resume=True)
    with pytest.raises(PrismError, match=r"data_hash"):
        profile_model(loaded, text[:200_000], name, settings, tmp_path / "p.h5", resume=True)
    # A damaged checkpoint is refused in one line.
    state = tmp_path / "p.h5.partial" / "layer0.state.npz"
    state.write_bytes(b"garbage")
    with pytest.raises(PrismError, match="layer 0 is damaged"):
        profile_model(loaded, text, name, settings, tmp_path / "p.h5", resume=True)
    np.savez(state, fit_count=np.array([object()], dtype=object))  # pickled objects: never advise loading them
    with pytest.raises(PrismError, match=r"layer 0 is damaged \(it holds pickled objects, which prism never writes\)") as exc:
        profile_model(loaded, text, name, settings, tmp_path / "p.h5", resume=True)
    assert "allow_pickle" not in str(exc.value)
    # --resume with nothing to resume starts from the beginning.
    profile_model(loaded, text, name, settings, tmp_path / "fresh.h5", resume=True)
    assert (tmp_path / "fresh.h5").exists()


def test_layer_seeds_do_not_depend_on_the_layers_profiled(olmoe_run, tmp_path) -> None:
    """Profiling layer 1 alone samples exactly the rows it samples when every layer is profiled."""
    loaded, text, name, reference = olmoe_run
    profile_model(loaded, text, name, ProfileSettings(**{**SETTINGS, "layers": [1]}), tmp_path / "one.h5")
    _, whole = profile_data(reference)
    _, one = profile_data(tmp_path / "one.h5")
    assert sorted(one) == sorted(k for k in whole if k.startswith("layers/1/"))
    for key, value in one.items():
        np.testing.assert_array_equal(value, whole[key], err_msg=key)


def test_memory_plan_by_hand() -> None:
    """Sizes of a hand-computed case: E = 4, I = 8, 10 rows (8 fit + 2 held-out), float16 rows."""
    g = ProfileGeometry(num_experts=4, width=8, top_k=2, n_layers=6, max_rows=10, holdout_fraction=0.2, row_bytes=2,
                        forward_bytes=1000)
    assert g.caps == (8, 2)
    assert g.reservoir_bytes == 10 * 8 * 2
    assert g.layer_state_bytes == 4 * (16 + 16 * 8) + 4 * 10 * 12 + 8 * 1536
    assert g.minimum_budget == 1000 + g.layer_state_bytes + 320
    assert forward_bytes(8, 32, 64, 4, 4) == 24 * 256 * 64 * 4 + 3 * 8 * 4 * 1024 * 4
    # 100 tokens x top-2 / 4 experts = 50 routed per expert: 40 fit, 10 held-out, capped at 8 and 2.
    assert g.expected_rows(100) == (8, 2)
    assert g.expected_rows(10) == pytest.approx((4.0, 1.0))
    big = plan_memory(g, 100 * g.layer_state_bytes)
    assert (big.passes, big.layers_per_pass) == (1, 6)
    three = plan_memory(g, 1000 + 5 * g.layer_state_bytes)  # 2 layers fit half the rest: 3 passes of 2
    assert (three.passes, three.layers_per_pass) == (3, 2)
    assert three.buffer_bytes == 5 * g.layer_state_bytes - 2 * g.layer_state_bytes - 160
    with pytest.raises(PrismError, match="minimum"):
        plan_memory(g, g.minimum_budget - 1)


@pytest.mark.parametrize("text, value", [("8G", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                          ("2000", 2000), ("64k", 65536)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bounded_memory_loading_gives_the_same_model(tiny_model_dir, family: str) -> None:
    """`prism profile` loads through lazily read tensors (a lower peak): the very weights the default loader gives."""
    default = load_model(str(tiny_model_dir(family)))
    bounded = load_model(str(tiny_model_dir(family)), bounded_memory=True)
    a, b = default.model.state_dict(), bounded.model.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert bounded.model.config._name_or_path == default.model.config._name_or_path
