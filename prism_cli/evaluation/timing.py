"""Latency of one forward step: decode (one new token per sequence over a KV cache) or prefill.

Points that share a model are timed round-robin (``bench``): one step of each point per round, so
slow drifts of a shared machine (other jobs, frequency changes) spread over all points instead of
biasing whichever point ran during them.

Decode reuses one KV cache of ``seq_len`` tokens per batch size: each timed step appends a token and
``crop(-1)`` takes it off again, so every repeat sees the same context. The cache keeps spare columns
(``runtime/kvcache.py``), so a step writes its token in place, as serving engines do (prism's, vLLM's,
SGLang's), instead of copying the whole cache as transformers' default cache does every step. Prefill runs whole prompts
and, as serving engines do, computes logits for the last position only. Times are wall clock around
the forward on CPU and CUDA events on GPU, after warm-up; median and p90 over the repeats.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from prism_cli.errors import PrismError
from prism_cli.runtime.kvcache import ReservedLayer, cache_from_rows, reserved_cache


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    tokens_per_second: float
    peak_memory_mib: float
    repeats: int
    moe_ms: float | None = None  # median time inside the sparse MoE blocks (CPU only: timed by hooks)
    #: Half-width of the 95 % confidence interval of the median, relative to it (the spread reported);
    #: None where it is unknown (fewer than two samples).
    median_ci: float | None = None


def median_ci(samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    With n samples the number below the true median is binomial(n, 1/2): the interval runs from the
    sample of rank ``n/2 - z*sqrt(n)/2`` to that of rank ``1 + n/2 + z*sqrt(n)/2`` (1-based, rounded,
    clipped to the sample), the textbook normal approximation (n = 20 gives ranks 6 and 15).
    """
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        raise ValueError("no samples")
    half = z * math.sqrt(n) / 2
    lo = min(n, max(1, round(n / 2 - half)))
    hi = max(lo, min(n, round(1 + n / 2 + half)))
    return xs[lo - 1], xs[hi - 1]


def relative_ci(samples: list[float]) -> float | None:
    """Half-width of :func:`median_ci` over the median: 0.02 means the median is known within 2 %.

    None for fewer than two samples: one sample has no spread to measure (its interval is the sample
    itself, which would read as a median known exactly)."""
    if len(samples) < 2:
        return None
    lo, hi = median_ci(samples)
    median = statistics.median(samples)
    return (hi - lo) / 2 / median if median > 0 else math.inf


class BlockClock:
    """Wall time spent inside some modules during a forward (forward pre-hook to forward hook).

    Only meaningful where kernels are synchronous (CPU); on CUDA the step's events are used instead.
    """

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.elapsed = 0.0
        self._start = 0.0
        self._handles = [h for m in modules for h in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._exit))]

    def _enter(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: object) -> None:
        self.elapsed += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


#: Prompt tokens per forward while a decode bench builds its KV cache.
PROMPT_CHUNK_TOKENS = 8192


def _is_oom(exc: BaseException) -> bool:
    # torch's CPU allocator says "DefaultCPUAllocator: can't allocate memory", CUDA's "out of memory".
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in ("out of memory", "can't allocate memory"))
    )


def step_memory_floor(config: Any, batch: int, seq_len: int, element_size: int) -> int:
    """Bytes a step at ``batch`` x ``seq_len`` needs at the least: the token ids and one hidden state of
    the (prompt's) forward pass. A true lower bound for any architecture, so a batch that cannot fit is
    refused before the quality pass instead of after it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return batch * (seq_len + 1) * 8 + batch * seq_len * int(text.hidden_size) * element_size


def cache_bytes_per_sequence(model: Any, seq_len: int, vocab: int) -> int:
    """Bytes of one sequence's decode cache at ``seq_len``, measured on a batch-1 cache as the bench
    builds it: exact for any attention (grouped, latent, sliding, recurrent), no formula per family."""
    timer = StepTimer(model, 1, seq_len, "decode", vocab)
    try:
        seen: dict[int, int] = {}
        for layer in timer.cache.layers:
            for value in vars(layer).values():
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())
    finally:
        timer.close()


def available_memory(device: torch.device) -> int:
    """Bytes a step may still allocate on ``device``: free device memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


class StepTimer:
    """Times forward steps of ``model`` at a batch size, building the decode context once."""

    def __init__(
        self, model: Any, batch: int, seq_len: int, mode: str, vocab: int, seed: int = 0,
        moe_blocks: list[torch.nn.Module] | None = None,
    ) -> None:
        if mode not in ("decode", "prefill"):
            raise PrismError(f"--mode must be decode or prefill, got {mode!r}")
        self.model, self.batch, self.seq_len, self.mode = model, batch, seq_len, mode
        self.moe_blocks = moe_blocks or []
        self._clock = BlockClock(self.moe_blocks)
        self.device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen).to(self.device)
        self.cache = None
        self._pristine: Any = None
        # transformers renamed `past_key_values` to `cache`; take whichever this version's forward has.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # A serving prefill needs logits for the last position only (vLLM, SGLang and generate() do this).
        self._prefill_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        try:
            if mode == "decode":
                self._prepare_decode()
        except BaseException as exc:  # re-raised unless it is an out-of-memory error
            if _is_oom(exc):
                raise MemoryError(f"batch {batch} x seq-len {seq_len} does not fit in memory") from None
            raise

    @torch.inference_mode()
    def _step(self) -> None:
        if self.mode == "decode":
            self.model(input_ids=self.ids[:, self.seq_len :], use_cache=True, **{self._cache_kw: self.cache})
        else:
            self.model(input_ids=self.ids[:, : self.seq_len], use_cache=False, **self._prefill_kw)

    def sample(self) -> tuple[float, float | None, float]:
        """One timed step: (milliseconds, milliseconds inside the MoE blocks or None, peak memory MiB)."""
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._step()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
                memory = torch.cuda.max_memory_allocated(self.device)
            else:
                self._clock.elapsed = 0.0
                t0 = time.perf_counter()
                self._step()
                ms = (time.perf_counter() - t0) * 1e3
                memory = psutil.Process().memory_info().rss
        except BaseException as exc:  # re-raised unless it is an out-of-memory error
            if _is_oom(exc):
                raise MemoryError(f"batch {self.batch} x seq-len {self.seq_len} does not fit in memory") from None
            raise
        moe = None if cuda or not self.moe_blocks else self._clock.elapsed * 1e3
        self._rewind()
        return ms, moe, memory / 2**20

    def _prepare_decode(self) -> None:
        """The prompt's KV cache and one untimed decode step: a model transformers cannot decode over a
        cache fails here, in one line."""
        try:
            with torch.inference_mode():
                self.cache = self._prompt_cache()
            self._step()
        except Exception as exc:
            if _is_oom(exc):
                raise
            raise PrismError(f"this model cannot decode over its KV cache in transformers ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); bench it with --mode prefill") from None
        self._rewind()

    def _prompt_cache(self) -> Any:
        """The prompt's KV cache, in a cache whose layers keep spare columns (``runtime/kvcache.py``).

        Built ``PROMPT_CHUNK_TOKENS`` at a time, whole sequences apart, as serving engines prefill: one
        forward over every prompt of the batch needs activations for batch x seq-len tokens at once, far
        more than the decode step that is timed (a decode bench at batch 2000 of the built-in model was
        killed for memory while building its prompts). A cache with layers of other kinds (sliding
        windows, recurrent state) is built in one forward."""
        chunk = max(1, PROMPT_CHUNK_TOKENS // self.seq_len)
        first = self._prefill(0, min(chunk, self.batch))
        if self.batch <= chunk:
            return first
        if any(type(layer) is not ReservedLayer for layer in first.layers):
            del first
            return self._prefill(0, self.batch)
        parts = [[(layer.keys, layer.values)] for layer in first.layers]
        for start in range(chunk, self.batch, chunk):
            cache = self._prefill(start, start + chunk)
            for part, layer in zip(parts, cache.layers, strict=True):
                part.append((layer.keys, layer.values))
        return cache_from_rows(parts, self.seq_len)

    def _prefill(self, start: int, stop: int) -> Any:
        """The KV cache of the prompts of sequences ``start:stop``."""
        return self.model(input_ids=self.ids[start:stop, : self.seq_len], use_cache=True,
                          **{self._cache_kw: reserved_cache(self.model.config)}).past_key_values

    def _rewind(self) -> None:
        """Take the decoded token off the cache again (outside the timed region). A cache with recurrent
        state (linear-attention layers) cannot crop: the prompt's cache is then computed again once and
        each later step starts from a copy of it."""
        if self.mode != "decode":
            return
        if self._pristine is None:
            try:
                self.cache.crop(-1)
                return
            except Exception:  # noqa: BLE001 - each cache class refuses in its own way
                with torch.inference_mode():
                    self._pristine = self._prompt_cache()
        self.cache = copy.deepcopy(self._pristine)

    def summarize(self, samples: list[tuple[float, float | None, float]]) -> Latency:
        """Median and p90 of the samples' step times, with throughput, peak memory and MoE time."""
        times = [t for t, _, _ in samples]
        median = statistics.median(times)
        p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        tokens = self.batch * (1 if self.mode == "decode" else self.seq_len)
        moe = [m for _, m, _ in samples if m is not None]
        return Latency(median, p90, tokens / (median / 1e3), max(m for _, _, m in samples), len(samples),
                       statistics.median(moe) if moe else None, relative_ci(times))

    def measure(self, repeats: int, warmup: int) -> Latency:
        """``warmup`` untimed steps, then ``repeats`` timed ones."""
        for _ in range(warmup):
            self._step()
            self._rewind()
        return self.summarize([self.sample() for _ in range(repeats)])

    def close(self) -> None:
        self._clock.remove()


def largest_fitting_batch(model: Any, batch: int, seq_len: int, mode: str, vocab: int) -> int:
    """Halve ``batch`` until a step fits; 0 when not even one sequence does."""
    while batch > 1:
        batch //= 2
        try:
            StepTimer(model, batch, seq_len, mode, vocab).measure(repeats=1, warmup=0)
            return batch
        except MemoryError:
            continue
    return 0
