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


#: First bytes of compressed files, which read as "not UTF-8 text" without saying why.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"(\xb5/\xfd": "zstd", b"BZh": "bzip2", b"PK\x03\x04": "zip"}
#: Why a built-in split may not be what ``forbid`` keeps out of a run.
_HELD_OUT = {"eval": ("evaluation", "only reports results"), "calibration": ("calibration", "is held out from training")}


def load_text(data: str | None, default_split: str, forbid: tuple[str, ...] = (), what: str = "") -> tuple[str, str]:
    """Text for ``--data``: a file path, or ``builtin:<split>``; None means the built-in ``default_split``.

    Returns ``(text, name)`` where ``name`` is what output metadata records. An explicit empty ``data``
    (``--data ''``: an unset shell variable, say) is refused, not read as "the default". ``forbid``: built-in
    splits this run (``what``, e.g. ``"profile"``) may not read, by name or as a copy of their text in a file.
    """
    if data is not None and not str(data).strip():
        raise PrismError(f"--data is empty: give a text file or builtin:<split>, or leave --data out for "
                         f"{BUILTIN_PREFIX}{default_split}")
    spec = f"{BUILTIN_PREFIX}{default_split}" if data is None else data
    if spec.startswith(BUILTIN_PREFIX):
        split = spec[len(BUILTIN_PREFIX) :]
        if split not in SPLITS:
            raise PrismError(f"unknown built-in split {split!r}; choose one of {', '.join(SPLITS)}")
        if split in forbid:
            name, reason = _HELD_OUT[split]
            raise PrismError(f"the {name} split {reason}: {what} on {BUILTIN_PREFIX}{default_split} (the default) or a "
                             "text file of your own")
        return split_text(split), spec
    text = _read_text_file(spec)
    for split in forbid:
        passage = shared_passage(text, split_text(split))
        if passage is not None:
            name, reason = _HELD_OUT[split]
            raise PrismError(f"data file {spec} holds text of the built-in {name} split ({passage!r}...), which "
                             f"{reason}: {what} on other text")
    return text, str(Path(spec))


def _read_text_file(spec: str) -> str:
    path = Path(spec)
    if not path.exists():
        hint = f"; the built-in splits are written {BUILTIN_PREFIX}<split>" if spec.lower().startswith(BUILTIN_PREFIX) else ""
        raise PrismError(f"data file {spec} does not exist{hint}")
    if path.is_dir():
        raise PrismError(f"data path {spec} is a folder; give a text file")
    if path.is_char_device() or path.is_block_device():  # /dev/zero would be read until memory ran out
        raise PrismError(f"data path {spec} is a device; give a text file")
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
        kind = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
        if kind is not None:
            raise PrismError(f"data file {spec} is {kind}-compressed; decompress it (prism reads plain UTF-8 text)")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text the model should read
    except UnicodeDecodeError:
        raise PrismError(f"data file {spec} is not UTF-8 text") from None
    except OSError as exc:
        raise PrismError(f"cannot read data file {spec}: {exc.strerror}") from None
    if not text.strip():
        raise PrismError(f"data file {spec} is empty")
    if "\x00" in text:  # valid UTF-8, but a binary file: its "perplexity" would be a number about nothing
        raise PrismError(f"data file {spec} holds NUL bytes: it is a binary file, not text")
    return text


#: ``shared_passage`` compares passages of this many characters, at most this many of them per text.
PASSAGE_CHARS, PASSAGES = 256, 32


def shared_passage(text: str, held_out: str) -> str | None:
    """The start of a passage of ``text`` found verbatim in ``held_out`` (line endings aside), else None.

    Passages of ``PASSAGE_CHARS`` characters are taken at evenly spaced places over the whole text: a copy
    of a held-out split, or a file that pastes a stretch of one into other text, shares them, while text
    that was not copied from it shares no 256-character passage by chance.
    """
    text = text.replace("\r\n", "\n")
    held_out = held_out.replace("\r\n", "\n")
    if len(text) < PASSAGE_CHARS:
        return text.strip()[:40] if len(text.strip()) >= 64 and text.strip() in held_out else None
    last = len(text) - PASSAGE_CHARS
    for start in sorted({last * i // max(1, PASSAGES - 1) for i in range(PASSAGES)}):
        passage = text[start : start + PASSAGE_CHARS]
        if passage in held_out:
            return " ".join(passage.split())[:40]
    return None


def data_file(data: str | None) -> dict[str, Path]:
    """``{"data file": path}`` where ``--data`` names an existing file (for ``check_not_input``), else ``{}``."""
    return {"data file": Path(data)} if data and not data.startswith(BUILTIN_PREFIX) and Path(data).is_file() else {}


def load_selection_text(data: str | None, what: str) -> tuple[str, str]:
    """``load_text`` for text a setting is chosen on (``what``, e.g. ``"choose routers"``): the built-in
    calibration split by default, and never the evaluation split, which only reports results."""
    return load_text(data, "calibration", forbid=("eval",), what=what)
