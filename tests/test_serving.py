"""The online half: cost model, floors, scheduling policies (on the simulator, against hand-computed
cases), the continuous-batching engine (against ``generate()`` of each request alone), per-row points,
sampling, ``prism schedule`` and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import synthetic_cost_model

from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.runtime.experts import reset_dispatch_counts
from prism_cli.runtime.per_row import PerRowTopKPolicy, clear_row_points, set_row_points
from prism_cli.runtime.policies import POLICIES, TopKPolicy
from prism_cli.serving.costmodel import CostModel, EngineCosts, PointCost, interpolate
from prism_cli.serving.engine import Batch, Engine, Limits
from prism_cli.serving.floors import Ladder, PointSpace, parse_floor, parse_mix
from prism_cli.serving.policies import SCHEDULING_POLICIES
from prism_cli.serving.requests import Request, SamplingParams
from prism_cli.serving.simulate import SimExecutor, SimKV

SPACE = PointSpace("neurons", 4, 2)
ORIGINAL = PointSpace(None, 4, 2)


def P(text: str) -> OperatingPoint:
    return SPACE.parse(text) if not text.startswith("original") else ORIGINAL.parse(text)


def sim_engine(policy: str, space: PointSpace = SPACE, cost: CostModel | None = None, history: int | None = None,
               **limits) -> Engine:
    cost = cost or synthetic_cost_model()
    lim = Limits(**{"max_batch": 8, "max_running": 16, "t_max": 1.0, **limits})
    cls = SCHEDULING_POLICIES.get(policy)
    instance = cls(space.full()) if policy == "static" else cls()
    return Engine(SimExecutor(cost), instance, Ladder(space, cost, lim.max_batch), lim, cost, history=history)


def request(floor: str, arrival: float = 0.0, out: int = 8, prompt: int = 16, space: PointSpace = SPACE) -> Request:
    return Request(list(range(prompt)), SamplingParams(max_tokens=out, temperature=0.0), space.parse(floor), arrival)


# --- cost model ------------------------------------------------------------------------------------

def test_interpolation_is_linear_between_and_extends_the_end_segments():
    table = {1: 10.0, 8: 24.0, 32: 72.0}
    assert interpolate(table, 1) == 10.0 and interpolate(table, 8) == 24.0
    assert interpolate(table, 4) == pytest.approx(10.0 + 14.0 * 3 / 7)
    assert interpolate(table, 16) == pytest.approx(24.0 + 48.0 * 8 / 24)
    assert interpolate(table, 64) == pytest.approx(72.0 + 2.0 * 32)  # the last segment's slope (2 ms a row)
    assert interpolate({8: 40.0}, 4) == pytest.approx(20.0)  # one measurement: proportional


def test_extrapolation_never_prices_a_step_below_what_was_measured():
    """Without batch 1 the first segment reaches 0 ms below it (a step would be free, a utility infinite):
    below the first key a row costs at least what it costs there, above the last a step at least the last."""
    rising = {8: 10.0, 16: 30.0}  # 2.5 ms a row: the first segment reaches 0 ms at batch 4
    assert interpolate(rising, 2) == pytest.approx(2.5)  # 1.25 ms a row as at batch 8 (the segment: -5)
    assert interpolate(rising, 6) == pytest.approx(7.5)  # the segment's 5.0 is below 6 rows at 1.25
    assert interpolate({1: 4.0, 8: 10.0}, 0.5) == pytest.approx(3.571428571)  # the segment, above 2.0
    noisy = {1: 10.0, 8: 12.0, 32: 11.0}  # a last segment that falls (noise) would reach 0 ms at batch 296
    assert interpolate(noisy, 64) == pytest.approx(11.0) and interpolate(noisy, 400) == pytest.approx(11.0)
    assert interpolate(noisy, 20) == pytest.approx(11.5)  # between keys: the measurements as they are


def _bench_json(path: Path, mode: str, seq_len: int, latency: dict[str, dict[int, float]]) -> Path:
    points = [{"point": p, "kind": "original" if p.startswith("original") else "elastic", "perplexity": 40.0 + i,
               "latency": {str(b): {"median_ms": ms, "p90_ms": ms} for b, ms in lat.items()}}
              for i, (p, lat) in enumerate(latency.items())]
    path.mkdir(parents=True, exist_ok=True)
    (path / "bench.json").write_text(json.dumps({"target": "x", "settings": {"mode": mode, "seq_len": seq_len},
                                                 "points": points, "environment": {"processor": "cpu", "torch_threads": 2}}))
    return path / "bench.json"


def test_cost_model_from_bench_keys_prefill_by_prompt_tokens(tmp_path):
    dec = _bench_json(tmp_path / "d", "decode", 128, {"linear:2": {1: 5.0, 8: 9.0}, "original:1": {1: 6.0, 8: 11.0}})
    pre = _bench_json(tmp_path / "p", "prefill", 64, {"linear:2": {1: 20.0, 4: 50.0}, "original:1": {1: 22.0, 4: 60.0}})
    model = CostModel.from_bench(dec, pre)
    assert model.decode("linear:2", 8) == 9.0 and model.prefill("original:1", 256) == 60.0  # 4 prompts x 64 tokens
    assert model.prefill("linear:2", 160) == pytest.approx(20.0 + 30.0 * (160 - 64) / 192)
    model.save(tmp_path / "cm.json")
    again = CostModel.load(tmp_path / "cm.json")
    assert again.decode("original:1", 4) == model.decode("original:1", 4) and again.perplexity("original:1") == 41.0
    with pytest.raises(PrismError, match="--mode prefill"):
        CostModel.from_bench(dec, dec)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PrismError, match="cannot read cost model"):
        CostModel.load(tmp_path / "bad.json")


def _engine_costs() -> EngineCosts:
    """Decode ``2 + rows + width / 32`` ms and prefill ``rows * width / 100`` ms at linear:8; a join costs
    ``rows * width / 1000`` ms and a trim half that (tables at two widths, linear in both, by hand)."""
    def table(f):
        return {w: {r: f(r, w) for r in (2, 8)} for w in (64, 256)}

    return EngineCosts({"linear:8": table(lambda r, w: 2 + r + w / 32)}, {"linear:8": table(lambda r, w: r * w / 100)},
                       table(lambda r, w: r * w / 1000), table(lambda r, w: r * w / 2000))


def test_engine_costs_interpolate_in_rows_and_width_and_round_trip(tmp_path):
    costs = _engine_costs()
    assert costs.decode("linear:8", 8, 64) == pytest.approx(12.0)
    assert costs.decode("linear:8", 5, 160) == pytest.approx(2 + 5 + 160 / 32)  # between both measured axes
    assert costs.decode("linear:8", 16, 512) == pytest.approx(2 + 16 + 512 / 32)  # beyond both: the end segments
    assert costs.decode("topk:4", 8, 64) is None  # not measured: the simulator falls back to the bench
    assert costs.join(4, 100) == pytest.approx(0.4) and costs.keep(4, 100) == pytest.approx(0.2)
    model = synthetic_cost_model()
    model.engine = costs
    model.save(tmp_path / "cm.json")
    again = CostModel.load(tmp_path / "cm.json").engine
    assert again is not None and again.decode("linear:8", 5, 160) == costs.decode("linear:8", 5, 160)
    assert again.prefill("linear:8", 3, 100) == pytest.approx(3.0) and again.keep(8, 256) == costs.keep(8, 256)


def test_a_cost_model_with_unusable_times_is_refused_when_read(tmp_path):
    def saved(edit) -> Path:
        model = synthetic_cost_model()
        model.engine = _engine_costs()
        edit(model)
        model.save(tmp_path / "cm.json")
        return tmp_path / "cm.json"

    assert CostModel.load(saved(lambda m: None)).problem() is None
    for edit, needle in (
        (lambda m: m.points["linear:2"].decode_ms.update({8: -1.0}), r"points.linear:2.decode_ms\[8\] is -1 ms"),
        (lambda m: m.points["topk:3"].prefill_ms.update({64: float("nan")}), r"points.topk:3.prefill_ms\[64\] is nan ms"),
        (lambda m: m.points["linear:4"].decode_ms.clear(), "points.linear:4.decode_ms is empty"),
        (lambda m: m.engine.decode_ms["linear:8"][64].update({2: float("inf")}), r"engine.decode_ms.linear:8\[64\]\[2\] is inf"),
        (lambda m: m.engine.join_ms.update({0: {2: 1.0}}), "engine.join_ms has key 0"),
    ):
        with pytest.raises(PrismError, match=f"cost model .*cm.json: {needle}"):
            CostModel.load(saved(edit))


def test_the_simulator_charges_rows_at_different_linear_points_their_whole_blocks():
    """Synthetic decode costs C(b, K) = 10 + b*K ms, N = 4. Two rows at linear:2 and linear:6 share a step:
    the executor computes their blocks whole (linear:4 and linear:8): (10 + 2*4 + 10 + 2*8) / 2 = 22 ms, not
    the (10 + 4 + 10 + 12) / 2 = 18 of their own points. A uniform step, a step with a topk row and an export
    that does not route by blocks keep their own points."""
    model = synthetic_cost_model()
    rows = [request("linear:2"), request("linear:6")]

    def step(sim: SimExecutor, points: list[str]) -> float:
        batch = Batch(rows[: len(points)])
        batch.kv = SimKV(8, [8] * len(points))
        return sim.decode(batch, [P(p) for p in points])[1]

    blocks, plain = SimExecutor(model, block=4), SimExecutor(model)
    assert step(blocks, ["linear:2", "linear:6"]) == pytest.approx(22.0)
    assert step(plain, ["linear:2", "linear:6"]) == pytest.approx(18.0)
    assert step(blocks, ["linear:2", "linear:2"]) == pytest.approx(14.0)
    assert step(blocks, ["linear:2", "topk:6"]) == pytest.approx(18.0)


def test_the_simulator_tracks_cache_width_as_the_engine_pads_and_trims():
    """Hand-computed: prompts of 10 and 30 tokens (width 30), one decode step, a row of 50 joins (width 50),
    one step, the 50-token row leaves: the width falls to the longest row left (31 + 1 tokens)."""
    model = synthetic_cost_model()
    model.engine = _engine_costs()
    sim = SimExecutor(model)
    point = P("linear:8")
    a, b, c = request("linear:2", prompt=10), request("linear:2", prompt=30), request("linear:2", prompt=50)
    batch = Batch([])
    kv, _, ms = sim.prefill([a, b], [point, point])
    assert ms == pytest.approx(2 * 30 / 100) and (kv.width, kv.seen) == (30, [10, 30])
    sim.join(batch, kv)
    batch.rows = [a, b]
    _, ms = sim.decode(batch, [point, point])
    assert ms == pytest.approx(2 + 2 + 30 / 32) and batch.kv.width == 31
    kv, _, _ = sim.prefill([c], [point])
    clock = sim.clock
    sim.join(batch, kv)
    batch.rows = [a, b, c]
    assert (batch.kv.width, batch.kv.seen) == (50, [11, 31, 50])
    assert sim.clock - clock == pytest.approx(3 * 50 / 1000 / 1e3)  # the join's copy, charged
    _, ms = sim.decode(batch, [point] * 3)
    assert ms == pytest.approx(2 + 3 + 50 / 32)
    clock = sim.clock
    sim.keep(batch, [0, 1])
    assert (batch.kv.width, batch.kv.seen) == (32, [12, 32])
    assert sim.clock - clock == pytest.approx(3 * 51 / 2000 / 1e3)
    assert sim.times.kv_s == pytest.approx((3 * 50 / 1000 + 3 * 51 / 2000) / 1e3)


def test_the_simulator_charges_the_engines_time_around_each_pass(tmp_path):
    """With 0.5 ms of engine time per pass, a prefill and a decode step move the clock by their costs plus
    1 ms, which is not counted as forward time; a cost model saved with it loads it, one without it (older
    files) loads 0."""
    model = synthetic_cost_model()
    model.engine = _engine_costs()
    model.engine.step_overhead_ms = 0.5
    sim = SimExecutor(model)
    point = P("linear:8")
    a = request("linear:2", prompt=64)
    batch = Batch([])
    kv, _, prefill_ms = sim.prefill([a], [point])
    sim.join(batch, kv)  # into an empty batch: no copy
    batch.rows = [a]
    _, decode_ms = sim.decode(batch, [point])
    assert prefill_ms == pytest.approx(64 / 100) and decode_ms == pytest.approx(2 + 1 + 64 / 32)
    assert sim.clock == pytest.approx((prefill_ms + decode_ms + 1.0) / 1e3)
    assert sim.times.forward_s == pytest.approx((prefill_ms + decode_ms) / 1e3)
    model.save(tmp_path / "cm.json")
    assert CostModel.load(tmp_path / "cm.json").engine.step_overhead_ms == 0.5
    data = json.loads((tmp_path / "cm.json").read_text())
    del data["engine"]["step_overhead_ms"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert CostModel.load(tmp_path / "old.json").engine.step_overhead_ms == 0.0
    data["engine"]["step_overhead_ms"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PrismError, match="malformed.*step_overhead_ms"):
        CostModel.load(tmp_path / "bad.json")


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["engine"].update(step_overhead_ms=float("inf")), "step_overhead_ms must be a finite time"),
    (lambda d: d["points"]["linear:2"].update(perplexity="low"), "points.linear:2.perplexity is 'low'"),
    (lambda d: d["points"]["linear:2"].update(perplexity=-3.0), "points.linear:2.perplexity is -3.0"),
    (lambda d: d["points"]["linear:2"].update(perplexity=float("nan")), "points.linear:2.perplexity is nan"),
    (lambda d: d["points"]["linear:2"].update(kind="banana"), "points.linear:2.kind is 'banana'"),
    (lambda d: d["points"]["linear:2"].update(point="linear:3"), "points.linear:2 says it is 'linear:3'"),
    (lambda d: d.update(decode_seq_len=-5), "decode_seq_len is -5"),
    (lambda d: d.update(machine=None), "machine is None"),
])
def test_a_cost_model_with_an_unusable_field_is_refused(tmp_path, edit, needle):
    """Found by fuzzing: these loaded, and a string perplexity crashed a ``ppl:`` floor, a negative one met
    every ceiling, an infinite engine overhead wrote NaN latencies (and invalid JSON)."""
    model = synthetic_cost_model()
    model.engine = _engine_costs()
    model.save(tmp_path / "cm.json")
    assert CostModel.load(tmp_path / "cm.json").perplexity("linear:2") == 50.0
    data = json.loads((tmp_path / "cm.json").read_text())
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PrismError, match="bad.json") as exc:
        CostModel.load(tmp_path / "bad.json")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


class _VirtualClock:
    """``time.perf_counter`` that moves only when told: the engine's own work takes no time on it."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t


class _PassingExecutor(SimExecutor):
    """Passes that take 4 ms of counted forward time on ``clock``, then 2 ms the executor does not count (as
    sampling and the next step's inputs are not): the engine's time around a pass is exactly 2 ms (6 ms if
    the passes' own time were not taken out)."""

    def __init__(self, wall: _VirtualClock) -> None:
        super().__init__(synthetic_cost_model())
        self.wall = wall

    def now(self) -> float:
        return self.wall.t

    def reset_clock(self) -> None:
        """The clock the engine reads is ``wall``'s, which only passes move."""

    def _pass(self) -> float:
        self.wall.t += 0.004
        self.times.forward_s += 0.004
        self.wall.t += 0.002
        return 4.0

    def prefill(self, requests, points):
        ms = self._pass()
        return SimKV(max(r.prompt_len for r in requests), [r.prompt_len for r in requests]), [0] * len(requests), ms

    def decode(self, batch, points):
        ms = self._pass()
        batch.kv = SimKV(batch.kv.width + 1, [n + 1 for n in batch.kv.seen])
        return [0] * len(batch.rows), ms


def test_step_overhead_is_the_engines_wall_time_outside_its_passes(monkeypatch):
    from prism_cli.serving import calibrate

    clock = _VirtualClock()
    monkeypatch.setattr(calibrate, "time", clock)
    overhead = calibrate.measure_step_overhead(_PassingExecutor(clock), SPACE, P("linear:8"), 100,
                                               Limits(max_batch=4, max_running=8), requests=12)
    assert overhead == pytest.approx(2.0, rel=1e-9)


# --- floors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("point, floor, ok", [
    ("linear:6", "linear:4", True), ("linear:3", "linear:4", False), ("linear:8", "topk:7", True),  # full meets all
    ("topk:4", "linear:4", False), ("original:1", "linear:4", True), ("original:1", "linear:5", False),
    ("linear:4", "original:1", True), ("original:2", "topk:6", True), ("threshold:0.9", "threshold:0.8", True),
    ("threshold:0.8", "threshold:0.9", False), ("topk:6", "threshold:0.5", False),
])
def test_meets(point, floor, ok):
    assert SPACE.meets(P(point), P(floor)) is ok


def test_floor_mix_and_bad_floors():
    mix = parse_mix("linear:2=1,linear:6=2,topk:8=1", SPACE)
    assert [(str(f), w) for f, w in mix] == [("linear:2", 0.25), ("linear:6", 0.5), ("topk:8", 0.25)]
    assert parse_floor("ppl:45", SPACE).ceiling == 45.0
    with pytest.raises(PrismError, match="linear:9"):
        parse_floor("linear:9", SPACE)
    with pytest.raises(PrismError, match="pattern") as raised:
        parse_floor("pattern:4,1", SPACE)
    assert "not a point of this export" not in str(raised.value)  # it is one, just not a floor
    # A bare number counts sub-experts, as in every operating point; where that fails, the ceiling is named.
    with pytest.raises(PrismError, match=r"ppl:45\)$"):
        parse_floor("45", SPACE)
    with pytest.raises(PrismError, match="share"):
        parse_mix("linear:2=half", SPACE)


def test_floor_shares_must_be_finite_and_positive():
    for text, bad in (("linear:2=nan", "linear:2"), ("linear:2=inf,linear:8=1", "linear:2"), ("linear:2=1,linear:8=-1", "linear:8"),
                      ("linear:2=0", "linear:2")):
        with pytest.raises(PrismError, match=f"share .* of {bad} must be a finite number > 0"):
            parse_mix(text, SPACE)
    assert [w for _, w in parse_mix("linear:2=1e308,linear:8=1e308", SPACE)] == [0.5, 0.5]  # no infinite sum


def test_cheapest_point_meeting_a_set_of_floors():
    ladder = Ladder(SPACE, synthetic_cost_model(), 8)
    assert ladder.cheapest_meeting([P("linear:2"), P("linear:6")]) == P("linear:6")
    assert ladder.cheapest_meeting([P("linear:2"), P("topk:3")]) == P("linear:8")  # only the full model meets both
    orig = Ladder(ORIGINAL, synthetic_cost_model(), 8)
    assert orig.cheapest_meeting([P("original:1")]) == P("original:1")


def test_floor_bits_and_masks_follow_meets_as_floors_appear():
    """Floors become bits of an int as a policy first sees them (``Ladder.bit``); a point's ``mask`` must hold
    exactly the floors it meets (``PointSpace.meets``, the rule), including floors first seen after the mask
    was made, and ``cheapest_of`` a set of bits must meet every floor in it with no cheaper point of the set
    (or the full model) meeting them all, however the memos were filled before."""
    import random

    rng = random.Random(0)
    pool = [P(f"linear:{k}") for k in range(1, 9)] + [P(f"topk:{k}") for k in range(1, 9)] + [P("threshold:0.5")]
    for _ in range(20):
        ladder = Ladder(SPACE, synthetic_cost_model(), 8)
        seen: list[OperatingPoint] = []
        for _ in range(30):
            if rng.random() < 0.4 or not seen:
                seen.append(rng.choice(pool))
                ladder.bit(seen[-1])
            point = rng.choice(pool)
            for floor in seen:
                assert bool(ladder.mask(point) & ladder.bit(floor)) == SPACE.meets(point, floor), (point, floor)
            floors = set(rng.sample(seen, rng.randrange(1, len(seen) + 1)))
            bits = ladder.bits_of(frozenset(floors))
            assert bits == sum({ladder.bit(f) for f in floors})
            served, mask, rank = ladder.cheapest_of(bits)
            assert all(SPACE.meets(served, f) for f in floors)
            assert mask == ladder.mask(served) and rank == ladder.rank(served)
            meeting_all = [p for p in {*floors, SPACE.full()} if all(SPACE.meets(p, f) for f in floors)]
            assert rank == min(map(ladder.rank, meeting_all))
            assert [k for k, _ in ladder.queues(bits)] == ladder.queue_points(floors)


# --- policies on the simulator ---------------------------------------------------------------------

def _poisson(n: int, rate: float, floors: list[str], seed: int = 0, space: PointSpace = SPACE) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    t, out = 0.0, []
    for i in range(n):
        t += float(torch.empty(1).exponential_(rate, generator=gen))
        out.append(request(floors[i % len(floors)], t, out=4 + i % 13, prompt=8 + i % 20, space=space))
    return out


@pytest.mark.parametrize("policy", SCHEDULING_POLICIES.names())
def test_every_policy_serves_everything_within_limits_and_floors(policy):
    engine = sim_engine(policy, max_batch=4, max_running=8)
    reqs = _poisson(60, 40.0, ["linear:2", "linear:6", "linear:8", "topk:3"])
    engine.schedule(reqs)
    engine.run()
    assert all(r.finish_reason == "length" and len(r.output_ids) == r.params.max_tokens for r in reqs)
    assert max(s.rows for s in engine.stats.steps) <= 4
    for r in reqs:  # independent of the engine's own count: every point a request saw meets its floor
        assert all(SPACE.meets(SPACE.parse(p), r.floor) for p in r.served_at), (policy, r.floor, r.served_at)
    assert engine.stats.violations == 0
    if policy == "mixed":
        assert any(len(set(s.points)) > 1 for s in engine.stats.steps)  # rows at their own points in one step


def test_static_below_a_floor_is_counted_as_a_violation():
    cost = synthetic_cost_model()
    lim = Limits(4, 8, 1.0)
    engine = Engine(SimExecutor(cost), SCHEDULING_POLICIES.get("static")(P("linear:2")), Ladder(SPACE, cost, 4), lim, cost)
    reqs = [request("linear:2"), request("linear:6")]
    engine.schedule(reqs)
    engine.run()
    assert reqs[0].below_floor_steps == 0 and reqs[1].below_floor_steps == 8 and engine.stats.violations == 8


def test_a_cancelled_request_is_dropped_waiting_or_running():
    """``Engine.cancel``: a waiting request leaves the queue without a token, a running one stops where it is;
    the others are served whole. (The queue is swept for cancelled requests only after a cancel.)"""
    engine = sim_engine("fifo", max_batch=1, max_running=1)
    running, waiting, other = (request("linear:2", out=20) for _ in range(3))
    for r in (running, waiting, other):
        engine.submit(r)
    engine.step()
    assert engine.running() == 1 and len(engine.waiting) == 2
    engine.cancel(waiting)
    engine.cancel(running)
    engine.run()
    assert waiting.finish_reason == "cancelled" and waiting.output_ids == []
    assert running.finish_reason == "cancelled" and len(running.output_ids) < 20
    assert other.finish_reason == "length" and len(other.output_ids) == 20


def test_a_request_submitted_and_cancelled_while_the_inbox_empties_is_still_dropped():
    """The engine thread finds the inbox empty while the server's thread submits a request and cancels it (a
    client gone while its prompt was tokenized): the cancel must not be spent on the sweep of that step, which
    cannot see the request yet. The other thread is played by the inbox, at the check that finds it empty."""
    from collections import deque

    engine = sim_engine("fifo", max_batch=1, max_running=1)
    first, late = request("linear:2", out=20), request("linear:2", out=20)

    class RacingInbox(deque):
        raced = False

        def __bool__(self) -> bool:
            empty = len(self) == 0
            if empty and not self.raced:  # the loop ends here; then the other thread acts
                self.raced = True
                self.append(late)
                engine.cancel(late)
            return not empty

    engine._inbox = RacingInbox()
    engine.submit(first)
    engine.run()
    assert late.finish_reason == "cancelled" and late.output_ids == []
    assert first.finish_reason == "length"


def test_prism_launches_the_queue_of_highest_utility():
    # C(b, K) = 10 + b*K. Three linear:2 requests and one linear:8 arrive together (max batch 8, none full):
    # U(Q_2) = 3 / (10 + 3*2) = 0.1875 beats U(Q_8) = 4 / (10 + 4*8) = 0.095, so Q_2 launches alone. For the
    # linear:8 request, a batch of its own gives the round (3+1) / (16 + 18) = 0.118 tokens/ms, joining the
    # linear:2 batch (and raising it to linear:8) 4 / 42 = 0.095: it gets its own batch, at once.
    engine = sim_engine("prism", max_batch=8, max_running=16, t_max=0.5)
    low = [request("linear:2", out=20) for _ in range(3)]
    high = request("linear:8", out=20)
    engine.schedule([*low, high])
    engine.run()
    assert all(r.served_at == {"linear:2"} for r in low) and high.served_at == {"linear:8"}
    assert [s.rows for s in engine.stats.steps[:2]] == [3, 1] and high.first_token_at < 0.1


def test_a_bounded_history_keeps_the_last_records_and_counts_everything():
    """A server's engine (``history``) keeps only its last finished requests, steps and decision times,
    while its counters count every one (hand-checked against an engine that keeps everything)."""
    reqs = _poisson(12, 4.0, ["linear:2", "linear:8"])
    full, bounded = (sim_engine("fifo", history=h, max_batch=2, max_running=4) for h in (None, 3))
    for engine in (full, bounded):
        engine.schedule([Request(r.prompt_ids, r.params, r.floor, r.arrival) for r in reqs])
        engine.run()
    assert len(full.finished) == 12 and len(full.stats.steps) > 3
    assert [r.arrival for r in bounded.finished] == [r.arrival for r in list(full.finished)[-3:]]
    assert list(bounded.stats.steps) == list(full.stats.steps)[-3:] and len(bounded.stats.decision_times) == 3
    assert bounded.stats.decisions == full.stats.decisions and bounded.stats.violations == full.stats.violations == 0


def test_t_max_forces_a_launch_that_utility_passes_over():
    # One running slot left, held by a long linear:2 batch: a linear:8 request arriving later could only
    # raise that batch to linear:8, which lowers the round's utility; once it is t_max old it goes in anyway.
    engine = sim_engine("prism", max_batch=4, max_running=4, t_max=0.5)
    low = [request("linear:2", out=400) for _ in range(3)]
    late_low = [request("linear:2", arrival=0.001 * i, out=4) for i in range(1, 40)]
    high = request("linear:8", arrival=0.0005, out=4)
    engine.schedule([*low, high, *late_low])
    engine.run()
    assert 0.5 <= high.first_token_at < 0.7
    assert engine.stats.violations == 0


def test_prism_keeps_floors_apart_under_overload():
    """200 requests, half at linear:2 and half at linear:8, arrive within about 0.2 s into two batches of 4:
    every freed slot is refilled at once, so a batch that took any floor would hold a linear:8 row for as
    long as it runs. prism keeps one batch at linear:2 (nearly all linear:2 rows decode there); FIFO, which
    fills slots oldest first, runs nearly every step at linear:8."""

    def low_share(policy: str) -> tuple[float, Engine]:
        engine = sim_engine(policy, max_batch=4, max_running=8, t_max=0.05)
        reqs = _poisson(200, 1000.0, ["linear:2", "linear:8"])
        engine.schedule(reqs)
        engine.run()
        decoded = [p for s in engine.stats.steps if s.kind == "decode" for p in s.points]
        return decoded.count("linear:2") / sum(r.floor == P("linear:2") for r in reqs for _ in range(r.params.max_tokens)), engine

    prism, engine = low_share("prism")
    fifo, _ = low_share("fifo")
    assert prism > 0.8 and fifo < 0.2, (prism, fifo)
    assert engine.stats.violations == 0


def test_prism_points_a_batch_down_after_a_burst_of_high_floors():
    """Eight linear:8 requests (of staggered lengths) open both batches at linear:8, then 200 requests, half
    at linear:2, arrive within about 0.2 s: each freed slot is refilled at once, so no batch ever empties.
    A batch's point that only rose would keep both at linear:8 (about 10 % of linear:2 rows at linear:2, as
    FIFO); prism re-points one batch down, and most linear:2 rows decode at linear:2."""

    def low_share(policy: str) -> tuple[float, Engine]:
        engine = sim_engine(policy, max_batch=4, max_running=8, t_max=0.05)
        burst = [request("linear:8", arrival=0.0, out=20 + 3 * i) for i in range(8)]
        rest = _poisson(200, 1000.0, ["linear:2", "linear:8"])
        for r in rest:
            r.arrival += 0.001
        engine.schedule(burst + rest)
        engine.run()
        decoded = [p for s in engine.stats.steps if s.kind == "decode" for p in s.points]
        return decoded.count("linear:2") / sum(r.params.max_tokens for r in rest if r.floor == P("linear:2")), engine

    prism, engine = low_share("prism")
    fifo, _ = low_share("fifo")
    assert prism > 0.7 and fifo < 0.2, (prism, fifo)
    assert engine.stats.violations == 0


def test_fullbatch_waits_for_a_full_batch_or_t_max():
    engine = sim_engine("fullbatch", max_batch=4, max_running=8, t_max=0.3)
    reqs = [request("linear:2", arrival=0.0), request("linear:2", arrival=0.01)]
    engine.schedule(reqs)
    engine.run()
    assert all(0.3 <= r.first_token_at < 0.35 for r in reqs)


def test_fullbatch_under_overload_launches_only_full_batches():
    """With a full batch waiting, t_max launches nothing smaller: every request is past t_max in a sustained
    overload, and launching each freed slot as a batch would end in batches of one row each."""
    engine = sim_engine("fullbatch", max_batch=4, max_running=8, t_max=0.01)
    reqs = _poisson(80, 1000.0, ["linear:2", "linear:8"])  # all arrive within about 0.1 s
    engine.schedule(reqs)
    engine.run()
    prefills = [s.rows for s in engine.stats.steps if s.kind == "prefill"]
    assert prefills == [4] * 20  # 80 requests: twenty full batches, none smaller


def test_prism_beats_fifo_on_the_original_when_cheap_points_are_cheap():
    # overload (arrivals far above capacity): throughput is what each policy can serve. A large t_max: under
    # sustained overload every request would pass a small one, and launches would go in FIFO order.
    floors = ["linear:2", "linear:2", "linear:6", "linear:8"]
    rates = {}
    for policy, space in [("prism", SPACE), ("fifo", ORIGINAL)]:
        engine = sim_engine(policy, space=space, cost=synthetic_cost_model(fixed=2.0), max_batch=8, max_running=16, t_max=100.0)
        reqs = _poisson(200, 500.0, ["original:1" if f == "linear:2" else "original:2" for f in floors] if space is ORIGINAL
                        else floors, space=space)
        engine.schedule(reqs)
        engine.run()
        rates[policy] = len(reqs) / max(r.finished_at for r in reqs)
        assert engine.stats.violations == 0
    assert rates["prism"] > 1.2 * rates["fifo"]


_HASH_SEED_RUN = """
import hashlib, random
from prism_cli.serving.costmodel import CostModel, PointCost
from prism_cli.serving.engine import Engine, Limits
from prism_cli.serving.floors import Ladder, PointSpace
from prism_cli.serving.policies import SCHEDULING_POLICIES
from prism_cli.serving.requests import Request, SamplingParams
from prism_cli.serving.simulate import SimExecutor

space = PointSpace("neurons", 4, 2)
cost = CostModel({f"{g}:{k}": PointCost(f"{g}:{k}", "elastic", 100.0 / k, {b: 10.0 + b * k for b in (1, 8, 32)},
                                        {t: 0.01 * t * k for t in (64, 512)}) for g in ("linear", "topk") for k in range(1, 9)},
                 128, 64, "test")
engine = Engine(SimExecutor(cost), SCHEDULING_POLICIES.get("prism")(), Ladder(space, cost, 4), Limits(4, 8, 1.0), cost)
rng, t, reqs = random.Random(0), 0.0, []
for i in range(300):
    t += rng.expovariate(60.0)
    floor = space.parse(["linear:4", "topk:4", "linear:3", "topk:3", "linear:6", "topk:6"][i % 6])
    reqs.append(Request(list(range(8 + i % 20)), SamplingParams(max_tokens=4 + i % 13, temperature=0.0), floor, t))
engine.schedule(reqs)
engine.run()
trace = [(round(r.first_token_at, 9), round(r.finished_at, 9), sorted(r.served_at)) for r in reqs]
print(hashlib.sha256(repr(trace).encode()).hexdigest())
"""


def test_prism_schedules_the_same_whatever_the_hash_seed():
    """Points of equal cost (``linear:k`` and ``topk:k`` here) must be ordered by something other than a
    set's iteration order, which follows string hashing: the same workload, run in processes with
    different ``PYTHONHASHSEED``, gives one schedule."""
    import os
    import subprocess
    import sys

    outs = {subprocess.run([sys.executable, "-c", _HASH_SEED_RUN], env={**os.environ, "PYTHONHASHSEED": str(seed)}, check=True,
                           capture_output=True, text=True).stdout.strip() for seed in range(4)}
    assert len(outs) == 1, outs


def test_prism_prices_a_launch_at_the_batch_it_would_make():
    """Nothing running, n requests waiting at linear:2 (max batch 8): the launch of all n is priced as a step
    of a batch of n rows, C(n, 2) = 10 + 2n by hand; its members are not also counted as requests that may
    still fill it (which priced 3 rows as a batch of 6)."""
    for n in (1, 3, 5):
        engine = sim_engine("prism", max_batch=8, max_running=16)
        priced: list[tuple[int, int]] = []
        step_cost = engine.ladder.step_cost

        def spy(point, rows, size=None, step_cost=step_cost, priced=priced):
            priced.append((rows, size))
            return step_cost(point, rows, size)

        engine.ladder.step_cost = spy
        for _ in range(n):
            engine.waiting.push(request("linear:2"))
        launches = engine.policy.admit(engine)
        assert [len(lt.requests) for lt in launches] == [n]
        assert set(priced) == {(n, n)}, (n, priced)


def test_a_decode_table_without_batch_1_never_prices_a_step_at_zero():
    """Decode measured at batches 8 and 16 only (12 and 34 ms: 2.75 ms a row from 8 on): the first segment
    would reach 0 ms at batch 2.5. One request alone decodes at 12 / 8 = 1.5 ms a step (a row no cheaper than
    at batch 8), under FIFO and under prism (whose utility divided by a 0-ms step)."""
    points = {f"linear:{k}": PointCost(f"linear:{k}", "elastic", 100.0 / k, {8: 12.0, 16: 34.0}, {64: 1.0, 512: 8.0})
              for k in range(1, 9)}
    cost = CostModel(points, 128, 64, "test")
    assert cost.problem() is None
    for policy in ("fifo", "prism"):
        engine = sim_engine(policy, cost=cost)
        req = request("linear:2", out=20)
        engine.schedule([req])
        engine.run()
        assert req.finish_reason == "length"
        assert [s.ms for s in engine.stats.steps if s.kind == "decode"] == [pytest.approx(1.5)] * 19


def test_points_are_ordered_in_one_unit_when_the_cost_model_lacks_some():
    """A cost model with linear:2 (2 ms) and linear:8 (4 ms) but not linear:6: ranking linear:6 by its 6
    sub-experts against the others' milliseconds put it above the full model, and a linear:6 floor was served
    at linear:8. Without every candidate timed the order is by compute (2 < 6 < 8 sub-experts)."""
    points = {p: PointCost(p, "elastic", 50.0, {1: ms, 8: 1.2 * ms}, {64: 1.0, 512: 8.0})
              for p, ms in (("linear:2", 2.0), ("linear:8", 4.0))}
    ladder = Ladder(SPACE, CostModel(points, 128, 64, "test"), 8)
    assert ladder.cheapest_meeting([P("linear:6")]) == P("linear:6")
    assert ladder.cheapest_meeting([P("linear:2"), P("linear:6")]) == P("linear:6")
    assert ladder.queue_points([P("linear:6"), P("linear:2")]) == [P("linear:2"), P("linear:6"), P("linear:8")]
    assert ladder.cheapest_meeting([P("linear:2")]) == P("linear:2")  # both timed: by milliseconds


def test_scheduler_time_is_averaged_over_the_decisions_made():
    """Iterations with nothing waiting (or no free slot) only decode: they make no decision and must not
    dilute the time per decision. Counted by wrapping the policy."""
    engine = sim_engine("prism", max_batch=8, max_running=16)
    calls = []
    admit = engine.policy.admit

    def counted(e):
        calls.append(1)
        return admit(e)

    engine.policy.admit = counted
    engine.schedule(_poisson(80, 20.0, ["linear:2", "linear:6", "linear:8"]))
    engine.run()
    assert len(engine.stats.steps) > len(calls) > 0  # some iterations decoded without a decision
    assert engine.stats.decisions == len(engine.stats.decision_times) == len(calls)


def test_a_cuda_forward_pass_is_timed_to_its_end(monkeypatch):
    """On CUDA a forward pass returns with its kernels queued: the step's clock must wait for the device
    (else the time lands in sampling). Checked by the synchronisations asked for, on a CUDA and a CPU device."""
    from prism_cli.serving.executor import ModelExecutor

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    executor = object.__new__(ModelExecutor)
    executor.device = torch.device("cpu")
    executor._finished()
    assert synced == []
    executor.device = torch.device("cuda", 1)
    executor._finished()
    assert synced == [torch.device("cuda", 1)]


# --- per-row points --------------------------------------------------------------------------------

def test_per_row_topk_equals_topk_at_each_tokens_k():
    gen = torch.Generator().manual_seed(0)
    tokens, experts, n_sub, top_k = 12, 8, 4, 2
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    w = torch.rand(tokens, top_k, generator=gen)
    scores = torch.rand(tokens, top_k, n_sub, generator=gen)
    ks = torch.randint(1, n_sub * top_k + 1, (tokens,), generator=gen)
    ids, weights = PerRowTopKPolicy(n_sub, top_k, experts).allocate(idx, w, scores, ks)
    assert "per_row_topk" in POLICIES
    for t in range(tokens):
        want_ids, want_w = TopKPolicy(n_sub, top_k, experts).allocate(idx[t : t + 1], w[t : t + 1], scores[t : t + 1], int(ks[t]))
        kept = ids[t] != experts * n_sub
        assert int(kept.sum()) == int(ks[t])
        got = dict(zip(ids[t][kept].tolist(), weights[t][kept].tolist(), strict=True))
        assert got == pytest.approx(dict(zip(want_ids[0].tolist(), want_w[0].tolist(), strict=True)))
        assert weights[t][~kept].abs().sum() == 0


def _assert_rows_get_their_points(model, ids: torch.Tensor, points: list) -> None:
    """One forward with row i at ``points[i]`` gives each row what the whole model at that point gives it."""
    from prism_cli.runtime.elastic import set_operating_point

    with torch.inference_mode():
        want = []
        for i, p in enumerate(points):
            set_operating_point(model, p)
            want.append(model(input_ids=ids[i : i + 1]).logits)
        set_row_points(model, points, ids.shape[1])
        got = model(input_ids=ids).logits
        clear_row_points(model)
    for i in range(len(points)):
        torch.testing.assert_close(got[i : i + 1], want[i], rtol=1e-4, atol=1e-4)


def test_row_points_give_each_row_what_its_point_gives_it(served):
    ids = torch.randint(0, 400, (3, 10), generator=torch.Generator().manual_seed(1))
    points = [served.space.parse(p) for p in ("linear:3", "topk:5", "threshold:0.8")]
    _assert_rows_get_their_points(served.model, ids, points)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])  # top-k weights as they are; renormalised over the top-k
def test_rows_at_linear_points_route_in_one_call_as_each_point_alone(family, tmp_path):
    """Every row at a linear point: one router call at the largest K, each token cut to its own K (whole
    blocks, partial blocks, the full K), gives each row what the model at its point gives it."""
    from conftest import write_random_partition

    from prism_cli import load_elastic
    from prism_cli.export.builder import ExportSettings, export_model
    from prism_cli.models.tiny import build_tiny_model
    from prism_cli.operating_points import parse_operating_point

    source = build_tiny_model(family, tmp_path / family)
    export_model(str(source), write_random_partition(source, tmp_path / "p.h5"), tmp_path / "export", ExportSettings(gate="linear"))
    model = load_elastic(str(tmp_path / "export"))
    calls = []
    handle = model.prism_state.flat_routers[0].router.register_forward_hook(lambda *_: calls.append(1))  # the stock router
    ids = torch.randint(0, 400, (5, 6), generator=torch.Generator().manual_seed(4))
    points = [parse_operating_point(f"linear:{k}", "linear", 4, 2) for k in (1, 3, 4, 6, 8)]
    _assert_rows_get_their_points(model, ids, points)
    handle.remove()
    assert len(calls) == len(points) + 1  # each point alone, then the mixed forward in one call
    reset_dispatch_counts()
    with torch.inference_mode():
        set_row_points(model, points, ids.shape[1])
        model(input_ids=ids)
        clear_row_points(model)
    # the experts took the ragged block shape (each token's own blocks), not the flat path over every pair
    assert set(reset_dispatch_counts()) == {"prefix-padded"}


def test_rows_of_a_tuned_router_get_their_points(tmp_path):
    """A tuned router's copies no longer tie (``ranked`` mode: each point's own top-K): rows at different
    linear points in one forward give each row what the model at its point gives it."""
    from conftest import write_random_partition

    from prism_cli import load_elastic
    from prism_cli.export.builder import ExportSettings, export_model
    from prism_cli.models.tiny import build_tiny_model
    from prism_cli.operating_points import parse_operating_point

    source = build_tiny_model("olmoe", tmp_path / "olmoe")
    export_model(str(source), write_random_partition(source, tmp_path / "p.h5"), tmp_path / "export", ExportSettings(gate="linear"))
    model = load_elastic(str(tmp_path / "export"))
    gen = torch.Generator().manual_seed(6)
    for router in model.prism_state.flat_routers:  # what training does to the rows, and how a tuned export routes
        with torch.no_grad():
            router.router.weight.add_(torch.randn(router.router.weight.shape, generator=gen) * 0.1)
        router.mode = "ranked"
    ids = torch.randint(0, 400, (5, 6), generator=torch.Generator().manual_seed(4))
    _assert_rows_get_their_points(model, ids, [parse_operating_point(f"linear:{k}", "linear", 4, 2) for k in (1, 3, 4, 6, 8)])


# --- the real engine -------------------------------------------------------------------------------

@torch.inference_mode()
def _greedy_alone(served, r: Request, point: OperatingPoint) -> list[int]:
    """The oracle: the request alone, no KV cache, no padding, the whole sequence recomputed every token."""
    from prism_cli.runtime.elastic import set_operating_point

    set_operating_point(served.model, point)
    ids = list(r.prompt_ids)
    for _ in range(r.params.max_tokens):
        ids.append(int(served.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[r.prompt_len :]


def _run_and_check_each_alone(executor, policy, served, reference, reqs: list[Request], limits: Limits) -> Engine:
    """Serve ``reqs`` on ``served``; every greedy output must be what the request alone gives on ``reference``
    at the point it was served at, with no floor violated."""
    engine = Engine(executor, policy, Ladder(served.space, None, limits.max_batch), limits)
    engine.schedule(reqs)
    engine.run()
    for r in reqs:
        (point,) = r.served_at
        assert r.output_ids == _greedy_alone(reference, r, reference.space.parse(point)), (r.floor, point)
    assert engine.stats.violations == 0
    return engine


@pytest.mark.parametrize("policy", ["mixed", "static"])
def test_continuous_batching_matches_generating_each_request_alone(served, policy):
    """Requests of different lengths join and leave batches (max 2 rows, 3 running): every greedy output is
    what the request alone gives at the point it was served at (mixed: rows at their own points in one step)."""
    from prism_cli.serving.executor import ModelExecutor

    floors = ["linear:2", "linear:8", "topk:4", "linear:6", "linear:2"]
    gen = torch.Generator().manual_seed(5)
    reqs = [Request(torch.randint(0, 400, (5 + 3 * i,), generator=gen).tolist(),
                    SamplingParams(max_tokens=4 + 2 * i, temperature=0.0, ignore_eos=True), served.space.parse(f), 0.0)
            for i, f in enumerate(floors)]
    executor = ModelExecutor(served)
    policy_obj = SCHEDULING_POLICIES.get(policy)(served.space.full()) if policy == "static" else SCHEDULING_POLICIES.get(policy)()
    engine = _run_and_check_each_alone(executor, policy_obj, served, served, reqs, Limits(2, 3, 0.05))
    assert max(s.rows for s in engine.stats.steps) == 2  # rows did share steps
    if policy == "mixed":
        assert {next(iter(r.served_at)) for r in reqs} == set(floors) and executor.times.per_row_steps > 0


@pytest.mark.parametrize("policy", ["mixed", "static"])
def test_serving_keeps_no_tensor_alive_after_the_requests_end(served, policy):
    """A server's memory must not grow with the steps it runs: after a workload ends, serving the same
    workload again leaves no more live tensors than the first time did (counted by the garbage
    collector; an executor that kept each step's logits fails it)."""
    import gc

    from prism_cli.serving.executor import ModelExecutor

    floors = ["linear:8", "linear:4", "linear:2", "linear:8"]

    def serve() -> int:
        gen = torch.Generator().manual_seed(2)
        reqs = [Request(torch.randint(0, 400, (6 + i,), generator=gen).tolist(),
                        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), served.space.parse(f), 0.0)
                for i, f in enumerate(floors)]
        policy_obj = SCHEDULING_POLICIES.get(policy)(served.space.full()) if policy == "static" else SCHEDULING_POLICIES.get(policy)()
        limits = Limits(2, 4, 0.05)
        engine = Engine(ModelExecutor(served), policy_obj, Ladder(served.space, None, limits.max_batch), limits)
        engine.schedule(reqs)
        engine.run()
        assert all(len(r.output_ids) == 6 for r in reqs)
        del engine, reqs
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    first = serve()
    assert serve() - first < 10


@pytest.mark.parametrize("original", [False, True])
def test_offloaded_experts_serve_what_the_model_alone_gives(served, tiny_export, original):
    """--device-memory on the engine: the experts live behind a cache holding a third of them (simulated
    device), rows at their own points share steps, and every greedy output is still what the request
    alone gives on the model without offloading (the export, or its source model)."""
    from prism_cli.offload.config import OffloadConfig
    from prism_cli.serving.executor import ModelExecutor, load_served_model

    offloaded = load_served_model(str(tiny_export), original=original, offload=OffloadConfig("34%"))
    assert offloaded.model.prism_offload is not None
    reference = load_served_model(str(tiny_export), original=True) if original else served
    floors = ["linear:2", "linear:8", "linear:6"]
    gen = torch.Generator().manual_seed(11)
    reqs = [Request(torch.randint(0, 400, (6 + 2 * i,), generator=gen).tolist(),
                    SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                    reference.space.parse(f) if not original else reference.space.full(), 0.0)
            for i, f in enumerate(floors)]
    policy = SCHEDULING_POLICIES.get("fifo" if original else "mixed")()
    _run_and_check_each_alone(ModelExecutor(offloaded), policy, offloaded, reference, reqs, Limits(3, 3, 0.05))
    assert offloaded.model.prism_offload.cache.stats.misses > 0  # the cache did work


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(served):
    from prism_cli.serving.executor import ModelExecutor

    def run(params: SamplingParams) -> list[int]:
        r = Request([5, 6, 7, 8], params, served.space.full(), 0.0)
        engine = Engine(ModelExecutor(served, seed=1), SCHEDULING_POLICIES.get("fifo")(), Ladder(served.space), Limits(2, 2, 1.0))
        engine.schedule([r])
        engine.run()
        return r.output_ids

    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    assert run(seeded) == run(seeded)
    assert run(seeded) != run(SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))
    greedy = run(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert run(SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)) == greedy


def test_stop_string_ends_the_text_before_it(served):
    from prism_cli.serving.executor import ModelExecutor

    def run(stop: tuple[str, ...]) -> Request:
        r = Request([5, 6, 7, 8], SamplingParams(max_tokens=16, temperature=0.0, stop=stop, ignore_eos=True), served.space.full(), 0.0)
        engine = Engine(ModelExecutor(served), SCHEDULING_POLICIES.get("fifo")(), Ladder(served.space), Limits(2, 2, 1.0))
        engine.schedule([r])
        engine.run()
        return r

    full = run(())
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = run((stop,))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


# --- prism schedule ----------------------------------------------------------------------------------

def test_schedule_sim_and_real_write_their_metrics(cli, tiny_export, tmp_path):
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    res = cli("schedule", tiny_export, "--sim", "--cost-model", cost, "--rate", "20", "--duration", "1", "--max-output", "8",
              "--max-prompt", "32", "--out", tmp_path / "sim")
    assert res.code == 0, res
    data = json.loads((tmp_path / "sim.json").read_text())
    assert data["metrics"]["floor_violations"] == 0 and data["metrics"]["completed"] == data["metrics"]["requests"] > 5
    res = cli("schedule", tiny_export, "--policy", "mixed", "--rate", "20", "--duration", "0.3", "--max-output", "4",
              "--max-prompt", "16", "--out", tmp_path / "real")
    assert res.code == 0, res
    real = json.loads((tmp_path / "real.json").read_text())["metrics"]
    assert real["floor_violations"] == 0 and real["engine_time_s"]["forward"] > 0


@pytest.mark.parametrize("args, needles", [
    (["--rate", "0"], ["--rate", "positive"]),
    (["--policy", "fifo", "--floors", "linear:9=1"], ["linear:9"]),
    (["--policy", "prism"], ["prism policy", "cost model"]),
    (["--policy", "lottery"], ["lottery", "prism"]),
    (["--sim"], ["cost model"]),
    (["--max-batch", "8", "--max-running", "4"], ["--max-running"]),
    (["--sim", "--device-memory", "1GB"], ["--device-memory", "cost model"]),
    (["--policy", "fifo", "--cache-policy", "lfu"], ["--cache-policy", "--device-memory"]),
    (["--policy", "fifo", "--device-memory", "4XB"], ["4XB"]),
])
def test_schedule_bad_input(cli, tiny_export, args, needles):
    cli("schedule", tiny_export, "--duration", "1", *args).assert_one_line_error(*needles)  # (no cost model saved)


def test_cost_model_times_the_engine_itself(cli, tiny_export, tmp_path):
    dec = _bench_json(tmp_path / "d", "decode", 128, {"linear:8": {1: 5.0, 8: 9.0}, "original:2": {1: 6.0, 8: 11.0}})
    pre = _bench_json(tmp_path / "p", "prefill", 64, {"linear:8": {1: 20.0, 4: 50.0}, "original:2": {1: 22.0, 4: 60.0}})
    res = cli("schedule", "cost-model", tiny_export, "--decode", dec, "--prefill", pre, "--rows", "1,3", "--widths", "8,24",
              "--repeats", "2", "--out", tmp_path / "cm.json")
    assert res.code == 0, res
    engine = CostModel.load(tmp_path / "cm.json").engine
    assert engine is not None and set(engine.decode_ms) == {"linear:8", "original:2"}
    for table in (*engine.decode_ms.values(), *engine.prefill_ms.values()):
        assert {w: sorted(by) for w, by in table.items()} == {8: [1, 3], 24: [1, 3]}
        assert all(v > 0 for by in table.values() for v in by.values())
    assert {w: sorted(by) for w, by in engine.join_ms.items()} == {8: [3], 24: [3]}  # copies need two rows
    assert engine.step_overhead_ms > 0  # the engine's own time around its passes, measured on a burst
    res = cli("schedule", "cost-model", tiny_export, "--decode", dec, "--prefill", pre, "--no-engine", "--out", tmp_path / "b.json")
    assert res.code == 0 and CostModel.load(tmp_path / "b.json").engine is None
    for args, needles in ((["--widths", "1"], ["widths", ">= 2"]), (["--repeats", "0"], ["--repeats"]),
                          (["--rows", "a"], ["--rows"]), (["--widths", "5000"], ["context"])):
        cli("schedule", "cost-model", tiny_export, "--decode", dec, "--prefill", pre, *args,
            "--out", tmp_path / "x.json").assert_one_line_error(*needles)


def test_decode_gain_bound_by_hand():
    """Synthetic costs C(b, K) = 10 + b*K: at 8 rows linear:2 26 ms, linear:8 and original:2 74 ms; half the
    requests at each floor decode at 50 ms a step on average: 74 / 50 - 1 = +48 %. With engine costs (width
    64: 4 / 6 / 8 ms; width 256: 10 / 10 / 10 ms) those count instead: 8 / 5 - 1 = +60 % and 0; with the
    engine's time around each step, it counts in every step."""
    from prism_cli.serving.sweep import decode_gain_bound

    model = synthetic_cost_model()
    mix = [("linear:2", 0.5), ("linear:8", 0.5)]
    assert decode_gain_bound(model, mix, "original:2", 8) == {"bench decode": pytest.approx(0.48)}
    table = {p: {64: {8: v}, 256: {8: 10.0}} for p, v in (("linear:2", 4.0), ("linear:8", 6.0), ("original:2", 8.0))}
    model.engine = EngineCosts(table, table, {}, {})
    assert decode_gain_bound(model, mix, "original:2", 8) == {"engine, cache width 64": pytest.approx(0.6),
                                                              "engine, cache width 256": pytest.approx(0.0)}
    model.engine.step_overhead_ms = 2.0  # every step also pays 2 ms around it: (8 + 2) / (5 + 2) - 1
    assert decode_gain_bound(model, mix, "original:2", 8)["engine, cache width 64"] == pytest.approx(10 / 7 - 1)
    # The bench's timing where the engine has none: linear:3 at 8 rows 34 ms.
    assert decode_gain_bound(model, [("linear:3", 1.0)], "original:2", 8) == {"bench decode": pytest.approx(74 / 34 - 1)}
    assert decode_gain_bound(model, [("topk:9", 1.0)], "original:2", 8) == {}


def test_sweep_measures_the_engine_again_right_before_real_runs(cli, tiny_export, tmp_path):
    """The cost model given says every engine step costs 1,000 ms; a real sweep re-measures the engine on
    the same grid (the tiny model takes far less) and saves what it measured; --no-calibrate keeps it."""
    model = synthetic_cost_model()
    model.points = {k: v for k, v in model.points.items() if k in ("linear:2", "linear:8", "original:1", "original:2")}
    grid = {8: {1: 1000.0, 3: 1000.0}, 24: {1: 1000.0, 3: 1000.0}}
    copies = {8: {3: 1000.0}, 24: {3: 1000.0}}
    model.engine = EngineCosts(dict.fromkeys(model.points, grid), dict.fromkeys(model.points, grid), copies, copies)
    model.save(tmp_path / "cm.json")
    args = ("schedule", "sweep", tiny_export, "--cost-model", tmp_path / "cm.json", "--rates", "20", "--duration", "0.3",
            "--max-output", "4", "--max-prompt", "16", "--floors", "linear:2=0.5,linear:8=0.5")
    res = cli(*args, "--out", tmp_path / "s")
    assert res.code == 0, res
    fresh = CostModel.load(tmp_path / "s_cost_model.json").engine
    assert fresh is not None and set(fresh.decode_ms) == set(model.points)
    for table in (*fresh.decode_ms.values(), *fresh.prefill_ms.values()):
        assert {w: sorted(by) for w, by in table.items()} == {8: [1, 3], 24: [1, 3]}
        assert all(0 < v != 1000.0 for by in table.values() for v in by.values())  # measured, not the file's
    assert fresh.step_overhead_ms > 0
    assert "measured again right before the runs" in (tmp_path / "s.md").read_text()
    res = cli(*args, "--no-calibrate", "--out", tmp_path / "n")
    assert res.code == 0 and not (tmp_path / "n_cost_model.json").exists()
    assert "measured again" not in (tmp_path / "n.md").read_text()


def test_schedule_unreadable_trace_names_the_line(cli, tiny_export, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0, "prompt": "a b", "max_tokens": 4}\n\n{"arrival": 1, "prompt": "x"}\n')
    cli("schedule", tiny_export, "--policy", "fifo", "--trace", trace).assert_one_line_error("line 3", "max_tokens")
    trace.write_text('{"arrival": 0, "prompt": "a b", "max_tokens": 4, "floor": "linear:12"}\n')
    cli("schedule", tiny_export, "--policy", "fifo", "--trace", trace).assert_one_line_error("line 1", "linear:12")
    cli("schedule", tiny_export, "--policy", "fifo", "--trace", tmp_path / "none.jsonl").assert_one_line_error("does not exist")


def test_row_points_work_where_the_router_is_not_named_gate(tmp_path):
    """Granite-MoE's block calls its router ``router``: per-row points wrap that child, not a ``gate``."""
    from conftest import write_random_partition

    from prism_cli import load_elastic
    from prism_cli.export.builder import ExportSettings, export_model
    from prism_cli.models.tiny import build_tiny_model
    from prism_cli.operating_points import parse_operating_point

    source = build_tiny_model("granitemoe", tmp_path / "granite")
    export_model(str(source), write_random_partition(source, tmp_path / "p.h5"), tmp_path / "export",
                 ExportSettings(gate="neurons"))
    ids = torch.randint(0, 400, (2, 8), generator=torch.Generator().manual_seed(2))
    points = [parse_operating_point(p, "neurons", 4, 2) for p in ("linear:2", "topk:6")]
    _assert_rows_get_their_points(load_elastic(str(tmp_path / "export")), ids, points)


# --- bad input found by fuzzing: loads, floor shares, benches of another export, --out before the run -----

def test_sweep_refuses_no_load_and_unknown_loads_before_any_run():
    from prism_cli.serving.runner import ScheduleSettings
    from prism_cli.serving.sweep import parse_loads, run_sweep

    assert parse_loads(" high , low") == ["high", "low"]
    for text, needle in (("", "names no load"), (" , ", "names no load"), ("low,peak", "unknown load peak")):
        with pytest.raises(PrismError, match=needle):
            parse_loads(text)
    # run_sweep refuses them too (the directory is never read: the refusal comes first).
    for loads, rates, needle in (([], None, "names no load"), (["peak"], None, "unknown load peak"), ([], [], "no arrival rate")):
        with pytest.raises(PrismError, match=needle):
            run_sweep("/nowhere", ScheduleSettings(sim=True), synthetic_cost_model(), loads, rates)


def test_sweep_rounds_alternate_their_order_and_pair_each_round(monkeypatch):
    """Three rounds of real runs: the policies in order, reversed, in order again (so that a drift of the
    machine's speed weighs on every policy alike), ``prism`` always next to its baseline (the pair the targets
    compare); the table in its own order; the simulator once per policy; the targets compare each
    round's prism with the same round's FIFO on the original and take medians: by hand, gains +10 %, -20 %,
    +50 % -> +10 %; mixed over prism +10 %, 0 %, -20 % -> 0 %."""
    from prism_cli.serving import sweep
    from prism_cli.serving.runner import ScheduleResult, ScheduleSettings

    rps = {("prism", False): [11.0, 8.0, 15.0], ("fifo", True): [10.0, 10.0, 10.0], ("mixed", False): [12.1, 8.0, 12.0]}
    real: list[tuple[str, bool]] = []
    simulated: list[tuple[str, bool]] = []

    def fake(directory, settings, cost_model, served=None):
        key = (settings.policy, settings.original)
        model = "original" if settings.original else "export"
        if settings.sim:
            simulated.append(key)
            return ScheduleResult({"policy": settings.policy}, model, "sim", {"requests_per_s": 5.0}, [])
        n = real.count(key)
        real.append(key)
        value = rps.get(key, [7.0] * 3)[n]
        spread = {"p50": 50.0 / value, "p90": 100.0 / value, "p99": 120.0 / value}
        metrics = {"requests_per_s": value, "output_tokens_per_s": 64 * value, "ttft_s": spread, "tpot_s": spread,
                   "e2e_s": spread, "floor_violations": n, "scheduler_us_per_decision": 100.0,
                   "scheduler_share_of_decode_step": 0.01 * (n + 1)}
        return ScheduleResult({"policy": settings.policy}, model, "real", metrics, [])

    monkeypatch.setattr(sweep, "run_schedule", fake)
    runs, capacity = sweep.run_sweep("dir", ScheduleSettings(sim=False), synthetic_cost_model(), [], [4.0], rounds=3)
    assert capacity is None
    assert sorted(sweep.ORDER) == sorted(sweep.RUNS)
    assert real == sweep.ORDER + sweep.ORDER[::-1] + sweep.ORDER
    assert abs(sweep.ORDER.index(("prism", False)) - sweep.ORDER.index(("fifo", True))) == 1
    assert sorted(simulated) == sorted(sweep.RUNS)
    assert [(r.settings["policy"], r.model == "original", r.metrics["round"]) for _, _, r in runs] == [
        (p, o, i) for p, o in sweep.RUNS for i in (1, 2, 3)]
    assert all(r.metrics["sim_over_real"] == pytest.approx(5.0 / r.metrics["requests_per_s"]) for _, _, r in runs)
    goal = sweep.targets(runs, load="4/s")
    assert goal["rounds"] == 3
    assert goal["gains"] == pytest.approx([0.1, -0.2, 0.5])
    assert goal["gain"] == pytest.approx(0.1)
    assert (goal["prism_requests_per_s"], goal["fifo_original_requests_per_s"]) == (11.0, 10.0)
    assert goal["prism_e2e_p90_s"] == pytest.approx(100 / 11) and goal["p90_no_worse"]
    assert goal["mixed_over_prism"] == pytest.approx(0.0)
    assert goal["floor_violations"]["prism"] == 3 and goal["scheduler_share_of_decode_step"] == pytest.approx(0.02)
    assert not goal["met"]
    table = sweep.sweep_table(runs, "real", "test machine")
    assert "round" in table.columns and len(table.rows) == 18


def test_sweep_rounds_must_be_real_and_positive(cli, tiny_export, tmp_path):
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    for extra, needle in ((("--rounds", "0"), "--rounds must be at least 1, got 0"), (("--sim", "--rounds", "2"), "repeats real runs")):
        cli("schedule", "sweep", tiny_export, "--cost-model", cost, "--rates", "1", *extra,
            "--out", tmp_path / "sw").assert_one_line_error(needle)
    assert not list(tmp_path.glob("sw*"))


def test_floor_shares_that_do_not_sum_to_one_are_rescaled_and_said(cli, tiny_export, tmp_path):
    from prism_cli.serving.floors import parse_shares, rescale_note

    shares = parse_shares("linear:2=0.5,linear:6=0.3", SPACE)
    assert [w for _, w in shares] == [0.5, 0.3]
    assert rescale_note(shares) == "floor shares sum to 0.8: rescaled to linear:2=0.625, linear:6=0.375"
    assert rescale_note(parse_shares("linear:2=0.25,linear:8=0.75", SPACE)) is None
    assert rescale_note(parse_shares("linear:2", SPACE)) is None  # one floor without a share: all of them
    assert rescale_note(parse_shares("linear:2=3,linear:8=1", SPACE)) == "floor shares sum to 4: rescaled to linear:2=0.75, linear:8=0.25"
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    common = (tiny_export, "--sim", "--cost-model", cost, "--duration", "0.5", "--max-output", "4", "--max-prompt", "16",
              "--floors", "linear:2=0.5,linear:8=0.3")
    res = cli("schedule", *common, "--rate", "20", "--out", tmp_path / "run")
    assert res.code == 0, res
    assert "floor shares sum to 0.8: rescaled to linear:2=0.625, linear:8=0.375" in res.out
    used = json.loads((tmp_path / "run.json").read_text())["settings"]["floor_shares"]
    assert used == {"linear:2": pytest.approx(0.625), "linear:8": pytest.approx(0.375)}
    res = cli("schedule", "sweep", *common, "--rates", "20", "--out", tmp_path / "sweep")
    assert res.code == 0, res
    assert res.out.count("floor shares sum to 0.8") == 1
    used = json.loads((tmp_path / "sweep.json").read_text())["floor_shares"]
    assert used == {"linear:2": pytest.approx(0.625), "linear:8": pytest.approx(0.375)}
    res = cli("schedule", *common[:-1], "linear:2=0.5,linear:8=0.5", "--rate", "20")
    assert res.code == 0 and "floor shares" not in res.out


def test_cost_model_refuses_benches_of_another_export(tiny_export, tmp_path):
    """The tiny export has N=4 sub-experts and top-2. Benches name the folder they measured; where it
    exists it must be this export (or a copy of it); where it does not, the bench's points must fit
    this export and its original:k must count N*k = 4k active sub-experts."""
    def bench(name: str, mode: str, target: Path | str, points: dict[str, float | None]) -> Path:
        entries = [{"point": p, "kind": "original" if p.startswith("original") else "elastic", "perplexity": 40.0,
                    **({"active": a} if a is not None else {}), "latency": {"1": {"median_ms": 5.0}, "8": {"median_ms": 9.0}}}
                   for p, a in points.items()]
        (tmp_path / name).mkdir(exist_ok=True)
        path = tmp_path / name / f"{mode}.json"
        path.write_text(json.dumps({"target": str(target), "settings": {"mode": mode, "seq_len": 16}, "points": entries}))
        return path

    def build(target: Path | str, points: dict[str, float | None]) -> CostModel:
        key = str(abs(hash((str(target), tuple(points)))))
        return CostModel.from_bench(bench(key, "decode", target, points), bench(key, "prefill", target, points), tiny_export)

    ours = {"linear:8": 8.0, "original:1": 4.0, "original:2": 8.0}
    assert set(build(tiny_export, ours).points) == set(ours)
    copy = tmp_path / "copy-of-export"
    copy.mkdir()
    (copy / "config.json").write_text((Path(tiny_export) / "config.json").read_text())
    assert set(build(copy, ours).points) == set(ours)  # a copy of this export: the same prism section
    assert set(build(tmp_path / "moved", {"linear:8": None, "original:2": None}).points) == {"linear:8", "original:2"}
    other = tmp_path / "other-export"
    other.mkdir()
    config = json.loads((Path(tiny_export) / "config.json").read_text())
    config["prism"]["sub_experts"] = 8
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrismError, match=f"measured on {other}, not on {tiny_export}"):
        build(other, ours)
    with pytest.raises(PrismError, match=r"moved, not on .*original:1 counts 8 active sub-experts: N=8; .* has N=4"):
        build(tmp_path / "moved", {"linear:8": 8.0, "original:1": 8.0})
    with pytest.raises(PrismError, match=r"its point linear:12 is not a point of .*N=4, top-2"):
        build(tmp_path / "moved", {"linear:12": 12.0, "original:2": None})
    decode = bench("mix", "decode", tiny_export, ours)
    with pytest.raises(PrismError, match=f"prefill.json was measured on {other}"):
        CostModel.from_bench(decode, bench("mix", "prefill", other, ours), tiny_export)


def test_schedule_run_checks_its_out_before_the_run(cli, tiny_export, tmp_path, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr("prism_cli.serving.runner.run_schedule", never)
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    (tmp_path / "res.json").mkdir()
    (tmp_path / "a-file").write_text("x")
    for out, needles in ((tmp_path / "res", ["res.json", "is a folder"]),
                         (tmp_path / "a-file" / "sub" / "res", ["a-file", "is a file, not a folder"])):
        cli("schedule", tiny_export, "--sim", "--cost-model", cost, "--duration", "1", "--out", out).assert_one_line_error(*needles)


def test_schedule_outputs_never_replace_what_the_run_reads(cli, tiny_export, tmp_path, monkeypatch):
    """``--out`` inside the export (its config.json, its saved cost model) or onto the cost model or the trace
    was written over them after the run; every such stem is refused before any run, and the inputs stay."""
    def never(*_args, **_kwargs):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr("prism_cli.serving.sweep.run_sweep", never)  # first: sweep imports run_schedule from runner
    monkeypatch.setattr("prism_cli.serving.runner.run_schedule", never)
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    trace = tmp_path / "tr.json"
    trace.write_text('{"arrival": 0, "prompt": "The whale", "max_tokens": 4}\n')
    before = {p: p.read_bytes() for p in (cost, trace, Path(tiny_export) / "config.json")}
    sim = ("--sim", "--cost-model", cost, "--duration", "1")
    for command, out, needles in (
            (("schedule", "run", tiny_export, *sim), Path(tiny_export) / "config", ["inside the export"]),
            (("schedule", "run", tiny_export, *sim), Path(tiny_export) / "prism" / "cost_model", ["inside the export"]),
            (("schedule", "run", tiny_export, *sim), tmp_path / "cm", ["cm.json", "is the cost model"]),
            (("schedule", "run", tiny_export, *sim[:3], "--trace", trace), tmp_path / "tr", ["tr.json", "is the trace"]),
            (("schedule", "sweep", tiny_export, *sim, "--rates", "1"), tmp_path / "cm", ["cm.json", "is the cost model"]),
            (("schedule", "sweep", tiny_export, *sim, "--rates", "1"), Path(tiny_export) / "sweep", ["inside the export"]),
            (("schedule", "sweep", tiny_export, *sim, "--rates", "1"), tmp_path, ["is a folder"])):
        cli(*command, "--out", out).assert_one_line_error(*needles)
    assert {p: p.read_bytes() for p in before} == before


def test_a_sweep_names_every_file_after_its_whole_stem(cli, tiny_export, tmp_path):
    """``--out sw/res.v2`` wrote res.v2.md but res.png (``with_suffix``): two sweeps res.v1 and res.v2 shared a plot."""
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    (tmp_path / "sw").mkdir()  # a missing folder is refused, not made
    result = cli("schedule", "sweep", tiny_export, "--sim", "--cost-model", cost, "--duration", "1", "--rates", "2",
                 "--max-prompt", "32", "--max-output", "16", "--out", tmp_path / "sw" / "res.v2")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == [
        "res.v2.csv", "res.v2.json", "res.v2.md", "res.v2.png", "res.v2_targets.json"]


def test_a_trace_run_says_it_ran_the_trace(cli, tiny_export, tmp_path):
    """The summary named --rate, --duration and --floors (their defaults) for a run whose arrivals, lengths
    and floors all came from --trace."""
    cost = tmp_path / "cm.json"
    synthetic_cost_model().save(cost)
    trace = tmp_path / "tr.jsonl"
    trace.write_text('{"arrival": 0, "prompt": "The whale", "max_tokens": 4, "floor": "linear:2"}\n'
                     '{"arrival": 0.5, "prompt": "Call me", "max_tokens": 3}\n')
    result = cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--trace", trace, "--out", tmp_path / "r")
    assert result.code == 0, result.err
    note = (tmp_path / "r.md").read_text()
    assert f"trace {trace}" in note and "req/s for" not in note
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["requests"] == 2 and saved["settings"]["trace"] == str(trace)
    assert not {"rate", "duration", "floors", "max_prompt", "max_output"} & set(saved["settings"])  # the defaults were recorded
    # Options for the Poisson workload the trace replaces are refused, not ignored (--max-prompt 10 kept 52).
    for option, value in (("--rate", "2"), ("--max-prompt", "10"), ("--floors", "linear:2"), ("--duration", "5")):
        cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--trace", trace, option,
            value).assert_one_line_error(f"{option} does not apply with --trace")


def test_a_number_as_a_trace_floor_is_a_perplexity_ceiling_as_on_the_server(cli, tiny_export, tmp_path):
    """``"floor": 45`` in a trace was read as ``topk:45``-style text (``3`` became ``topk:3``), while the server reads
    a number as a perplexity ceiling: a trace now means what a request means. By hand: the floor a number gives is
    the floor ``ppl:`` of that number gives, for a ceiling every point meets and for one only the full model meets."""
    cost = tmp_path / "cm.json"
    model = synthetic_cost_model()
    model.save(cost)
    full = max(p.perplexity for p in model.points.values())
    best = min(p.perplexity for p in model.points.values())
    lines = [{"arrival": i * 0.1, "prompt": "The whale", "max_tokens": 2, "floor": floor}
             for i, floor in enumerate([full + 1, f"ppl:{full + 1}", best, f"ppl:{best}"])]
    trace = tmp_path / "tr.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli("schedule", "run", tiny_export, "--sim", "--cost-model", cost, "--trace", trace, "--out", tmp_path / "r")
    assert result.code == 0, result.err
    floors = [r["floor"] for r in sorted(json.loads((tmp_path / "r.json").read_text())["requests"], key=lambda r: r["arrival"])]
    assert floors[0] == floors[1] and floors[2] == floors[3] and floors[0] != floors[2], floors


def test_impossible_lengths_are_named_by_their_options(cli, tiny_export):
    cli("schedule", "run", tiny_export, "--sim", "--min-output", "9", "--max-output", "3").assert_one_line_error(
        "--min-output 9", "--max-output 3")
