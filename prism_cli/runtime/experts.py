"""prism's experts implementation, registered with transformers' ``ExpertsInterface`` as ``"prism"``.

It computes ``out[t] = sum_p w[t, p] * Expert_{idx[t, p]}(x[t])`` for any fused experts module (whole
experts or flat sub-experts) and accepts sentinel slots (``idx == num_experts``, e.g. from the
threshold policy's variable compute). Which executor runs is resolved once per module, device and
dtype, from a registry:

* ``grouped-mm`` (:mod:`prism_cli.runtime.grouped_mm`): two grouped matrix products per call (one
  per projection and prefix length), whatever the number of experts; for the standard layouts, on the
  calls where that pays (``grouped_mm.choose_path``), else one product per sub-expert (``flat-loop``) or
  the ``grouped`` executor; a single token of prefix routing (``prefix-one``) takes one product per
  projection and block;
* ``grouped`` (:mod:`prism_cli.runtime.grouped`): tokens grouped once per expert, sub-experts run over
  contiguous weight slices; any device, any layout transformers' own implementations accept;
* ``offload`` (:mod:`prism_cli.offload.executor`, registered there): a module whose experts live in host
  memory behind a device cache (``attach_offload`` sets ``module.prism_offload``);
* ``cuda-kernels``: prism's compiled kernels (``prism_cli.cuda``), on a CUDA device of sm_80+ with the
  kernels built, bf16/fp16 weights and the standard layout (gate/up concatenated, not transposed, no
  biases, SwiGLU).

Where autograd records a call (training, or a forward outside ``torch.no_grad()``), none of these runs:
the family's eager experts do (``autograd``), so that a backward reaches every weight.

Every call is counted by the executor that actually ran (``DISPATCH_COUNTS``), so a report can name
the implementation behind each number instead of the one it asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate

from prism_cli import cuda
from prism_cli.errors import PrismError
from prism_cli.registry import Registry
from prism_cli.runtime import grouped_mm
from prism_cli.runtime.grouped import contiguous_down, grouped_experts_forward

EXPERTS_IMPLEMENTATION = "prism"

Executor = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXECUTORS: Registry[Executor] = Registry("experts executor")
#: Calls per executor since the last ``reset_dispatch_counts()``.
DISPATCH_COUNTS: Counter[str] = Counter()


@EXECUTORS.register("grouped")
def _grouped(module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return grouped_experts_forward(module, x, indices, weights, sub_experts_of(module))


@EXECUTORS.register("grouped-mm")
def _grouped_products(module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out, path = grouped_mm.grouped_mm_forward(module, x, indices, weights, sub_experts_of(module))
    DISPATCH_COUNTS[path] += 1
    return out


@EXECUTORS.register("cuda-kernels")
def _kernels(module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ops = cuda.get_ops(x.device)
    down = contiguous_down(module)  # the stock layout (a model moved here after the CPU runtime ran)
    if not ops.takes(x, module.gate_up_proj, down):  # e.g. an unaligned slice of activations
        DISPATCH_COUNTS["grouped"] += 1
        return _grouped(module, x, indices, weights)
    DISPATCH_COUNTS["cuda-kernels"] += 1
    return ops.experts_forward(x, module.gate_up_proj, down, indices, weights)


#: Executors that count what actually ran themselves (they may hand a call to ``grouped``).
SELF_COUNTING = frozenset({"cuda-kernels", "grouped-mm"})


def sub_experts_of(module: torch.nn.Module) -> int:
    """How many adjacent experts of ``module`` are the pieces of one original expert (1 for a plain model)."""
    return int(getattr(module, "prism_sub_experts", 1))


def _standard_layout(module: torch.nn.Module) -> bool:
    return (
        not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_bias", False)
        and type(module)._apply_gate is _default_apply_gate
    )


def resolve_executor(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """The executor for ``module`` on ``device`` with activations of ``dtype`` (see the module docstring)."""
    if getattr(module, "prism_offload", None) is not None:  # experts in host memory (prism_cli.offload)
        return "offload"
    if device.type == "cuda" and dtype in cuda.KERNEL_DTYPES and _standard_layout(module) and cuda.available():
        return "cuda-kernels"
    if grouped_mm.takes(module):
        return "grouped-mm"
    return "grouped"


def records_gradient(module: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether autograd records this call: a backward must then reach the weights, the inputs and the
    routing weights, which prism's executors (plans built on the host, cached layouts, compiled kernels)
    do not carry."""
    return torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                        or any(p.requires_grad for p in module.parameters(recurse=False)))


def differentiable_forward(module: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """The family's own eager experts (transformers' reference: differentiable, any dtype and layout),
    with prism's sentinel slots as slots of expert 0 at weight 0: the same output, and gradients for
    everything it reads. Offloaded experts (host memory behind a device cache) have no backward: they
    run as for inference, and a backward through them is refused."""
    if getattr(module, "prism_offload", None) is not None:
        DISPATCH_COUNTS["offload"] += 1
        with torch.no_grad():
            out = EXECUTORS.get("offload")(module, x, indices, weights)
        return _NoBackward.apply(out, x, weights)
    DISPATCH_COUNTS["autograd"] += 1
    sentinel = indices >= module.num_experts
    if bool(sentinel.any()):
        indices, weights = indices.masked_fill(sentinel, 0), weights.masked_fill(sentinel, 0.0)
    eager = getattr(type(module).forward, "__wrapped__", None)  # under transformers' implementation dispatch
    if eager is None:
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, x, indices, weights)
    return eager(module, x, indices, weights)


class _NoBackward(torch.autograd.Function):
    """``out`` as an output autograd records (a plain forward outside ``no_grad`` works) but will not
    differentiate: a wrong gradient would be silent."""

    @staticmethod
    def forward(ctx: object, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: object, *grads: torch.Tensor) -> None:
        raise PrismError("offloaded experts have no backward: load the model without offloading to train it")


def prism_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    if records_gradient(self, hidden_states, top_k_weights):  # training, or a forward outside no_grad
        return differentiable_forward(self, hidden_states, top_k_index, top_k_weights)
    key = (hidden_states.device, hidden_states.dtype)
    cached = getattr(self, "_prism_executor", None)
    if cached is None or cached[0] != key:
        cached = (key, resolve_executor(self, *key))
        self._prism_executor = cached
    name = cached[1]
    if name not in SELF_COUNTING:
        DISPATCH_COUNTS[name] += 1
    return EXECUTORS.get(name)(self, hidden_states, top_k_index, top_k_weights)


def reset_dispatch_counts() -> Counter[str]:
    """The counts so far, then zero them."""
    counts = Counter(DISPATCH_COUNTS)
    DISPATCH_COUNTS.clear()
    return counts


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, prism_experts_forward)
