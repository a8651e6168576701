"""Checking the kernels against the torch reference: random routings and cases at given shapes, the
relative error of every op, and the self-check ``prism doctor`` and ``scripts/gpu_check.sh`` run."""

from __future__ import annotations

from typing import Any

import torch

from prism_cli.cuda import KERNEL_DTYPES, OPS, get_ops, reference

TOLERANCE = 1e-2  # max relative error of a kernel against the float32 reference
# Hidden size, expert width, experts and top-k of the real models the kernels are checked and timed on.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "OLMoE-1B-7B": dict(hidden=2048, inter=1024, experts=64, top_k=8),
    "Qwen3-30B-A3B": dict(hidden=2048, inter=768, experts=128, top_k=8),
    "Mixtral-8x7B": dict(hidden=4096, inter=14336, experts=8, top_k=2),
    "DeepSeek-V2-Lite": dict(hidden=2048, inter=1408, experts=64, top_k=6),
}


def random_routing(
    tokens: int,
    experts: int,
    n_sub: int,
    top_k: int,
    active: int,
    generator: torch.Generator,
    unused_slots: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random routing at one operating point, on ``generator``'s device.

    Each token picks ``top_k`` distinct experts, scores their ``n_sub`` sub-experts at random and keeps
    the ``active`` best (``1 <= active <= n_sub * top_k``); then a fraction ``unused_slots`` of the slots
    is replaced by the sentinel ``experts * n_sub``. Returns ``indices [T, active]`` (int64),
    ``weights [T, active]`` (float32, positive, summing to one per token) and the chosen experts
    ``[T, top_k]``.
    """
    if not (1 <= active <= n_sub * top_k and top_k <= experts):
        raise ValueError(f"need 1 <= active <= n_sub * top_k and top_k <= experts, got {active}, {top_k}")
    device = generator.device
    chosen = torch.rand(tokens, experts, generator=generator, device=device).topk(top_k, dim=1).indices
    sub = chosen[:, :, None] * n_sub + torch.arange(n_sub, device=device)  # [T, k, N] sub-expert ids
    keep = torch.rand(tokens, top_k * n_sub, generator=generator, device=device).topk(active, dim=1).indices
    indices = sub.reshape(tokens, -1).gather(1, keep)
    unused = torch.rand(indices.shape, generator=generator, device=device) < unused_slots
    indices = indices.masked_fill(unused, experts * n_sub)
    weights = torch.rand(tokens, active, generator=generator, device=device) + 0.05
    return indices, weights / weights.sum(dim=1, keepdim=True), chosen


def random_case(
    hidden: int,
    width: int,
    experts: int,
    n_sub: int,
    top_k: int,
    tokens: int,
    active: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    unused_slots: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """A random sub-expert MoE layer (``experts * n_sub`` sub-experts of width ``width``, i.e. I / N)
    with routing from :func:`random_routing`, and 4 gate neurons per sub-expert for ``gate_scores``.
    Weights are scaled so that activations stay of order one; nothing is zero."""
    gen = torch.Generator(device=device).manual_seed(seed)
    groups, neurons = experts * n_sub, 4 * n_sub

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    indices, weights, chosen = random_routing(tokens, experts, n_sub, top_k, active, gen, unused_slots)
    return {
        "x": randn(tokens, hidden),
        "gate_up": randn(groups, 2 * width, hidden, scale=hidden**-0.5),
        "down": randn(groups, hidden, width, scale=width**-0.5),
        "indices": indices,
        "weights": weights.to(dtype),
        "expert_idx": chosen,
        "gate_w": randn(experts, neurons, hidden, scale=hidden**-0.5),
        "up_w": randn(experts, neurons, hidden, scale=hidden**-0.5),
        "n_sub": n_sub,
    }


def _poison_free_memory(device: torch.device) -> None:
    """Fill free blocks of the caching allocator (both pools) with NaN bytes, so that an op reading
    memory it never wrote is caught: the ops allocate their outputs from these blocks."""
    torch.empty(256 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    small = [torch.empty(256 << 10, dtype=torch.uint8, device=device) for _ in range(32)]
    for block in small:
        block.fill_(0xFF)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (NaN anywhere in out gives inf)."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return (out - ref).abs().max().item() / (scale or 1.0) if ref.numel() else 0.0


def check_case(ops: Any, case: dict[str, Any]) -> dict[str, float]:
    """Max relative error of every op of ``ops`` against the reference run in float32 on ``case``
    (from :func:`random_case`); outputs are poisoned before each call. ``sort_pairs`` must match
    exactly (0.0, else inf)."""
    f32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    x, gate_up, down, indices, weights = (case[k] for k in ("x", "gate_up", "down", "indices", "weights"))
    device, groups, tokens, slots = x.device, gate_up.shape[0], x.shape[0], indices.shape[1]
    ref_order, ref_offsets = reference.sort_pairs(indices, groups)
    ref_act = reference.grouped_swiglu(f32["x"], f32["gate_up"], ref_order, ref_offsets, slots)
    expected = {
        "grouped_swiglu": ref_act,
        "grouped_down": reference.grouped_down(
            ref_act, f32["down"], ref_order, ref_offsets, f32["weights"], tokens
        ),
        "experts_forward": reference.experts_forward(f32["x"], f32["gate_up"], f32["down"], indices, f32["weights"]),
        "gate_scores": reference.gate_scores(
            f32["x"], f32["gate_w"], f32["up_w"], case["expert_idx"], case["n_sub"]
        ),
    }
    calls = {
        "sort_pairs": lambda: ops.sort_pairs(indices, groups),
        "grouped_swiglu": lambda: ops.grouped_swiglu(x, gate_up, ref_order, ref_offsets, slots),
        "grouped_down": lambda: ops.grouped_down(
            ref_act.to(x.dtype), down, ref_order, ref_offsets, weights, tokens
        ),
        "experts_forward": lambda: ops.experts_forward(x, gate_up, down, indices, weights),
        "gate_scores": lambda: ops.gate_scores(x, case["gate_w"], case["up_w"], case["expert_idx"], case["n_sub"]),
    }
    errors: dict[str, float] = {}
    for name in OPS:
        if device.type == "cuda":
            _poison_free_memory(device)
        out = calls[name]()
        if name == "sort_pairs":
            same = all(torch.equal(a, b) for a, b in zip(out, (ref_order, ref_offsets), strict=True))
            errors[name] = 0.0 if same else float("inf")
        else:
            errors[name] = relative_error(out, expected[name])
    return errors


# Small cases for self_check: decode-like (skinny kernel) and one skewed group of more than 64 pairs
# (tiled kernel), odd token counts, unused slots, an odd number of groups of 16-wide chunks.
_SELF_CHECK_CASES: tuple[dict[str, int], ...] = (
    dict(hidden=256, width=48, experts=8, n_sub=4, top_k=2, tokens=7, active=5),
    dict(hidden=200, width=40, experts=3, n_sub=4, top_k=2, tokens=130, active=3),
    dict(hidden=512, width=64, experts=4, n_sub=2, top_k=4, tokens=300, active=8),
)


def self_check(device: torch.device | str = "cuda") -> dict[str, Any]:
    """Run every compiled op against the reference on small random inputs, bf16 and fp16.

    Returns ``{"device", "passed", "ops": {op: {"passed", "max_rel_err"}}}``, or with ``"error"`` when
    the kernels could not be built or an op raised.
    """
    device = torch.device(device)
    result: dict[str, Any] = {"device": str(device), "passed": False, "ops": {}}
    if device.type != "cuda" or not torch.cuda.is_available():
        result["error"] = "no CUDA device"
        return result
    try:
        ops = get_ops(device)
        if ops is reference:
            raise RuntimeError("the kernels are not available (nvcc or ninja missing)")
        worst = dict.fromkeys(OPS, 0.0)
        for dtype in KERNEL_DTYPES:
            for seed, shape in enumerate(_SELF_CHECK_CASES):
                case = random_case(**shape, dtype=dtype, device=device, unused_slots=0.1, seed=seed)
                for name, err in check_case(ops, case).items():
                    worst[name] = max(worst[name], err)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this feeds `prism doctor`
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["ops"] = {name: {"passed": err <= TOLERANCE, "max_rel_err": err} for name, err in worst.items()}
    result["passed"] = all(op["passed"] for op in result["ops"].values())
    return result
