"""Synthetic activation magnitudes for testing and benchmarking solvers without a model.

Both generators return ``|a|`` (non-negative float32 ``[n_rows, width]``), ready for ``group_loads``.
``planted_rows`` has a known best partition; ``realistic_rows`` imitates SwiGLU statistics (most
neurons near idle for a token, a few large, neurons correlated through a few shared directions), so
partitioning pays off but no exact answer exists.
"""

from __future__ import annotations

import numpy as np

from prism_cli.solvers.heuristics import equal_labels


def planted_rows(
    n_rows: int, width: int, n_groups: int, rng: np.random.Generator, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a planted block structure, and the planted labels ``[width]``.

    Neurons are split into ``n_groups`` equal groups at random; each token picks one group, whose
    neurons get log-normal magnitudes (median 1, heavy right tail) while every other neuron gets
    ``noise * |N(0, 1)|``. For small ``noise`` the planted split puts nearly all of every token's
    mass in one group, so it is the optimum of the paper cost for any ``keep``.
    """
    labels = rng.permutation(equal_labels(width, n_groups))
    active = rng.integers(n_groups, size=n_rows)
    big = rng.lognormal(0.0, 0.5, size=(n_rows, width))
    small = noise * np.abs(rng.standard_normal((n_rows, width)))
    rows = np.where(labels[None, :] == active[:, None], big, small)
    return rows.astype(np.float32), labels


def realistic_rows(n_rows: int, width: int, rng: np.random.Generator, rank: int = 8) -> np.ndarray:
    """SwiGLU-like magnitudes ``|silu(g) * u|`` driven by ``rank`` shared token directions.

    Gate pre-activations ``g = 3 z . w_j + bias_j`` use a latent ``z`` per token (``rank`` dims) and
    negative biases, so most neurons sit in silu's near-zero tail for most tokens and fire when the
    token points their way; neurons whose ``w_j`` are aligned fire together, which is the structure
    a partition can exploit. Per-token and per-neuron log-normal scales add the heavy tails. The
    constants were picked so that, at N = 4 and keep = 1, random / rate-chunk / anneal costs fall
    roughly where SPEC 7 measured them on a trained model (about 0.7 / 0.57 / 0.49 here).
    """
    latent = rng.standard_normal((n_rows, rank)).astype(np.float32)
    gate_dirs = rng.standard_normal((rank, width)).astype(np.float32) / np.sqrt(rank)
    up_dirs = rng.standard_normal((rank, width)).astype(np.float32) / np.sqrt(rank)
    bias = rng.normal(-2.5, 0.5, size=width).astype(np.float32)
    gate = 3.0 * (latent @ gate_dirs) + bias
    up = latent @ up_dirs + 0.5 * rng.standard_normal((n_rows, width), dtype=np.float32)
    act = gate / (1.0 + np.exp(-gate)) * up
    token_scale = rng.lognormal(0.0, 0.3, size=(n_rows, 1))
    neuron_scale = rng.lognormal(0.0, 0.3, size=width)
    return np.abs(act * token_scale * neuron_scale).astype(np.float32)
