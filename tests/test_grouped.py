"""The grouped experts executor and its plan, against a float64 per-token brute force.

The oracle computes ``out[t] = sum_p w[t, p] * SubExpert_{idx[t, p]}(x[t])`` one (token, slot) at a time
in float64 from the module's weights and transformers' own definition of its activation
(``_apply_gate``), for the standard layout (OLMoE) and for GPT-OSS's (transposed weights, biases,
interleaved gate/up, clamped activation).
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch

from prism_cli.runtime import bounds, grouped_mm
from prism_cli.runtime.grouped import grouped_experts_forward
from prism_cli.runtime.plan import SMALL_BATCH_PAIRS, plan_experts

HIDDEN, WIDTH = 32, 8  # sub-expert width


def _olmoe_experts(groups: int) -> torch.nn.Module:
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    cfg = OlmoeConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_experts=groups, num_experts_per_tok=2)
    module = OlmoeExperts(cfg)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, HIDDEN**-0.5)
        module.down_proj.normal_(0, WIDTH**-0.5)
    return module


def _gpt_oss_experts(groups: int) -> torch.nn.Module:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=groups, num_experts_per_tok=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    module = GptOssExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


LAYOUTS = {"olmoe": _olmoe_experts, "gpt_oss": _gpt_oss_experts}


@torch.no_grad()
def brute_force(module: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(module).double()
    groups = m.gate_up_proj.shape[0]
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        for p in range(idx.shape[1]):
            g = int(idx[t, p])
            if g >= groups:
                continue
            xt = x[t].double()
            if m.is_transposed:
                h = xt @ m.gate_up_proj[g] + m.gate_up_proj_bias[g]
                y = m._apply_gate(h[None])[0] @ m.down_proj[g] + m.down_proj_bias[g]
            else:
                h = m.gate_up_proj[g] @ xt
                y = m.down_proj[g] @ m._apply_gate(h[None])[0]
            out[t] += float(w[t, p]) * y
    return out


def routing(kind: str, tokens: int, experts: int, n_sub: int, top_k: int, gen: torch.Generator):
    """``prefix``: each chosen expert runs its first m sub-experts (the linear gate's shape); ``subsets``:
    random subsets (the training-free gate's); ``sentinels``: subsets with unused slots; ``duplicates``:
    a sub-expert twice for a token (weights add up)."""
    chosen = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    ids, ws = [], []
    for t in range(tokens):
        row, wrow = [], []
        for e in chosen[t].tolist():
            w_e = float(torch.rand(1, generator=gen)) + 0.1
            if kind == "prefix":
                subs = list(range(int(torch.randint(1, n_sub + 1, (1,), generator=gen))))
            else:
                subs = [n for n in range(n_sub) if torch.rand(1, generator=gen) < 0.5] or [0]
            row += [e * n_sub + n for n in subs]
            wrow += [w_e] * len(subs)
        if kind == "duplicates":
            row.append(row[0])
            wrow.append(0.25)
        ids.append(row)
        ws.append(wrow)
    width = max(len(r) for r in ids) + (2 if kind == "sentinels" else 0)
    sentinel = experts * n_sub
    idx = torch.full((tokens, width), sentinel, dtype=torch.long)
    w = torch.zeros(tokens, width)
    for t, (r, wr) in enumerate(zip(ids, ws, strict=True)):
        perm = torch.randperm(width, generator=gen)[: len(r)]  # slots in any order, sentinels anywhere
        idx[t, perm] = torch.tensor(r)
        w[t, perm] = torch.tensor(wr)
    return idx, w


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n_sub", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 5, 90])
@pytest.mark.parametrize("kind", ["prefix", "subsets", "sentinels", "duplicates"])
def test_grouped_matches_the_brute_force(layout, n_sub, tokens, kind):
    experts, top_k = 6, 2
    gen = torch.Generator().manual_seed(_seed(layout, n_sub, tokens, kind))
    module = LAYOUTS[layout](experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    idx, w = routing(kind, tokens, experts, n_sub, top_k, gen)
    with torch.no_grad():
        got = grouped_experts_forward(module, x, idx, w, n_sub)
    want = brute_force(module, x, idx, w)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["linear", "prefix"])
def test_tall_blocks_match_the_brute_force(kind):
    """Blocks of a few hundred rows x several sub-experts (a long prefill on the plan executor) are one
    product over the contiguous slice; the sums are the per-slot definition's."""
    experts, n_sub, tokens = 3, 4, 400
    gen = torch.Generator().manual_seed(7 if kind == "linear" else 8)
    module = LAYOUTS["olmoe"](experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    idx, w = linear_routing(tokens, experts, n_sub, 6, gen) if kind == "linear" else routing(kind, tokens, experts, n_sub, 2, gen)
    plan_rows = max(work.stop - work.start for work in plan_experts(idx, w, n_sub, experts * n_sub).experts)
    assert plan_rows > 200  # tall: each expert's block has hundreds of rows
    with torch.no_grad():
        got = grouped_experts_forward(module, x, idx, w, n_sub)
    want = brute_force(module, x, idx, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def linear_routing(tokens: int, experts: int, n_sub: int, k: int, gen: torch.Generator):
    """The linear gate's shape at ``linear:k``: per token ``k // N`` whole experts, then the first
    ``k % N`` sub-experts of the next, each block in sub-expert order (what its router emits)."""
    chosen = torch.rand(tokens, experts, generator=gen).argsort(dim=1)
    ids = [[int(chosen[t, r]) * n_sub + n for r in range(-(-k // n_sub)) for n in range(min(n_sub, k - r * n_sub))]
           for t in range(tokens)]
    w = torch.rand(tokens, len(ids[0]), generator=gen) + 0.1
    return torch.tensor(ids), w


@pytest.mark.parametrize("n_sub", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 5, 90])
@pytest.mark.parametrize("kind", ["linear", "prefix", "subsets", "sentinels", "duplicates"])
def test_grouped_mm_matches_the_brute_force(n_sub, tokens, kind):
    """Both paths of the grouped-products executor: ``prefix-mm`` exactly for the linear gate's shape
    (the prefix length of each block may differ from the others), ``flat-mm`` for everything else."""
    experts = 6
    gen = torch.Generator().manual_seed(_seed("mm", n_sub, tokens, kind))
    module = _olmoe_experts(experts * n_sub)
    assert grouped_mm.takes(module)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    if kind == "linear":
        idx, w = linear_routing(tokens, experts, n_sub, int(torch.randint(1, 3 * n_sub + 1, (1,), generator=gen)), gen)
    else:
        idx, w = routing(kind, tokens, experts, n_sub, 2, gen)
    with torch.no_grad():
        got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub, "mm")
    if kind == "linear":
        assert path == "prefix-mm"
    want = brute_force(module, x, idx, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_grouped_mm_takes_the_flat_path_for_subsets_that_are_not_prefixes():
    module = _olmoe_experts(6 * 4)
    x = torch.randn(3, HIDDEN)
    idx = torch.tensor([[1, 2], [5, 4], [9, 10]])  # sub-experts 1-2 of expert 0, 1 then 0 of expert 1, 1-2 of expert 2
    w = torch.rand(3, 2)
    with torch.no_grad():
        got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, 4, "mm")
    assert path == "flat-mm"
    torch.testing.assert_close(got.double(), brute_force(module, x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_sub", [1, 4])
@pytest.mark.parametrize("kind", ["subsets", "sentinels", "duplicates"])
def test_flat_loop_matches_the_brute_force(n_sub, kind):
    """One product per sub-expert, the path for arbitrary subsets past ``MAX_PAIRS`` on the CPU."""
    gen = torch.Generator().manual_seed(_seed("loop", n_sub, kind))
    module = _olmoe_experts(6 * n_sub)
    x = torch.randn(40, HIDDEN, generator=gen)
    idx, w = routing(kind, 40, 6, n_sub, 2, gen)
    with torch.no_grad():
        got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub, "flat-loop")
    assert path == "flat-loop"
    want = brute_force(module, x, idx, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_runtime_path_follows_the_size_of_the_call(monkeypatch, tmp_path):
    """Under the bounds saved for this machine: below min_tokens tokens the plan executor; up to
    max_prefix_rows rows (a token's block) for prefix routing and max_pairs pairs for subsets grouped
    products (blocks of different lengths in at most max_padded_rows rows padded whole); beyond, the plan
    executor for prefix routing and the per-sub-expert loop for subsets; same output on every path."""
    monkeypatch.setenv("PRISM_EXECUTOR_BOUNDS", str(tmp_path / "bounds.json"))
    bounds.save_bounds(bounds.ExecutorBounds(min_tokens=4, max_prefix_rows=64, max_pairs=64, max_padded_rows=48),
                       bounds.machine_key())
    assert bounds.current_bounds().max_prefix_rows == 64
    module = _olmoe_experts(6 * 4)
    gen = torch.Generator().manual_seed(5)
    # linear:6 at N = 4 is two blocks per token (4 and 2 sub-experts): 20 tokens = 40 rows (120 pairs), 30
    # tokens = 60 rows, 40 tokens = 80 rows
    cases = [(3, "linear", "grouped"), (3, "subsets", "grouped"), (20, "linear", "prefix-padded"), (30, "linear", "prefix-mm"),
             (8, "subsets", "flat-mm"), (40, "linear", "grouped"), (40, "subsets", "flat-loop")]
    for tokens, kind, want_path in cases:
        x = torch.randn(tokens, HIDDEN, generator=gen)
        if kind == "linear":
            idx, w = linear_routing(tokens, 6, 4, 6, gen)
        else:
            idx, w = routing("subsets", tokens, 6, 4, 2, gen)
            idx, w = idx[:, :6], w[:, :6]  # 6 slots: 8 tokens = 48 pairs, 40 = 240
        with torch.no_grad():
            got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, 4)
        assert path == want_path, (tokens, kind)
        want = brute_force(module, x, idx, w)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _handed(idx: torch.Tensor, w: torch.Tensor, n_sub: int, k: int, gen: torch.Generator):
    """``idx``/``w`` of ``linear_routing`` as a tied router hands them over: each expert's weight on all its
    slots, the copies of a whole block in a shuffled order, and the ``PrefixRouting`` attached."""
    whole, part = divmod(k, n_sub)
    lengths = (n_sub,) * whole + ((part,) if part else ())
    w = torch.cat([w[:, [sum(lengths[:j])]].expand(-1, m) for j, m in enumerate(lengths)], dim=1).contiguous()
    idx = idx.clone()
    for j in range(whole):
        idx[:, j * n_sub : (j + 1) * n_sub] = idx[:, j * n_sub + torch.randperm(n_sub, generator=gen)]
    setattr(idx, grouped_mm.PREFIX_ATTR, grouped_mm.PrefixRouting(idx[:, ::n_sub] // n_sub, lengths, uniform=True))
    return idx, w


@pytest.mark.parametrize("n_sub", [1, 4, 8])
@pytest.mark.parametrize("tokens", [1, 6])
def test_routing_handed_by_the_router_matches_the_brute_force(n_sub, tokens):
    """What a tied linear gate hands the experts (whole blocks' copies in any order, the block shape
    attached): one token takes ``prefix-one``, more take ``prefix-mm``; whole experts read the source
    layout of ``down_proj``, partial blocks the transposed copy."""
    experts = 6
    gen = torch.Generator().manual_seed(_seed("handed", n_sub, tokens))
    module = _olmoe_experts(experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    for k in sorted({1, n_sub, n_sub + 1, 2 * n_sub, 3 * n_sub - 1}):
        idx, w = _handed(*linear_routing(tokens, experts, n_sub, k, gen), n_sub, k, gen)
        with torch.no_grad():
            got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub, None if tokens == 1 else "mm")
        assert path == ("prefix-one" if tokens == 1 else "prefix-mm"), k
        want = brute_force(module, x, idx, w)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_uniform_blocks_take_one_weight_per_block():
    """A block wider than the hidden size (8 sub-experts of 8 > 32) with ``uniform`` is scaled after its
    down projection by the weight of its first slot: right where the router's copies carry one weight
    (the brute force), and visibly so where a caller claimed uniform weights that are not."""
    n_sub, experts, tokens = 8, 6, 6
    gen = torch.Generator().manual_seed(_seed("uniform"))
    module = _olmoe_experts(experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    idx, w = _handed(*linear_routing(tokens, experts, n_sub, 2 * n_sub, gen), n_sub, 2 * n_sub, gen)
    with torch.no_grad():
        got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub, "mm")
    assert path == "prefix-mm"
    want = brute_force(module, x, idx, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    uneven = w * torch.linspace(0.5, 1.5, w.shape[1])
    with torch.no_grad():
        claimed, _ = grouped_mm.grouped_mm_forward(module, x, idx, uneven, n_sub, "mm")
    assert not torch.allclose(claimed.double(), brute_force(module, x, idx, uneven), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n_sub", [2, 4, 8])
@pytest.mark.parametrize("handed", [False, True])
def test_padded_blocks_match_the_brute_force(n_sub, handed):
    """Blocks of different lengths computed whole with zero weights on the sub-experts not taken
    (``prefix-padded``): the sums of the slots routed, nothing of the padding."""
    experts, tokens = 6, 7
    gen = torch.Generator().manual_seed(_seed("padded", n_sub, handed))
    module = _olmoe_experts(experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    for k in (1, n_sub + 1, 2 * n_sub - 1, 3 * n_sub - 1):
        idx, w = linear_routing(tokens, experts, n_sub, k, gen)
        if handed:
            idx, w = _handed(idx, w, n_sub, k, gen)
        with torch.no_grad():
            got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub, "prefix-padded")
        assert path == "prefix-padded"
        want = brute_force(module, x, idx, w)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _rows_at_points(tokens: int, experts: int, n_sub: int, blocks: int, gen: torch.Generator):
    """A batch whose tokens run at different linear points, as ``per_row.RowPointRouter`` hands it over:
    the whole blocks covering the largest K, each token's slots past its own K at the sentinel with
    weight zero, each token's K attached with the block shape."""
    k = torch.randint(1, blocks * n_sub + 1, (tokens,), generator=gen)
    k[0] = blocks * n_sub  # the largest K is reached
    idx, w = linear_routing(tokens, experts, n_sub, blocks * n_sub, gen)
    drop = torch.arange(blocks * n_sub) >= k.unsqueeze(1)
    expert = idx[:, ::n_sub] // n_sub
    idx, w = idx.masked_fill(drop, experts * n_sub), w.masked_fill(drop, 0.0)
    setattr(idx, grouped_mm.PREFIX_ATTR, grouped_mm.PrefixRouting(expert, (n_sub,) * blocks, token_k=k))
    return idx, w


@pytest.mark.parametrize("n_sub", [1, 4, 8])
@pytest.mark.parametrize("tokens", [1, 9, 60])
def test_rows_at_different_points_match_the_brute_force(n_sub, tokens, monkeypatch, tmp_path):
    """Each token at its own K: ``prefix-padded`` computes the blocks each token's K reaches (up to
    ``max_padded_rows`` rows), the flat path the ids with their sentinels beyond; both the brute force's
    sums (which skip the sentinels: nothing of a token's unused blocks reaches its output)."""
    monkeypatch.setenv("PRISM_EXECUTOR_BOUNDS", str(tmp_path / "bounds.json"))
    bounds.save_bounds(bounds.ExecutorBounds(min_tokens=4, max_prefix_rows=4096, max_pairs=4096, max_padded_rows=100),
                       bounds.machine_key())
    experts = 6
    gen = torch.Generator().manual_seed(_seed("ragged", n_sub, tokens))
    module = _olmoe_experts(experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    idx, w = _rows_at_points(tokens, experts, n_sub, 2, gen)
    with torch.no_grad():
        got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub)
    assert path == ("prefix-padded" if tokens * 2 <= 100 else "flat-mm")
    want = brute_force(module, x, idx, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_one_token_of_a_plain_model_takes_the_single_token_path():
    """A plain model's top-k (N = 1) is prefix routing as it is: one token takes ``prefix-one`` with nothing
    attached; an unused slot sends it to the plan executor."""
    module = _olmoe_experts(6)
    x = torch.randn(1, HIDDEN)
    w = torch.tensor([[0.7, 0.2]])
    for idx, want_path in ((torch.tensor([[4, 1]]), "prefix-one"), (torch.tensor([[4, 6]]), "grouped")):
        with torch.no_grad():
            got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, 1)
        assert path == want_path
        torch.testing.assert_close(got.double(), brute_force(module, x, idx, w), rtol=1e-5, atol=1e-6)


def _seed(*key: object) -> int:
    """A seed per test case, the same in every process (``hash`` of a string is salted per process)."""
    return zlib.crc32(repr(key).encode())


def test_grouped_mm_leaves_other_layouts_and_float64_to_the_plan_executor():
    assert not grouped_mm.takes(_gpt_oss_experts(8))  # transposed, biases
    assert not grouped_mm.takes(_olmoe_experts(8).double())


def test_prefix_routing_needs_the_same_ranges_in_every_token():
    gen = torch.Generator().manual_seed(3)
    idx, _ = linear_routing(4, 6, 4, 6, gen)
    found = grouped_mm.prefix_routing(idx, 4, 24)
    assert found.lengths == (4, 2) and torch.equal(found.expert, idx[:, [0, 4]] // 4)
    swapped = idx.clone()
    swapped[2, [4, 5]] = swapped[2, [5, 4]]  # one token lists its partial block out of order
    assert grouped_mm.prefix_routing(swapped, 4, 24) is None
    unused = idx.clone()
    unused[1, 5] = 24
    assert grouped_mm.prefix_routing(unused, 4, 24) is None


def test_all_slots_unused_gives_zeros():
    module = _olmoe_experts(8)
    x = torch.randn(3, HIDDEN)
    idx = torch.full((3, 2), 8)
    with torch.no_grad():
        assert torch.equal(grouped_experts_forward(module, x, idx, torch.ones(3, 2), 4), torch.zeros(3, HIDDEN))


@pytest.mark.parametrize("tokens", [5, 300])
def test_plan_computes_each_requested_piece_once(tokens):
    """No waste: the plan's pieces are the distinct (token, sub-expert) pairs routed; prefix routing
    gives only contiguous blocks, one per expert and prefix length, covering its rows."""
    n_sub, experts = 4, 6
    gen = torch.Generator().manual_seed(1)
    for kind in ("prefix", "subsets", "sentinels"):
        idx, w = routing(kind, tokens, experts, n_sub, 2, gen)
        plan = plan_experts(idx, w, n_sub, experts * n_sub)
        distinct = {(t, g) for t in range(tokens) for g in idx[t].tolist() if g < experts * n_sub}
        assert plan.pieces == len(distinct)
        covered = set()
        for work in plan.experts:
            rows = plan.tokens[work.start : work.stop]
            assert len(set(rows.tolist())) == rows.size  # a token once per expert
            for a, b, n0, n1 in work.blocks:
                covered |= {(int(t), work.expert * n_sub + n) for t in rows[a:b] for n in range(n0, n1)}
            for n, r in work.scattered:
                covered |= {(int(t), work.expert * n_sub + n) for t in rows[r]}
            if kind == "prefix":
                assert not work.scattered
                lengths = {int(m).bit_length() for m in plan.masks[work.start : work.stop]}
                assert len(work.blocks) <= len(lengths)  # nested prefixes: one block per distinct length at most
        assert covered == distinct


@pytest.mark.parametrize("n_sub", [4, 8])
def test_a_plan_from_the_block_shape_is_the_plan_from_every_slot(n_sub):
    """Where the router hands over the block shape, the planner builds rows from the blocks; the plan must
    be the one it builds from every slot (rows, masks, weights, rectangles), whole and partial blocks."""
    experts, tokens = 6, 300
    gen = torch.Generator().manual_seed(_seed("blocks", n_sub))
    for k in (n_sub, n_sub + 1, 2 * n_sub, 3 * n_sub - 1):
        idx, w = _handed(*linear_routing(tokens, experts, n_sub, k, gen), n_sub, k, gen)
        found = getattr(idx, grouped_mm.PREFIX_ATTR)
        slots = plan_experts(idx, w, n_sub, experts * n_sub)
        shaped = plan_experts(idx, w, n_sub, experts * n_sub, (found.expert, found.lengths))
        assert np.array_equal(shaped.tokens, slots.tokens) and np.array_equal(shaped.masks, slots.masks)
        assert np.array_equal(shaped.weights, slots.weights)
        assert [(e.expert, e.start, e.stop, e.all_tokens, e.blocks, len(e.scattered)) for e in shaped.experts] == \
            [(e.expert, e.start, e.stop, e.all_tokens, e.blocks, len(e.scattered)) for e in slots.experts]


def test_the_plan_executor_takes_the_handed_block_shape(monkeypatch):
    """Past the prefix-rows bound, routing handed by the router runs on the plan executor from its block
    shape: against the float64 brute force."""
    n_sub, experts, tokens = 8, 6, 200
    gen = torch.Generator().manual_seed(_seed("handed-plan"))
    module = _olmoe_experts(experts * n_sub)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    monkeypatch.setattr(grouped_mm, "current_bounds", lambda width=None: bounds.ExecutorBounds(4, 16, 1 << 20))
    used = []
    real = grouped_mm.grouped_experts_forward
    monkeypatch.setattr(grouped_mm, "grouped_experts_forward", lambda *a: used.append(a[5]) or real(*a))
    for k in (n_sub, 2 * n_sub - 3):
        idx, w = _handed(*linear_routing(tokens, experts, n_sub, k, gen), n_sub, k, gen)
        with torch.no_grad():
            got, path = grouped_mm.grouped_mm_forward(module, x, idx, w, n_sub)
        assert path == "grouped" and used[-1] is not None
        want = brute_force(module, x, idx, w)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["prefix", "subsets", "sentinels", "duplicates"])
def test_small_and_large_planners_agree(kind, monkeypatch):
    """The plain-Python planner (decode steps) and the numpy one give the same plan."""
    import prism_cli.runtime.plan as plan_mod

    gen = torch.Generator().manual_seed(2)
    idx, w = routing(kind, 6, 6, 4, 2, gen)
    assert idx.numel() <= SMALL_BATCH_PAIRS
    small = plan_experts(idx, w, 4, 24)
    monkeypatch.setattr(plan_mod, "SMALL_BATCH_PAIRS", 0)
    large = plan_experts(idx, w, 4, 24)
    for field in ("tokens", "masks", "weights"):
        np.testing.assert_array_equal(getattr(small, field), getattr(large, field))
    assert [(e.expert, e.start, e.stop, e.blocks, e.all_tokens) for e in small.experts] == \
        [(e.expert, e.start, e.stop, e.blocks, e.all_tokens) for e in large.experts]
    assert [[(n, r.tolist()) for n, r in e.scattered] for e in small.experts] == \
        [[(n, r.tolist()) for n, r in e.scattered] for e in large.experts]


def test_whole_batch_expert_needs_no_gather():
    """A decode step of one sequence: the expert's rows are the batch (flagged, and still exact)."""
    module = _olmoe_experts(8)
    x = torch.randn(1, HIDDEN)
    idx, w = torch.tensor([[4, 5, 6, 7, 0, 1]]), torch.tensor([[0.5] * 4 + [0.2] * 2])
    plan = plan_experts(idx, w, 4, 8)
    assert [work.all_tokens for work in plan.experts] == [True, True]
    with torch.no_grad():
        got = grouped_experts_forward(module, x, idx, w, 4)
    torch.testing.assert_close(got.double(), brute_force(module, x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped_products", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_gate_scores_match_the_brute_force(tokens, grouped_products, monkeypatch):
    """Mean |silu(g.x) * (u.x)| over each sub-expert's gate neurons, for each chosen expert, in float64
    (with grouped products, and with the per-expert loop of a torch that has none)."""
    from prism_cli.runtime import scoring
    from prism_cli.runtime.scoring import gate_scores, gate_up_rows

    if not grouped_products:
        monkeypatch.setattr(scoring, "GROUPED_MM", None)

    experts, n_sub, s, top_k = 6, 4, 3, 2
    gen = torch.Generator().manual_seed(tokens)
    gate_w, up_w = torch.randn(experts, n_sub * s, HIDDEN, generator=gen), torch.randn(experts, n_sub * s, HIDDEN, generator=gen)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    chosen = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    got = gate_scores(x, gate_up_rows(gate_w, up_w), chosen, n_sub)
    want = torch.zeros(tokens, top_k, n_sub, dtype=torch.float64)
    for t in range(tokens):
        for slot, e in enumerate(chosen[t].tolist()):
            a = torch.nn.functional.silu(gate_w[e].double() @ x[t].double()) * (up_w[e].double() @ x[t].double())
            want[t, slot] = a.abs().view(n_sub, s).mean(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
