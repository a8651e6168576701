"""Where router fine-tuning starts: the export's tied copies, or copies told apart by a mass probe.

An untuned flat router gives an expert's N sub-experts the same score, so ``linear:K`` below a
multiple of N takes them in index order, sub-expert 0 first (it carries the most activation mass on
average). The first gradient steps untie the copies by whatever the gradient says, which for the
copies a step did not select is nothing about their own use: the index order is lost and has to be
learned again from the loss, slowly (``--init copies``: measured in ``results/tune_gate.md``).

``--init probe`` starts instead from copies that already rank the sub-experts of an expert per token:
on training text, for every token routed to expert e by the original router, the activation mass
of each sub-expert ``m_n(x) = sum_{j in S_n} |silu(g_j . x) (u_j . x)|`` (the quantity the partition
concentrates, SPEC 3.2) is computed exactly, and a ridge regression per expert fits
``Delta_n . x ~ log m_n(x) - mean_n' log m_n'(x)`` from the router input x. Copy n of expert e then
gets the row ``w_e + alpha * Delta_n``: the expert's logit plus its predicted log-mass share, so the
router's own top-K takes the sub-experts with the largest mass first (MoEfication fits routers of
neuron groups to their activations in the same spirit). The deviations sum to zero over an
expert's copies, so an expert's total weight changes little; ``alpha`` trades the ranking against
the K = N*k weights, which the fine-tuning then sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from prism_cli.registry import Registry

#: Ridge penalty, relative to the mean eigenvalue of the inputs' second-moment matrix.
RIDGE = 1e-2
#: Floor under a sub-expert's activation mass before the log.
MASS_FLOOR = 1e-6

RouterInit = Callable[..., list[torch.Tensor] | None]
INITS: Registry[RouterInit] = Registry("router initialisation")


@INITS.register("copies")
def copies_init(*_args: Any, **_kwargs: Any) -> None:
    """Keep the export's router as it is (tied copies, or an earlier tuning's rows)."""
    return None


@INITS.register("probe")
@torch.no_grad()
def probe_init(trainee: Any, windows: torch.Tensor, source_rows: dict[str, torch.Tensor], alpha: float,
               batch: int = 8) -> list[torch.Tensor]:
    """Flat router rows ``w_e + alpha * Delta_n`` (module docstring) fitted on the token ``windows``."""
    from prism_cli.runtime.elastic import set_operating_point

    model, layers, n_sub = trainee.model, trainee.layers, trainee.n_sub
    inputs: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    hooks = [layer.block.gate.register_forward_hook(
        lambda _m, args, _out, i=layer.index: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for layer in layers]
    set_operating_point(model, f"linear:{trainee.full_k}")  # the original model: routing of the source router
    device = trainee.params[0].device
    try:
        for start in range(0, windows.shape[0], batch):
            model(input_ids=windows[start : start + batch].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for layer, param in zip(layers, trainee.params, strict=True):
        x = torch.cat(inputs[layer.index])
        source = source_rows[f"layers.{layer.index}.weight"].to(x)
        chosen = torch.topk(F.linear(x, source), trainee.full_k // n_sub, dim=-1).indices
        deltas = torch.zeros(source.shape[0], n_sub, source.shape[1], dtype=torch.float64)
        gate_up = layer.experts.gate_up_proj.detach().float()
        width = gate_up.shape[1] // 2
        for e in range(source.shape[0]):
            xe = x[(chosen == e).any(dim=-1)]
            if xe.shape[0] < 2:
                continue  # an expert no token reached: keep its copies tied
            mass = torch.stack([
                (F.silu(xe @ gate_up[e * n_sub + n, :width].T) * (xe @ gate_up[e * n_sub + n, width:].T)).abs().sum(-1)
                for n in range(n_sub)], dim=-1).clamp_min(MASS_FLOOR).log().double()
            target = mass - mass.mean(dim=-1, keepdim=True)
            xd = xe.double()
            gram = xd.T @ xd
            ridge = RIDGE * torch.trace(gram) / gram.shape[0]
            deltas[e] = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target).T
        flat = source.double().repeat_interleave(n_sub, dim=0) + alpha * deltas.reshape(-1, source.shape[1])
        rows.append(flat.to(param.dtype))
    return rows
