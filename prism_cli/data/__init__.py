"""The built-in corpus and its deterministic train / calibration / evaluation split.

The corpus is three public-domain English texts (see ``corpus/PROVENANCE.md``) stored xz-compressed
inside the package. Each text is cut into consecutive chunks of about ``CHUNK_CHARS`` characters,
always at a line break; chunk ``i`` of a text goes to

* ``eval``        when ``i % 20 == 10``  (5 %, held out: every quality number uses it),
* ``calibration`` when ``i % 20 == 5``   (5 %, profiling only),
* ``train``       otherwise              (90 %, the built-in model's training text).

The three splits never share a chunk, and every split samples the whole length of every book, so the
held-out text has the same mix of styles as the training text without overlapping it.
"""

from __future__ import annotations

import hashlib
import lzma
from functools import cache
from importlib import resources
from pathlib import Path

from prism_cli.errors import PrismError

SPLITS: tuple[str, ...] = ("train", "calibration", "eval")
TEXTS: tuple[str, ...] = ("austen", "kjv", "mobydick")
CHUNK_CHARS = 16_384
_PERIOD = 20
_SPLIT_OF_RESIDUE = {10: "eval", 5: "calibration"}


def corpus_dir() -> Path:
    """Folder of the compressed corpus files shipped with the package."""
    return Path(str(resources.files("prism_cli.data") / "corpus"))


@cache
def corpus_text(name: str) -> str:
    """One whole corpus text, decompressed."""
    if name not in TEXTS:
        raise KeyError(f"unknown corpus text {name!r}; known: {', '.join(TEXTS)}")
    with lzma.open(corpus_dir() / f"{name}.txt.xz", "rt", encoding="utf-8") as fh:
        return fh.read()


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into consecutive chunks of at least ``chunk_chars`` characters, ending at a newline.

    Concatenating the chunks gives back ``text`` exactly.
    """
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def split_of_chunk(index: int) -> str:
    """The split that chunk ``index`` of a text belongs to."""
    return _SPLIT_OF_RESIDUE.get(index % _PERIOD, "train")


@cache
def split_text(split: str) -> str:
    """All chunks of one split, texts in a fixed order, chunks in book order."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    parts = [
        chunk
        for name in TEXTS
        for i, chunk in enumerate(chunk_text(corpus_text(name)))
        if split_of_chunk(i) == split
    ]
    return "".join(parts)


def text_hash(text: str) -> str:
    """Short content hash recorded in output metadata, so later steps can tell which data was used."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


BUILTIN_PREFIX = "builtin:"


def load_text(data: str | None, default_split: str) -> tuple[str, str]:
    """Text for ``--data``: a file path, or ``builtin:<split>``; None means the built-in ``default_split``.

    Returns ``(text, name)`` where ``name`` is what output metadata records. An explicit empty ``data``
    (``--data ''``: an unset shell variable, say) is refused, not read as "the default".
    """
    if data is not None and not str(data).strip():
        raise PrismError(f"--data is empty: give a text file or builtin:<split>, or leave --data out for "
                         f"{BUILTIN_PREFIX}{default_split}")
    spec = f"{BUILTIN_PREFIX}{default_split}" if data is None else data
    if spec.startswith(BUILTIN_PREFIX):
        split = spec[len(BUILTIN_PREFIX) :]
        if split not in SPLITS:
            raise PrismError(f"unknown built-in split {split!r}; choose one of {', '.join(SPLITS)}")
        return split_text(split), spec
    path = Path(spec)
    if not path.exists():
        raise PrismError(f"data file {spec} does not exist")
    if path.is_dir():
        raise PrismError(f"data path {spec} is a folder; give a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrismError(f"data file {spec} is not UTF-8 text") from None
    except OSError as exc:
        raise PrismError(f"cannot read data file {spec}: {exc.strerror}") from None
    if not text.strip():
        raise PrismError(f"data file {spec} is empty")
    return text, str(path)


def data_file(data: str | None) -> dict[str, Path]:
    """``{"data file": path}`` where ``--data`` names an existing file (for ``check_not_input``), else ``{}``."""
    return {"data file": Path(data)} if data and not data.startswith(BUILTIN_PREFIX) and Path(data).is_file() else {}


def load_selection_text(data: str | None, what: str) -> tuple[str, str]:
    """``load_text`` for text a setting is chosen on (``what``, e.g. ``"choose routers"``): the built-in
    calibration split by default, and never the evaluation split, which only reports results."""
    if data is not None and data.strip() == f"{BUILTIN_PREFIX}eval":
        raise PrismError(f"the evaluation split only reports results: {what} on {BUILTIN_PREFIX}calibration "
                         "(the default) or a text file of your own")
    return load_text(data, "calibration")
