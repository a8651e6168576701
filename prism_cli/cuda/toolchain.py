"""Building prism's CUDA kernels: ``torch.utils.cpp_extension`` for the device's own architecture, on
first use, into a cache folder keyed by the sources, torch and the architecture
(``$PRISM_CACHE/kernels/<key>``, by default ``~/.cache/prism/kernels/<key>``); and what ``prism doctor``
reports about the toolkit."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
SOURCES: list[Path] = [_HERE / "kernels.cu", _HERE / "binding.cpp"]
_HEADERS: list[Path] = [_HERE / "kernels.cuh"]
CUDA_FLAGS: list[str] = ["-O3", "--use_fast_math", "-std=c++17"]
HOST_FLAGS: list[str] = ["-O3", "-std=c++17"]

_lock = threading.Lock()
_extension: ModuleType | None = None


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


def available_toolchain() -> bool:
    """nvcc (CUDA_HOME) and ninja are found: the kernels can be built here."""
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and cpp_extension.is_ninja_available()


def supported_device() -> bool:
    """A CUDA device of compute capability 8.0 or newer (cp.async, bf16 mma)."""
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
        if arch is None or not supported_device():
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
