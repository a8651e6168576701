"""prism_cli.cuda: the sources compile (nvcc for sm_90 wherever nvcc exists), the torch reference is
right (CPU), and on a GPU every compiled op matches the reference on the real models' shapes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prism_cli import cuda
from prism_cli.cuda import checks, reference, toolchain

NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEFINES = ["-DTORCH_EXTENSION_NAME=prism_kernels_test", "-DTORCH_API_INCLUDE_EXTENSION_H"]


def torch_includes(tmp_path: Path) -> list[str]:
    """The include flags of a torch extension build. CPU wheels of torch lack one generated header of
    c10/cuda (fixed content); it is supplied so that the sources can be compiled here."""
    from torch.utils import cpp_extension

    dirs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in dirs):
        stub = tmp_path / "stub"
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(stub))
    return [flag for d in dirs for flag in ("-isystem", d)]


# ---------------------------------------------------------------------------------------------
# Compilation (no GPU needed).


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", [p for p in cuda.SOURCES if p.suffix == ".cu"], ids=lambda p: p.name)
def test_cu_source_compiles_for_hopper_without_spills(source: Path, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    obj = tmp_path / (source.stem + ".o")
    cmd = [NVCC, "-arch=sm_90", *toolchain.CUDA_FLAGS, *cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC"]
    cmd += ["-Xptxas", "-v", *DEFINES, *torch_includes(tmp_path), "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert obj.stat().st_size > 0
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    assert spills and not any(spills), "a kernel spills registers:\n" + proc.stderr[-6000:]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_binding_compiles(tmp_path: Path) -> None:
    binding = next(p for p in cuda.SOURCES if p.suffix == ".cpp")
    cmd = [CXX, "-fsyntax-only", *toolchain.HOST_FLAGS, "-fPIC", *DEFINES, *torch_includes(tmp_path), str(binding)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]


# ---------------------------------------------------------------------------------------------
# The torch reference (CPU).


def naive_experts(x, gate_up, down, indices, weights) -> torch.Tensor:
    """out[t] = sum_p w[t, p] * SubExpert_{indices[t, p]}(x[t]), one token and slot at a time, float64."""
    groups, width = gate_up.shape[0], gate_up.shape[1] // 2
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for p in range(indices.shape[1]):
            g = int(indices[t, p])
            if g < groups:
                h = gate_up[g] @ x[t]
                out[t] += weights[t, p] * (down[g] @ (F.silu(h[:width]) * h[width:]))
    return out


def naive_gate_scores(x, gate_w, up_w, expert_idx, n_sub) -> torch.Tensor:
    tokens, k = expert_idx.shape
    scores = torch.empty(tokens, k, n_sub, dtype=torch.float64)
    for t in range(tokens):
        for j in range(k):
            e = int(expert_idx[t, j])
            a = (F.silu(gate_w[e].double() @ x[t].double()) * (up_w[e].double() @ x[t].double())).abs()
            scores[t, j] = a.view(n_sub, -1).mean(dim=1)
    return scores


CPU_SHAPES = [  # hidden, width, experts, n_sub, top_k, tokens, active
    (32, 8, 4, 4, 2, 1, 1),
    (48, 16, 3, 4, 2, 7, 8),
    (64, 24, 8, 2, 3, 13, 4),
    (40, 8, 2, 8, 1, 5, 8),
]


@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_reference_experts_forward_matches_a_per_token_loop(shape: tuple[int, ...]) -> None:
    hidden, width, experts, n_sub, top_k, tokens, active = shape
    case = cuda.random_case(
        hidden, width, experts, n_sub, top_k, tokens, active, torch.float64, "cpu", unused_slots=0.25, seed=3
    )
    args = [case[k] for k in ("x", "gate_up", "down", "indices", "weights")]
    out = reference.experts_forward(*args)
    expected = naive_experts(*args)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # The grouped ops compose to the same step (the CPU path fuses them, so summation order differs),
    # and the fused CPU path is deterministic.
    order, offsets = reference.sort_pairs(case["indices"], experts * n_sub)
    act = reference.grouped_swiglu(case["x"], case["gate_up"], order, offsets, active)
    composed = reference.grouped_down(act, case["down"], order, offsets, case["weights"], tokens)
    assert torch.allclose(composed, out, rtol=1e-5, atol=1e-6 * out.abs().max().item())
    assert torch.equal(out, reference.experts_forward(case["x"], case["gate_up"], case["down"], case["indices"], case["weights"]))


@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_reference_gate_scores_match_a_loop(shape: tuple[int, ...]) -> None:
    hidden, width, experts, n_sub, top_k, tokens, active = shape
    case = cuda.random_case(hidden, width, experts, n_sub, top_k, tokens, active, torch.float64, "cpu", seed=4)
    args = [case[k] for k in ("x", "gate_w", "up_w", "expert_idx", "n_sub")]
    scores = reference.gate_scores(*args)
    assert scores.dtype == torch.float32 and scores.shape == (tokens, top_k, n_sub)
    assert torch.allclose(scores.double(), naive_gate_scores(*args), rtol=1e-4, atol=1e-6)


def test_reference_sort_pairs_is_stable_and_drops_unused_slots() -> None:
    gen = torch.Generator().manual_seed(0)
    groups = 6
    indices = torch.randint(0, groups + 1, (50, 5), generator=gen)  # the value `groups` is the sentinel
    order, offsets = reference.sort_pairs(indices, groups)
    flat = indices.reshape(-1)
    assert order.dtype == offsets.dtype == torch.long and offsets.shape == (groups + 1,)
    assert int(offsets[-1]) == order.numel() == int((flat < groups).sum())
    for g in range(groups):
        members = order[offsets[g] : offsets[g + 1]]
        assert (flat[members] == g).all()
        assert torch.equal(members, (flat == g).nonzero().reshape(-1))  # flat order kept: stable


def test_random_routing_keeps_the_best_sub_experts_of_distinct_experts() -> None:
    gen = torch.Generator().manual_seed(1)
    indices, weights, chosen = cuda.random_routing(9, 5, 4, 3, 7, gen, unused_slots=0.0)
    assert indices.shape == weights.shape == (9, 7) and chosen.shape == (9, 3)
    for t in range(9):
        assert len(set(chosen[t].tolist())) == 3
        assert len(set(indices[t].tolist())) == 7
        assert set((indices[t] // 4).tolist()) <= set(chosen[t].tolist())
    assert torch.allclose(weights.sum(dim=1), torch.ones(9)) and (weights > 0).all()
    with pytest.raises(ValueError, match=r"need 1 <= active <= n_sub \* top_k and top_k <= experts, got 13, 3"):
        cuda.random_routing(2, 5, 4, 3, 13, gen)


class _Skewed:
    """The reference ops with every output scaled by ``1 + eps`` and ``sort_pairs``' order reversed: a
    kernel set whose errors are known by hand."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __getattr__(self, name: str):
        op = getattr(reference, name)

        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            if name == "sort_pairs":
                order, offsets = out
                return order.flip(0), offsets
            return out * (1 + self.eps)

        return call


def test_check_case_measures_known_errors() -> None:
    case = cuda.random_case(32, 8, 4, 4, 2, 6, 5, torch.float32, "cpu", unused_slots=0.2)
    errors = cuda.check_case(_Skewed(0.03), case)
    assert errors["sort_pairs"] == float("inf")  # a different pair order is wrong, not a little off
    for op in set(cuda.OPS) - {"sort_pairs"}:
        assert errors[op] == pytest.approx(0.03, rel=1e-4), op  # max |ref * 1.03 - ref| / max |ref|
    assert checks.relative_error(torch.full((2, 2), float("nan")), torch.ones(2, 2)) == float("inf")
    assert checks.relative_error(torch.ones(2, 2) * 1.01, torch.ones(2, 2)) == pytest.approx(0.01)


def test_without_cuda_every_device_gets_the_reference() -> None:
    assert cuda.get_ops("cpu") is reference
    assert cuda.get_ops(torch.device("cpu")) is reference
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert not cuda._kernel_ready(x, x)  # CPU tensors never take the kernels
    if not torch.cuda.is_available():
        assert not cuda.available() and not cuda.is_built() and cuda.cache_dir() is None
        assert cuda.self_check("cuda") == {"device": "cuda", "passed": False, "ops": {}, "error": "no CUDA device"}


def test_toolkit_info_reports_versions() -> None:
    info = cuda.toolkit_info()
    assert info["torch"] == torch.__version__
    assert set(info) >= {"device", "capability", "nvcc", "nvcc_version", "ninja", "built", "cache_dir"}
    if NVCC is not None:
        assert info["nvcc"] is not None and "release" in info["nvcc_version"]


# ---------------------------------------------------------------------------------------------
# The compiled kernels (GPU).

N_SUB = 4
GPU_SHAPES = {
    **{name: dict(shape) for name, shape in cuda.MODEL_SHAPES.items()},
    "odd": dict(hidden=200, inter=160, experts=5, top_k=3),  # Is = 40: partial chunks and tiles
}
GPU_SHAPES["Mixtral-8x7B"]["experts"] = 4  # half the experts: weights stay under 2 GB


def gpu_cases() -> list[tuple[str, int, int, torch.dtype]]:
    """Every shape at batches 1, 7, 64 and 4096 with K from 1 to N * k (fewer K at 4096), bf16; a few
    in fp16."""
    cases = []
    for name, shape in GPU_SHAPES.items():
        k_max = N_SUB * shape["top_k"]
        for tokens in (1, 7, 64, 4096):
            ks = (1, k_max) if tokens == 4096 else (1, 3, k_max // 2 + 1, k_max)
            cases += [(name, tokens, k, torch.bfloat16) for k in sorted(set(ks))]
    cases += [(name, tokens, 5, torch.float16) for name in ("OLMoE-1B-7B", "odd") for tokens in (7, 4096)]
    return cases


def gpu_case(name: str, tokens: int, active: int, dtype: torch.dtype, seed: int = 0) -> dict:
    shape = GPU_SHAPES[name]
    return cuda.random_case(
        shape["hidden"], shape["inter"] // N_SUB, shape["experts"], N_SUB, shape["top_k"], tokens, active,
        dtype, "cuda", unused_slots=0.1, seed=seed,
    )


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name,tokens,active,dtype", gpu_cases(), ids=str)
def test_kernels_match_the_reference(name: str, tokens: int, active: int, dtype: torch.dtype) -> None:
    ops = cuda.get_ops("cuda")
    assert ops is not reference
    errors = cuda.check_case(ops, gpu_case(name, tokens, active, dtype, seed=tokens + active))
    assert all(err <= cuda.TOLERANCE for err in errors.values()), errors


@pytest.mark.gpu
@requires_gpu
def test_experts_forward_is_deterministic_and_graph_capturable() -> None:
    ops = cuda.get_ops("cuda")
    case = gpu_case("OLMoE-1B-7B", 300, 12, torch.bfloat16)
    args = [case[k] for k in ("x", "gate_up", "down", "indices", "weights")]
    first = ops.experts_forward(*args)
    assert torch.equal(first, ops.experts_forward(*args))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.experts_forward(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if the op synchronises with the host
        captured = ops.experts_forward(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


@pytest.mark.gpu
@requires_gpu
def test_kernels_reject_bad_inputs_with_clear_messages() -> None:
    ext = cuda.build()
    case = gpu_case("odd", 7, 3, torch.bfloat16)
    x, gate_up, down, indices, weights = (case[k] for k in ("x", "gate_up", "down", "indices", "weights"))
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        ext.experts_forward(x.float(), gate_up, down, indices, weights)
    with pytest.raises(RuntimeError, match="down must be"):
        ext.experts_forward(x, gate_up, down[:, :8].contiguous(), indices, weights)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ext.experts_forward(x, gate_up, down, indices.cpu(), weights)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.experts_forward(x, gate_up, down, indices.t(), weights.t())
    # float32 goes to the reference through get_ops.
    out = cuda.get_ops("cuda").experts_forward(x.float(), gate_up.float(), down.float(), indices, weights.float())
    assert out.dtype == torch.float32


@pytest.mark.gpu
@requires_gpu
def test_self_check_passes() -> None:
    result = cuda.self_check("cuda")
    assert result["passed"], result
    assert cuda.is_built() and cuda.available()
