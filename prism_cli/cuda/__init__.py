"""prism's CUDA kernels: build, load, dispatch and check them; the torch reference is the CPU path.

``get_ops(device)`` returns an object with the five ops of :mod:`prism_cli.cuda.reference`
(``sort_pairs``, ``grouped_swiglu``, ``grouped_down``, ``experts_forward``, ``gate_scores``): the
compiled kernels of ``kernels.cu`` on a CUDA device, the reference everywhere else. The kernels are
built with ``torch.utils.cpp_extension`` for the device's own architecture on first use, into a cache
folder keyed by the sources, torch and the architecture (``$PRISM_CACHE/kernels/<key>``, by default
``~/.cache/prism/kernels/<key>``).

This module imports only torch and the standard library: GPU machines may lack the CLI's other
dependencies.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import torch

from prism_cli.cuda import reference
from prism_cli.cuda.toolchain import SOURCES, available_toolchain, build, cache_dir, is_built, supported_device, toolkit_info

OPS: tuple[str, ...] = ("sort_pairs", "grouped_swiglu", "grouped_down", "experts_forward", "gate_scores")
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

_compiled: _CompiledOps | None = None


def available() -> bool:
    """A CUDA device of compute capability 8.0 or newer (cp.async, bf16 mma) is present and the
    kernels are built or can be (nvcc and ninja found)."""
    return supported_device() and (is_built() or available_toolchain())


def _kernel_ready(x: torch.Tensor, *weights: torch.Tensor, widths: tuple[int, ...] = ()) -> bool:
    """Whether the compiled kernels take these inputs: CUDA, bf16/fp16, 16-byte rows and alignment."""
    tensors = (x, *weights)
    return (
        all(t.is_cuda and t.dtype == x.dtype for t in tensors)
        and x.dtype in KERNEL_DTYPES
        and all(t.shape[-1] % 8 == 0 and t.data_ptr() % 16 == 0 for t in tensors)
        and all(w % 8 == 0 for w in widths)
    )


class _CompiledOps:
    """The kernels behind the reference's API; inputs they do not take (float32, odd widths) go to the
    reference. Inputs are made contiguous (a no-op for the usual contiguous tensors)."""

    def __init__(self, extension: ModuleType) -> None:
        self._ext = extension

    @staticmethod
    def takes(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Whether ``experts_forward`` runs the kernels (not the reference) on these inputs."""
        return _kernel_ready(x, gate_up, down, widths=(gate_up.shape[1] // 2,))

    def sort_pairs(self, indices: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        if indices.is_cuda and indices.dtype == torch.long:
            return self._ext.sort_pairs(indices.contiguous(), num_groups)
        return reference.sort_pairs(indices, num_groups)

    def grouped_swiglu(
        self, x: torch.Tensor, gate_up: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, slots: int
    ) -> torch.Tensor:
        if _kernel_ready(x, gate_up, widths=(gate_up.shape[1] // 2,)):
            return self._ext.grouped_swiglu(x.contiguous(), gate_up.contiguous(), order, offsets, slots)
        return reference.grouped_swiglu(x, gate_up, order, offsets, slots)

    def grouped_down(
        self,
        act: torch.Tensor,
        down: torch.Tensor,
        order: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor,
        num_tokens: int,
    ) -> torch.Tensor:
        if _kernel_ready(act, down, widths=(down.shape[1],)):
            return self._ext.grouped_down(
                act.contiguous(), down.contiguous(), order, offsets, weights.contiguous(), num_tokens
            )
        return reference.grouped_down(act, down, order, offsets, weights, num_tokens)

    def experts_forward(
        self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        if _kernel_ready(x, gate_up, down, widths=(gate_up.shape[1] // 2,)) and indices.dtype == torch.long:
            return self._ext.experts_forward(
                x.contiguous(), gate_up.contiguous(), down.contiguous(), indices.contiguous(), weights.contiguous()
            )
        return reference.experts_forward(x, gate_up, down, indices, weights)

    def gate_scores(
        self, x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, expert_idx: torch.Tensor, n_sub: int
    ) -> torch.Tensor:
        if _kernel_ready(x, gate_w, up_w) and expert_idx.dtype == torch.long:
            return self._ext.gate_scores(
                x.contiguous(), gate_w.contiguous(), up_w.contiguous(), expert_idx.contiguous(), n_sub
            )
        return reference.gate_scores(x, gate_w, up_w, expert_idx, n_sub)


def get_ops(device: torch.device | str | None = None) -> Any:
    """The five ops for ``device``: compiled kernels on a CUDA device (built on first use), else the
    torch reference. Without nvcc or ninja, or before sm_80, a CUDA device also gets the reference,
    with a warning."""
    global _compiled
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return reference
    if not available():
        warnings.warn("prism: CUDA kernels unavailable (device older than sm_80, or no nvcc or ninja); "
                      "using the torch reference", stacklevel=2)
        return reference
    if _compiled is None:
        _compiled = _CompiledOps(build())
    return _compiled


# The checks need the dispatch above: imported last, re-exported as the package's API.
from prism_cli.cuda.checks import MODEL_SHAPES, TOLERANCE, check_case, random_case, random_routing, self_check  # noqa: E402

__all__ = [
    "MODEL_SHAPES",
    "OPS",
    "SOURCES",
    "TOLERANCE",
    "available",
    "build",
    "cache_dir",
    "check_case",
    "get_ops",
    "is_built",
    "random_case",
    "random_routing",
    "self_check",
    "toolkit_info",
]
