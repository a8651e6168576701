"""The built-in corpus split and ``load_text``: deterministic, disjoint, covering every book; one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import lzma

import pytest

from prism_cli import data
from prism_cli.data import (
    CHUNK_CHARS,
    SPLITS,
    TEXTS,
    chunk_text,
    corpus_text,
    load_text,
    split_of_chunk,
    split_text,
)
from prism_cli.errors import PrismError


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunks_by_split() -> dict[str, list[tuple[str, int, str]]]:
    """``split -> [(book, chunk index, chunk text)]`` straight from the chunking rule."""
    out: dict[str, list[tuple[str, int, str]]] = {s: [] for s in SPLITS}
    for book in TEXTS:
        for i, chunk in enumerate(chunk_text(corpus_text(book))):
            out[split_of_chunk(i)].append((book, i, chunk))
    return out


# --- the built-in split --------------------------------------------------------------------------


def test_split_is_deterministic() -> None:
    first = {s: digest(split_text(s)) for s in SPLITS}
    # Recompute from the compressed files, bypassing every cache.
    split_text.cache_clear()
    corpus_text.cache_clear()
    second = {s: digest(split_text(s)) for s in SPLITS}
    assert first == second


#: SHA-256 of the public-domain texts as published in the project's source corpus (``shared/corpus/*.txt``,
#: see ``corpus/PROVENANCE.md``): the packaged copies must decompress to exactly these.
PUBLISHED_SHA256 = {
    "austen": "db2cdbf60584de5e99d05bf89964819ec32e0b9968920e12c4f1217bd63cf87f",
    "kjv": "a270145c051ddc976935de6f8c7a9c8f6b7c27a6df0f036a012fe61962f639b1",
    "mobydick": "d557f8aa45aae2896e3e43796e853d2a9e5986b7ecfb9258a1415135216015f0",
}


def test_the_packaged_corpus_is_the_published_text() -> None:
    assert sorted(PUBLISHED_SHA256) == sorted(TEXTS)
    for book in TEXTS:
        assert digest(corpus_text(book)) == PUBLISHED_SHA256[book], book


def test_chunks_rebuild_each_book_and_end_at_line_breaks() -> None:
    for book in TEXTS:
        text = corpus_text(book)
        chunks = chunk_text(text)
        assert "".join(chunks) == text
        assert all(len(c) >= CHUNK_CHARS for c in chunks[:-1])
        assert all(c.endswith("\n") for c in chunks[:-1])


def test_splits_do_not_overlap_and_cover_the_corpus() -> None:
    by_split = chunks_by_split()
    # Each (book, chunk) is in exactly one split, and each split is exactly its chunks in order.
    keys = [(book, i) for s in SPLITS for book, i, _ in by_split[s]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(b, i) for b in TEXTS for i in range(len(chunk_text(corpus_text(b))))}
    for s in SPLITS:
        assert split_text(s) == "".join(c for _, _, c in by_split[s])
    # No chunk's text appears in two splits (a repeated chunk would leak training text into eval).
    contents = [{c for _, _, c in by_split[s]} for s in SPLITS]
    for a in range(len(SPLITS)):
        for b in range(a + 1, len(SPLITS)):
            assert not contents[a] & contents[b], (SPLITS[a], SPLITS[b])
    assert sum(len(split_text(s)) for s in SPLITS) == sum(len(corpus_text(b)) for b in TEXTS)


def test_split_shares_are_as_documented() -> None:
    total = sum(len(corpus_text(b)) for b in TEXTS)
    shares = {s: len(split_text(s)) / total for s in SPLITS}
    assert 0.85 < shares["train"] < 0.95
    assert 0.03 < shares["calibration"] < 0.07
    assert 0.03 < shares["eval"] < 0.07


def test_every_split_has_text_from_every_book() -> None:
    by_split = chunks_by_split()
    for s in SPLITS:
        text = split_text(s)
        books = {book for book, _, _ in by_split[s]}
        assert books == set(TEXTS), s
        for book in TEXTS:
            # The split samples the whole book: a chunk from its first and one from its last 20 chunks.
            mine = [i for b, i, _ in by_split[s] if b == book]
            n = len(chunk_text(corpus_text(book)))
            assert min(mine) < 20 and max(mine) >= n - 20, (s, book)
            sample = next(c for b, _, c in by_split[s] if b == book)
            assert sample in text


# --- load_text ------------------------------------------------------------------------------------


def test_load_text_builtin_and_file(tmp_path) -> None:
    text, name = load_text(None, "eval")
    assert name == "builtin:eval" and text == split_text("eval")
    text, name = load_text("builtin:calibration", "eval")
    assert name == "builtin:calibration" and text == split_text("calibration")
    path = tmp_path / "calib.txt"
    path.write_text("Call me Ishmael. Ünïcödé is fine.\n", encoding="utf-8")
    text, name = load_text(str(path), "calibration")
    assert text.startswith("Call me Ishmael") and name == str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty", "is empty"),
        ("blank", "is empty"),
        ("latin1", "not UTF-8"),
        ("builtin", "unknown built-in split"),
        ("capitals", "does not exist; the built-in splits are written builtin:<split>"),
        ("gzip", "is gzip-compressed; decompress it"),  # these read as "not UTF-8 text", without saying why
        ("xz", "is xz-compressed; decompress it"),
        ("device", "is a device"),  # /dev/zero was read until memory ran out
        ("nul", "holds NUL bytes: it is a binary file"),  # valid UTF-8; its perplexity was reported, exit 0
    ],
)
def test_load_text_errors(tmp_path, case: str, message: str) -> None:
    spec = {
        "missing": lambda: tmp_path / "nope.txt",
        "folder": lambda: tmp_path,
        "empty": lambda: _write(tmp_path / "empty.txt", b""),
        "blank": lambda: _write(tmp_path / "blank.txt", b"  \n\n\t\n"),
        "latin1": lambda: _write(tmp_path / "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1")),
        "builtin": lambda: "builtin:validation",
        "capitals": lambda: "BUILTIN:eval",
        "gzip": lambda: _write(tmp_path / "text.gz", gzip.compress(b"Call me Ishmael.\n")),
        "xz": lambda: _write(tmp_path / "text.xz", lzma.compress(b"Call me Ishmael.\n")),
        "device": lambda: "/dev/zero",
        "nul": lambda: _write(tmp_path / "zeros.txt", b"Call me Ishmael.\n" + bytes(4096)),
    }[case]()
    with pytest.raises(PrismError, match=message) as exc:
        load_text(str(spec), "calibration")
    assert "\n" not in str(exc.value)
    if case == "builtin":
        assert all(s in str(exc.value) for s in SPLITS)


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def test_unknown_split_in_library_call_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        data.split_text("validation")


def test_a_byte_order_mark_is_not_text(tmp_path) -> None:
    """A UTF-8 BOM reached the model as a token (perplexity 46.76 against 43.06 for the same text)."""
    path = _write(tmp_path / "bom.txt", "\ufeffCall me Ishmael.\n".encode())
    assert load_text(str(path), "calibration")[0] == "Call me Ishmael.\n"


# --- held-out text, by name or copied into a file ---------------------------------------------------


def _held_out_cases(tmp_path) -> dict[str, str]:
    evaluation, train = split_text("eval"), split_text("train")
    return {
        "a copy": _write(tmp_path / "copy.txt", evaluation.encode()),
        "a copy with CRLF line ends": _write(tmp_path / "crlf.txt", evaluation.replace("\n", "\r\n").encode()),
        "a pasted stretch": _write(tmp_path / "pasted.txt", (train[:20_000] + evaluation[40_000:60_000]).encode()),
    }


@pytest.mark.parametrize("case", ["a copy", "a copy with CRLF line ends", "a pasted stretch"])
def test_evaluation_text_in_a_file_is_refused_where_settings_are_chosen(tmp_path, case) -> None:
    """``--data builtin:eval`` was refused where a setting is chosen, but a file holding the same text was
    read, and ``profile`` took even ``builtin:eval`` without a word."""
    path = _held_out_cases(tmp_path)[case]
    with pytest.raises(PrismError, match="holds text of the built-in evaluation split") as exc:
        load_text(str(path), "calibration", forbid=("eval",), what="profile")
    assert "\n" not in str(exc.value)
    assert load_text(str(path), "eval")[0]  # where nothing is chosen on it (eval, bench), it is read


def test_text_that_was_not_copied_from_a_held_out_split_is_read(tmp_path) -> None:
    """Other text of the same books (the train split) shares no 256-character passage with the evaluation split."""
    path = _write(tmp_path / "train.txt", split_text("train")[:400_000].encode())
    assert load_text(str(path), "calibration", forbid=("eval",), what="profile")[1] == str(path)
    with pytest.raises(PrismError, match="the evaluation split only reports results: profile on builtin:calibration"):
        load_text("builtin:eval", "calibration", forbid=("eval",), what="profile")


@pytest.mark.parametrize("data", ["builtin:eval", "a copy"])
def test_profile_refuses_evaluation_text(cli, tmp_path, data) -> None:
    """The profile decides the partition, a setting: it ran on ``builtin:eval`` without a word."""
    if data == "a copy":
        data = _write(tmp_path / "copy.txt", split_text("eval").encode())
    result = cli("profile", "--data", data, "--out", tmp_path / "p.h5")
    assert result.code == 2
    result.assert_one_line_error("evaluation split")
    assert not (tmp_path / "p.h5").exists()
