"""The host allocator under timed and served forward passes on the CPU.

glibc's malloc gives an allocation above its mmap threshold (adjusted at run time, at most 32 MiB on
64-bit Linux) fresh pages from the kernel and unmaps them again on free. A CPU forward at serving batch
sizes allocates activations that large in every layer (prefill 32 x 256 on the built-in model: a 32 MiB
gate/up product per MoE layer), so every step pays page faults and zeroing for memory the step before
just freed: slower steps, and a spread that depends on what the kernel is doing meanwhile
(`make bench-allocator` measures both settings side by side: results/allocator.md).
``reuse`` raises the mmap and trim thresholds so freed blocks stay in the heap for the next step, which
is what the jemalloc / tcmalloc preloads of PyTorch's CPU performance guide achieve; the price is that
resident memory stays at its high-water mark instead of shrinking between steps.

``prism bench`` and the serving engine apply it on the CPU (``--cpu-allocator system`` keeps glibc's
defaults); Python users call :func:`configure_cpu_allocator` themselves. It is a process-wide setting:
the elastic model and the original it is compared with run in one process, under the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Thresholds tried for ``reuse``, largest first: glibc before 2.26 refuses more than half its heap size
#: (32 MiB) for the mmap threshold.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_INT_MAX = 2**31 - 1

ALLOCATOR_MODES = ("reuse", "system")

_state = "system"


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def configure_cpu_allocator(mode: str = "reuse") -> str:
    """Set the process's allocator for CPU forwards (``reuse`` or ``system``, see the module docstring)
    and return what is in effect, as :func:`cpu_allocator` describes it. ``system`` after ``reuse``
    cannot undo it (glibc has no reset): the description then still says ``reuse``."""
    global _state
    if mode not in ALLOCATOR_MODES:
        from prism_cli.errors import PrismError

        raise PrismError(f"--cpu-allocator must be one of {', '.join(ALLOCATOR_MODES)}, got {mode!r}")
    if mode == "reuse" and not _state.startswith("reuse"):
        libc = _glibc()
        if libc is None:
            _state = "system (not glibc: left as it is)"
            return _state
        for threshold in _MMAP_THRESHOLDS:
            if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
                libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
                _state = f"reuse (glibc mmap threshold {threshold >> 20} MiB, no trimming)"
                break
    return _state


def cpu_allocator() -> str:
    """The allocator setting in effect: ``system`` (glibc's defaults) or ``reuse (...)`` with its thresholds."""
    return _state
