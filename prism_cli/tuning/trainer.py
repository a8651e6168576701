"""``prism tune-gate``: fine-tune only the flat router of an export, at K sub-experts per token (SPEC 3.4b).

Every parameter but the flat router's ``E * N`` rows per MoE layer is frozen (checked, and reported as
the trainable share). Each step draws a batch of windows from the training text, routes every token to
K sub-experts with the runtime's own linear gate (``set_operating_point(model, "linear:K")``, K from a
schedule in ``schedules``) and minimises the next-token cross-entropy, plus, with ``distill > 0``, that
weight times the KL divergence from the original model's next-token distribution to the tuned one.

Routing at K goes through the runtime's ``LinearGateRouter``: the stock router at its full top-(N*k),
then the first K pairs by (score, descending; sub-expert index, ascending). While an expert's N copies
are still tied (at the start) that is the deterministic order vLLM also uses; once they differ it is
the router's own top-K, the routing that is then served. Gradients reach the router through the
routing weights of the kept pairs and the softmax over all ``E * N`` logits. Experts run with a stock
transformers implementation (``grouped_mm`` or ``eager``), which supports autograd.

The original model (the teacher of the distillation term) is the same network with the untuned rows
at the full top-(N*k), which equals the source model at its top-k exactly: the untuned rows are
swapped in for one no-grad forward per step, so no second copy of the model is held.

Determinism and resume: batch ``s`` and K of step ``s`` are drawn from ``default_rng([seed, s, ...])``
and the learning rate is a function of ``s``, so a run resumed from a checkpoint repeats exactly what
an uninterrupted one does. A checkpoint (router rows, optimizer state, loss curve, time used) is
written atomically every ``checkpoint_minutes`` and when Ctrl-C stops the run (at the end of the step
under way; a second Ctrl-C stops at once and keeps the last checkpoint). The tuned export is written
only when training completes. Several devices: the loop runs under ``accelerate`` (``accelerate
launch prism tune-gate ...``): every process draws the same global batch and trains on its share.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prism_cli.data import BUILTIN_PREFIX, data_file, load_text, text_hash
from prism_cli.errors import Interrupted, PrismError
from prism_cli.export.format import EXPORT_OUTPUT
from prism_cli.export.validate import validate_export
from prism_cli.io import atomic_path, check_new_folder, check_not_input
from prism_cli.models.loading import check_context_length, load_config, load_model, weights_fingerprint
from prism_cli.runtime.elastic import attach_elastic_state, read_export_meta, set_operating_point
from prism_cli.tuning.init import INITS
from prism_cli.tuning.schedules import SCHEDULES
from prism_cli.tuning.writer import read_source_router, write_tuned_export

#: Experts implementations that support autograd (prism's own is inference-only).
TRAIN_IMPLEMENTATIONS = ("grouped_mm", "eager")
#: Built-in splits that are held out: training on them would leak into calibration or evaluation.
HELD_OUT_SPLITS = ("calibration", "eval")
#: Stream id of batch draws in ``np.random.default_rng([seed, step, stream])``.
BATCH_STREAM = 0
#: Stream id of the windows the initialisation probes, ``np.random.default_rng([seed, INIT_STREAM])``.
INIT_STREAM = 2
CHECKPOINT_VERSION = 1


#: The most steps a run takes: far past any tuning (a step is a forward and backward pass), and every
#: step count fits the checkpoint's and the curve's integers.
MAX_STEPS = 10**9


@dataclass
class TuneSettings:
    """Options of ``prism tune-gate``; ``k_start`` / ``k_end`` default to 1 and N*k. ``init``, ``init_alpha``
    and ``lr`` default to the best of ``make tune-gate`` on validation text (results/tune_gate.md): from the
    copies at lr 1e-3, every schedule ended worse than the untuned router."""

    data: str | None = None
    steps: int = 300
    lr: float = 3e-5
    warmup: int = 10
    k_start: int | None = None
    k_end: int | None = None
    batch: int = 8
    seq_len: int = 256
    schedule: str = "uniform"
    init: str = "probe"
    init_alpha: float = 0.5
    init_tokens: int = 32_768
    distill: float = 0.0
    seed: int = 0
    checkpoint_minutes: float = 5.0
    experts_impl: str = "grouped_mm"
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise PrismError(f"--steps must be between 1 and {MAX_STEPS:,}, got {self.steps}")
        if not 0 < self.lr <= 1:  # AdamW moves each router weight by about lr per step: past 1 it only diverges
            raise PrismError(f"--lr must be in (0, 1], got {self.lr}")
        if self.warmup < 0:
            raise PrismError(f"--warmup must be at least 0, got {self.warmup}")
        if self.batch < 1:
            raise PrismError(f"--batch must be at least 1, got {self.batch}")
        if self.seq_len < 2:
            raise PrismError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            raise PrismError(f"--distill must be a weight >= 0, got {self.distill}")
        if not (self.checkpoint_minutes > 0 and math.isfinite(self.checkpoint_minutes)):
            raise PrismError(f"--checkpoint-minutes must be a positive number, got {self.checkpoint_minutes}")
        if not math.isfinite(self.init_alpha):
            raise PrismError(f"--init-alpha must be a finite number, got {self.init_alpha}")
        if self.experts_impl not in TRAIN_IMPLEMENTATIONS:
            raise PrismError(f"--experts-impl must be one of {', '.join(TRAIN_IMPLEMENTATIONS)} (they support autograd), "
                             f"got {self.experts_impl!r}")
        SCHEDULES.get(self.schedule)
        INITS.get(self.init)
        if self.init == "probe" and self.init_tokens < self.seq_len:  # the only init that reads them
            raise PrismError(f"--init-tokens must be at least one window of --seq-len {self.seq_len}, got {self.init_tokens}")
        if self.data and self.data.startswith(BUILTIN_PREFIX) and self.data[len(BUILTIN_PREFIX):] in HELD_OUT_SPLITS:
            raise PrismError(f"--data {self.data} is held-out text (calibration and evaluation are never trained on); "
                             f"use {BUILTIN_PREFIX}train or your own training text")

    def k_range(self, max_k: int) -> tuple[int, int]:
        """``(k_start, k_end)``, defaults filled in, checked against ``1..max_k`` (N*k)."""
        start = 1 if self.k_start is None else self.k_start
        end = max_k if self.k_end is None else self.k_end
        for name, k in (("--k-start", start), ("--k-end", end)):
            if not 1 <= k <= max_k:
                raise PrismError(f"{name} {k} is outside 1..{max_k} (N*k sub-experts per token for this export)")
        if start > end:
            raise PrismError(f"--k-start {start} is above --k-end {end}: K rises from --k-start to --k-end")
        return start, end

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr`` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup - 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def training_record(self) -> dict[str, Any]:
        """The settings that define the training (a resumed run must repeat them); not where or how often."""
        record = asdict(self)
        for key in ("checkpoint_minutes", "device"):
            record.pop(key)
        return record


@dataclass
class StepRecord:
    """One training step, as the loss curve file stores it."""

    step: int
    k: int
    loss: float
    ce: float
    kl: float | None
    lr: float
    tokens: int
    seconds: float


@dataclass
class TuneResult:
    out: Path
    steps: int
    tokens: int
    k_range: tuple[int, int]
    schedule: str
    final_ce: float
    trainable: int
    total: int
    wall_s: float
    cpu_s: float
    resumed_at: int | None
    tied_copies: int
    curve: list[StepRecord] = field(default_factory=list)
    #: What the run could not do as asked (an --init-tokens capped by the text), one line each.
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total


def checkpoint_path(out: Path) -> Path:
    """Where an interrupted run of ``--out out`` keeps its state (next to ``out``, visible)."""
    return out.with_name(out.name + ".tune-checkpoint.pt")


class TrainBatches:
    """Windows of ``seq_len + 1`` tokens drawn at random starts of the tokenized training text."""

    def __init__(self, ids: np.ndarray, batch: int, seq_len: int, seed: int) -> None:
        self.ids, self.batch, self.seq_len, self.seed = ids, batch, seq_len, seed
        if len(ids) < batch * (seq_len + 1):
            raise PrismError(
                f"the training text gives {len(ids):,} tokens, fewer than one batch of {batch} x {seq_len + 1} "
                f"({batch * (seq_len + 1):,}); give more text, or a smaller --batch or --seq-len"
            )

    def probe_count(self, tokens: int) -> int:
        """How many windows the initialisation probes for ``tokens`` tokens: ``tokens // seq_len``, capped by
        the text (the whole windows it holds)."""
        return min(max(1, tokens // self.seq_len), len(self.ids) // self.seq_len)

    def probe_windows(self, tokens: int) -> torch.Tensor:
        """``probe_count(tokens)`` windows of ``seq_len`` tokens for the initialisation: at random starts (a
        stream of their own), or where that asks for all the text holds, the text cut into consecutive windows
        (random starts would probe the same tokens over and over, and take time for nothing)."""
        count, whole = self.probe_count(tokens), len(self.ids) // self.seq_len
        if count >= whole:
            return torch.from_numpy(self.ids[: whole * self.seq_len].reshape(whole, self.seq_len).copy())
        starts = np.random.default_rng([self.seed, INIT_STREAM]).integers(0, len(self.ids) - self.seq_len + 1, size=count)
        return torch.from_numpy(np.stack([self.ids[s : s + self.seq_len] for s in starts]))

    def at(self, step: int) -> torch.Tensor:
        """The global batch of step ``step``: ``[batch, seq_len + 1]``, the same on every process."""
        span = self.seq_len + 1
        starts = np.random.default_rng([self.seed, step, BATCH_STREAM]).integers(0, len(self.ids) - span + 1, size=self.batch)
        return torch.from_numpy(np.stack([self.ids[s : s + span] for s in starts]))


def check_export(directory: Path) -> dict[str, Any]:
    """The ``prism`` section of an export that can be tuned, or a one-line error."""
    if not directory.is_dir():
        raise PrismError(f"{directory} does not exist or is not a folder; give a prism export (from `prism export`)")
    meta = read_export_meta(directory)
    validate_export(directory, meta)  # an edited config.json: one line naming the field
    if "router_bank" in meta:
        raise PrismError(f"{directory} switches routers with K (prism select-routers); tune one of the exports it was built from")
    return meta


@dataclass
class Trainee:
    """An export loaded for router training: the runtime attached (so ``linear:K`` routes as served),
    everything frozen but the flat routers' weights ``params`` (one per MoE layer, in layer order)."""

    model: Any
    tokenizer: Any
    adapter: Any
    layers: list[Any]
    params: list[torch.nn.Parameter]
    n_sub: int
    full_k: int
    total: int  # parameters of the checkpoint (prism's copy of the source router for the gate neurons not counted)

    @classmethod
    def load(cls, export_dir: Path, experts_impl: str, dtype: str, device: str) -> Trainee:
        loaded = load_model(str(export_dir), dtype=dtype, device=device, experts_implementation=experts_impl)
        model, adapter = loaded.model, loaded.adapter
        layers = adapter.moe_layers(model)
        params = [layer.router.weight for layer in layers]
        total = sum(p.numel() for p in model.parameters())
        state = attach_elastic_state(model, export_dir)
        for router in state.flat_routers:
            # An untuned export's copies tie, and the runtime routes it by whole blocks of tied copies; the
            # first step unties them, after which linear:K must be the router's own top-K, as served. The
            # rule gives both (and needs no read-back from the device to choose).
            router.mode = "rule"
        _freeze_all_but(model, params)
        return cls(model, loaded.tokenizer, adapter, layers, params, state.n_sub, state.n_sub * state.source_top_k, total)

    def teacher_rows(self, source_rows: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Flat router weights of the original model: each source row repeated N times."""
        return [source_rows[f"layers.{layer.index}.weight"].repeat_interleave(self.n_sub, dim=0).to(p.device, p.dtype)
                for layer, p in zip(self.layers, self.params, strict=True)]


def step_loss(
    model: Any, inner: Any, window: torch.Tensor, k: int, params: list[torch.nn.Parameter],
    teacher: list[torch.Tensor] | None, distill: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, cross-entropy, KL or None)`` of one batch of windows ``[b, L + 1]`` routed at ``linear:k``.

    ``model`` is what runs forward (wrapped by accelerate or not), ``inner`` the transformers model
    under it. With ``teacher`` (the original router weights), ``loss = ce + distill * KL(original || tuned)``
    per predicted token, the original's distribution computed with those weights at the full top-(N*k).
    """
    inputs, labels = window[:, :-1], window[:, 1:]
    target = None
    if teacher is not None:
        with torch.no_grad(), _swapped(params, teacher):
            set_operating_point(inner, f"linear:{inner.prism_state.n_sub * inner.prism_state.source_top_k}")
            target = F.log_softmax(_at_least_float32(model(input_ids=inputs, use_cache=False).logits), dim=-1)
    set_operating_point(inner, f"linear:{k}")
    logits = _at_least_float32(model(input_ids=inputs, use_cache=False).logits)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    if target is None:
        return ce, ce, None
    log_p = F.log_softmax(logits, dim=-1)
    kl = F.kl_div(log_p.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    return ce + distill * kl, ce, kl


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _freeze_all_but(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Freeze every parameter of ``model`` except ``params``, and check that exactly those train."""
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    training = {id(p) for p in model.parameters() if p.requires_grad}
    if training != chosen:
        raise RuntimeError(f"only the {len(chosen)} flat router weights should train, but {len(training)} parameters do")


@contextlib.contextmanager
def _swapped(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily give ``params`` the ``values`` (in place, so optimizer and autograd references stay valid)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


class _StopFlag:
    """Ctrl-C or SIGTERM during training sets a flag (the step under way finishes, then a checkpoint is
    written); a second one raises at once, as the handlers before training do."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: Ctrl-C then raises as usual
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def tune_gate(
    export_dir: str | Path,
    out: str | Path,
    settings: TuneSettings,
    *,
    force: bool = False,
    resume: bool = False,
    on_start: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TuneResult:
    """Tune the flat router of the export ``export_dir`` and write the tuned export to ``out``.

    ``on_start(first_step, steps, tokens_per_step)`` is called once every check has passed;
    ``on_step(record)`` after every step (on the main process).
    """
    from accelerate import Accelerator

    settings.validate()
    export_dir, out = Path(export_dir), Path(out)
    meta = check_export(export_dir)
    check_context_length(load_config(str(export_dir)), settings.seq_len)
    n_sub, top_k = int(meta["sub_experts"]), int(meta["source"]["top_k"])
    k_start, k_end = settings.k_range(n_sub * top_k)
    check_not_input(out, {"export being tuned": export_dir, **data_file(settings.data)}, inside=True)  # before --force's advice
    if out.exists() and not force:
        raise PrismError(f"output {out} already exists; pass --force to replace it")
    check_new_folder(out, True, EXPORT_OUTPUT)  # an old export only; its folder can be written: before the training
    ckpt = checkpoint_path(out)
    if resume and not ckpt.exists():
        raise PrismError(f"--resume: no checkpoint at {ckpt} (a run with this --out writes one every "
                         f"{settings.checkpoint_minutes:g} min and on Ctrl-C); run without --resume to start")
    if not resume and ckpt.exists() and not force:
        raise PrismError(f"an interrupted run left {ckpt}: pass --resume to continue it, or --force to start over")
    text, data_name = load_text(settings.data, "train", forbid=HELD_OUT_SPLITS, what="train")

    accelerator = Accelerator(cpu=settings.device == "cpu")
    if settings.batch % accelerator.num_processes:
        raise PrismError(f"--batch {settings.batch} must be a multiple of the {accelerator.num_processes} processes")
    trainee = Trainee.load(export_dir, settings.experts_impl, settings.dtype, str(accelerator.device))
    adapter, layers, params = trainee.adapter, trainee.layers, trainee.params
    ids = np.asarray(trainee.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    batches = TrainBatches(ids, settings.batch, settings.seq_len, settings.seed)
    notes, probe_tokens = [], None
    if settings.warmup >= settings.steps:  # lr_at ramps over the whole run: its peak is never reached
        notes.append(f"--warmup {settings.warmup} is not below --steps {settings.steps}: the learning rate rises for the "
                     f"whole run and never reaches --lr {settings.lr:g}")
    if settings.init == "probe":
        probe_tokens = batches.probe_count(settings.init_tokens) * settings.seq_len
        if probe_tokens < settings.init_tokens // settings.seq_len * settings.seq_len:
            notes.append(f"--init-tokens {settings.init_tokens:,} is capped by the training text: the probe fits on all "
                         f"{probe_tokens:,} tokens of {data_name} (whole windows of --seq-len {settings.seq_len})")
    source_rows = read_source_router(export_dir, adapter, n_sub)
    input_hash = weights_fingerprint(export_dir, adapter)
    trainable, total = sum(p.numel() for p in params), trainee.total
    teacher = trainee.teacher_rows(source_rows) if settings.distill > 0 else None
    model = trainee.model
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)

    record = {**settings.training_record(), "data": data_name, "data_hash": text_hash(text), "k_start": k_start,
              "k_end": k_end, "input_weights_hash": input_hash}
    step, curve, wall_before, cpu_before, resumed_at = 0, [], 0.0, 0.0, None
    if resume:
        state = _load_checkpoint(ckpt, record)
        step, curve = _restore(ckpt, state, params, optimizer, settings.steps)
        wall_before, cpu_before, resumed_at = float(state["wall_s"]), float(state["cpu_s"]), step
    else:
        c_init, w_init = time.process_time(), time.perf_counter()
        rows = INITS.get(settings.init)(trainee, batches.probe_windows(settings.init_tokens), source_rows,
                                        settings.init_alpha)
        if rows is not None:
            with torch.no_grad():
                for p, row in zip(params, rows, strict=True):
                    p.copy_(row)
        # the probe's cost counts as training time
        wall_before, cpu_before = time.perf_counter() - w_init, time.process_time() - c_init
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    schedule = SCHEDULES.get(settings.schedule)(k_start, k_end, settings.steps, settings.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = settings.batch * settings.seq_len

    def save(at_step: int) -> None:
        if accelerator.is_main_process:
            _save_checkpoint(ckpt, record, at_step, params, optimizer, curve, wall_before + time.perf_counter() - t0,
                             cpu_before + time.process_time() - c0)
        accelerator.wait_for_everyone()

    if on_start is not None and accelerator.is_main_process:
        on_start(step, settings.steps, tokens_per_step)
    t0, c0 = time.perf_counter(), time.process_time()
    last_save = t0
    with _StopFlag() as stop:
        while step < settings.steps:
            k = schedule.k_at(step)
            window = batches.at(step)[rank::world].to(accelerator.device)
            loss, ce, kl = step_loss(model, inner, window, k, params, teacher, settings.distill)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            values = torch.stack([loss.detach(), ce.detach(), (kl if kl is not None else ce).detach()]).float()
            values = accelerator.reduce(values, "mean") if world > 1 else values
            if not bool(torch.isfinite(values).all()) or any(not bool(torch.isfinite(p).all()) for p in params):
                # NaN router rows route nowhere: the export written from them would serve NaN at every point.
                raise PrismError(f"training diverged at step {step + 1}: the loss is {float(values[0]):g}; nothing was "
                                 "written (lower --lr, --init-alpha or --distill)")
            step += 1
            rec = StepRecord(step, k, float(values[0]), float(values[1]), float(values[2]) if kl is not None else None,
                             lr, tokens_per_step, time.perf_counter() - t0 + wall_before)
            curve.append(rec)
            if on_step is not None and accelerator.is_main_process:
                on_step(rec)
            stopping = stop.set
            if world > 1:
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device), "sum") > 0)
            if stopping:
                save(step)
                stopped = Interrupted(f"stopped at step {step} of {settings.steps}; checkpoint saved to {ckpt}: "
                                      "run the same command with --resume to continue")
                stopped.exit_code = 128 + (stop.signum or signal.SIGINT)  # 143 after SIGTERM, as shells report
                raise stopped
            if step < settings.steps and time.perf_counter() - last_save >= settings.checkpoint_minutes * 60:
                save(step)
                last_save = time.perf_counter()
    wall, cpu = wall_before + time.perf_counter() - t0, cpu_before + time.process_time() - c0
    tuned = {layer.index: p.detach().cpu() for layer, p in zip(layers, params, strict=True)}
    result = TuneResult(out, settings.steps, settings.steps * tokens_per_step, (k_start, k_end), settings.schedule,
                        curve[-1].ce, trainable, total, wall, cpu, resumed_at, tied_copies(tuned, n_sub), curve, notes)
    if accelerator.is_main_process:
        tuning = {
            **record,
            "method": "router-only fine-tuning of the flat export (SPEC 3.4b)",
            "input": str(export_dir),
            "tokens": result.tokens,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": trainable / total,
            "final_ce": result.final_ce,
            "tied_copies": result.tied_copies,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "processes": world,
            "resumed_at_step": resumed_at,
            **({"init_tokens_used": probe_tokens} if probe_tokens is not None else {}),
        }
        write_tuned_export(export_dir, out, tuned, source_rows, tuning, [asdict(r) for r in curve], adapter, force=force)
        ckpt.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return result


def tied_copies(tuned: dict[int, torch.Tensor], n_sub: int) -> int:
    """How many (layer, expert) still have two identical router copies (never told apart by training)."""
    count = 0
    for weight in tuned.values():
        copies = weight.view(-1, n_sub, weight.shape[-1])
        for e in range(copies.shape[0]):
            rows = copies[e]
            if any(torch.equal(rows[a], rows[b]) for a in range(n_sub) for b in range(a + 1, n_sub)):
                count += 1
    return count


def _save_checkpoint(path: Path, record: dict[str, Any], step: int, params: list[torch.nn.Parameter], optimizer: Any,
                     curve: list[StepRecord], wall_s: float, cpu_s: float) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "record": record,
        "step": step,
        "routers": [p.detach().cpu().clone() for p in params],
        "optimizer": optimizer.state_dict(),
        "curve": [asdict(r) for r in curve],
        "wall_s": wall_s,
        "cpu_s": cpu_s,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _restore(path: Path, state: dict[str, Any], params: list[torch.nn.Parameter], optimizer: Any,
             steps: int) -> tuple[int, list[StepRecord]]:
    """Load a checkpoint's routers and optimizer into this run; returns its step and loss curve. A checkpoint
    that ``torch.load`` reads but whose parts do not fit this run (edited, or written by a bug) is refused as
    damaged: resumed as it is, it failed inside torch or trained past ``--steps``."""
    def damaged(what: str) -> PrismError:
        return PrismError(f"the checkpoint {path} is damaged ({what}); delete it (or pass --force without --resume) "
                          "to start over")

    step, routers = state.get("step"), state.get("routers")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise damaged(f"its step {step!r} is not one of 0..{steps}")
    if not isinstance(routers, list) or len(routers) != len(params):
        raise damaged(f"it holds {len(routers) if isinstance(routers, list) else 'no'} routers, this export {len(params)}")
    for p, saved in zip(params, routers, strict=True):
        if not isinstance(saved, torch.Tensor) or saved.shape != p.shape or not bool(torch.isfinite(saved).all()):
            raise damaged("a router is not a finite tensor of this export's shape")
    try:
        curve = [StepRecord(**r) for r in state["curve"]]
        if len(curve) != step or any(not isinstance(state[k], (int, float)) for k in ("wall_s", "cpu_s")):
            raise ValueError
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise damaged("its loss curve, times or optimizer state do not fit") from None
    with torch.no_grad():
        for p, saved in zip(params, routers, strict=True):
            p.copy_(saved)
    return step, curve


def _load_checkpoint(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "unreadable"
        # torch's own message would advise weights_only=False, which runs whatever code the file holds.
        raise PrismError(f"cannot read the checkpoint {path}: it is damaged or not a tune-gate checkpoint "
                         f"({type(exc).__name__}); delete it (or pass --force without --resume) to start over") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise PrismError(f"{path} is not a tune-gate checkpoint of this prism; delete it to start over")
    saved = state.get("record")
    if not isinstance(saved, dict):
        raise PrismError(f"{path} is not a tune-gate checkpoint of this prism; delete it to start over")
    for key, value in record.items():
        if key != "data" and saved.get(key) != value:  # the text is checked by its hash, wherever it lies now
            raise PrismError(f"the checkpoint {path} was made with {key} = {saved.get(key)!r}, this run has {value!r}: "
                             "resume with the same options, or pass --force without --resume to start over")
    return state
