"""`seqserve-client translate-file IN OUT`: a resumable batch translation of a large text file, line for line.

How OUT stays valid and resumable:
- IN is read lazily. Lines go out through TranslateStream with at most ``window`` in flight; answers come back in any
  order and wait in a reorder buffer until every line before them is answered, so OUT always holds the translations
  of a prefix of IN. The reader also stays at most ``reorder_limit`` lines ahead of OUT, bounding memory when one
  early line is slow.
- Ready lines are written whole with unbuffered writes, so a killed run leaves whole lines (at worst a partial last
  line, which the next run cuts off before appending).
- On start, OUT's complete lines are counted and that many lines of IN are skipped: rerunning the same command
  finishes the job, and the result equals an uninterrupted run (the server's answers do not depend on batch company).
- A failed line either stops the job (OUT keeps every line before it; rerun to retry from there) or becomes an empty
  line (``on_error="empty"``). A dropped stream (UNAVAILABLE) is reopened with the client's retry policy, resending
  only the lines that were sent and not answered.
- Every line is sent, blank ones too (the server translates "" to ""); line breaks inside a translation become spaces.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

import grpc
from tqdm import tqdm

from seqserve.clients.channel import Retrier
from seqserve.clients.client import Client
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import DecodingOptions, StreamResult

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "empty")


class OutputNotAPrefix(ValueError):
    """OUT holds more lines than IN, so it is not the output of this job."""

    def __init__(self, out_lines: int, in_lines: int):
        self.out_lines, self.in_lines = out_lines, in_lines
        super().__init__(f"OUT already holds {out_lines} lines but IN has only {in_lines}: not a partial run of IN")


class UnusablePath(ValueError):
    """IN or OUT cannot take part in a resumable job (the same file, or not a regular file); nothing was changed."""


@dataclass
class TranslateFileReport:
    """What one run did."""

    total_lines: int  # lines in IN
    resumed_from: int  # lines OUT already held at start
    written: int = 0  # lines written by this run
    failed_lines: list[int] = field(default_factory=list)  # 1-based numbers of lines that failed (written empty)
    stopped_by: SeqServeError | None = None  # the per-line error that stopped the job (on_error="stop")
    stopped_at_line: int | None = None  # its 1-based line number
    reconnects: int = 0  # streams reopened after UNAVAILABLE

    @property
    def done(self) -> int:
        return self.resumed_from + self.written

    @property
    def complete(self) -> bool:
        return self.done == self.total_lines


def count_lines(path: Path) -> int:
    """Lines in a file, a last line without "\\n" included."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def check_paths(source: Path, target: Path) -> None:
    """Refuse IN and OUT that a job could not use safely, before anything is read from or written to them.

    IN is read twice (counted, then translated) and OUT is counted, cut and appended to: both must be regular files,
    and distinct. A device or FIFO as OUT (/dev/stdout, /dev/full) would be read forever or read from our own pipe.
    """
    if not source.exists():
        raise UnusablePath(f"IN {source} does not exist")
    if not stat.S_ISREG(source.stat().st_mode):
        raise UnusablePath(f"IN {source} is not a regular file (it is read twice: counted, then translated)")
    if not target.exists():
        return
    if not stat.S_ISREG(target.stat().st_mode):
        raise UnusablePath(f"OUT {target} is not a regular file: translate-file appends to a file it can count")
    if os.path.samefile(source, target):
        raise UnusablePath(f"IN and OUT are the same file ({source}): OUT must be a different file")


def complete_lines(path: Path) -> int:
    """How many whole lines OUT holds, after cutting off a partial last line left by a killed run."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    count = count_lines(path)
    with open(path, "r+b") as handle:
        # Find the end of the last whole line, reading backwards from the end of the file.
        end = size
        while end > 0:
            step = min(end, 1 << 16)
            handle.seek(end - step)
            newline = handle.read(step).rfind(b"\n")
            if newline >= 0:
                end = end - step + newline + 1
                break
            end -= step
        if end < size:
            log.info("%s: cutting a partial last line of %d bytes left by an interrupted run", path, size - end)
            handle.truncate(end)
            count -= 1
    return count


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
    reorder_limit: int | None = None,
) -> TranslateFileReport:
    """Translate IN into OUT line by line, resuming after whatever OUT already holds; see the module docstring.

    ``max_lines`` stops after that many new lines (a run in chunks; the next run resumes). ``reorder_limit``
    (default max(256, 32 x window)) bounds the lines read ahead of OUT.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if max_lines is not None and max_lines < 0:
        raise ValueError(f"max_lines must be 0 or more, got {max_lines}")
    if reorder_limit is not None and reorder_limit < 1:
        raise ValueError(f"reorder_limit must be at least 1, got {reorder_limit}")
    source, target = Path(source), Path(target)
    check_paths(source, target)
    total = count_lines(source)
    # Validate OUT before changing it: a partial last line counts here, so a file that is not ours is refused
    # whole (only a run of this job leaves a partial line, and never past IN's last line).
    if target.exists() and (held := count_lines(target)) > total:
        raise OutputNotAPrefix(held, total)
    start = complete_lines(target)
    end = total if max_lines is None else min(total, start + max_lines)
    report = TranslateFileReport(total_lines=total, resumed_from=start)
    if start:
        log.info("%s holds %d of %d lines: resuming at line %d", target, start, total, start + 1)

    with open(source, encoding="utf-8", newline="\n") as handle:
        job = _Job(report, _numbered_lines(handle, start, end), start, reorder_limit or max(256, 32 * window))
        bar = tqdm(total=total, initial=start, unit="line", disable=not progress, desc="translate", leave=False)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            retrier: Retrier | None = None  # while the stream keeps failing; progress starts a fresh one
            while job.next_line < end and report.stopped_by is None:
                stream = client.translate_stream(
                    model, job.items(), options, version=version, truncate=truncate, window=window
                )
                try:
                    for result in stream:
                        job.answer(result, on_error)
                        job.write_ready(fd, bar)
                        retrier = None
                except SeqServeError as error:
                    # The call's timeout bounds the time without progress, so a restart of a few seconds is ridden out.
                    retrier = retrier or Retrier("TranslateStream", client.config.retry, client.config.timeout_s)
                    wait = retrier.wait_after(error)  # raises error when retrying is over
                    resend = len(job.sent)
                    log.warning("stream failed (%s); reopening in %.2f s, resending %d lines", error, wait, resend)
                    time.sleep(wait)
                    report.reconnects += 1
                    continue
                if job.next_line < end and report.stopped_by is None:
                    unanswered = f"{len(job.sent)} lines unanswered"
                    raise SeqServeError(grpc.StatusCode.INTERNAL, f"the server ended the stream with {unanswered}")
        finally:
            job.stopping = True
            os.close(fd)
            bar.close()
    return report


def _numbered_lines(handle: TextIO, start: int, end: int) -> Iterator[tuple[int, str]]:
    """(0-based index, line without its "\\n" or "\\r\\n") for lines start..end-1."""
    lines = (line.rstrip("\n").rstrip("\r") for line in handle)
    return itertools.islice(enumerate(lines), start, end)


class _Job:
    """The state one translate-file run shares between grpc's request thread (items) and the answer loop."""

    def __init__(self, report: TranslateFileReport, lines: Iterator[tuple[int, str]], start: int, reorder_limit: int):
        self.report = report
        self.lines = lines
        self.next_line = start  # 0-based index of the next line OUT needs
        self.results: dict[int, str] = {}  # answered lines waiting for the ones before them
        self.sent: dict[int, str] = {}  # sent and not yet answered: resent when a stream is reopened
        self.reorder_limit = reorder_limit
        self.stopping = False  # a line failed with on_error="stop", or the run is over: read no further
        self._lock = threading.Condition()
        self._stream = 0  # which stream's items() may read IN

    def items(self) -> Iterator[tuple[str, str]]:
        """(id, text) for one stream: the lines a dropped stream left unanswered, then new lines from IN."""
        with self._lock:
            self._stream += 1
            stream, resend = self._stream, sorted(self.sent.items())
        yield from ((str(index), text) for index, text in resend)
        while True:
            with self._lock:
                # Stay within reorder_limit lines of OUT; a newer stream takes over reading from IN.
                while self._ahead() and not self.stopping and stream == self._stream:
                    self._lock.wait(0.1)
                if self.stopping or stream != self._stream:
                    return
                item = next(self.lines, None)
                if item is None:
                    return
                self.sent[item[0]] = item[1]
            yield str(item[0]), item[1]

    def answer(self, result: StreamResult, on_error: str) -> None:
        index = int(result.id)
        with self._lock:
            self.sent.pop(index, None)
        if result.error is None:
            self.results[index] = _one_line(result.translation.text)
            return
        log.warning("line %d: %s", index + 1, result.error)
        if on_error == "empty":
            self.report.failed_lines.append(index + 1)
            self.results[index] = ""
        elif self.report.stopped_at_line is None or index + 1 < self.report.stopped_at_line:
            self.report.stopped_by, self.report.stopped_at_line = result.error, index + 1
            with self._lock:
                self.stopping = True  # send nothing more; what is in flight still comes back and is written
                self._lock.notify_all()

    def write_ready(self, fd: int, bar: tqdm) -> None:
        """Write the answered lines that continue OUT's prefix (whole lines, unbuffered)."""
        ready: list[str] = []
        while self.next_line in self.results:
            ready.append(self.results.pop(self.next_line))
            self.next_line += 1
        if not ready:
            return
        view = memoryview("".join(text + "\n" for text in ready).encode("utf-8"))
        while view:
            view = view[os.write(fd, view) :]
        self.report.written += len(ready)
        bar.update(len(ready))
        with self._lock:
            self._lock.notify_all()

    def _ahead(self) -> bool:
        return len(self.sent) + len(self.results) >= self.reorder_limit


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
