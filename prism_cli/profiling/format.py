"""The profile file (``profile.h5``): what ``prism profile`` writes and ``prism partition`` reads.

Layout (HDF5)::

    /                       attrs: format="prism-profile", format_version, prism_version, created,
                                   model, model_type, config_hash, weights_hash, data, data_hash,
                                   tokens, seq_len, seed, max_rows, holdout_fraction, row_dtype,
                                   num_experts, expert_width, hidden_size, top_k, layers (list)
    /layers/<L>/            one group per profiled MoE layer L (the decoder layer index)
        tokens_routed       [E] int64    tokens routed to each expert (all calibration tokens)
        router_weight_sum   [E] float64  sum of those tokens' routing weights
        l1_mass             [E, I] float64  sum over routed tokens of |a_j(x)|
        hot_count           [E, I] int64    tokens for which neuron j is in the top quarter of |a(x)|
        experts/<e>/fit_rows        [r, I]  activation rows a(x) (signed), uniform reservoir sample
                   /fit_token       [r]     global position of each row's token in the calibration stream
                   /fit_weight      [r]     its routing weight for expert e
                   /heldout_rows, heldout_token, heldout_weight: the same for held-out sequences

Every non-empty dataset is chunked with HDF5's Fletcher-32 checksum (profiles written since
2026-12-06): a damaged byte fails the read, reported as a corrupt profile. Older files, contiguous and
without checksums, read the same.

Rows come from two disjoint sets of calibration sequences: a seeded ``holdout_fraction`` of the
sequences feed only the held-out reservoirs, the rest only the fit reservoirs, so partitions are
validated on tokens they never saw. Co-activation counts are not stored: they are computed from the
fit rows when needed (``PartitionProblem.coactivation``), at the paper's ``k_a = 3/4 I``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_cli.errors import PrismError
from prism_cli.io import integer_attrs, open_prism_h5

FORMAT = "prism-profile"
#: 2: ``weights_hash`` fingerprints every tensor (``prism_cli.models.checkpoint_files``); 1 hashed one router.
FORMAT_VERSION = 2
#: Root attributes that readers rely on (the partition copies the model ones): a file without them is
#: refused on open, in one line, instead of failing later with a bare KeyError.
_REQUIRED_ATTRS = (
    "layers", "num_experts", "expert_width", "hidden_size", "top_k",
    "model", "model_type", "config_hash", "weights_hash", "data_hash", "tokens",
)


@dataclass
class ExpertRows:
    """One expert's recorded rows and statistics, as read back from a profile."""

    layer: int
    expert: int
    fit_rows: np.ndarray
    heldout_rows: np.ndarray
    l1_mass: np.ndarray
    hot_rate: np.ndarray
    tokens_routed: int


class ProfileFile:
    """Read access to a profile, validated on open; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._h5, self.meta = open_prism_h5(self.path, "profile", FORMAT, FORMAT_VERSION, "profile the model again (prism profile)")
        try:
            absent = [key for key in _REQUIRED_ATTRS if key not in self.meta]
            if absent:
                raise PrismError(f"{path} is incomplete: attributes {', '.join(absent)} are missing")
            integer_attrs(self.meta, ("num_experts", "expert_width", "hidden_size", "top_k"), self.path, minimum=1)
            integer_attrs(self.meta, ("layers",), self.path)
            self.layers: list[int] = self.meta["layers"]
            missing = [layer for layer in self.layers if f"layers/{layer}" not in self._h5]
            if missing:
                raise PrismError(f"{path} is incomplete: layers {missing} are listed but missing")
        except PrismError:
            self._h5.close()
            raise

    def __enter__(self) -> ProfileFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def num_experts(self) -> int:
        return self.meta["num_experts"]

    @property
    def width(self) -> int:
        return self.meta["expert_width"]

    def tokens_routed(self, layer: int) -> np.ndarray:
        return self._read(f"layers/{layer}/tokens_routed", (self.num_experts,))

    def expert(self, layer: int, expert: int) -> ExpertRows:
        """Rows and statistics of one (layer, expert)."""
        if layer not in self.layers:
            raise PrismError(f"layer {layer} is not in profile {self.path} (profiled layers: {self.layers})")
        base = f"layers/{layer}"
        routed = self._read(f"{base}/tokens_routed", (self.num_experts,))
        hot = self._read(f"{base}/hot_count", (self.num_experts, self.width))[expert]
        return ExpertRows(
            layer=layer,
            expert=expert,
            fit_rows=self._read(f"{base}/experts/{expert}/fit_rows", (None, self.width)),
            heldout_rows=self._read(f"{base}/experts/{expert}/heldout_rows", (None, self.width)),
            l1_mass=self._read(f"{base}/l1_mass", (self.num_experts, self.width))[expert],
            hot_rate=hot / max(int(routed[expert]), 1),
            tokens_routed=int(routed[expert]),
        )

    def row_counts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Fit and held-out row counts of every expert of ``layer``, each expert's rows read and checked
        (shape and finite values): a partition run refuses a damaged profile before it solves anything."""
        counts = [[self._read(f"layers/{layer}/experts/{e}/{kind}_rows", (None, self.width)).shape[0]
                   for e in range(self.num_experts)] for kind in ("fit", "heldout")]
        return np.array(counts[0]), np.array(counts[1])

    def _read(self, key: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
        """Dataset ``key``, checked against ``shape`` (None: any length on that axis) where given, and finite."""
        try:
            data = self._h5[key][()]
        except (KeyError, OSError):
            raise PrismError(f"profile {self.path} is corrupt: cannot read {key}") from None
        if shape is not None:
            if data.ndim != len(shape) or any(n is not None and d != n for d, n in zip(data.shape, shape, strict=True)):
                want = " x ".join("rows" if n is None else str(n) for n in shape)
                raise PrismError(f"profile {self.path} is corrupt: {key} has shape {data.shape}, expected {want} "
                                 f"(the file says {self.num_experts} experts of width {self.width})")
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise PrismError(f"profile {self.path} is corrupt: {key} holds NaN or infinite values")
        return data
