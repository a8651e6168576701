"""The real engine's executor: forward passes of a transformers model over left-padded KV caches.

A batch's KV state is one transformers ``DynamicCache`` over its rows, left-padded so that every row's
next token sits at the last position, with a 2-D attention mask and per-row positions (what
``generate()`` does for a padded batch). Rows join by padding the shorter cache on the left and
concatenating along the batch; rows leave by selecting the others, after which columns that are
padding in every row are cut off. Both copy the batch's cache: that copying, sampling and scheduling
are the engine's work between forward passes, timed separately (``overhead_s``) so that a report can
say what continuous batching costs on top of the model. The cache's layers keep spare columns
(``runtime/kvcache.py``): a decode step writes its token in place instead of copying the cache.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prism_cli.allocator import configure_cpu_allocator
from prism_cli.errors import PrismError
from prism_cli.operating_points import OperatingPoint
from prism_cli.runtime.kvcache import cache_from_rows, reserved_cache
from prism_cli.runtime.per_row import clear_row_points, set_row_points
from prism_cli.serving.engine import Batch, Executor, ExecutorTimes
from prism_cli.serving.floors import PointSpace
from prism_cli.serving.requests import Request

#: Temperatures below this sample greedily, as vLLM does: dividing the logits by a tinier one
#: overflows them to infinities, whose softmax is NaN.
GREEDY_BELOW = 1e-5


@dataclass
class KVRows:
    cache: Any  # DynamicCache, batch dimension = rows
    mask: torch.Tensor  # [rows, columns] 1 = a real token
    seen: torch.Tensor  # [rows] real tokens in the cache (the position of the next one)
    last: torch.Tensor  # [rows] the token each row feeds next


@dataclass
class ServedModel:
    model: Any
    tokenizer: Any
    space: PointSpace
    name: str
    context: int


def load_served_model(directory: str, original: bool = False, dtype: str = "float32", device: str = "cpu",
                      offload: Any = None) -> ServedModel:
    """The export at ``directory`` on the elastic runtime, or (``original``) its source model at top-1..k.

    ``offload`` (a ``prism_cli.offload.OffloadConfig``, from ``--device-memory``) keeps the routed experts
    in host memory behind a device cache: sub-experts for the export, whole experts for the original."""
    from prism_cli.models.loading import load_model
    from prism_cli.runtime.elastic import attach_elastic_state, load_elastic_model, read_export_meta
    from prism_cli.runtime.experts import EXPERTS_IMPLEMENTATION

    meta = read_export_meta(directory)
    n_sub, top_k = int(meta["sub_experts"]), int(meta["source"]["top_k"])
    if original:
        loaded = load_model(meta["source"]["model"], dtype=dtype, device="cpu" if offload is not None else device,
                            experts_implementation=EXPERTS_IMPLEMENTATION)
        attach_elastic_state(loaded.model, None)
        if offload is not None:
            from prism_cli.offload.executor import attach_offload

            attach_offload(loaded.model, offload, default_device=device)
        space = PointSpace(None, n_sub, top_k)
    else:
        loaded = load_elastic_model(directory, dtype=dtype, device=device, offload=offload)
        space = PointSpace(meta["gate"], n_sub, top_k)
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 2048)
    return ServedModel(loaded.model, loaded.tokenizer, space, Path(directory).name if not original else "original", context)


class ModelExecutor(Executor):
    def __init__(self, served: ServedModel, seed: int = 0) -> None:
        self.model = served.model
        self.tokenizer = served.tokenizer
        params = inspect.signature(self.model.forward).parameters
        # transformers renamed `past_key_values` to `cache`; use whichever this version's forward takes.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.device = next(self.model.parameters()).device
        if self.device.type == "cpu":  # as `prism bench` measures the cost model (prism_cli/allocator.py)
            configure_cpu_allocator("reuse")
        self.pad = served.tokenizer.pad_token_id if served.tokenizer.pad_token_id is not None else 0
        eos = served.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self.generator = torch.Generator().manual_seed(seed)
        self.times = ExecutorTimes()
        self._t0 = time.perf_counter()
        clear_row_points(self.model)  # another executor of this model may have left per-row points set
        self._row_points = False

    def decode_text(self, ids: list[int]) -> str:  # type: ignore[override]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def reset_clock(self) -> None:
        """Time zero of the engine's clock is now (a workload's arrivals count from it)."""
        self._t0 = time.perf_counter()

    # --- points ------------------------------------------------------------------------------
    def _set_points(self, points: list[OperatingPoint], tokens_per_row: int) -> None:
        from prism_cli.runtime.elastic import set_operating_point

        if len(set(points)) == 1:
            if self._row_points:
                clear_row_points(self.model)
                self._row_points = False
            if self.model.prism_state.point != points[0]:
                set_operating_point(self.model, points[0])
        else:
            set_row_points(self.model, points, tokens_per_row)
            self._row_points = True
            self.times.per_row_steps += 1

    # --- forward passes ----------------------------------------------------------------------
    def _finished(self) -> None:
        """Wait for the device: on CUDA a forward pass returns once its kernels are queued, and its time
        would land in sampling (whose ``.cpu()`` waits), not in the step the cost model prices."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, requests: list[Request], points: list[OperatingPoint]) -> tuple[Any, list[int], float]:
        width = max(r.prompt_len for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - r.prompt_len :] = torch.tensor(r.prompt_ids)
            mask[i, width - r.prompt_len :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self._set_points(points, width)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, **self._logits_kw,
                         **{self._cache_kw: reserved_cache(self.model.config)})
        self._finished()
        ms = (time.perf_counter() - t0) * 1e3
        self.times.forward_s += ms / 1e3
        tokens = self._sample(out.logits[:, -1], requests)
        seen = torch.tensor([r.prompt_len for r in requests])
        return KVRows(out.past_key_values, mask.to(self.device), seen, torch.tensor(tokens)), tokens, ms

    @torch.inference_mode()
    def decode(self, batch: Batch, points: list[OperatingPoint]) -> tuple[list[int], float]:
        kv: KVRows = batch.kv
        mask = torch.cat([kv.mask, torch.ones((kv.mask.shape[0], 1), dtype=kv.mask.dtype, device=kv.mask.device)], dim=1)
        self._set_points(points, 1)
        t0 = time.perf_counter()
        out = self.model(input_ids=kv.last.unsqueeze(1).to(self.device), attention_mask=mask,
                         position_ids=kv.seen.unsqueeze(1).to(self.device), use_cache=True, **{self._cache_kw: kv.cache})
        self._finished()
        ms = (time.perf_counter() - t0) * 1e3
        self.times.forward_s += ms / 1e3
        kv.mask, kv.seen = mask, kv.seen + 1
        tokens = self._sample(out.logits[:, -1], batch.rows)
        kv.last = torch.tensor(tokens)
        return tokens, ms

    # --- KV rows -----------------------------------------------------------------------------
    def join(self, batch: Batch, kv: Any) -> None:
        t0 = time.perf_counter()
        if batch.kv is None:
            batch.kv = kv
        else:
            batch.kv = _concat(batch.kv, kv)
        self.times.kv_s += time.perf_counter() - t0

    def keep(self, batch: Batch, rows: list[int]) -> None:
        t0 = time.perf_counter()
        kv: KVRows = batch.kv
        index = torch.tensor(rows, device=kv.mask.device)
        mask = kv.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        width = mask.shape[1] - first
        layers = [[(k[:, :, first:].index_select(0, index), v[:, :, first:].index_select(0, index))] for k, v in _layers(kv.cache)]
        batch.kv = KVRows(cache_from_rows(layers, width), mask[:, first:], kv.seen.index_select(0, index.cpu()),
                          kv.last.index_select(0, index.cpu()))
        self.times.kv_s += time.perf_counter() - t0

    def idle(self, until: float | None, wake: threading.Event) -> None:
        timeout = 0.05 if until is None else max(0.0, min(until - self.now(), 0.05))
        wake.wait(timeout)

    # --- sampling ----------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        t0 = time.perf_counter()
        logits = logits.float().cpu()
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, r in enumerate(requests):
            p = r.params
            if p.temperature < GREEDY_BELOW:
                tokens.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p  # keep the smallest prefix reaching top_p
                drop[0] = False  # the likeliest token stays whatever top_p is (5e-324 rounds to 0 in float32)
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            if r.generator is None:
                r.generator = torch.Generator().manual_seed(p.seed) if p.seed is not None else self.generator
            tokens.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        self.times.sample_s += time.perf_counter() - t0
        return tokens


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return [(layer.keys, layer.values) for layer in cache.layers]
    except AttributeError:
        raise PrismError(f"the engine batches plain key/value caches only; this model's cache is {type(cache).__name__}") from None


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _concat(a: KVRows, b: KVRows) -> KVRows:
    width = max(a.mask.shape[1], b.mask.shape[1])
    layers = [[pair_a, pair_b] for pair_a, pair_b in zip(_layers(a.cache), _layers(b.cache), strict=True)]
    mask = torch.cat([_pad_left(a.mask, width, 1), _pad_left(b.mask, width, 1)])
    return KVRows(cache_from_rows(layers, width), mask, torch.cat([a.seen, b.seen]), torch.cat([a.last, b.last]))
