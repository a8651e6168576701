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

import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from prism_cli.cuda import reference

__all__ = [
    "MODEL_SHAPES",
    "OPS",
    "SOURCES",
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

_HERE = Path(__file__).resolve().parent
SOURCES: list[Path] = [_HERE / "kernels.cu", _HERE / "binding.cpp"]
_HEADERS: list[Path] = [_HERE / "kernels.cuh"]
OPS: tuple[str, ...] = ("sort_pairs", "grouped_swiglu", "grouped_down", "experts_forward", "gate_scores")
CUDA_FLAGS: list[str] = ["-O3", "--use_fast_math", "-std=c++17"]
HOST_FLAGS: list[str] = ["-O3", "-std=c++17"]
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
TOLERANCE = 1e-2  # max relative error of a kernel against the float32 reference
# Hidden size, expert width, experts and top-k of the real models the kernels are checked and timed on.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "OLMoE-1B-7B": dict(hidden=2048, inter=1024, experts=64, top_k=8),
    "Qwen3-30B-A3B": dict(hidden=2048, inter=768, experts=128, top_k=8),
    "Mixtral-8x7B": dict(hidden=4096, inter=14336, experts=8, top_k=2),
    "DeepSeek-V2-Lite": dict(hidden=2048, inter=1408, experts=64, top_k=6),
}

_lock = threading.Lock()
_extension: ModuleType | None = None
_compiled: _CompiledOps | None = None


def _arch() -> str | None:
    """The current CUDA device's compute capability as TORCH_CUDA_ARCH_LIST spells it ("9.0")."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cache_dir() -> Path | None:
    """The build folder of the kernels for this machine (None without a CUDA device)."""
    arch = _arch()
    if arch is None:
        return None
    key = hashlib.sha256()
    for path in SOURCES + _HEADERS:
        key.update(path.read_bytes())
    key.update(f"{torch.__version__}|{torch.version.cuda}|{arch}|{CUDA_FLAGS}|{HOST_FLAGS}".encode())
    root = Path(os.environ.get("PRISM_CACHE") or Path.home() / ".cache" / "prism").expanduser()
    return root / "kernels" / key.hexdigest()[:16]


def _module_name(directory: Path) -> str:
    return f"prism_kernels_{directory.name}"


def is_built() -> bool:
    """Whether the kernels for this device, sources and torch are in the cache."""
    directory = cache_dir()
    return directory is not None and any(directory.glob(f"{_module_name(directory)}*.so"))


def _buildable() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and cpp_extension.is_ninja_available()


def available() -> bool:
    """A CUDA device of compute capability 8.0 or newer (cp.async, bf16 mma) is present and the
    kernels are built or can be (nvcc and ninja found)."""
    return _supported_device() and (is_built() or _buildable())


def _supported_device() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def build(verbose: bool = False, force: bool = False) -> ModuleType:
    """Compile (or load from the cache) the kernels for the current device and return the module.

    ``force`` deletes the cached build first. A process loads one build: after ``force`` the new
    library serves the next process.
    """
    global _extension
    with _lock:
        if _extension is not None and not force:
            return _extension
        arch = _arch()
        if arch is None or not _supported_device():
            raise RuntimeError(f"prism's kernels need a CUDA device of compute capability 8.0 or newer, got {arch}")
        from torch.utils import cpp_extension

        directory = cache_dir()
        assert directory is not None
        if force:
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        try:
            _extension = cpp_extension.load(
                name=_module_name(directory),
                sources=[str(path) for path in SOURCES],
                extra_cflags=HOST_FLAGS,
                extra_cuda_cflags=CUDA_FLAGS,
                build_directory=str(directory),
                verbose=verbose,
            )
        finally:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous
        return _extension


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


# ---------------------------------------------------------------------------------------------
# Checking the kernels against the reference.


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


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
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
            errors[name] = _rel_err(out, expected[name])
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


def toolkit_info() -> dict[str, Any]:
    """The device, the CUDA toolkit and the state of the kernels, for ``prism doctor``."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home) / "bin" / "nvcc" if home else Path(shutil.which("nvcc") or "nvcc")
    nvcc_version = None
    if nvcc.exists():
        proc = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
        lines = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
        nvcc_version = next((line for line in lines if "release" in line), None)
    cuda = torch.cuda.is_available()
    directory = cache_dir()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else None,
        "capability": _arch(),
        "nvcc": str(nvcc) if nvcc.exists() else None,
        "nvcc_version": nvcc_version,
        "ninja": cpp_extension.is_ninja_available(),
        "cache_dir": str(directory) if directory is not None else None,
        "built": is_built(),
    }
