"""Memory-constrained inference: routed experts in host memory, a cache of sub-experts on the device (SPEC 4.3).

``OffloadConfig`` (``config.py``) says how much device memory there is and which cache policy runs;
``attach_offload(model, config)`` (``executor.py``) offloads a loaded model's experts, and
``prism_cli.load_elastic(DIR, offload=OffloadConfig(...))`` loads an export that way. The cache and its
policies are in ``cache.py``, the transfer model (CUDA copies, or a simulated link) in ``link.py``;
``trace.py`` and ``replay.py`` study real model shapes from routing traces; ``bench.py`` is
``prism offload-bench``.
"""

from __future__ import annotations

from prism_cli.offload.config import Budget, LinkSpec, OffloadConfig, offload_config, parse_budget

__all__ = ["Budget", "LinkSpec", "OffloadConfig", "attach_offload", "detach_offload", "offload_config", "parse_budget"]


def __getattr__(name: str):
    # The executor imports torch and the runtime; keep `import prism_cli.offload` light for the CLI.
    if name in ("attach_offload", "detach_offload"):
        from prism_cli.offload import executor

        return getattr(executor, name)
    raise AttributeError(name)
