"""Where a number was measured: versions, processor, threads and the command, for every results file.

Kept apart from the stages (and free of torch/transformers imports: versions come from package
metadata) so that a pure-numpy benchmark can record its environment without loading the runtime.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from prism_cli import __version__
from prism_cli.allocator import cpu_allocator


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall through to platform's answer
        pass
    return platform.processor() or "unknown"


def environment(device: Any = None) -> dict[str, Any]:
    """Versions, machine and command line; the GPU's name when ``device`` is a CUDA device."""
    env: dict[str, Any] = {
        "prism": __version__,
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "torch_threads": _torch_threads(),
        "cpu_allocator": cpu_allocator(),
        "executor_bounds": _executor_bounds(),
        "source": source_revision(),
        "command": " ".join(["prism", *sys.argv[1:]]),
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def source_revision(root: Path | None = None) -> str | None:
    """The git commit of the prism checkout that ran (``+dirty`` with uncommitted changes to tracked files),
    so that a regenerated table names the code that produced it; None for an installed package."""
    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or not a readable repository
        return None
    return commit + ("+dirty" if changed else "") if commit else None


def _executor_bounds() -> str:
    from prism_cli.runtime.bounds import describe_machine_bounds  # torch-free; the runtime's choice of executors

    return describe_machine_bounds()


def _torch_threads() -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def machine_label(env: dict[str, Any]) -> str:
    """Short description of where latencies were measured, for column labels."""
    return env.get("gpu") or f"{env['processor']}, {env['torch_threads']} threads"


def this_cpu_label() -> str:
    """``machine_label`` of this machine's CPU, as a CPU bench run here records it."""
    return machine_label({"processor": cpu_name(), "torch_threads": _torch_threads()})
