"""KV caches with spare columns, so a decode step writes in place: the serving engine's and the bench's.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``: every decode step
copies the whole cache of every layer: on the built-in model, a decode step over the cache this module
keeps took 0.71x the time of one over a concatenating cache at batch 32 and 256 columns, 0.90-0.97x at
batch 1 (``make bench-kv-cache`` -> results/kv_cache.md, same tokens). A ``ReservedLayer``
holds its keys and values as views of a buffer with ``reserve`` spare columns: a step writes its
column into the buffer and the views grow by one; only when the spare columns run out is the buffer
reallocated, ``reserve`` columns larger, so the copying is paid once every ``reserve`` steps. Rows
joining a batch are copied once into a new buffer (``from_rows``; padding, concatenation and re-wrapping
into a ``DynamicCache`` took three copies); rows leaving take two (the kept rows are gathered, then
copied into the new buffer), as before.

The views are what attention reads; the layer is otherwise a ``DynamicLayer`` (same sequence length,
mask sizes, type checks), so any model that decodes over a ``DynamicCache`` decodes over this one.
transformers' ``crop`` (the bench's rewind after each timed step) keeps them views of the buffer; its row
selection and ``reset`` replace them, and the next update then starts a new buffer from what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Spare columns per buffer: one reallocation per this many decode steps.
RESERVE = 64


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are the first columns of buffers with spare columns."""

    def __init__(self, reserve: int = RESERVE) -> None:
        super().__init__()
        self.reserve = reserve
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_rows(cls, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int, reserve: int = RESERVE) -> ReservedLayer:
        """One layer over the rows of ``parts`` (``(keys, values)``, each ``[rows, heads, columns, dim]``) in
        order, each right-aligned in ``width`` columns (left padding is zero, as a padded batch needs)."""
        layer = cls(reserve)
        keys0, values0 = parts[0]
        rows = sum(k.shape[0] for k, _ in parts)
        layer._allocate(rows, keys0, values0, width)
        buf_k, buf_v = layer._buffers
        start = 0
        for keys, values in parts:
            n, pad = keys.shape[0], width - keys.shape[-2]
            if pad:
                buf_k[start : start + n, :, :pad].zero_()
                buf_v[start : start + n, :, :pad].zero_()
            buf_k[start : start + n, :, pad:width].copy_(keys)
            buf_v[start : start + n, :, pad:width].copy_(values)
            start += n
        layer.device, layer.is_initialized = keys0.device, True
        layer._view(width)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        end = used + key_states.shape[-2]
        if not self._in_buffer(key_states.shape[0], end):
            old = (self.keys, self.values) if used else None
            self._allocate(key_states.shape[0], key_states, value_states, end)
            if old is not None:
                self._buffers[0][:, :, :used].copy_(old[0])
                self._buffers[1][:, :, :used].copy_(old[1])
        self._buffers[0][:, :, used:end].copy_(key_states)
        self._buffers[1][:, :, used:end].copy_(value_states)
        self._view(end)
        return self.keys, self.values

    def _in_buffer(self, rows: int, columns: int) -> bool:
        """Whether the keys are still the buffer's first columns (transformers' ``crop`` keeps them so; its
        row selection and ``reset`` replace them) and ``columns`` fit."""
        if self._buffers is None or self.keys is None:
            return False
        buf = self._buffers[0]
        return (buf.shape[0] == rows and columns <= buf.shape[-2] and self.keys.data_ptr() == buf.data_ptr()
                and self.keys.stride() == buf.stride())

    def _allocate(self, rows: int, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        capacity = columns + self.reserve
        self._buffers = (keys.new_empty(rows, keys.shape[1], capacity, keys.shape[3]),
                         values.new_empty(rows, values.shape[1], capacity, values.shape[3]))

    def _view(self, columns: int) -> None:
        self.keys = self._buffers[0][:, :, :columns]
        self.values = self._buffers[1][:, :, :columns]


def reserved_cache(config: Any) -> DynamicCache:
    """An empty cache for a prefill of a model of ``config``: the layers transformers would make plain
    ``DynamicLayer``s are ``ReservedLayer``s, the others (sliding windows, linear attention) stay its own."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_from_rows(parts_per_layer: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], width: int) -> DynamicCache:
    """A cache whose layer ``l`` holds the rows of ``parts_per_layer[l]`` (see ``ReservedLayer.from_rows``)."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer.from_rows(parts, width) for parts in parts_per_layer]
    return cache
