"""Quality of many operating points against one reference, in a single pass over the data.

For each batch the reference (the full model) runs once; then every operating point runs on the same
batch and is compared with it: next-token negative log-likelihood (perplexity), KL divergence of its
next-token distribution from the reference's, top-1 agreement, and the mean number of sub-experts its
tokens computed. Batches outer, points inner keeps memory at one batch of logits, whatever the number
of points; all sums are in float64 in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prism_cli.data.windows import batched
from prism_cli.evaluation.perplexity import next_token_nll


@dataclass
class PointQuality:
    """Quality of one operating point relative to the reference."""

    perplexity: float
    kl: float
    top1_agreement: float
    active: float | None
    tokens: int


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    active_sum: float = 0.0
    active_count: int = 0


class ActiveCounter:
    """Forward hook for MoE routers: sub-experts computed per token and layer (experts count ``per_expert``).

    ``mean()`` is the average over every (token, MoE layer) seen since the last ``reset()``; sentinel
    slots (variable compute) are not counted.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def hook(self, per_expert: int = 1, sentinel: int | None = None) -> Callable:
        """A forward hook for one router: its indices count ``per_expert`` each, ``sentinel`` ones not at all."""

        def count(_module: torch.nn.Module, _inputs: object, output: tuple[torch.Tensor, ...]) -> None:
            indices = output[2]
            live = indices.numel() if sentinel is None else int((indices != sentinel).sum())
            self.total += live * per_expert
            self.tokens += indices.shape[0]

        return count

    def reset(self) -> None:
        self.total, self.tokens = 0.0, 0

    def mean(self) -> float | None:
        return self.total / self.tokens if self.tokens else None


@torch.inference_mode()
def evaluate_points(
    reference: torch.nn.Module,
    runners: Sequence[tuple[str, Callable[[], torch.nn.Module], ActiveCounter | None]],
    windows: torch.Tensor,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, PointQuality]:
    """Evaluate every runner ``(name, prepare, counter)``; ``prepare()`` sets the point and returns the model."""
    device = next(reference.parameters()).device
    accs = {name: _Acc() for name, _, _ in runners}
    for batch in batched(windows, batch_size):
        ids = batch.to(device)
        ref_logp = F.log_softmax(reference(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        ref_top = ref_logp.argmax(dim=-1)
        for name, prepare, counter in runners:
            model = prepare()
            if counter is not None:
                counter.reset()
            logits = model(input_ids=ids, use_cache=False).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            acc = accs[name]
            acc.nll += float(next_token_nll(logits, batch).double().sum())
            acc.kl += float((ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).double().sum())
            acc.agree += float((logp.argmax(dim=-1) == ref_top).double().sum())
            acc.tokens += ref_top.numel()
            if counter is not None:
                acc.active_sum += counter.total
                acc.active_count += counter.tokens
        if on_batch is not None:
            on_batch(batch.numel())
    return {
        name: PointQuality(
            perplexity=math.exp(a.nll / a.tokens),
            kl=max(a.kl / a.tokens, 0.0),  # a true KL is >= 0; rounding can leave -1e-10
            top1_agreement=a.agree / a.tokens,
            active=a.active_sum / a.active_count if a.active_count else None,
            tokens=a.tokens,
        )
        for name, a in accs.items()
    }
