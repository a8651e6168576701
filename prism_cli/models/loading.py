"""Loading models and tokenizers by path or hub id, with one-line errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from prism_cli.errors import PrismError
from prism_cli.models.adapters import MoEAdapter, adapter_for_config
from prism_cli.models.checkpoint_files import check_checkpoint_files, checkpoint_tensors, tensors_fingerprint
from prism_cli.models.source_sized import SOURCE_SIZED, causal_lm_class

#: Name that selects the model shipped inside the package.
BUILTIN = "builtin"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Config fields that say nothing about the weights (left out of the fingerprint).
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "architectures",
    "_experts_implementation",
    "_attn_implementation",
    "use_cache",
    "output_router_logits",
    "prism",
}


def builtin_model_dir() -> Path:
    """The built-in checkpoint (a stock OLMoE model, see its README.md)."""
    return Path(__file__).resolve().parent.parent / "data" / "builtin-model"


def model_label(resolved: str) -> str:
    """How a model is recorded in output files: ``builtin`` for the shipped model, whose path differs
    between checkouts (so exports and profiles of it stay valid when the repository moves)."""
    return BUILTIN if Path(resolved) == builtin_model_dir() else resolved


def resolve_model(spec: str | None) -> str:
    """``None`` or ``"builtin"`` -> the built-in checkpoint; a path must exist; anything else is a hub id.

    An explicit empty ``spec`` (an unset shell variable, say) is refused, not read as the built-in model."""
    if spec is not None and not str(spec).strip():
        raise PrismError("the model is empty: give a checkpoint folder or hub id, or leave it out for the built-in model")
    if spec in (None, BUILTIN):
        path = builtin_model_dir()
        if not (path / "config.json").exists():
            raise PrismError(f"the built-in model is missing from {path}; reinstall prism or run `make model`")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PrismError(f"model path {spec} is a file; give the checkpoint folder")
        if not (path / "config.json").exists():
            raise PrismError(f"{spec} is not a transformers checkpoint: it has no config.json")
        if not os.access(path / "config.json", os.R_OK):
            raise PrismError(f"cannot read {path / 'config.json'}: permission denied")
        return str(path.resolve())  # recorded in profiles and exports: found again from any working folder
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1:
        raise PrismError(f"model path {spec} does not exist")
    return spec


def load_config(spec: str | None) -> Any:
    """The transformers config of a checkpoint folder or hub id."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    name = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise PrismError(_load_failure(name, exc)) from None
    except StrictDataclassError as exc:  # a field of the wrong type: the last line names it and its value
        reason = str(exc).strip().splitlines()[-1].strip().removeprefix("TypeError: ").removeprefix("ValueError: ")
        raise PrismError(f"cannot load model from {name}: config.json: {reason}") from None
    except AttributeError as exc:  # transformers reads a dtype name as ``getattr(torch, name)``
        if (bad := _bad_dtype_field(name)) is None:  # a hub config: its file is not at hand to name the field
            raise PrismError(f"cannot load model from {name}: {' '.join(str(exc).split())}") from None
        raise PrismError(f"cannot load model from {name}: config.json {bad[0]} is {bad[1]!r}, not a torch dtype "
                         f"({', '.join(DTYPES)} ...)") from None


def _bad_dtype_field(name: str) -> tuple[str, Any] | None:
    """The first ``dtype`` / ``torch_dtype`` field of a local ``config.json`` (nested configs too, as
    ``text_config.dtype``) that names no torch dtype, with its value; None where every one does."""
    try:
        stack: list[tuple[str, Any]] = [("", json.loads((Path(name) / "config.json").read_text()))]
    except (OSError, ValueError):
        return None
    while stack:
        prefix, section = stack.pop()
        for key, value in section.items() if isinstance(section, dict) else ():
            if key in ("dtype", "torch_dtype") and isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                return prefix + key, value
            stack.append((f"{prefix}{key}.", value))
    return None


#: A size-mismatch row of transformers' load report: the tensor, its checkpoint shape, the model's shape.
_MISMATCH = re.compile(r"^(\S+)\s.*size mismatch - ckpt: torch\.Size\(\[(.*?)\]\) vs model:\s*torch\.Size\(\[(.*?)\]\)")


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """The lines of the load report transformers logs as a warning (prism keeps its warnings quiet), without
    ANSI styles. A checkpoint whose shapes differ from the config raises only "look at the above report":
    the report names the tensor and both shapes."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(re.sub(r"\x1b\[[0-9;]*m", "", line).strip(" |") for line in record.getMessage().splitlines())

    logger = logging.getLogger("transformers.modeling_utils")
    handler, level, propagate = Keep(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # kept here, not printed
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _load_failure(name: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not Path(name).exists():
        return (
            f"cannot load {name!r}: it is not a local folder and the hub did not provide it "
            f"(offline, or no such model): {first}"
        )
    return f"cannot load model from {name}: {first}"


@dataclass
class LoadedModel:
    """A model with its tokenizer, its MoE adapter and where it came from."""

    model: Any
    tokenizer: Any
    adapter: MoEAdapter | None
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype prism runs, by name (``bfloat16``) or as the torch dtype itself."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise PrismError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def parse_device(name: str) -> torch.device:
    """A torch device, refusing CUDA where there is none.

    Only cpu and cuda: torch parses mps, xpu, meta and others too, but prism's kernels, timing and memory
    checks know these two, and the others failed later in torch, after the model was loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise PrismError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrismError("CUDA was asked for but this machine has no CUDA device (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise PrismError(f"device {name!r} does not exist: this machine has {count} CUDA device{'s' * (count != 1)} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def load_model(
    spec: str | None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    experts_implementation: str | None = None,
    require_moe: bool = True,
    bounded_memory: bool = False,
) -> LoadedModel:
    """Load a causal LM for inference; ``require_moe`` also checks that prism supports its MoE family.

    ``bounded_memory`` loads a safetensors checkpoint with a peak of about the model's size plus one
    layer (``_load_bounded``) instead of transformers' default, which can reach twice the model.
    """
    from transformers import AutoModelForCausalLM

    name = resolve_model(spec)
    config = load_config(name)
    adapter = adapter_for_config(config) if require_moe else _maybe_adapter(config)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    target = None if device_map else parse_device(device)
    if Path(name).is_dir():
        check_checkpoint_files(name)  # a truncated download: one line here, not a safetensors traceback
        if adapter is not None:
            adapter.check_checkpoint(name)  # config and weights that disagree: one line, before transformers' report
    try:
        with _load_report() as report:
            model = _load_bounded(name, config, kwargs) if bounded_memory and not device_map else None
            if model is None:
                if getattr(config, SOURCE_SIZED, None):  # prism's own class, not the export's modeling file
                    model = causal_lm_class(config).from_pretrained(name, config=config, **kwargs)
                else:
                    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        mismatches = sorted((m for line in report if (m := _MISMATCH.search(line))), key=lambda m: m[1])
        if mismatches:  # transformers' error only points at its report
            key, ckpt, built = mismatches[0].groups()
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise PrismError(f"cannot load model from {name}: its weights do not match config.json: {key} is [{ckpt}] "
                             f"in the weights, [{built}] as config.json builds it{more}") from None
        raise PrismError(_load_failure(name, exc)) from None
    tokenizer = load_tokenizer(name)
    if target is not None:
        model.to(target)
    model.eval()
    if adapter is not None:
        adapter.moe_layers(model)  # fails early, with the reason, on an unsupported expert layout
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name)


def check_context_length(config: Any, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's positions: past them a model runs on without a word
    and its outputs mean nothing."""
    if seq_len < 1:
        raise PrismError(f"{option} must be positive, got {seq_len}")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise PrismError(f"{option} {seq_len} is longer than the model's {limit:,} positions "
                         f"(max_position_embeddings); use {option} {limit} or less")


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a safetensors checkpoint (from its index when sharded), or [] for another format."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def _load_bounded(name: str, config: Any, kwargs: dict[str, Any]) -> Any:
    """Load through transformers from lazily read (``pread``) tensors, one conversion at a time.

    transformers' default path memory-maps the shards, and every page it reads stays mapped (and
    counted in the resident memory) while a few mapped tensors live; with the experts fused into one
    tensor per layer on load, and worker threads reading ahead, peak memory reaches about twice the
    model. Handing it tensors read with ``pread`` on demand, with its asynchronous loading off, keeps
    the peak near the model's size. Returns None where this does not apply (not safetensors, or a
    safetensors without the ``pread`` backend): the caller loads the usual way.
    """
    from safetensors import safe_open

    files = _safetensors_files(checkpoint_dir(name))
    cls = causal_lm_class(config)
    if not files or cls is None:
        return None
    try:
        handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    except TypeError:  # safetensors before the backend argument
        return None
    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        state = {key: h.get_slice(key) for h in handles for key in h.keys()}
        model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved
        for h in handles:
            h.__exit__(None, None, None)
    model.config._name_or_path = name
    return model


def _maybe_adapter(config: Any) -> MoEAdapter | None:
    try:
        return adapter_for_config(config)
    except PrismError:
        return None


def config_fingerprint(config: Any) -> str:
    """Hash of the config fields that describe the architecture (not versions or runtime choices)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(name: str) -> Path:
    """The folder holding a model's files: the path itself, or the hub snapshot (downloaded if needed)."""
    path = Path(name)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
        raise PrismError(_load_failure(name, exc)) from None


def weights_fingerprint(directory: Path, adapter: MoEAdapter) -> str:
    """Fingerprint of a checkpoint's weights as stored on disk, every router whole and every other
    tensor by a fixed sample (``prism_cli.models.checkpoint_files``): tells apart two checkpoints of one
    architecture (a fine-tune, another seed, one layer's router edited) without loading the model."""
    tensors = checkpoint_tensors(directory)
    routers = adapter.key_patterns().router
    if not any(routers.match(name) for name in tensors):
        raise PrismError(f"found no MoE router weights in {directory}")
    return tensors_fingerprint(tensors, lambda name: routers.match(name) is not None)


def weights_fingerprint_without_routers(directory: Path, adapter: MoEAdapter) -> str:
    """``weights_fingerprint`` of every tensor but the MoE routers: the same for two exports whose routers
    alone differ (router tuning), different where any other weight does (by the same samples)."""
    routers = adapter.key_patterns().router
    tensors = {name: t for name, t in checkpoint_tensors(directory).items() if not routers.match(name)}
    return tensors_fingerprint(tensors, lambda _name: False)


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a checkpoint folder or hub id, or one line saying why it has none that works."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PrismError(f"cannot load the tokenizer of {name} (are its tokenizer files missing or damaged?): "
                         f"{' '.join(str(exc).split())}") from None
    if not tokenizer("a text").input_ids:  # transformers makes an empty tokenizer where the files are missing
        raise PrismError(f"{name} has no usable tokenizer (its tokenizer files are missing or empty): "
                         "copy them from the model it came from")
    return tokenizer
