"""Reading and validating corpus files: sentence splitting, TSV pairs, prose documents, per-line problems.

File formats the training code reads (`read_pairs`, `read_documents`): UTF-8 (optionally gzip) text; pairs are
``source<TAB>target`` lines with both sides non-empty; prose is one document a line, blank lines ignored. A malformed
line is a `DataError` naming the file and line, never silently dropped. Building the corpora is ``models/corpora.py``;
the `seqserve data` command is ``models/data_cli.py``.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A corpus file is malformed: `line` is 1-based, or None when the problem is the whole file."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(self.path, line, reason)  # the constructor's arguments, so it pickles

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}" if self.line is not None else f"{self.path}: {self.reason}"



# ---------------------------------------------------------------------------------------------------------------------
# Sentences

# Words whose full stop rarely ends a sentence; ordinals ("am 18. Januar") are left to split, which only makes a
# German side longer and so falls back to whole-paragraph pairs in `align_paragraphs`.
_ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr st jr sr gen col capt lt gov hon rev prof vs e.g i.e cf u.s z.b bzw usw vgl ca nr d.h".split()
)
_TERMINATOR = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+")
_OPENERS = "\"'\u201c\u201e\u2018([\u00bf\u00a1"


def split_sentences(text: str) -> list[str]:
    """Split running text after . ! ? (or …) when an upper-case word follows, except after a few abbreviations and
    single-letter initials. Whitespace is folded."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _TERMINATOR.finditer(text):
        following = text[match.end() : match.end() + 3].lstrip(_OPENERS)
        if not following or not following[0].isupper():
            continue
        word = text[max(start, match.start() - 40) : match.start() + 1].split()[-1].lower()
        stem = word.rstrip(".")
        if word.endswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    if start < len(text):
        sentences.append(text[start:].strip())
    return [s for s in sentences if s]


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validating corpus files


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """(line number, text without its newline) or (line number, DataError) for a line that is not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "no such file")
    if path.is_dir():
        raise DataError(path, None, "is a folder, not a file")
    number = 0
    try:
        with _open_binary(path) as stream:
            for number, raw in enumerate(stream, 1):
                raw = raw.rstrip(b"\r\n")
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the text
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start : exc.start + 4]
                    yield number, DataError(path, number, f"not UTF-8: byte {exc.start} starts {bad!r}")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, number + 1, f"cannot read past here: {exc}") from exc


def _parse_pair(text: str) -> tuple[str, str] | str:
    """The stripped (source, target) of a TSV line, or the reason it is malformed."""
    if not text.strip():
        return "empty line (expected source<TAB>target)"
    tabs = text.count("\t")
    if tabs != 1:
        return "no TAB between source and target" if tabs == 0 else f"{tabs} TABs (expected exactly one)"
    source, target = (side.strip() for side in text.split("\t"))
    if not source:
        return "empty source side"
    if not target:
        return "empty target side"
    return source, target


def read_pairs(
    path: str | os.PathLike, strict: bool = True, problems: list[DataError] | None = None
) -> list[tuple[str, str]]:
    """``source<TAB>target`` pairs of a TSV file (.gz allowed).

    `strict` raises `DataError` at the first malformed line; otherwise each one is logged, appended to `problems`
    when given, and skipped. A file without any pair is always an error.
    """
    pairs: list[tuple[str, str]] = []
    found: list[DataError] = []
    for number, text in _lines(Path(path)):
        parsed = _parse_pair(text) if isinstance(text, str) else text
        if isinstance(parsed, tuple):
            pairs.append(parsed)
            continue
        error = parsed if isinstance(parsed, DataError) else DataError(path, number, parsed)
        if strict:
            raise error
        logger.warning("skipping %s", error)
        found.append(error)
    if problems is not None:
        problems.extend(found)
    if found:
        logger.warning("%s: skipped %d malformed line(s), kept %d pairs", path, len(found), len(pairs))
    if not pairs:
        raise DataError(path, None, "no source<TAB>target pairs")
    return pairs


def read_documents(
    path: str | os.PathLike, strict: bool = True, problems: list[DataError] | None = None
) -> list[list[str]]:
    """Prose documents (one a line, blank lines ignored, .gz allowed), each split into sentences for NSP."""
    documents: list[list[str]] = []
    found: list[DataError] = []
    for _, text in _lines(Path(path)):
        if isinstance(text, DataError):
            if strict:
                raise text
            logger.warning("skipping %s", text)
            found.append(text)
        elif text.strip():
            documents.append(split_sentences(text))
    if problems is not None:
        problems.extend(found)
    if not documents:
        raise DataError(path, None, "no text (every line is blank)")
    return documents


def corpus_kind(path: str | os.PathLike) -> str:
    """'pairs' for .tsv / .tsv.gz files, else 'prose'."""
    name = Path(path).name.lower()
    return "pairs" if name.endswith((".tsv", ".tsv.gz")) else "prose"


@dataclass
class ValidationReport:
    path: str
    kind: str  # "pairs" | "prose"
    records: int  # pairs or documents read
    problems: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_file(path: str | os.PathLike, kind: str = "auto") -> ValidationReport:
    """Read a whole file and collect every problem instead of stopping at the first."""
    kind = corpus_kind(path) if kind == "auto" else kind
    reader = read_pairs if kind == "pairs" else read_documents
    problems: list[DataError] = []
    try:
        records = len(reader(path, strict=False, problems=problems))
    except DataError as exc:  # a whole-file problem (missing, unreadable, empty)
        return ValidationReport(str(path), kind, 0, problems + [exc])
    return ValidationReport(str(path), kind, records, problems)
