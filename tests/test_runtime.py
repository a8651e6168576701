"""The elastic runtime: allocation policies, operating-point syntax, prism's experts implementation,
switching operating points in place, the Python API and the active sub-expert count."""

from __future__ import annotations

import inspect
import itertools
import re
from pathlib import Path

import pytest
import torch
from conftest import FULL, N_SUB, TOP_K, logits_of, random_neurons_export, token_batch

from prism_cli.errors import PrismError
from prism_cli.evaluation.quality import ActiveCounter
from prism_cli.operating_points import OperatingPoint, default_operating_points, parse_operating_point
from prism_cli.runtime.grouped_mm import prefix_routing
from prism_cli.runtime.policies import POLICIES, PatternPolicy, ThresholdPolicy, TopKPolicy

EXPERTS = 8
SENTINEL = EXPERTS * N_SUB


def routing(tokens: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random router output for ``tokens``: distinct experts, softmax-like weights, positive scores."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=gen) + 0.05
    w = w / w.sum(dim=1, keepdim=True)
    scores = torch.rand(tokens, TOP_K, N_SUB, generator=gen) + 0.1
    return idx, w, scores


def candidates(idx: torch.Tensor, w: torch.Tensor, scores: torch.Tensor, t: int) -> list[tuple[int, float, float]]:
    """Token t's (sub-expert id, weight, weight x score) pairs, by brute force."""
    return [
        (int(idx[t, r]) * N_SUB + n, float(w[t, r]), float(w[t, r] * scores[t, r, n]))
        for r in range(idx.shape[1]) for n in range(N_SUB)
    ]


# ---------------------------------------------------------------------------------------------
# Allocation policies.


def test_policies_are_registered():
    assert {"topk", "pattern", "threshold"} <= set(POLICIES.names())
    assert POLICIES.get("topk") is TopKPolicy


@pytest.mark.parametrize("k", [1, 3, FULL])
def test_topk_keeps_the_k_largest_weight_times_score_pairs(k):
    idx, w, scores = routing()
    ids, weights = TopKPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, k)
    assert ids.shape == weights.shape == (idx.shape[0], k)
    for t in range(idx.shape[0]):
        pairs = sorted(candidates(idx, w, scores, t), key=lambda p: -p[2])
        assert set(ids[t].tolist()) == {p[0] for p in pairs[:k]}
        weight_of = {p[0]: p[1] for p in pairs}
        assert weights[t].tolist() == pytest.approx([weight_of[i] for i in ids[t].tolist()])


def test_topk_lists_its_pairs_in_candidate_order():
    """Router slot by slot, sub-experts ascending: at K = N*k every token's routing is whole experts in
    sub-expert order, the prefix shape the executors run as whole-expert products."""
    idx = torch.tensor([[3, 0], [1, 2]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    scores = torch.tensor([[[0.1, 0.9, 0.2, 0.8], [0.5, 0.4, 0.3, 0.6]], [[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9]]])
    ids, _ = TopKPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, 2)
    # token 0: 0.7*0.9 (3, 1) and 0.7*0.8 (3, 3); token 1: 0.6*0.9 (1, 0) and 0.4*0.9 (2, 3)
    assert ids.tolist() == [[3 * N_SUB + 1, 3 * N_SUB + 3], [1 * N_SUB + 0, 2 * N_SUB + 3]]
    full, _ = TopKPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, N_SUB * TOP_K)
    want = [[e * N_SUB + n for e in row for n in range(N_SUB)] for row in idx.tolist()]
    assert full.tolist() == want
    assert prefix_routing(full, N_SUB, EXPERTS * N_SUB) is not None


def test_topk_prefers_a_strong_sub_expert_of_a_weak_expert():
    idx = torch.tensor([[0, 1]])
    w = torch.tensor([[0.6, 0.4]])
    scores = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.2, 0.9, 0.1, 0.1]]])
    ids, weights = TopKPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, 1)
    assert ids.tolist() == [[1 * N_SUB + 1]] and weights.tolist() == [[pytest.approx(0.4)]]


@pytest.mark.parametrize("pattern", [(4, 1), (3, 3), (1, 0), (2, 4), (4, 4)])
def test_pattern_gives_each_ranked_expert_its_best_sub_experts(pattern):
    idx, w, scores = routing(seed=1)
    ids, weights = PatternPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, pattern)
    assert ids.shape == (idx.shape[0], sum(pattern))
    for t in range(idx.shape[0]):
        ranked = sorted(range(TOP_K), key=lambda r: -float(w[t, r]))
        want, want_w = set(), {}
        for r, count in zip(ranked, pattern, strict=True):
            best = sorted(range(N_SUB), key=lambda n: -float(scores[t, r, n]))[:count]
            for n in best:
                want.add(int(idx[t, r]) * N_SUB + n)
                want_w[int(idx[t, r]) * N_SUB + n] = float(w[t, r])
        assert set(ids[t].tolist()) == want
        assert weights[t].tolist() == pytest.approx([want_w[i] for i in ids[t].tolist()])


@pytest.mark.parametrize("tau", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_threshold_keeps_a_prefix_until_the_share_reaches_tau(tau):
    idx, w, scores = routing(seed=2)
    ids, weights = ThresholdPolicy(N_SUB, TOP_K, EXPERTS).allocate(idx, w, scores, tau)
    assert ids.shape == weights.shape and 1 <= ids.shape[1] <= FULL
    widths = []
    for t in range(idx.shape[0]):
        pairs = sorted(candidates(idx, w, scores, t), key=lambda p: -p[2])
        total = sum(p[2] for p in pairs)
        # the fewest pairs whose share reaches tau (at least one)
        kept = next(m for m in range(1, len(pairs) + 1) if sum(p[2] for p in pairs[:m]) / total >= tau - 1e-7)
        row, row_w = ids[t].tolist(), weights[t].tolist()
        live = [i for i in row if i != SENTINEL]
        assert row[: len(live)] == live, "kept pairs must be a prefix"
        assert len(live) == kept
        assert live == [p[0] for p in pairs[:kept]]
        assert row_w[: len(live)] == pytest.approx([p[1] for p in pairs[:kept]])
        assert all(x == 0.0 for x in row_w[len(live) :])
        widths.append(kept)
    assert ids.shape[1] == max(widths), "no all-sentinel column"


def test_threshold_sentinels_and_extremes():
    idx, w, scores = routing(seed=3)
    policy = ThresholdPolicy(N_SUB, TOP_K, EXPERTS)
    assert policy.sentinel == SENTINEL
    ids, weights = policy.allocate(idx, w, scores, 1.0)
    assert ids.shape == (idx.shape[0], FULL) and (ids != SENTINEL).all()
    for t in range(idx.shape[0]):
        assert sorted(ids[t].tolist()) == sorted(p[0] for p in candidates(idx, w, scores, t))
    ids, weights = policy.allocate(idx, w, scores, 1e-6)
    assert ids.shape == (idx.shape[0], 1) and (ids != SENTINEL).all() and (weights > 0).all()
    # a token with one dominant pair keeps one pair, its neighbour many: sentinels fill the first row
    idx = torch.tensor([[0, 1], [2, 3]])
    w = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    scores = torch.tensor([[[100.0, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]], [[1.0] * 4, [1.0] * 4]])
    ids, weights = policy.allocate(idx, w, scores, 0.9)
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [0] + [SENTINEL] * 7 and weights[0, 1:].eq(0).all()
    assert (ids[1] != SENTINEL).all()


# ---------------------------------------------------------------------------------------------
# Operating-point syntax.


@pytest.mark.parametrize(
    ("spec", "gate", "want"),
    [
        ("topk:3", "neurons", OperatingPoint("topk", 3)),
        ("3", "neurons", OperatingPoint("topk", 3)),
        (5, "neurons", OperatingPoint("topk", 5)),
        ("5", "linear", OperatingPoint("linear", 5)),
        ("linear:8", "neurons", OperatingPoint("linear", 8)),
        (" topk:8 ", "neurons", OperatingPoint("topk", 8)),
        ("pattern:4,1", "neurons", OperatingPoint("pattern", (4, 1))),
        ("pattern:4", "neurons", OperatingPoint("pattern", (4, 0))),
        ("pattern:5", "neurons", OperatingPoint("pattern", (4, 1))),
        ("pattern:0,3", "neurons", OperatingPoint("pattern", (0, 3))),
        ("threshold:0.9", "neurons", OperatingPoint("threshold", 0.9)),
        ("threshold:1", "neurons", OperatingPoint("threshold", 1.0)),
        ("original:2", None, OperatingPoint("original", 2)),
        ("1", None, OperatingPoint("original", 1)),
        (OperatingPoint("topk", 2), "neurons", OperatingPoint("topk", 2)),
    ],
)
def test_parse_operating_point_accepts(spec, gate, want):
    got = parse_operating_point(spec, gate, N_SUB, TOP_K)
    assert got == want
    assert parse_operating_point(str(got), gate, N_SUB, TOP_K) == got  # str() round-trips


@pytest.mark.parametrize(
    ("spec", "gate"),
    [
        ("topk:0", "neurons"), ("topk:9", "neurons"), ("linear:9", "linear"), ("0", "linear"), ("-1", "neurons"),
        ("topk:2.5", "neurons"), ("topk:", "neurons"), ("", "neurons"), ("topk:x", "neurons"),
        ("topk:3", "linear"), ("threshold:0.5", "linear"), ("original:1", "neurons"), ("topk:2", None),
        ("original:3", None), ("original:0", None),
        ("threshold:0", "neurons"), ("threshold:1.5", "neurons"), ("threshold:-0.1", "neurons"),
        ("threshold:nan", "neurons"), ("threshold:abc", "neurons"),
        ("pattern:5,0", "neurons"), ("pattern:1,1,1", "neurons"), ("pattern:0,0", "neurons"),
        ("pattern:9", "neurons"), ("pattern:0", "neurons"), ("pattern:a,b", "neurons"), ("pattern:-1,2", "neurons"),
        ("bogus:1", "neurons"),
    ],
)
def test_parse_operating_point_refuses(spec, gate):
    with pytest.raises(PrismError) as exc:
        parse_operating_point(spec, gate, N_SUB, TOP_K)
    assert "\n" not in str(exc.value)


def test_default_operating_points():
    assert [str(p) for p in default_operating_points(None, 1, TOP_K)] == ["original:1", "original:2"]
    linear = default_operating_points("linear", N_SUB, TOP_K)
    assert [str(p) for p in linear] == [f"linear:{k}" for k in range(1, FULL + 1)]
    neurons = [str(p) for p in default_operating_points("neurons", N_SUB, TOP_K)]
    assert neurons[:FULL] == [str(p) for p in linear] and f"topk:{FULL}" in neurons and "threshold:0.9" in neurons
    for p in neurons:
        parse_operating_point(p, "neurons", N_SUB, TOP_K)


# ---------------------------------------------------------------------------------------------
# prism's experts implementation against transformers' eager one.


@pytest.fixture(scope="module")
def eager_experts(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("olmoe")), dtype=torch.float32, experts_implementation="eager")
    return model.model.layers[1].mlp.experts


def test_prism_experts_equal_eager(eager_experts):
    from prism_cli.runtime.experts import prism_experts_forward

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, eager_experts.hidden_dim, generator=gen)
    idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:3] for _ in range(20)])
    w = torch.rand(20, 3, generator=gen)
    with torch.no_grad():
        want = eager_experts(x, idx, w)
        got = prism_experts_forward(eager_experts, x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prism_experts_skip_sentinel_slots(eager_experts):
    from prism_cli.runtime.experts import prism_experts_forward

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, eager_experts.hidden_dim, generator=gen)
    idx = torch.stack([torch.randperm(EXPERTS, generator=gen)[:3] for _ in range(12)])
    w = torch.rand(12, 3, generator=gen)
    live = torch.rand(12, 3, generator=gen) < 0.6
    live[:, 0] = True
    live[3] = False  # a token with no expert at all gets zeros
    padded_idx = torch.where(live, idx, torch.full_like(idx, EXPERTS))
    padded_w = torch.where(live, w, torch.zeros_like(w))
    with torch.no_grad():
        got = prism_experts_forward(eager_experts, x, padded_idx, padded_w)
        want = eager_experts(x, idx, torch.where(live, w, torch.zeros_like(w)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[3].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# The elastic model: Python API, switching in place, active sub-experts.


@pytest.fixture(scope="module")
def neurons_export(tiny_model_dir, tmp_path_factory) -> Path:
    return random_neurons_export(tiny_model_dir("olmoe"), tmp_path_factory.mktemp("runtime"), seed=11)


@pytest.fixture(scope="module")
def loaded_elastic(neurons_export):
    import prism_cli

    return prism_cli.load_elastic(str(neurons_export), operating_point=f"topk:{FULL}")


@pytest.fixture
def elastic(loaded_elastic):
    """The module's elastic model at the full point, put back there after each test even when it fails
    (else a failed test's point would carry into the next)."""
    import prism_cli

    prism_cli.set_operating_point(loaded_elastic, f"topk:{FULL}")
    try:
        yield loaded_elastic
    finally:
        prism_cli.set_operating_point(loaded_elastic, f"topk:{FULL}")


def test_python_api_and_in_place_switching(elastic):
    import prism_cli

    ids = token_batch(seed=4)
    weights = {name: (p.data_ptr(), p.detach().clone()) for name, p in elastic.named_parameters()}
    assert str(elastic.prism_state.point) == f"topk:{FULL}"
    full = logits_of(elastic, ids)
    assert str(prism_cli.set_operating_point(elastic, "topk:1")) == "topk:1"
    one = logits_of(elastic, ids)
    assert (one - full).abs().max() > 1e-3, "topk:1 must compute less than topk:8"
    prism_cli.set_operating_point(elastic, "threshold:0.7")
    assert not torch.equal(logits_of(elastic, ids), full)
    prism_cli.set_operating_point(elastic, f"topk:{FULL}")
    assert torch.equal(logits_of(elastic, ids), full)
    for name, p in elastic.named_parameters():  # no weight moved or changed
        assert p.data_ptr() == weights[name][0] and torch.equal(p, weights[name][1]), name
    with pytest.raises(PrismError):
        prism_cli.set_operating_point(elastic, "topk:99")
    assert str(elastic.prism_state.point) == f"topk:{FULL}", "a refused point leaves the model where it was"


def _storages(module: torch.nn.Module) -> dict[int, int]:
    """Every tensor storage the module holds (parameters, buffers and any attribute, in tuples and dicts):
    data pointer -> bytes."""
    found: dict[int, int] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item)

    for tensor in [*module.parameters(), *module.buffers()]:
        visit(tensor)
    for name, value in vars(module).items():
        if not name.startswith("_") or name.startswith("_prism"):
            visit(value)
    return found


def test_the_cpu_runtime_holds_each_weight_once_and_down_proj_at_most_twice(neurons_export):
    """After every kind of point has run, prefill and decode, each experts module holds gate_up once and
    down_proj at most twice (the parameter, re-laid out in place, and the source model's layout), with the
    values it was loaded with, and each gate router its gate-neuron rows once: no copy per layout."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import prism_cli
    from prism_cli.export.format import GATE_FILE

    model = prism_cli.load_elastic(str(neurons_export), operating_point="linear:1")
    plain = AutoModelForCausalLM.from_pretrained(str(neurons_export), dtype=torch.float32)  # transformers alone
    ids = token_batch(seed=6)
    for point in ["linear:1", f"linear:{N_SUB}", f"linear:{N_SUB + 1}", f"linear:{FULL}", "topk:3", "threshold:0.7"]:
        prism_cli.set_operating_point(model, point)
        logits_of(model, ids)
        logits_of(model, ids[:1, :1])
    for layer in model.prism_state.layers:
        experts = layer.experts
        gate_up, down = experts.gate_up_proj, experts.down_proj
        held = sum(_storages(experts).values())
        assert held <= gate_up.numel() * gate_up.element_size() + 2 * down.numel() * down.element_size(), layer.index
        assert torch.equal(down.detach(), plain.model.layers[layer.index].mlp.experts.down_proj.detach())
    # The gate neurons' rows are held once too: the source router and [E, 2*N*s, H], nothing else.
    positions = load_file(str(Path(neurons_export) / GATE_FILE))
    for layer, gate in zip(model.prism_state.layers, model.prism_state.gate_routers, strict=True):
        experts, n_sub, s = positions[f"layers.{layer.index}.gate_positions"].shape
        hidden = layer.experts.gate_up_proj.shape[-1]
        router_bytes = sum(t.numel() * t.element_size() for t in [*gate.router.parameters(), *gate.router.buffers()])
        assert sum(_storages(gate).values()) == router_bytes + experts * 2 * n_sub * s * hidden * 4


def test_contiguous_down_restores_the_stock_layout_in_place(neurons_export):
    import prism_cli
    from prism_cli.runtime.grouped import contiguous_down

    model = prism_cli.load_elastic(str(neurons_export))
    experts = model.prism_state.layers[0].experts
    before = experts.down_proj.detach().clone()
    parameter = experts.down_proj
    assert not parameter.is_contiguous(), "the CPU runtime lays down_proj out as it reads it"
    assert contiguous_down(experts) is parameter and parameter.is_contiguous()
    assert torch.equal(parameter.detach(), before)


@pytest.mark.parametrize("point", ["linear:3", "topk:3"])
def test_an_elastic_model_saves_as_its_export(neurons_export, point, tmp_path):
    """The router swap is invisible to state_dict / save_pretrained: the saved checkpoint is the export's."""
    from transformers import AutoModelForCausalLM

    import prism_cli

    model = prism_cli.load_elastic(str(neurons_export), operating_point=point)
    stock = AutoModelForCausalLM.from_pretrained(str(neurons_export)).state_dict()
    assert sorted(model.state_dict()) == sorted(stock)
    model.save_pretrained(tmp_path / "saved")
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).state_dict()
    assert sorted(saved) == sorted(stock)
    for key, tensor in stock.items():
        assert torch.equal(saved[key], tensor), key


def test_load_state_dict_reaches_both_gates(neurons_export):
    import prism_cli

    model = prism_cli.load_elastic(str(neurons_export), operating_point="topk:3")
    state = model.state_dict()
    key = next(k for k in state if k.endswith("mlp.gate.weight"))
    state[key] = state[key] * 2.0
    model.load_state_dict(state, strict=True)
    router = model.prism_state.elastic_routers[0]
    assert torch.equal(router.linear.router.weight, state[key])
    assert torch.equal(router.neurons.router.weight, state[key][::N_SUB])


def test_moving_the_model_moves_every_gate(neurons_export):
    """model.double() at a neurons point converts the linear branch too (and the other way round)."""
    import prism_cli

    ids = token_batch(seed=6)
    model = prism_cli.load_elastic(str(neurons_export), operating_point=f"topk:{FULL}")
    want = logits_of(model, ids).double()
    model.double()
    for point in (f"linear:{FULL}", "linear:3", f"topk:{FULL}"):
        prism_cli.set_operating_point(model, point)
        got = model(input_ids=ids, use_cache=False).logits
        assert got.dtype == torch.float64
        if point != "linear:3":
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), point


@pytest.mark.parametrize("point", ["linear:3", "topk:3", "threshold:0.7", "pattern:4,1"])
def test_cached_decoding_matches_a_full_forward(elastic, point):
    """Routing is per token, so a KV-cached decode step computes what a full forward does at that position;
    generate() runs at every point."""
    import prism_cli

    prism_cli.set_operating_point(elastic, point)
    ids = token_batch(seed=8)
    with torch.no_grad():
        full = elastic(input_ids=ids, use_cache=False).logits[:, -1].float()
        prefix = elastic(input_ids=ids[:, :-1], use_cache=True)
        cache_kw = "cache" if "cache" in inspect.signature(elastic.forward).parameters else "past_key_values"  # renamed in 5.x
        step = elastic(input_ids=ids[:, -1:], use_cache=True, **{cache_kw: prefix.past_key_values}).logits[:, -1].float()
        out = elastic.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    prism_cli.set_operating_point(elastic, f"topk:{FULL}")
    assert (step - full).abs().max() <= 1e-4 * full.abs().max()
    assert out.shape == (ids.shape[0], ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)


def test_gate_neuron_rows_come_from_the_partition(elastic, neurons_export, tiny_model_dir):
    """The training-free gate reads the rows of each sub-expert's gate neurons: row
    ``permutation[n * I/N + position]`` of the source expert's W_gate and W_up."""
    from prism_cli.models.checkpoint import CheckpointReader
    from prism_cli.solvers.format import read_partition

    partition = read_partition(neurons_export.parent / "p.h5")
    source = CheckpointReader(tiny_model_dir("olmoe"))
    size = 32 // N_SUB
    state = elastic.prism_state
    for layer, router in zip(state.layers, state.gate_routers, strict=True):
        s = partition.meta["gate_neurons"]
        assert router.gate_w.shape == router.up_w.shape == (EXPERTS, N_SUB * s, 64)
        for e in range(EXPERTS):
            expert = partition.experts[layer.index][e]
            rows = [int(expert.permutation[n * size + int(pos)]) for n in range(N_SUB) for pos in expert.gate_positions[n]]
            gate = source.get(f"model.layers.{layer.index}.mlp.experts.{e}.gate_proj.weight")
            up = source.get(f"model.layers.{layer.index}.mlp.experts.{e}.up_proj.weight")
            assert torch.equal(router.gate_w[e], gate[rows]) and torch.equal(router.up_w[e], up[rows])


def test_gate_scores_are_mean_gate_neuron_activations(elastic):
    """Scores of the chosen experts' sub-experts: mean |silu(g.x) (u.x)| over their gate neurons."""
    router = elastic.prism_state.gate_routers[0]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    _, _, expert_idx = router.router(x)
    from prism_cli.cuda import reference

    scores = reference.gate_scores(x, router.gate_w, router.up_w, expert_idx, N_SUB)
    s = router.gate_w.shape[1] // N_SUB
    for t in range(6):
        for r, e in enumerate(expert_idx[t].tolist()):
            act = (torch.nn.functional.silu(router.gate_w[e] @ x[t]) * (router.up_w[e] @ x[t])).abs()
            torch.testing.assert_close(scores[t, r], act.view(N_SUB, s).mean(dim=1))


def test_pattern_of_one_whole_expert_is_the_original_top1(elastic, tiny_model_dir):
    """OLMoE does not renormalise its top-k weights: all N sub-experts of the best expert, weighted by
    its routing weight, must equal the source model routed to its top-1 expert."""
    from transformers import AutoModelForCausalLM

    from prism_cli import set_operating_point

    source = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("olmoe")), dtype=torch.float32).eval()
    set_operating_point(source, "original:1")
    ids = token_batch(seed=12)
    set_operating_point(elastic, f"pattern:{N_SUB},0")
    want = logits_of(source, ids)
    assert float((logits_of(elastic, ids) - want).abs().max() / want.abs().max()) <= 1e-4
    set_operating_point(elastic, f"linear:{N_SUB}")  # the flat router's top-N: the N copies of the best expert
    assert float((logits_of(elastic, ids) - want).abs().max() / want.abs().max()) <= 1e-4
    set_operating_point(elastic, f"topk:{FULL}")


def test_load_elastic_refuses_a_plain_model(tiny_model_dir):
    import prism_cli

    with pytest.raises(prism_cli.PrismError, match="not a prism export"):  # the package names the error it raises
        prism_cli.load_elastic(str(tiny_model_dir("olmoe")))


@pytest.mark.parametrize("model", [None, "export/", torch.nn.Linear(2, 2)], ids=["none", "a path", "a module"])
def test_set_operating_point_refuses_what_is_not_a_model(model):
    import prism_cli

    with pytest.raises(PrismError, match="takes a model from prism_cli.load_elastic"):
        prism_cli.set_operating_point(model, "topk:4")


def test_an_export_loaded_without_prism_is_refused(neurons_export):
    """Loaded with stock transformers, an export was taken for a plain model: original:1 meant the top-1 of
    the flat sub-experts, a point the export does not have."""
    from transformers import AutoModelForCausalLM

    import prism_cli

    stock = AutoModelForCausalLM.from_pretrained(str(neurons_export))
    with pytest.raises(PrismError, match="loaded without prism: load it with prism_cli.load_elastic"):
        prism_cli.set_operating_point(stock, "original:1")


@pytest.mark.parametrize("directory", [None, 5])
def test_load_elastic_refuses_what_is_not_a_path(directory):
    """None fell back to the built-in model (named in the error as if the user had given it); 5 raised a TypeError."""
    import prism_cli

    with pytest.raises(PrismError, match="takes the folder of a prism export"):
        prism_cli.load_elastic(directory)


def test_load_elastic_takes_a_path_a_torch_dtype_and_refuses_an_empty_point(neurons_export):
    import prism_cli

    model = prism_cli.load_elastic(neurons_export, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(PrismError):  # "" loaded the default point, where " " was refused
        prism_cli.load_elastic(str(neurons_export), operating_point="")


def test_an_export_of_another_format_version_is_refused(cli, neurons_export, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(neurons_export, old)
    config = json.loads((old / "config.json").read_text())
    config["prism"]["format_version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    cli("eval", old, "--tokens", "64").assert_one_line_error("export format version 1", "export it again")


def _active(model, counter_hooks, ids) -> float:
    counter = ActiveCounter()
    handles = [m.register_forward_hook(counter.hook(**kw)) for m, kw in counter_hooks]
    try:
        logits_of(model, ids)
    finally:
        for h in handles:
            h.remove()
    return counter.mean()


@pytest.mark.parametrize("k", [1, 3, 5, FULL])
def test_active_sub_experts_at_topk_and_linear(elastic, k):
    from prism_cli import set_operating_point

    state = elastic.prism_state
    ids = token_batch(seed=7)
    set_operating_point(elastic, f"topk:{k}")
    assert _active(elastic, [(r, {"sentinel": SENTINEL}) for r in state.gate_routers], ids) == k
    # counted directly from the router outputs too
    seen: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda _m, _i, out: seen.append(out[2])) for r in state.gate_routers]
    logits_of(elastic, ids)
    for h in handles:
        h.remove()
    assert len(seen) == len(state.layers)
    for indices in seen:
        assert indices.shape == (ids.numel(), k) and (indices < SENTINEL).all()
        assert all(len(set(row)) == k for row in indices.tolist())
    set_operating_point(elastic, f"linear:{k}")
    assert _active(elastic, [(r, {}) for r in state.flat_routers], ids) == k
    set_operating_point(elastic, f"topk:{FULL}")


def test_active_sub_experts_vary_under_threshold(elastic):
    from prism_cli import set_operating_point

    state = elastic.prism_state
    ids = token_batch(seed=8)
    means = []
    for tau in (0.3, 0.6, 0.9, 1.0):
        set_operating_point(elastic, f"threshold:{tau}")
        means.append(_active(elastic, [(r, {"sentinel": SENTINEL}) for r in state.gate_routers], ids))
    assert all(1 <= m <= FULL for m in means)
    assert means == sorted(means) and means[-1] == FULL and means[0] < FULL
    set_operating_point(elastic, f"topk:{FULL}")


def test_every_advertised_point_runs(elastic):
    from prism_cli import set_operating_point

    ids = token_batch(seed=9, batch=1, length=8)
    for point in itertools.islice(elastic.prism_state.points(), 0, None, 3):
        set_operating_point(elastic, point)
        assert torch.isfinite(logits_of(elastic, ids)).all(), point
    set_operating_point(elastic, f"topk:{FULL}")


def _eval_perplexity(result) -> float:
    assert result.code == 0, result
    return float(re.search(r"perplexity(?: at \S+)? ([\d.]+) on", result.out).group(1))


def test_eval_cli_at_operating_points(cli, neurons_export, tiny_model_dir):
    """`prism eval EXPORT -K point`: the full point is the original model; another point is another model
    (the tiny model's weights are random, so which one is better means nothing)."""
    args = ("--tokens", "512", "--seq-len", "64")
    original = _eval_perplexity(cli("eval", tiny_model_dir("olmoe"), *args))
    full = _eval_perplexity(cli("eval", neurons_export, *args, "--operating-point", f"topk:{FULL}"))
    one = _eval_perplexity(cli("eval", neurons_export, *args, "-K", "topk:1"))
    assert full == pytest.approx(original, rel=1e-3)
    assert abs(one - full) > 1e-3 * full
    cli("eval", tiny_model_dir("olmoe"), *args, "-K", "topk:1").assert_one_line_error("needs a prism export")
    cli("eval", neurons_export, *args, "-K", "topk:99").assert_one_line_error("topk:99")


def _reference_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                       w: torch.Tensor) -> torch.Tensor:
    """Brute force, token by token and slot by slot: ``sum_p w[t, p] * down_e (silu(gate_e x) * up_e x)``,
    skipping sentinel slots (``idx == E``); gate rows first in ``gate_up [E, 2I, H]``, ``down [E, H, I]``."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=x.dtype)
        for p in range(idx.shape[1]):
            e = int(idx[t, p])
            if e < gate_up.shape[0]:
                g, u = (gate_up[e] @ x[t]).chunk(2)
                y = y + w[t, p] * (down[e] @ (torch.nn.functional.silu(g) * u))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [1, 3, 20])
def test_gradients_of_the_experts_equal_a_float64_reference(neurons_export, tokens):
    """Backward through prism's experts reached gate_up_proj but neither down_proj (read through a detached
    view) nor the routing weights (planned on the host): fine-tuning an elastic model silently left half
    of each expert and the router as they were. Oracle: a float64 brute force on the same weights, at
    arbitrary sub-expert subsets with a sentinel slot."""
    import prism_cli
    from prism_cli.runtime.experts import prism_experts_forward, reset_dispatch_counts

    ours = prism_cli.load_elastic(str(neurons_export), operating_point="topk:3").model.layers[0].mlp.experts
    flat = EXPERTS * N_SUB
    gen = torch.Generator().manual_seed(tokens)
    idx = torch.stack([torch.randperm(flat, generator=gen)[:5] for _ in range(tokens)])
    idx[0, -1] = flat  # a sentinel slot
    w = torch.rand(tokens, 5, generator=gen)
    x = torch.randn(tokens, ours.hidden_dim, generator=gen)
    probe = torch.randn(tokens, ours.hidden_dim, generator=gen)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    reset_dispatch_counts()
    (prism_experts_forward(ours, xs, idx, ws) * probe).sum().backward()
    assert reset_dispatch_counts() == {"autograd": 1}
    ref = [t.detach().double().requires_grad_() for t in (x, w, ours.gate_up_proj, ours.down_proj)]
    (_reference_experts(ref[2], ref[3], ref[0], idx, ref[1]) * probe.double()).sum().backward()
    live = idx < flat
    got = [xs.grad, ws.grad * live, ours.gate_up_proj.grad, ours.down_proj.grad]
    for name, g, r in zip(["x", "weights", "gate_up_proj", "down_proj"], got, ref, strict=True):
        assert g is not None, f"no gradient for {name}"
        want = r.grad * live if name == "weights" else r.grad
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_of_the_same_routing_equal_the_source_model(neurons_export):
    """At linear:N*k an elastic model computes what the stock model of its export computes: so do its
    gradients, for every parameter."""
    from transformers import AutoModelForCausalLM

    import prism_cli

    ids = token_batch(seed=2, batch=2, length=12)
    grads = []
    for model in [prism_cli.load_elastic(str(neurons_export), operating_point=f"linear:{FULL}"),
                  AutoModelForCausalLM.from_pretrained(str(neurons_export), dtype=torch.float32)]:
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, want in grads[1].items():  # the stock router is the elastic router's linear branch
        got = grads[0].get(name, grads[0].get(name.replace("mlp.gate.", "mlp.gate.linear.router.")))
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("change", ["load_state_dict", "in-place step"])
def test_the_gate_follows_expert_weights_changed_after_load(neurons_export, tmp_path, change):
    """The training-free gate scored sub-experts by a copy of the gate neurons' rows taken at load: after
    ``load_state_dict`` (or an optimizer step) it chose by weights the model no longer had. Oracle: the
    same weights loaded fresh, from a copy of the export."""
    import shutil

    import prism_cli

    model = prism_cli.load_elastic(str(neurons_export), operating_point="topk:5")
    gen = torch.Generator().manual_seed(9)
    if change == "load_state_dict":
        state = model.state_dict()
        for key in [k for k in state if k.endswith("experts.gate_up_proj")]:
            state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=gen)
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for layer in model.prism_state.layers:
                layer.experts.gate_up_proj.add_(0.05 * torch.randn(layer.experts.gate_up_proj.shape, generator=gen))
    copy = tmp_path / "copy"
    shutil.copytree(neurons_export, copy)
    model.save_pretrained(copy)  # the weights and config; prism/ and the tokenizer stay the export's
    fresh = prism_cli.load_elastic(str(copy), operating_point="topk:5")
    ids = token_batch(seed=6)
    for point in ["topk:5", "threshold:0.7", "pattern:2,1"]:
        prism_cli.set_operating_point(model, point)
        prism_cli.set_operating_point(fresh, point)
        torch.testing.assert_close(logits_of(model, ids), logits_of(fresh, ids), rtol=0, atol=1e-6)


def test_a_training_step_after_an_inference_pass_that_took_the_gate_rows_again(neurons_export):
    """Rows taken again inside an inference_mode forward were inference tensors: the next training
    forward failed ("Inference tensors cannot be saved for backward"), and on CUDA the kernels' cached
    split of them (which reads their version) failed at once."""
    import prism_cli

    model = prism_cli.load_elastic(str(neurons_export), operating_point="topk:5")
    ids = token_batch(seed=3, batch=1, length=8)
    with torch.no_grad():  # an optimizer step
        for layer in model.prism_state.layers:
            layer.experts.gate_up_proj.mul_(1.01)
    logits_of(model, ids)  # under inference_mode: the rows are taken again here
    router = model.prism_state.gate_routers[0]
    assert not router.rows.is_inference()
    router._split_rows()  # what the CUDA branch reads
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.prism_state.layers[0].experts.down_proj.grad is not None
