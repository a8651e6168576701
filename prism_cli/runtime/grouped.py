"""Executing a routed batch from its plan: one gather and one scatter per expert, contiguous weight slices.

``grouped_experts_forward(module, x, indices, weights, n_sub)`` computes
``out[t] = sum_p weights[t, p] * SubExpert_{indices[t, p]}(x[t])`` for any fused experts module that
transformers' own implementations accept: gate/up concatenated or interleaved (the module's
``_apply_gate`` is used, so custom activations such as GPT-OSS's clamped SwiGLU work), transposed or
not, with or without biases. Each block of the plan (rows x a run of sub-experts) is one matmul for the
up-projection over the contiguous slice ``gate_up[e*N+n0 : e*N+n1]`` and the down-projection
accumulates into the expert's rows in place; a token is gathered once per expert and added into the
output once per expert, as with whole experts. Matmuls run in float32 and the output is reduced in a
fixed order (``index_add_`` is serial on the CPU), so results are deterministic.

This is prism's CPU path and the fallback where the compiled kernels do not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from prism_cli.runtime.plan import ExpertPlan, ExpertWork, plan_experts

T = TypeVar("T")


def grouped_experts_forward(
    module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_sub: int = 1,
    blocks: tuple[torch.Tensor, tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """The experts' output for routed ``x [T, H]`` (see the module docstring); ``blocks``: the routing's
    prefix shape where it is known (``plan_experts``)."""
    gate_up = module.gate_up_proj
    plan = plan_experts(indices, weights, n_sub, gate_up.shape[0], blocks)
    return execute_plan(module, x, plan)


def execute_plan(module: torch.nn.Module, x: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """Run ``plan`` on ``x``: per expert, gather its rows, compute its blocks, add its rows into the output."""
    xf = x.float()
    out: torch.Tensor | None = None
    tokens = torch.from_numpy(plan.tokens).to(x.device) if plan.experts else None
    row_w = torch.from_numpy(plan.weights).to(x.device) if plan.experts else None
    for work in plan.experts:
        we = row_w[work.start : work.stop]
        if work.all_tokens:  # e.g. a decode step of one sequence: no gather, no scatter
            ye = _expert_output(module, xf, we, work, plan.n_sub)
            out = ye if out is None else out.add_(ye)
            continue
        rows = tokens[work.start : work.stop]
        ye = _expert_output(module, xf.index_select(0, rows), we, work, plan.n_sub)
        if out is None:
            out = torch.zeros(x.shape[0], ye.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, rows, ye)
    if out is None:
        out = torch.zeros(x.shape[0], _hidden(module), dtype=torch.float32, device=x.device)
    return out.to(x.dtype)


def _hidden(module: torch.nn.Module) -> int:
    down = module.down_proj
    return down.shape[2] if getattr(module, "is_transposed", False) else down.shape[1]


def _up(module: torch.nn.Module, xr: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    """Gate-up projection of rows ``xr`` for sub-experts ``g0:g1``, activated: ``[rows, g1-g0, width]``."""
    gate_up = module.gate_up_proj
    count, rows = g1 - g0, xr.shape[0]
    if getattr(module, "is_transposed", False):  # [G, H, 2w]: a batched product over the sub-experts
        h = torch.matmul(xr, gate_up[g0:g1].float()).transpose(0, 1)
    else:  # [G, 2w, H]: the slice is one contiguous [(g1-g0)*2w, H] matrix
        h = F.linear(xr, gate_up[g0:g1].reshape(-1, gate_up.shape[-1]).float()).view(rows, count, -1)
    if getattr(module, "has_bias", False):
        h = h + module.gate_up_proj_bias[g0:g1].float()
    act = module._apply_gate(h.reshape(rows * count, -1))
    return act.view(rows, count, -1)


def _down_into(module: torch.nn.Module, target: torch.Tensor, act: torch.Tensor, g0: int, first: bool) -> torch.Tensor:
    """``target (+)= sum_j act[:, j] @ W_down[g0 + j]^T``; returns the result (a new tensor when ``first``)."""
    down = module.down_proj
    rows, count, width = act.shape
    if getattr(module, "is_transposed", False):  # [G, w, H]: the slice is one [(count*w), H] matrix
        weight = down[g0 : g0 + count].reshape(count * width, -1).float()
        flat = act.reshape(rows, count * width)
        return flat @ weight if first else target.addmm_(flat, weight)
    if count == 1:
        weight_t = down[g0].float().t()
        return act[:, 0] @ weight_t if first else target.addmm_(act[:, 0], weight_t)
    weight = _down_transposed(module)[g0 : g0 + count].reshape(count * width, -1).float()
    flat = act.reshape(rows, count * width)
    return flat @ weight if first else target.addmm_(flat, weight)


def _down_transposed(module: torch.nn.Module) -> torch.Tensor:
    """``down_proj`` as ``[G, w, H]``, so that a run of sub-experts is one matrix (one matmul, as for a
    whole expert).

    On the CPU the parameter itself is laid out this way, when the model is made elastic
    (``settle_down_layout``) or else on first use: it becomes a transposed view of this tensor (same shape
    and values, strides ``(w*H, 1, H)``), so the weights are held once, not once per layout. Elsewhere
    (a CUDA device, where the compiled kernels take the stock layout) a copy is built and kept on the
    module while ``down_proj`` is unchanged: 1/3 more expert memory there."""
    down = module.down_proj
    by_piece = down.detach().transpose(1, 2)
    if by_piece.is_contiguous():
        return by_piece
    if down.device.type == "cpu" and isinstance(down, torch.nn.Parameter):
        with torch.inference_mode(False):  # a parameter the model may still train with: not an inference tensor
            relaid = by_piece.contiguous()
            down.data = relaid.transpose(1, 2)
        return relaid
    key = (down.data_ptr(), down._version, down.device, down.dtype)
    return cached_on(module, "_prism_down_t", key, lambda: by_piece.contiguous())


def settle_down_layout(module: torch.nn.Module) -> None:
    """Lay ``down_proj`` out as the CPU runtime reads it (``_down_transposed``), once, when a model is made
    elastic: its weights then stay where they are while it switches points and runs."""
    if module.down_proj.device.type == "cpu" and not getattr(module, "is_transposed", False):
        _down_transposed(module)


def contiguous_down(module: torch.nn.Module) -> torch.Tensor:
    """``down_proj`` in the stock contiguous layout, restored in place where the CPU runtime re-laid it out
    (``_down_transposed``) and the model moved to a device whose kernels take the stock layout."""
    down = module.down_proj
    if not down.is_contiguous():
        with torch.inference_mode(False):
            down.data = down.detach().contiguous()
    return down


def cached_on(module: torch.nn.Module, name: str, key: tuple, build: Callable[[], T]) -> T:
    """``build()``, kept on ``module`` as attribute ``name`` while ``key`` (the identity and version of the
    weights it derives from) is unchanged."""
    cached = getattr(module, name, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(module, name, cached)
    return cached[1]


def _expert_output(module: torch.nn.Module, xe: torch.Tensor, we: torch.Tensor, work: ExpertWork, n_sub: int) -> torch.Tensor:
    """The weighted sum of the expert's computed sub-experts for its rows ``xe``: ``[rows, H]``."""
    base = work.expert * n_sub
    has_bias = getattr(module, "has_bias", False)
    ye: torch.Tensor | None = None
    for a, b, n0, n1 in work.blocks:
        act = _up(module, xe[a:b], base + n0, base + n1)
        act = act * we[a:b, n0:n1, None]
        whole = a == 0 and b == xe.shape[0]
        if ye is None and not whole:
            ye = torch.zeros(xe.shape[0], _hidden(module), dtype=torch.float32, device=xe.device)
        if ye is None:
            ye = _down_into(module, None, act, base + n0, first=True)
        else:
            _down_into(module, ye[a:b], act, base + n0, first=False)
        if has_bias:
            ye[a:b].addmm_(we[a:b, n0:n1], module.down_proj_bias[base + n0 : base + n1].float())
    for n, rows_np in work.scattered:
        rows = torch.from_numpy(rows_np).to(xe.device)
        act = _up(module, xe.index_select(0, rows), base + n, base + n + 1)
        w_rows = we.index_select(0, rows)[:, n : n + 1]
        act = act * w_rows[:, :, None]
        y = _down_into(module, None, act, base + n, first=True)
        if has_bias:
            y = y + w_rows * module.down_proj_bias[base + n].float()
        if ye is None:
            ye = torch.zeros(xe.shape[0], _hidden(module), dtype=torch.float32, device=xe.device)
        ye.index_add_(0, rows, y)
    assert ye is not None  # every expert of a plan has at least one row and one sub-expert
    return ye
