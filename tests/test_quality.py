"""Quality metrics (perplexity / next-token NLL, KL from the reference, top-1 agreement, active sub-experts)
checked against independent float64 brute force on stub models whose logits are fixed tables, and one tiny
case worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prism_cli.evaluation.perplexity import next_token_nll, perplexity
from prism_cli.evaluation.quality import ActiveCounter, evaluate_points

SENTINEL = -1


class _Router(torch.nn.Module):
    """Returns ``(x, x, indices)``; ``indices[t]`` has ``2`` slots, the second a sentinel on odd tokens."""

    def forward(self, ids):
        flat = ids.reshape(-1)
        second = torch.where(flat % 2 == 1, torch.full_like(flat, SENTINEL), flat)
        return flat, flat, torch.stack([flat, second], dim=1)


class StubLM(torch.nn.Module):
    """A causal LM whose logits are ``bigram[ids[t]] + position[t]`` (fixed tables, float32)."""

    def __init__(self, bigram, position):
        super().__init__()
        self.bigram = torch.nn.Parameter(bigram.float(), requires_grad=False)
        self.position = torch.nn.Parameter(position.float(), requires_grad=False)
        self.router = _Router()

    def forward(self, input_ids, use_cache=False):
        self.router(input_ids)
        return SimpleNamespace(logits=self.bigram[input_ids] + self.position[: input_ids.shape[1]])


def tables(seed, vocab, length):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(vocab, vocab, generator=g), torch.randn(length, vocab, generator=g)


def logits64(model, window):
    """float64 logits of one window, rebuilt from the stub's tables (not by calling the model)."""
    return model.bigram.double()[window] + model.position.double()[: len(window)]


def log_softmax64(row):
    """float64 log-softmax by the textbook formula."""
    m = max(row.tolist())
    lse = m + math.log(sum(math.exp(v - m) for v in row.tolist()))
    return [v - lse for v in row.tolist()]


def brute_force(reference, point, windows):
    """Mean NLL of ``point``, mean KL(ref || point) and top-1 agreement, by loops over every position."""
    nll = kl = agree = 0.0
    tokens = 0
    for window in windows:
        ref, pt = logits64(reference, window), logits64(point, window)
        for t in range(len(window) - 1):
            lr, lp = log_softmax64(ref[t]), log_softmax64(pt[t])
            nll += -lp[int(window[t + 1])]
            kl += sum(math.exp(a) * (a - b) for a, b in zip(lr, lp, strict=True))
            agree += float(max(range(len(lr)), key=lr.__getitem__) == max(range(len(lp)), key=lp.__getitem__))
            tokens += 1
    return nll / tokens, kl / tokens, agree / tokens, tokens


def random_windows(seed, n, length, vocab):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_next_token_nll_matches_a_float64_loop():
    """Oracle: ``-log_softmax(logits[t])[ids[t+1]]`` computed per position in float64 from the stub's tables."""
    vocab, length = 7, 6
    model = StubLM(*tables(0, vocab, length))
    windows = random_windows(1, 3, length, vocab)
    got = next_token_nll(model(input_ids=windows).logits, windows)
    assert got.shape == (3, length - 1)
    for b, window in enumerate(windows):
        full = logits64(model, window)
        for t in range(length - 1):
            assert float(got[b, t]) == pytest.approx(-log_softmax64(full[t])[int(window[t + 1])], rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_is_exp_of_the_mean_nll_over_every_predicted_position(batch_size):
    """Oracle: float64 loop over windows and positions; batch size (including a partial last batch) must not matter."""
    vocab, length = 7, 6
    model = StubLM(*tables(2, vocab, length))
    windows = random_windows(3, 5, length, vocab)
    nll, _, _, tokens = brute_force(model, model, windows)
    result = perplexity(model, windows, batch_size=batch_size)
    assert result.tokens == tokens == 5 * (length - 1)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_evaluate_points_matches_a_float64_brute_force(batch_size):
    """Oracle: per-position float64 loops for NLL, KL(ref || point) = Σ p_ref (log p_ref - log p) and argmax agreement,
    plus a hand count of live router slots for ``active``; two different points and the reference itself."""
    vocab, length = 6, 5
    reference = StubLM(*tables(4, vocab, length))
    near_bigram, near_pos = tables(4, vocab, length)
    near = StubLM(near_bigram + 0.3 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(9)), near_pos)
    far = StubLM(*tables(5, vocab, length))
    windows = random_windows(6, 5, length, vocab)
    counter = ActiveCounter()
    handles = [m.router.register_forward_hook(counter.hook(per_expert=3, sentinel=SENTINEL)) for m in (near, far)]
    try:
        runners = [("ref", lambda: reference, None), ("near", lambda: near, counter), ("far", lambda: far, counter)]
        got = evaluate_points(reference, runners, windows, batch_size)
    finally:
        for h in handles:
            h.remove()
    flat = windows.reshape(-1)
    live = 3 * (flat.numel() + int((flat % 2 == 0).sum()))  # every token's first slot, plus the second on even ids
    for name, model in (("ref", reference), ("near", near), ("far", far)):
        nll, kl, agree, tokens = brute_force(reference, model, windows)
        q = got[name]
        assert q.tokens == tokens == 5 * (length - 1)
        assert q.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
        assert q.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert q.top1_agreement == pytest.approx(agree, abs=1e-12)
        assert q.active == (None if name == "ref" else pytest.approx(live / flat.numel()))
    assert got["ref"].kl == pytest.approx(0.0, abs=1e-6) and got["ref"].top1_agreement == 1.0
    assert got["far"].kl > got["near"].kl > 1e-3  # the brute force checks above are not all near zero
    assert 0.0 < got["far"].top1_agreement < 1.0


def test_evaluate_points_two_token_windows_by_hand():
    """Hand-worked oracle, vocab 2, windows [0, 1] and [1, 1]; only the first position of each is scored.

    Reference rows: token 0 -> p = (1/3, 2/3), token 1 -> p = (2/3, 1/3). Point rows: both tokens -> q = (3/4, 1/4).
    NLL of the next token (1) under q is ln 4 both times, so perplexity = 4.
    KL(p || q): 1/3 ln(4/9) + 2/3 ln(8/3) and 2/3 ln(8/9) + 1/3 ln(4/3). Top-1: 1 vs 0 (disagree), 0 vs 0 (agree).
    """
    reference = StubLM(torch.tensor([[0.0, math.log(2.0)], [math.log(2.0), 0.0]]), torch.zeros(2, 2))
    point = StubLM(torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]]), torch.zeros(2, 2))
    windows = torch.tensor([[0, 1], [1, 1]])
    q = evaluate_points(reference, [("p", lambda: point, None)], windows, batch_size=1)["p"]
    kl0 = math.log(4 / 9) / 3 + 2 * math.log(8 / 3) / 3
    kl1 = 2 * math.log(8 / 9) / 3 + math.log(4 / 3) / 3
    assert q.tokens == 2
    assert q.perplexity == pytest.approx(4.0, rel=1e-6)
    assert q.kl == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    assert q.top1_agreement == 0.5
    assert q.active is None
    assert perplexity(point, windows).perplexity == pytest.approx(4.0, rel=1e-6)
