"""Offloading (prism_cli.offload): budgets, cache policies, links, the offload executor, traces and replays.

Oracles: hand-computed sizes and arrival times, brute-force reference caches, the model run without
offloading (the grouped executor: another code path), and the published DeepSeek-V2-Lite dimensions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FULL, N_SUB, random_neurons_export, token_batch

from prism_cli.errors import PrismError
from prism_cli.offload.cache import CACHE_POLICIES, PieceCache
from prism_cli.offload.config import LinkSpec, OffloadConfig, parse_budget, parse_link, parse_list, parse_size
from prism_cli.offload.executor import attach_offload, detach_offload, pinned_keys, run_pieces
from prism_cli.offload.link import SimulatedLink, VirtualClock
from prism_cli.runtime.elastic import set_operating_point
from prism_cli.runtime.experts import reset_dispatch_counts

# ---------------------------------------------------------------------------------------------
# Budgets and links.


@pytest.mark.parametrize(("text", "want"), [("4GB", 4 * 10**9), ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20),
                                            ("1.5GB", 1_500_000_000), ("64kB", 64_000), ("100B", 100), ("2 gb", 2 * 10**9)])
def test_sizes_are_read_with_their_units(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["4", "GB", "-1GB", "4 parsecs", ""])
def test_sizes_without_a_unit_are_refused(text):
    with pytest.raises(PrismError, match="unit"):
        parse_size(text)


def test_decimal_sizes_are_exact_and_bits_are_not_bytes():
    """``4.1GB`` became 4,099,999,999 bytes (``int`` of 4.1e9 in floating point), so ``4.1GB,4100MB`` passed as
    two budgets; ``25Gb/s`` (gigabits) read as 25 GB/s, a link 8x too fast."""
    assert parse_size("4.1GB") == parse_size("4100MB") == 4_100_000_000
    for text, hint in (("25Gb", "25GB"), ("2Mb", "2MB"), ("1GiB", None)):
        if hint is None:
            assert parse_size(text) == 2**30
            continue
        with pytest.raises(PrismError, match=f"in bits .*give bytes, e.g. {hint}"):
            parse_size(text)
    with pytest.raises(PrismError, match="in bits"):
        parse_link("25Gb/s")


@pytest.mark.parametrize("text", ["1e400GB", "1e400GB@deepseek-v2-lite", "1e30GB", 2**64])
def test_infinite_or_absurd_sizes_are_refused_in_one_line(text):
    """``1e400GB`` reads as infinity, which ``int()`` cannot take (it was an OverflowError)."""
    with pytest.raises(PrismError, match="too large"):
        parse_budget(text)
    if isinstance(text, str) and "@" not in text:
        with pytest.raises(PrismError, match="too large"):
            parse_link(f"{text}/s")


def test_infinite_device_memory_is_one_line(cli, export_dir):
    cli("eval", export_dir, "--tokens", "64", "--device-memory", "1e400GB").assert_one_line_error("too large")
    cli("offload-bench", export_dir, "--device-memory", "1e400GB", "--points", "topk:2").assert_one_line_error("too large")


def test_relative_budgets():
    assert parse_budget("45%").expert_fraction == pytest.approx(0.45)
    assert parse_budget("4GB").nbytes == 4 * 10**9
    with pytest.raises(PrismError, match=r"'120%' must be between 0% and 100%"):
        parse_budget("120%")
    with pytest.raises(PrismError, match="unknown model shape"):
        parse_budget("16GB@no-such-model")


def test_deepseek_v2_lite_shape_matches_its_published_dimensions():
    """27 layers (the first dense), 64 routed experts of width 1408 at hidden 2048: 15.7 B parameters."""
    from prism_cli.offload.shapes import SHAPES

    shape = SHAPES.get("deepseek-v2-lite")
    assert shape.expert_bytes() == 2 * 26 * 64 * 3 * 2048 * 1408
    total = (shape.expert_bytes() + shape.non_expert_bytes()) / 2
    assert 15.6e9 < total < 15.8e9
    frac = parse_budget("16GB@deepseek-v2-lite").expert_fraction
    assert frac == pytest.approx((16e9 * 0.95 - shape.non_expert_bytes()) / shape.expert_bytes())
    # The reserve the run keeps is the one the shape's budget leaves out (it was always the default 5 %).
    for reserve, kept in (("20%", 16e9 * 0.2), ("1GB", 1e9)):
        frac = OffloadConfig("16GB@deepseek-v2-lite", reserve=reserve).budget.expert_fraction
        assert frac == pytest.approx((16e9 - kept - shape.non_expert_bytes()) / shape.expert_bytes())
    assert shape.expert_unit_bytes(4) * 4 == shape.expert_unit_bytes(1)


def test_list_options_refuse_empty_lists_and_items():
    assert parse_list(" lru , lfu", "--policy", "lru") == ["lru", "lfu"]
    for text in ("", " , ", "lru,,lfu", "lru,"):
        with pytest.raises(PrismError, match="--policy"):
            parse_list(text, "--policy", "lru")


def test_a_damaged_trace_is_refused_naming_the_problem(tmp_path):
    from prism_cli.offload.trace import TRACE_FORMAT_VERSION, RoutingTrace

    meta = {"format_version": TRACE_FORMAT_VERSION, "sub_experts": 2, "num_experts": 4, "top_k": 1}
    experts, weights, scores = np.zeros((2, 3, 1), np.int32), np.ones((2, 3, 1), np.float32), np.ones((2, 3, 1, 2), np.float32)

    def load(**change: np.ndarray) -> RoutingTrace:
        arrays = {"experts": experts, "weights": weights, "scores": scores, "pred_experts": experts[1:],
                  "pred_weights": weights[1:], "pred_scores": scores[1:], **change}
        RoutingTrace(**arrays, meta=meta).save(tmp_path / "t.npz")
        return RoutingTrace.load(tmp_path / "t.npz")

    assert load().tokens == 3
    with pytest.raises(PrismError, match="expert id 4, outside 0..3"):
        load(pred_experts=experts[1:] + 4)
    with pytest.raises(PrismError, match="expert id -1"):
        load(experts=experts - 1)
    with pytest.raises(PrismError, match="scores hold NaN"):
        load(scores=scores * np.nan)
    with pytest.raises(PrismError, match="no routing"):
        load(experts=experts[:, :0], weights=weights[:, :0], scores=scores[:, :0])
    with pytest.raises(PrismError, match="is a folder"):
        RoutingTrace.load(tmp_path)


def test_links_are_read_and_charged():
    link = parse_link("25GB/s,5us")
    assert link.bandwidth == 25e9 and link.latency == pytest.approx(5e-6)
    assert parse_link("1GiB/s") == LinkSpec(float(2**30), LinkSpec.latency)
    for bad, named in (("fast", "link 'fast'"), ("25GB,5us", "link '25GB,5us'"), ("25GB/s,5 fortnights", "link latency '5 fortnights'")):
        with pytest.raises(PrismError, match=f"cannot read the {named}"):
            parse_link(bad)
    assert parse_link("1B/s").bandwidth == 1.0
    assert parse_link("25GB/s,1E3us").latency == pytest.approx(1e-3) and parse_link("1GB/s,1s").latency == 1.0
    for slow in ("25GB/s,1e400s", "25GB/s,1e300s", "25GB/s,1.5s"):  # infinity made every timing NaN, exit 0
        with pytest.raises(PrismError, match="link latency .* is too large: give at most 1 s per copy"):
            parse_link(slow)
    for slow in ("0.5B/s", "1e-12GB/s"):  # whole bytes: read as 0 B/s, which was called "not positive"
        with pytest.raises(PrismError, match="at least 1 B/s"):
            parse_link(slow)
    assert LinkSpec(1e9, 1e-3).seconds(10**6, copies=2) == pytest.approx(2e-3 + 1e-3)


def test_offload_config_refuses_unknown_policies_listing_the_known():
    with pytest.raises(PrismError, match="known: lru, lfu, prefetch"):
        OffloadConfig("4GB", policy="fifo")
    with pytest.raises(PrismError, match=r"pin must be a fraction of the cache in \[0, 1\), got 1.0"):
        OffloadConfig("4GB", pin=1.0)


# ---------------------------------------------------------------------------------------------
# Cache policies against brute-force references.


def _reference(policy: str, capacity: int, requests: list[int]) -> list[bool]:
    """Hit (True) / miss per request of a plain-list cache: LRU by last use; LFU by uses since insertion,
    then last use."""
    resident: dict[int, list[int]] = {}  # key -> [uses, last use]
    hits = []
    for t, key in enumerate(requests):
        if key in resident:
            resident[key][0] += 1
            resident[key][1] = t
            hits.append(True)
            continue
        hits.append(False)
        if len(resident) == capacity:
            rank = (lambda k: resident[k][1]) if policy == "lru" else (lambda k: (resident[k][0], resident[k][1]))
            del resident[min(resident, key=rank)]
        resident[key] = [1, t]
    return hits


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_policies_match_a_brute_force_cache(policy):
    rng = random.Random(3)
    requests = [min(int(rng.expovariate(0.15)), 40) for _ in range(3000)]
    cache = PieceCache(7, policy)
    got = []
    for key in requests:
        _, misses = cache.acquire([key])
        cache.release([key])
        got.append(not misses)
    assert got == _reference(policy, 7, requests)
    assert cache.stats.hits == sum(got) and cache.stats.requests == len(requests)


def test_locked_and_pinned_pieces_are_never_evicted():
    cache = PieceCache(4, "lru", pinned=[100])
    slots, misses = cache.acquire([1, 2, 3])  # fills the three free slots, all locked
    assert misses == [0, 1, 2] and len(set(slots)) == 3 and cache.slot_of[100] not in slots
    with pytest.raises(PrismError, match="cache of 4 slots cannot hold one step's pieces"):
        cache.acquire([4])  # every evictable slot is locked by the step in flight
    cache.release([1, 2, 3])
    cache.acquire([1])  # 1 becomes most recent; 2 is the LRU victim
    cache.release([1])
    _, misses = cache.acquire([4])
    assert misses == [0] and 2 not in cache.slot_of and 100 in cache.slot_of
    _, misses = cache.acquire([100])
    assert misses == [] and cache.stats.hits == 2


def test_prefetch_inserts_without_locking_and_is_scored():
    cache = PieceCache(3, "prefetch")
    assert CACHE_POLICIES.get("prefetch").prefetch
    assert [k for k, _ in cache.prefetch([5, 6])] == [5, 6]
    cache.note_prediction([5, 6], [5, 7])
    _, misses = cache.acquire([5, 7])
    assert misses == [1]
    assert cache.stats.prefetch_used == 1 and cache.stats.prefetched == 2
    assert cache.stats.prediction_precision == 0.5 and cache.stats.prediction_recall == 0.5


def test_prefetch_never_evicts_what_it_predicted():
    """A 3-slot LRU holds 0, 1, 2 (0 oldest); the next step is predicted to need 0 and 3: fetching 3 evicted 0,
    a miss of a hit. Now 1 goes (the oldest not predicted). And a prefetch of more keys than there is room
    for stops when the room is used, instead of evicting its own fetches (2 slots locked, 2 free)."""
    cache = PieceCache(3, "prefetch")
    cache.acquire([0, 1, 2])
    cache.release([0, 1, 2])
    assert cache.prefetch([0, 3]) == [(3, 1)]  # 3 takes key 1's slot
    assert sorted(cache.slot_of) == [0, 2, 3]
    _, misses = cache.acquire([0, 3])
    assert misses == [] and cache.stats.prefetch_used == 1
    busy = PieceCache(4, "prefetch")
    busy.acquire([0, 1])
    fetched = busy.prefetch([10, 11, 12, 13])
    assert [k for k, _ in fetched] == [10, 11] and busy.stats.evictions == 0 and busy.stats.prefetched == 2


def test_pinned_pieces_follow_the_partitions_mass_order():
    # sub-expert 0 of every expert of every layer first, then sub-expert 1 ...
    # two layers of two experts (groups = 8 pieces per layer): keys layer * 8 + e * 4 + n
    assert pinned_keys(layers=2, groups=8, n_sub=4, count=5) == [0, 4, 8, 12, 1]


# ---------------------------------------------------------------------------------------------
# The simulated link and the schedule of a step.


def test_simulated_link_charges_copies_serially_and_waits():
    clock = VirtualClock()
    link = SimulatedLink(LinkSpec(1e9, 1e-3), clock)  # 1 MB takes 1 ms, plus 1 ms per copy
    assert link.charge(slot=0, nbytes=10**6, copies=1) == pytest.approx(2e-3)
    assert link.charge(slot=1, nbytes=10**6, copies=2) == pytest.approx(2e-3 + 3e-3)  # queued behind the first
    clock.advance(1e-3)
    link.wait(0)
    assert clock.now() == pytest.approx(2e-3) and link.stats.stall_s == pytest.approx(1e-3)
    clock.advance(10e-3)
    link.wait(1)  # landed long ago: no stall
    assert link.stats.stall_s == pytest.approx(1e-3) and link.stats.bytes == 2 * 10**6 and link.stats.copies == 3


def test_a_paused_link_keeps_its_transfers_in_flight():
    clock = VirtualClock()
    link = SimulatedLink(LinkSpec(1e9, 0.0), clock)
    link.charge(0, 10**6)  # lands at 1 ms
    clock.advance(0.5e-3)
    link.pause()
    clock.advance(100e-3)  # another model runs
    link.resume()
    link.wait(0)
    assert link.stats.stall_s == pytest.approx(0.5e-3)


def test_run_pieces_computes_hits_first_then_misses_and_splits_big_demands():
    cache = PieceCache(3, "lru")
    link = SimulatedLink(LinkSpec(1e9, 0.0), VirtualClock())
    cache.acquire([2])
    cache.release([2])
    copied, order = [], []
    run_pieces(cache, link, [1, 2, 3], lambda k, s: copied.append(k), lambda g, s: order.extend(g))
    assert copied == [1, 3] and order == [1, 0, 2]  # piece 1 (key 2) was resident
    order.clear()
    run_pieces(cache, link, [4, 5, 6, 7, 8], lambda k, s: None, lambda g, s: order.extend(g))
    assert sorted(order) == [0, 1, 2, 3, 4] and order == [0, 1, 2, 3, 4]  # more than 3 slots: in chunks, in order


# ---------------------------------------------------------------------------------------------
# The offload executor on a tiny export: the same outputs as without offloading.


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("offload"), seed=5)


@pytest.fixture(scope="module")
def elastic(export_dir):
    import prism_cli

    return prism_cli.load_elastic(str(export_dir), operating_point=f"topk:{FULL}")


@torch.inference_mode()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("point", ["topk:3", "linear:5", "pattern:4,1", "threshold:0.8", f"topk:{FULL}"])
def test_offloaded_export_equals_the_export(elastic, point):
    ids = token_batch(seed=1)
    set_operating_point(elastic, point)
    want = _logits(elastic, ids)
    outputs = []
    for policy, budget, materialize in [("lru", "20%", True), ("lfu", "35%", False), ("prefetch", "20%", False)]:
        attach_offload(elastic, OffloadConfig(budget, policy=policy, materialize=materialize, pin=0.1))
        reset_dispatch_counts()
        outputs.append(_logits(elastic, ids))
        assert reset_dispatch_counts()["offload"] > 0
        detach_offload(elastic)
    for got in outputs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, outputs[0])  # whatever the cache held: pieces are summed in one fixed order


def test_load_elastic_offloads_on_the_device_it_loads_for(export_dir):
    import prism_cli

    config = OffloadConfig("30%")  # no device: the one load_elastic is given (cpu here)
    model = prism_cli.load_elastic(str(export_dir), operating_point="topk:5", offload=config)
    assert model.prism_offload.device == torch.device("cpu") and model.prism_offload.config.simulated
    assert config.device is None  # the caller's config is left as it was


def test_an_offloaded_model_runs_outside_no_grad_and_refuses_a_backward(export_dir):
    """A plain forward (autograd recording) runs as for inference; a backward, which could not reach the
    experts' weights in host memory, is one error instead of a silently wrong gradient."""
    import prism_cli

    model = prism_cli.load_elastic(str(export_dir), operating_point="topk:5", offload=OffloadConfig("30%"))
    ids = token_batch(seed=2)
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, _logits(model, ids))
    with pytest.raises(PrismError, match="offloaded experts have no backward"):
        out.loss.backward()


def test_offloaded_whole_experts_equal_the_plain_model_bitwise(tiny_model_dir):
    from prism_cli.models.loading import load_model
    from prism_cli.runtime.elastic import attach_elastic_state

    model = load_model(str(tiny_model_dir("olmoe")), experts_implementation="prism").model
    attach_elastic_state(model, None)
    ids = token_batch(seed=2)
    want = _logits(model, ids)
    controller = attach_offload(model, OffloadConfig("30%", policy="lru", materialize=True))
    got = _logits(model, ids)
    assert controller.n_sub == 1 and controller.cache.stats.misses > 0
    assert torch.equal(got, want)


@torch.inference_mode()
def test_offloaded_decoding_generates_the_same_tokens(elastic):
    """Offloaded greedy decoding equals the plain model's; the prediction precision and recall equal a count
    over the (predicted, needed) pieces of every step, recorded by a hook on the cache."""
    set_operating_point(elastic, "topk:5")
    prompt = token_batch(seed=4, batch=1, length=12)
    want = elastic.generate(prompt, max_new_tokens=8, do_sample=False)
    controller = attach_offload(elastic, OffloadConfig("25%", policy="prefetch"))
    seen = []
    note = controller.cache.note_prediction
    controller.cache.note_prediction = lambda predicted, needed: (seen.append((list(predicted), list(needed))), note(predicted, needed))
    got = elastic.generate(prompt, max_new_tokens=8, do_sample=False)
    stats = controller.cache.stats
    detach_offload(elastic)
    assert torch.equal(got, want)
    assert seen and stats.prefetched > 0
    right = sum(len(set(p) & set(n)) for p, n in seen)
    assert 0 < right < sum(len(p) for p, _ in seen)  # some predictions right, some wrong: the ratio is not trivial
    assert stats.prediction_precision == right / sum(len(p) for p, _ in seen)
    assert stats.prediction_recall == right / sum(len(n) for _, n in seen)


def test_the_cache_fills_the_budget_left_by_the_rest(elastic, export_dir):
    """Oracle: sizes worked out from the export's config (float32; its experts are the sub-experts): a piece is
    one sub-expert's gate, up and down rows, 3 x hidden x (width / N) x 4 B; the non-expert bytes are every tensor of the model not named
    ``experts`` (parameters and buffers, each storage once); the cache gets what the budget leaves after
    them and the 1 MB reserve, capped at every piece of every layer."""
    config = json.loads((export_dir / "config.json").read_text())  # the flat export: one "expert" per sub-expert
    hidden, layers, experts = config["hidden_size"], config["num_hidden_layers"], config["num_experts"] // N_SUB
    width = config["intermediate_size"] * N_SUB
    piece = 3 * hidden * (width // N_SUB) * 4
    assert piece == 3 * 64 * 8 * 4
    storages = {}
    for name, t in [*elastic.named_parameters(remove_duplicate=False), *elastic.named_buffers(remove_duplicate=False)]:
        if ".experts." not in name:
            storages[t.data_ptr()] = t.numel() * t.element_size()
    non_expert = sum(storages.values())
    budget = 10**6 * 40
    controller = attach_offload(elastic, OffloadConfig(budget, reserve="1MB"))
    detach_offload(elastic)
    assert controller.piece_bytes == piece
    assert controller.non_expert_bytes == non_expert
    assert controller.expert_bytes == layers * experts * 3 * hidden * width * 4
    assert controller.capacity == min((budget - 10**6 - non_expert) // piece, layers * experts * N_SUB) == layers * experts * N_SUB
    small = non_expert + 10**6 + 10 * piece + piece // 2  # room for ten pieces and a half
    controller = attach_offload(elastic, OffloadConfig(small, reserve="1MB"))
    detach_offload(elastic)
    assert controller.capacity == 10
    assert controller.device_bytes <= small - 10**6


def test_a_budget_below_the_non_expert_weights_names_what_is_needed(elastic):
    with pytest.raises(PrismError, match="give at least") as exc:
        attach_offload(elastic, OffloadConfig(10_000))
    assert "non-expert weights take" in str(exc.value)
    with pytest.raises(PrismError, match="more than this machine's memory"):
        attach_offload(elastic, OffloadConfig("100TB"))


@pytest.mark.parametrize("reserve", ["5%", "20%", "0%", "37.5%", "1MB", "123456B"])
@pytest.mark.parametrize("asked", ["10kB", "0%"])
def test_the_least_budget_named_is_one_that_runs(elastic, asked, reserve):
    """The hint of a too-small budget, given back as printed, runs, and one step below it at the printed
    precision (three significant digits) is refused. The hint was worked out with the reserve of the budget
    asked for: a share of a small budget is small, so asking for the hint was refused again (a fuzz round:
    ``1MB`` named 15.3 MB, which named 16 MB, which named 16.1 MB). Oracle: the program's own acceptance of
    the sizes, and the printed digits."""
    import re
    from decimal import Decimal

    def hint(budget) -> str:
        with pytest.raises(PrismError, match="too small") as exc:
            attach_offload(elastic, OffloadConfig(budget, reserve=reserve))
        message = str(exc.value)
        assert message.startswith("device memory (--device-memory) ") and "\n" not in message  # Python or CLI
        return re.search(r"give at least ([\d.]+) (B|kB|MB|GB)$", message).groups()

    digits, unit = hint(asked)
    scale = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}[unit]
    least = Decimal(digits) * scale
    step = max(Decimal(10) ** (Decimal(digits).adjusted() - 2) * scale, 1)  # one unit of the third digit
    attach_offload(elastic, OffloadConfig(f"{digits} {unit}", reserve=reserve))  # accepted as printed
    detach_offload(elastic)
    below = int(least - step)
    assert hint(below) == (digits, unit)  # refused, naming the same size


# ---------------------------------------------------------------------------------------------
# Traces, their mapping to other shapes, and replays.


@pytest.fixture(scope="module")
def trace(elastic):
    from prism_cli.offload.trace import record_trace

    return record_trace(elastic, token_batch(seed=7, batch=8, length=40), batch_size=4)


def test_a_trace_records_the_routers_choices(elastic, trace, tmp_path):
    from prism_cli.offload.trace import RoutingTrace

    state = elastic.prism_state
    chosen: list[torch.Tensor] = []
    hook = state.gate_routers[1].router.register_forward_hook(lambda _m, _i, out: chosen.append(out[2]))
    set_operating_point(elastic, f"topk:{FULL}")
    _logits(elastic, token_batch(seed=7, batch=8, length=40)[:4])
    hook.remove()
    assert np.array_equal(trace.experts[1][: 4 * 40], chosen[0].numpy())
    assert trace.scores.shape == (2, 320, 2, N_SUB) and trace.pred_experts.shape == (1, 320, 2)
    trace.save(tmp_path / "t.npz")
    again = RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(again.pred_scores, trace.pred_scores) and again.meta == trace.meta
    (tmp_path / "bad.npz").write_bytes(b"not a trace")
    with pytest.raises(PrismError, match="not a prism routing trace"):
        RoutingTrace.load(tmp_path / "bad.npz")


def test_trace_mapping_replays_its_own_shape_as_recorded_and_scales(trace):
    from prism_cli.offload.trace import TraceMapping

    same = TraceMapping(trace, trace.num_experts, trace.top_k, trace.layers)
    assert np.array_equal(same.routing(1).experts.numpy(), trace.experts[1])
    big = TraceMapping(trace, 4 * trace.num_experts, 3, 5, seed=1)
    r = big.routing(3)
    assert r.experts.shape == (trace.tokens, 3) and int(r.experts.max()) < 4 * trace.num_experts
    # the three largest router weights among the four streams' candidates, per token (brute force)
    tr, t = trace, 17
    cands = []
    for j in range(4):
        pos = (t + big.offsets[3, j]) % tr.tokens
        cands += [(float(w), int(e) + j * tr.num_experts) for e, w in zip(tr.experts[3 % 2][pos], tr.weights[3 % 2][pos],
                                                                          strict=True)]
    want = [e for _, e in sorted(cands, key=lambda c: -c[0])[:3]]
    assert r.experts[t].tolist() == want
    assert big.prediction(2) is None and big.prediction(3) is not None  # layer 3 reads trace layer 1
    with pytest.raises(PrismError, match=f"a trace of {trace.num_experts} experts cannot drive {trace.num_experts + 1} experts"):
        TraceMapping(trace, trace.num_experts + 1, 2, 2)


def test_a_balanced_trace_needs_consecutive_tokens(trace):
    """A one-token recording has no consecutive pair: its reuse rate was NaN (a warning) and became chance."""
    from dataclasses import replace

    from prism_cli.offload.trace import balanced_trace

    one = replace(trace, experts=trace.experts[:, :1])
    with pytest.raises(PrismError, match="1 token"):
        balanced_trace(one, 32, 4, 2, 100, seed=0)


def test_balanced_routing_spreads_evenly_and_keeps_reuse(trace):
    from prism_cli.offload.trace import balanced_trace, reuse_rate

    b = balanced_trace(trace, 32, 4, 2, 4000, seed=0)
    counts = np.bincount(b.experts[0].ravel(), minlength=32)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    assert all(len(set(row)) == 4 for row in b.experts[1].tolist()[:200])
    assert reuse_rate(b.experts[1]) == pytest.approx(b.meta["synthetic"]["reuse"], abs=0.03)


class _ConstantCompute:
    """A compute model of fixed times, so that a replay's latency can be computed by hand."""

    batched = False

    def __init__(self, fixed: float, layer: float, piece: float) -> None:
        self.f, self.l, self.p = fixed, layer, piece

    def token_fixed(self):
        return self.f

    def layer_fixed(self):
        return self.l

    def pieces(self, count, n_sub):
        return count * self.p

    def predictor(self):
        return 0.0


def test_a_replay_charges_what_a_hand_count_gives(trace, elastic, monkeypatch):
    """Oracle: a hand count of the constant compute times; the cache's measured bookkeeping (CPU time) is
    stubbed to a clock that never moves, so every latency equals the hand count exactly."""
    from prism_cli.offload import replay as replay_module
    from prism_cli.offload.config import Budget
    from prism_cli.offload.replay import ReplayGeometry, replay, shape_from_model

    monkeypatch.setattr(replay_module.time, "thread_time", lambda: 0.0)
    from prism_cli.offload.trace import TraceMapping
    from prism_cli.operating_points import OperatingPoint

    shape = shape_from_model("tiny", elastic.config)
    mapping = TraceMapping(trace, shape.num_experts, shape.top_k, shape.moe_layers)
    geo = ReplayGeometry(shape, N_SUB)
    compute = _ConstantCompute(1e-3, 2e-3, 1e-4)
    everything = Budget("all", expert_fraction=1.0)
    res = replay(mapping, geo, compute, LinkSpec(1e9, 0.0), everything, "lru", OperatingPoint("topk", 3), False,
                 warmup=300)
    # the whole model fits: after the warm-up no copies; per token 1 ms + 2 layers x (2 ms + 3 pieces x 0.1 ms)
    assert res.bytes_per_token == 0 and res.hit_rate == 1.0 and res.stall_per_token == 0
    assert len(res.latencies) == mapping.tokens - 300
    assert res.latencies == pytest.approx([1e-3 + 2 * (2e-3 + 3e-4)] * len(res.latencies), rel=1e-9, abs=0)
    assert res.bookkeeping_fraction == 0.0
    one = Budget("one", nbytes=int((shape.non_expert_bytes() + shape.expert_unit_bytes(1)) / 0.95) + 1)
    whole = replay(mapping, geo, compute, LinkSpec(1e9, 0.0), one, "lru", OperatingPoint("original", 1), True, warmup=300)
    assert whole.slots == 1 and 0 < whole.bytes_per_token <= 2 * shape.expert_unit_bytes(1)


# ---------------------------------------------------------------------------------------------
# The commands.


def test_eval_with_device_memory_matches_without(cli, export_dir):
    plain = cli("eval", export_dir, "--tokens", "256", "--seq-len", "32", "-K", "topk:3")
    off = cli("eval", export_dir, "--tokens", "256", "--seq-len", "32", "-K", "topk:3", "--device-memory", "30%",
              "--cache-policy", "lfu")
    assert plain.code == 0 and off.code == 0, off
    ppl = [line.split("perplexity at topk:3 ")[1].split()[0] for line in (plain.out, off.out)]
    assert ppl[0] == ppl[1] and "simulated link" in off.out


def test_bad_offload_input_is_one_line(cli, export_dir):
    cli("eval", export_dir, "--tokens", "64", "--device-memory", "10kB").assert_one_line_error("too small", "give at least")
    cli("eval", export_dir, "--tokens", "64", "--device-memory", "100TB").assert_one_line_error("more than")
    cli("eval", export_dir, "--device-memory", "30%", "--cache-policy", "mru").assert_one_line_error("lru, lfu, prefetch")
    cli("eval", export_dir, "--device-memory", "30").assert_one_line_error("unit")
    short = ("--context", "8", "--warmup", "1", "--tokens", "4")  # the tiny model's 128 positions hold them
    cli("offload-bench", export_dir, "--device-memory", "30%", "--points", f"topk:{FULL + 1}", *short).assert_one_line_error(
        f"outside 1..{FULL}")
    cli("offload-bench", export_dir, "--device-memory", "30%", "--points", "topk:2",
        "--routing", "balanced").assert_one_line_error("--shape")
    cli("offload-bench", export_dir, "--device-memory", "30%", "--points", "topk:2", "--shape", "gpt-9").assert_one_line_error(
        "unknown model shape")
    cli("offload-bench", export_dir, "--device-memory", "30%", "--points", "layered:2+1", *short).assert_one_line_error(
        "layered points")
    cli("offload-bench", export_dir, "--device-memory", "30%", "--points", "topk:2").assert_one_line_error(
        "--context 128 + --warmup 32 + --tokens 128", "128 positions", "lower --warmup and --tokens")


def test_offload_bench_checks_its_budgets_before_any_work(export_dir):
    """A budget too small for the models fails before the quality stage (minutes on a real model), not
    when the first cache is attached after it."""
    from prism_cli.offload.bench import OffloadBenchSettings, run_offload_bench

    stages: list[str] = []

    def on_stage(name: str, total: int):
        stages.append(name)
        return lambda _n: None

    settings = OffloadBenchSettings([parse_budget("10kB")], ["topk:3"], quality_tokens=64, tokens=2, warmup=0, context=4)
    with pytest.raises(PrismError, match="too small") as exc:
        run_offload_bench(str(export_dir), settings, on_stage)
    assert stages == []
    assert "give at least" in str(exc.value)


def _live_settings(budget: str, **kwargs) -> object:
    from prism_cli.offload.bench import OffloadBenchSettings

    return OffloadBenchSettings([parse_budget(budget)], ["topk:4"], quality_tokens=64, tokens=2, warmup=0, context=4,
                                **kwargs)


def test_offload_bench_100_percent_caches_every_sub_expert_and_every_expert(export_dir):
    """``100%`` is "100 % of the experts cached" for both caches. Oracle: the piece counts from the model's
    config, not the tool's byte accounting (the budget was solved for the source model, whose routers are
    narrower than the export's: the sub-expert cache got a few slots fewer than the experts)."""
    from prism_cli.offload.bench import run_offload_bench

    config = json.loads((export_dir / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_experts"] // N_SUB
    report = run_offload_bench(str(export_dir), _live_settings("100%"))
    slots = {run.key.cache: run.slots for run in report.runs}
    assert slots == {"sub-experts": layers * experts * N_SUB, "whole experts": layers * experts}
    assert len({run.budget_bytes for run in report.runs}) == 1 and all(r.device_bytes <= r.budget_bytes for r in report.runs)


def test_bench_device_memory_100_percent_caches_every_sub_expert_and_every_expert(export_dir):
    """``prism bench --device-memory 100%`` as ``offload-bench``: the budget was solved for the source model
    alone, so the export (wider routers) cached fewer than all of its sub-experts. Oracle: config.json."""
    from prism_cli.evaluation.bench import BenchSettings, _load

    config = json.loads((export_dir / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_experts"] // N_SUB
    models = _load(str(export_dir), BenchSettings(dtype="float32", offload=OffloadConfig("100%")))
    assert models.elastic.model.prism_offload.capacity == layers * experts * N_SUB
    assert models.source.model.prism_offload.capacity == layers * experts
    assert models.elastic.model.prism_offload.budget_bytes == models.source.model.prism_offload.budget_bytes


def test_offload_bench_0_percent_is_the_non_expert_weights_and_the_reserve(export_dir):
    """``0%`` leaves no room for a piece: refused, the budget named once, and it is the (export's larger)
    non-expert weights plus the reserve that the same message names."""
    import re

    from prism_cli.offload.bench import run_offload_bench

    with pytest.raises(PrismError, match="too small") as exc:
        run_offload_bench(str(export_dir), _live_settings("0%", reserve="1MB"))
    message = str(exc.value)
    size = r"([\d.]+ [kMG]?B)"
    budget = re.fullmatch(rf"device memory \(--device-memory\) 0% \({size}\) is too small: the non-expert weights take {size}, "
                          r"the reserve 1 MB and .*", message)
    assert budget, message  # one size after the budget, not "(13.3 MB) (13.3 MB)"
    # three significant digits each
    assert parse_size(budget[1].replace(" ", "")) == pytest.approx(parse_size(budget[2].replace(" ", "")) + 10**6, rel=0.01)


@pytest.mark.timeout(60)
def test_offload_bench_a_link_of_one_byte_a_second_is_charged_not_waited_out(export_dir, monkeypatch):
    """At 1 B/s a copy takes days of simulated time: the live run must charge it to its clock, never sleep it
    out (``time.sleep`` is replaced by one that refuses any wait over a second). Oracle for the charge: at
    1 B/s each byte moved is one second of stall, so the stalls per token equal the bytes per token (less the
    compute they overlap, well under 0.1 % of it), and every latency holds its token's stall."""
    import time

    from prism_cli.offload.bench import run_offload_bench

    slept: list[float] = []
    real_sleep = time.sleep

    def short_sleep(seconds):
        slept.append(seconds)
        if seconds > 1.0:
            raise AssertionError(f"slept {seconds:.0f} s of simulated link time")
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", short_sleep)
    report = run_offload_bench(str(export_dir), _live_settings("30%", link=LinkSpec(1.0, 0.0)))
    assert not [s for s in slept if s > 1.0]
    assert report.runs
    for run in report.runs:
        assert run.bytes_per_token > 1000  # a piece is kilobytes: days of simulated time per token
        assert run.stall_per_token == pytest.approx(run.bytes_per_token, rel=1e-3)
        assert run.stall_per_token <= run.bytes_per_token + 1e-6
        assert sum(run.latencies) >= run.stall_per_token * len(run.latencies)


@pytest.mark.parametrize(("option", "value", "named"), [("--device-memory", "30%,30%", "30%"),
                                                         ("--device-memory", "4GB,4000MB", "4GB"),
                                                         ("--policy", "lru,lru", "lru"), ("--pin", "0,0.0", "0"),
                                                         ("--points", "topk:4,topk:4", "topk:4"),
                                                         ("--points", "pattern:4,1;pattern:4,1", "pattern:4,1")])
def test_offload_bench_refuses_a_value_given_twice(cli, export_dir, option, value, named):
    args = {"--device-memory": "30%", "--points": "topk:4", option: value}
    r = cli("offload-bench", export_dir, *[x for kv in args.items() for x in kv], "--context", "8", "--warmup", "1",
            "--tokens", "2")
    r.assert_one_line_error(f"{option} names {named} more than once")
    assert r.code == 2


def test_offload_bench_live_writes_its_tables(cli, export_dir, tmp_path):
    out = tmp_path / "live"
    r = cli("offload-bench", export_dir, "--device-memory", "70%", "--points", "topk:4,linear:3", "--policy", "lru",
            "--tokens", "3", "--warmup", "1", "--context", "8", "--quality-tokens", "64", "--out", out)
    assert r.code == 0, r
    data = json.loads((out / "offload.json").read_text())
    names = {(run["point"], run["cache"]) for run in data["runs"]}
    assert ("original:1", "whole experts") in names and ("topk:4", "sub-experts") in names
    assert all(run["device_bytes"] <= run["budget_bytes"] for run in data["runs"])
    assert len({run["budget_bytes"] for run in data["runs"]}) == 1  # one budget in bytes for both models
    pairs = json.loads((out / "offload_pairs.json").read_text())["rows"]
    assert {p["pair"] for p in pairs} >= {"equal compute"}
    assert (out / "offload.png").stat().st_size > 0 and "simulated link" in (out / "offload.md").read_text()


def test_offload_bench_replay_at_the_source_shape(cli, export_dir, tmp_path):
    out = tmp_path / "replay"
    r = cli("offload-bench", export_dir, "--device-memory", "40%,70%", "--points", "topk:5", "--policy", "lru,prefetch",
            "--shape", "source", "--trace-tokens", "640", "--out", out)
    assert r.code == 0, r
    data = json.loads((out / "offload.json").read_text())
    assert data["mode"] == "replay" and {run["point"] for run in data["runs"]} == {"topk:5", "original:2", "linear:8"}
    prefetch = [run for run in data["runs"] if run["policy"] == "prefetch"]
    assert prefetch and all(run["prediction_precision"] is not None for run in prefetch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offloading_equals_the_device_model(export_dir):
    import prism_cli

    ids = token_batch(seed=3).cuda()
    on_device = prism_cli.load_elastic(str(export_dir), operating_point="topk:5", dtype="bfloat16", device="cuda")
    want = _logits(on_device, ids).float()
    del on_device
    model = prism_cli.load_elastic(str(export_dir), operating_point="topk:5", dtype="bfloat16",
                                   offload=OffloadConfig("30%", device="cuda"))
    got = _logits(model, ids).float()
    assert model.prism_offload.link.stats.copies > 0
    assert next(model.model.layers[0].mlp.experts.parameters()).is_pinned()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_offload_bench_refuses_a_reserve_that_cannot_hold_the_kv_cache(export_dir, monkeypatch):
    """A budget whose reserve (with what whole pieces leave of the cache) cannot hold the KV cache of
    --context plus every decode step is refused before the quality stage: the run ended over its budget,
    exit 3, after all its work. Oracle: the KV bytes from the config (layers x keys and values x heads x
    head width x 4 bytes per position), not the tool's measure; a reserve that holds them runs."""
    import prism_cli.evaluation.perplexity as quality
    from prism_cli.models.loading import load_config
    from prism_cli.offload.bench import OffloadBenchSettings, run_offload_bench
    from prism_cli.offload.config import format_size

    def settings(reserve: str) -> OffloadBenchSettings:
        return OffloadBenchSettings([parse_budget("30%")], ["topk:4"], quality_tokens=64, tokens=2, warmup=0, context=100,
                                    reserve=reserve)

    cfg = load_config(str(export_dir))
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    positions = 100 + 0 + 2  # --context, --warmup, --tokens
    need = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head * 4 * positions

    def never(*_args, **_kwargs):
        raise AssertionError("the quality stage ran")

    with monkeypatch.context() as patch:
        patch.setattr(quality, "perplexity", never)
        with pytest.raises(PrismError, match=f"less than the KV cache of {positions} positions .*: {format_size(need)}\\)"):
            run_offload_bench(str(export_dir), settings("1B"))
    report = run_offload_bench(str(export_dir), settings(f"{need}B"))
    assert all(r.device_bytes <= r.budget_bytes for r in report.runs)
