"""`seqserve-client translate-file IN OUT`: a resumable batch translation of a text file, one line per line.

How it keeps OUT valid and resumable:
- Lines go out through TranslateStream with at most ``window`` in flight; answers come back in any order and are
  buffered until every line before them is done, so OUT is always the translations of a prefix of IN.
- Whole lines are written with one unbuffered write each batch, so a killed run leaves whole lines (and at worst
  one partial last line, which the next run cuts off before appending).
- On start, OUT's complete lines are counted and that many lines of IN are skipped: rerunning the same command
  finishes the job, and the result equals an uninterrupted run.
- Blank input lines give blank output lines without a call; a translation's own line breaks become spaces.
- A failed line either stops the job (OUT keeps everything before it; rerun to retry from there) or becomes an
  empty line (``on_error="empty"``). A dropped stream (UNAVAILABLE) is reopened with the client's retry policy,
  resending only the lines not yet answered.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from tqdm import tqdm

from seqserve.clients.client import Client
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import DecodingOptions

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "empty")


class OutputNotAPrefix(ValueError):
    """OUT holds more lines than IN, so it is not the output of this job."""

    def __init__(self, out_lines: int, in_lines: int):
        self.out_lines, self.in_lines = out_lines, in_lines
        super().__init__(f"OUT already holds {out_lines} lines but IN has only {in_lines}: not a partial run of IN")


@dataclass
class TranslateFileReport:
    """What one run did."""

    total_lines: int  # lines in IN
    resumed_from: int  # lines OUT already held at start
    written: int = 0  # lines written by this run
    failed_lines: list[int] = field(default_factory=list)  # 1-based numbers of lines that failed (written empty)
    stopped_by: SeqServeError | None = None  # the per-line error that stopped the job (on_error="stop")
    stopped_at_line: int | None = None  # its 1-based line number

    @property
    def done(self) -> int:
        return self.resumed_from + self.written

    @property
    def complete(self) -> bool:
        return self.done == self.total_lines


def read_lines(path: Path) -> list[str]:
    """IN's lines without their line ends ("\\n" or "\\r\\n"); a last line without "\\n" still counts."""
    with open(path, encoding="utf-8", newline="\n") as handle:
        return [line.rstrip("\n").rstrip("\r") for line in handle]


def complete_lines(path: Path) -> int:
    """How many whole lines OUT holds, after cutting off a partial last line left by a killed run."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no whole line
    if end < len(data):
        log.info("%s: cutting a partial last line of %d bytes left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data.count(b"\n", 0, end)


def translate_file(
    client: Client,
    model: str,
    source: Path,
    target: Path,
    options: DecodingOptions = DecodingOptions(),
    *,
    version: int = 0,
    truncate: bool = False,
    window: int = 16,
    on_error: str = "stop",
    max_lines: int | None = None,
    progress: bool = True,
) -> TranslateFileReport:
    """Translate IN into OUT line by line, resuming after whatever OUT already holds; see the module docstring.

    ``max_lines`` stops after that many new lines (a run in chunks; the next run resumes).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    lines = read_lines(Path(source))
    start = complete_lines(Path(target))
    if start > len(lines):
        raise OutputNotAPrefix(start, len(lines))
    end = len(lines) if max_lines is None else min(len(lines), start + max_lines)
    report = TranslateFileReport(total_lines=len(lines), resumed_from=start)
    if start:
        log.info("%s holds %d of %d lines: resuming at line %d", target, start, len(lines), start + 1)

    results: dict[int, str] = {}  # answered lines waiting for the ones before them
    next_line = start  # 0-based index of the next line to write
    bar = tqdm(total=len(lines), initial=start, unit="line", disable=not progress, desc="translate", leave=False)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    attempt = 1
    try:
        while next_line < end and report.stopped_by is None:
            unanswered = (i for i in range(next_line, end) if i not in results)
            answers = _answers(client, model, lines, unanswered, options, version, truncate, window, report, on_error)
            try:
                for index, text in answers:
                    results[index] = text
                    next_line = _write_ready(fd, results, next_line, report, bar)
                    attempt = 1  # progress resets the retry budget
                break
            except SeqServeError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= client.config.retry.attempts:
                    raise
                wait = client.config.retry.backoff(attempt)
                log.warning("stream failed (%s); reopening in %.2f s, resending unanswered lines", error, wait)
                time.sleep(wait)
                attempt += 1
    finally:
        os.close(fd)
        bar.close()
    return report


def _answers(
    client: Client,
    model: str,
    lines: list[str],
    indices: Iterator[int],
    options: DecodingOptions,
    version: int,
    truncate: bool,
    window: int,
    report: TranslateFileReport,
    on_error: str,
) -> Iterator[tuple[int, str]]:
    """(line index, output text) as lines are answered; blank lines answer themselves without a call."""
    blank: list[int] = []

    def items() -> Iterator[tuple[str, str]]:
        for index in indices:
            if report.stopped_by is not None:
                return  # stop sending; what is in flight still comes back
            if lines[index].strip():
                yield str(index), lines[index]
            else:
                blank.append(index)

    for result in client.translate_stream(model, items(), options, version=version, truncate=truncate, window=window):
        while blank:
            yield blank.pop(), ""
        index = int(result.id)
        if result.error is None:
            yield index, _one_line(result.translation.text)
            continue
        log.warning("line %d: %s", index + 1, result.error)
        if on_error == "empty":
            report.failed_lines.append(index + 1)
            yield index, ""
        elif report.stopped_by is None or index + 1 < report.stopped_at_line:
            report.stopped_by, report.stopped_at_line = result.error, index + 1
    while blank:
        yield blank.pop(), ""


def _write_ready(fd: int, results: dict[int, str], next_line: int, report: TranslateFileReport, bar: tqdm) -> int:
    """Write the answered lines that continue OUT's prefix, in one write; the new index of the next line."""
    ready: list[str] = []
    while next_line in results:
        ready.append(results.pop(next_line))
        next_line += 1
    if ready:
        data = "".join(text + "\n" for text in ready).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        report.written += len(ready)
        bar.update(len(ready))
    return next_line


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
