"""The CPU allocator setting (prism_cli/allocator.py): freed activations are reused, not faulted in again.

The oracle is the kernel's own count of minor page faults (``getrusage``), in a fresh interpreter per
setting, so the process-wide ``mallopt`` of one case cannot leak into the other or into this one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism_cli.allocator import _glibc, configure_cpu_allocator
from prism_cli.errors import PrismError

_PROBE = """
import json, resource, sys, torch
from prism_cli.allocator import configure_cpu_allocator
described = configure_cpu_allocator(sys.argv[1])
torch.manual_seed(0)
x, w1, w2 = torch.randn(4096, 256), torch.randn(256, 2048), torch.randn(1024, 256)
def step():  # four layers of a prefill: a 32 MiB gate/up product, its 16 MiB activation, the down product
    for _ in range(4):
        h = x @ w1
        y = (torch.nn.functional.silu(h[:, :1024]) * h[:, 1024:]) @ w2
    return y
for _ in range(2):  # the first steps fault their memory in under either setting
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "described": described}))
"""


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the reuse setting is glibc's mallopt")
def test_reuse_keeps_freed_activations_in_the_heap() -> None:
    system, reuse = _faults("system"), _faults("reuse")
    assert system["described"] == "system"
    assert reuse["described"].startswith("reuse (glibc mmap threshold")
    # glibc's default maps each 32 MiB product afresh: at least one fault per 2 MiB huge page, 40 times over.
    assert system["faults"] >= 40 * 16
    # Kept in the heap, the same steps fault a small fraction of that. Now and then the heap takes a fresh
    # 32 MiB region once (8,192 faults; up to three seen in five steps), a fixed cost that ten steps make
    # small against the system setting's faults on every product (about 20,000 per step on an Intel Xeon).
    assert reuse["faults"] * 5 < system["faults"]


def test_unknown_mode_is_one_line() -> None:
    with pytest.raises(PrismError, match="--cpu-allocator must be one of reuse, system"):
        configure_cpu_allocator("jemalloc")
