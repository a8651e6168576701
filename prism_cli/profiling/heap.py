"""Keeping a profiling process's resident memory to what it actually holds (``--max-memory``).

Two things grow it without bound otherwise. Each forward pass allocates and frees hundreds of
megabytes of temporaries of many sizes; glibc keeps what is freed in its arenas and raises its mmap
threshold as big blocks are freed (so later big blocks come from the heap too): ``release_free_heap``
(``malloc_trim(0)``, once per batch: milliseconds against a forward pass of seconds) returns those
pages. And oneDNN caches a compiled kernel per matmul shape, which profiling changes on every expert
call: ``limit_kernel_cache`` turns that cache off for the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only; musl and macOS have no such call
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the allocator's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def limit_kernel_cache() -> None:
    """Keep oneDNN from caching a CPU matmul kernel per shape for the rest of the process.

    oneDNN (torch's CPU path for bfloat16 and half matmuls) keeps up to 1,024 compiled primitives,
    one per distinct shape. Profiling runs each expert on however many tokens it was routed in the
    batch, a new shape nearly every call, so the cache only grows: about 250 MiB over a 65,536-token
    run at OLMoE-1B-7B's shapes, unaccounted by ``--max-memory``, for almost no hits. The capacity
    is read when oneDNN first runs, so this takes effect only if called before the process's first
    CPU matmul in such a dtype; a value the user has set is kept.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
