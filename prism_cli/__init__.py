"""prism: turn a Mixture-of-Experts language model into an elastic one (MoE-Prism, arXiv 2510.19366).

The pipeline is a chain of files: ``profile`` (calibration activations, HDF5) -> ``partition``
(neurons split into sub-experts, HDF5) -> ``export`` (a transformers checkpoint with sub-experts) ->
``bench`` (quality and latency of every operating point). Each stage is a library module that can be
used without the CLI; ``load_elastic`` and ``set_operating_point`` are the runtime entry points.
"""

from __future__ import annotations

__version__ = "0.1.0"

from prism_cli.errors import PrismError

__all__ = ["PrismError", "__version__", "load_elastic", "set_operating_point"]


def __getattr__(name: str):
    # The runtime pulls in torch and transformers; keep `import prism_cli` (and `prism --help`) fast.
    if name in ("load_elastic", "set_operating_point"):
        from prism_cli.runtime import elastic

        return getattr(elastic, name)
    raise AttributeError(name)
