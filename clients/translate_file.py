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
- Before OUT is touched, IN and OUT are checked (distinct regular files, OUT no longer than IN) and so is the model
  (it exists and translates), so a mistake in the command changes nothing.
- A line the server refuses (INVALID_ARGUMENT: too long, bad characters) either stops the job (OUT keeps every line
  before it; rerun to retry from there) or becomes an empty line (``on_error="empty"``). Transient item errors
  (UNAVAILABLE, RESOURCE_EXHAUSTED) are never written as empty lines: the line is resent with the retry policy. Any
  other item error, and a stream that cannot be reopened, stops the job resumably (``report.stopped_by``).
- A dropped stream (UNAVAILABLE) is reopened with the client's retry policy, resending only the lines that were sent
  and not answered. The client's timeout bounds the time spent retrying without progress.
- IN is read as bytes and decoded line by line, so a line that is not UTF-8 is named (InputNotUTF8) after every line
  before it has been written. A UTF-8 byte order mark at the start of IN is dropped.
- Every line is sent, blank ones too (the server translates "" to ""); line breaks inside a translation become spaces.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import grpc
from tqdm import tqdm

from seqserve.clients.channel import Retrier, RetryPolicy
from seqserve.clients.client import Client
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import DecodingOptions, StreamResult
from seqserve.textfiles import UnusablePath, check_paths, complete_lines, count_lines, line_text


log = logging.getLogger(__name__)

ON_ERROR = ("stop", "empty")
LINE_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT})  # about the line itself: stop, or an empty line
TRANSIENT_ERRORS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})  # resend the line


class OutputNotAPrefix(ValueError):
    """OUT holds more lines than IN, so it is not the output of this job."""

    def __init__(self, out_lines: int, in_lines: int):
        self.out_lines, self.in_lines = out_lines, in_lines
        super().__init__(f"OUT already holds {out_lines} lines but IN has only {in_lines}: not a partial run of IN")


class InputNotUTF8(ValueError):
    """A line of IN is not UTF-8; every line before it has been written to OUT."""

    def __init__(self, line: int, offset: int, byte: int):
        self.line, self.offset, self.byte = line, offset, byte
        self.report: TranslateFileReport | None = None  # set once the lines before it are written
        super().__init__(f"IN line {line} is not valid UTF-8 (byte 0x{byte:02x} at offset {offset} of the file)")


@dataclass
class TranslateFileReport:
    """What one run did."""

    total_lines: int  # lines in IN
    resumed_from: int  # lines OUT already held at start
    written: int = 0  # lines written by this run
    failed_lines: list[int] = field(default_factory=list)  # 1-based numbers of lines that failed (written empty)
    stopped_by: SeqServeError | None = None  # what stopped the job: a line's error, or the stream's
    stopped_at_line: int | None = None  # the 1-based number of the first line OUT lacks because of it
    reconnects: int = 0  # streams reopened after UNAVAILABLE
    retried_lines: int = 0  # lines resent after a transient error (UNAVAILABLE, RESOURCE_EXHAUSTED)
    elapsed_s: float = 0.0

    @property
    def done(self) -> int:
        return self.resumed_from + self.written

    @property
    def complete(self) -> bool:
        return self.done == self.total_lines

    @property
    def line_failed(self) -> bool:
        """The job stopped because the server refused a line (fix it or truncate), not for a transient reason."""
        return self.stopped_by is not None and self.stopped_by.code in LINE_ERRORS


def check_model(client: Client, model: str, version: int) -> None:
    """Refuse a model the server does not have, or one that does not translate, before the job starts.

    Otherwise every line would fail alike (with on_error="empty": an OUT of empty lines, taken as finished).
    """
    versions = client.list_models(model)
    if not versions:
        names = sorted({info.name for info in client.list_models()})
        raise SeqServeError(
            grpc.StatusCode.NOT_FOUND, f"no model named {model!r} on the server (it has: {', '.join(names) or 'none'})"
        )
    if version:
        versions = [info for info in versions if info.version == version]
        if not versions:
            raise SeqServeError(grpc.StatusCode.NOT_FOUND, f"model {model!r} has no version {version}")
    known = [info for info in versions if info.capabilities]  # a version not loaded lists none
    if known and not any("translate" in info.capabilities for info in known):
        can = sorted({c for info in known for c in info.capabilities})
        raise SeqServeError(
            grpc.StatusCode.INVALID_ARGUMENT, f"model {model!r} does not translate (it can: {', '.join(can)})"
        )


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
    check_paths(source, target, "translate-file")
    total = count_lines(source)
    # Validate OUT before changing it: a partial last line counts here, so a file that is not ours is refused
    # whole (only a run of this job leaves a partial line, and never past IN's last line).
    if target.exists() and (held := count_lines(target)) > total:
        raise OutputNotAPrefix(held, total)
    check_model(client, model, version)
    started = time.monotonic()
    start = complete_lines(target)
    end = total if max_lines is None else min(total, start + max_lines)
    report = TranslateFileReport(total_lines=total, resumed_from=start)
    if start:
        log.info("%s holds %d of %d lines: resuming at line %d", target, start, total, start + 1)

    with open(source, "rb") as handle:
        retry = _RetryRule(client.config.retry, client.config.timeout_s)
        job = _Job(report, _numbered_lines(handle, start, end), start, reorder_limit or max(256, 32 * window), retry)
        # disable=None: tqdm draws only on a terminal, so batch logs get no progress frames
        bar = tqdm(total=total, initial=start, unit="line", disable=None if progress else True, desc="translate",
                   leave=False)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _run(client, model, options, version, truncate, window, on_error, job, end, fd, bar)
        finally:
            job.stop()
            os.close(fd)
            bar.close()
            report.elapsed_s = time.monotonic() - started
    if job.input_error is not None and report.stopped_by is None:  # an earlier line's failure is told first
        job.input_error.report = report
        raise job.input_error
    return report


def _run(
    client: Client, model: str, options: DecodingOptions, version: int, truncate: bool, window: int, on_error: str,
    job: "_Job", end: int, fd: int, bar: tqdm,
) -> None:
    """Streams until OUT reaches ``end``, the job stops, or IN turns out not to be UTF-8; reopens dropped streams."""
    report = job.report
    retrier: Retrier | None = None  # while the stream keeps failing; progress starts a fresh one
    while job.next_line < end and not job.stopping and not job.at_bad_line():
        stream = client.translate_stream(model, job.items(), options, version=version, truncate=truncate, window=window)
        try:
            for result in stream:
                job.answer(result, on_error)
                job.write_ready(fd, bar)
                retrier = None
        except SeqServeError as error:
            # The call's timeout bounds the time without progress, so a restart of a few seconds is ridden out.
            retrier = retrier or Retrier("TranslateStream", client.config.retry, client.config.timeout_s)
            try:
                wait = retrier.wait_after(error)
            except SeqServeError as final:
                job.stop_at(job.next_line, final)  # OUT is a clean prefix: the job can be resumed
                return
            log.warning("stream failed (%s); reopening in %.2f s, resending %d lines", error, wait, len(job.sent))
            time.sleep(wait)
            report.reconnects += 1
            continue
        if job.next_line < end and not job.stopping and not job.at_bad_line():
            unanswered = f"{len(job.sent)} sent lines unanswered"
            job.stop_at(job.next_line, SeqServeError(grpc.StatusCode.INTERNAL, f"the stream ended with {unanswered}"))


def _numbered_lines(handle: BinaryIO, start: int, end: int) -> Iterator[tuple[int, str | InputNotUTF8]]:
    """(0-based index, line without its "\n" or "\r\n") for lines start..end-1, decoded one by one.

    A line that is not UTF-8 comes as (index, InputNotUTF8) and ends the lines. Decoding line by line (rather than
    a text handle, which decodes ahead) lets every line before a bad one be translated and written.
    """
    offset = 0
    for index, raw in enumerate(handle):  # a binary handle splits at b"\n" only, as count_lines counts
        if index >= end:
            return
        if index >= start:
            try:
                text = line_text(raw, first=index == 0)
            except UnicodeDecodeError as error:
                yield index, InputNotUTF8(index + 1, offset + error.start, raw[error.start])
                return
            yield index, text
        offset += len(raw)


@dataclass(frozen=True)
class _RetryRule:
    """How a line that met a transient error is retried: the client's policy, bounded by its timeout."""

    policy: RetryPolicy
    timeout_s: float | None

    def retrier(self, line: int) -> Retrier:
        return Retrier(f"line {line}", self.policy, self.timeout_s, retryable=TRANSIENT_ERRORS)


class _Job:
    """The state one translate-file run shares between grpc's request thread (items) and the answer loop."""

    def __init__(
        self, report: TranslateFileReport, lines: Iterator[tuple[int, str | InputNotUTF8]], start: int,
        reorder_limit: int, retry: _RetryRule,
    ):
        self.report = report
        self.lines = lines
        self.next_line = start  # 0-based index of the next line OUT needs
        self.results: dict[int, str] = {}  # answered lines waiting for the ones before them
        self.sent: dict[int, str] = {}  # sent and not yet answered: resent when a stream is reopened
        self.waiting: dict[int, tuple[float, str]] = {}  # index -> (when, text): resent after a transient error
        self.retriers: dict[int, Retrier] = {}
        self.retry = retry
        self.reorder_limit = reorder_limit
        self.input_done = False  # IN read to its end (or to a line that is not UTF-8)
        self.input_error: InputNotUTF8 | None = None
        self.stopping = False  # the job stops (a line or the stream failed, or the run is over): read no further
        self._lock = threading.Condition()
        self._stream = 0  # which stream's items() may read IN

    def at_bad_line(self) -> bool:
        """IN has a line that is not UTF-8 and every line before it is in OUT: nothing more can be done. (Lines before
        it still unanswered when a stream drops are resent like any others.)"""
        return self.input_error is not None and self.next_line >= self.input_error.line - 1

    def items(self) -> Iterator[tuple[str, str]]:
        """(id, text) for one stream: lines a dropped stream left unanswered, lines due for a retry, then new lines.

        Runs in grpc's request thread, so it never raises: a line that is not UTF-8 is recorded and ends the input.
        It returns only when nothing is left to send or wait for, so an item retried late still has a stream.
        """
        with self._lock:
            self._stream += 1
            stream, resend = self._stream, sorted(self.sent.items())
        yield from ((str(index), text) for index, text in resend)
        while True:
            with self._lock:
                item = self._next_item(stream)
                if item is None:
                    return
                self.sent[item[0]] = item[1]
            yield str(item[0]), item[1]

    def _next_item(self, stream: int) -> tuple[int, str] | None:
        """The next line to send, waiting as needed; None when this stream should end. Holds the lock."""
        while True:
            if self.stopping or stream != self._stream:  # a newer stream takes over
                return None
            now = time.monotonic()
            due = [index for index, (when, _) in self.waiting.items() if when <= now]
            if due:
                return min(due), self.waiting.pop(min(due))[1]
            if not self.input_done and not self._ahead():  # stay within reorder_limit lines of OUT
                item = next(self.lines, None)
                if item is None or isinstance(item[1], InputNotUTF8):
                    self.input_done = True
                    self.input_error = None if item is None else item[1]
                    continue
                return item
            if self.input_done and not self.sent and not self.waiting:
                return None
            self._lock.wait(0.05)

    def answer(self, result: StreamResult, on_error: str) -> None:
        index = int(result.id)
        with self._lock:
            text = self.sent.pop(index, None)
            self._lock.notify_all()
        if result.error is None:
            self.results[index] = _one_line(result.translation.text)
            self.retriers.pop(index, None)
            return
        error = _about_line(result.error, index)
        if error.code in TRANSIENT_ERRORS and text is not None and not self.stopping:
            retrier = self.retriers.setdefault(index, self.retry.retrier(index + 1))
            try:
                wait = retrier.wait_after(error)
            except SeqServeError as final:
                self.stop_at(index, final)  # not the line's fault: stop resumably, never an empty line
                return
            log.info("line %d: %s; resending in %.2f s", index + 1, error, wait)
            self.report.retried_lines += 1
            with self._lock:
                self.waiting[index] = (time.monotonic() + wait, text)
            return
        if error.code in LINE_ERRORS and on_error == "empty":
            log.warning("line %d: %s", index + 1, error)  # the one place this line's failure is told
            self.report.failed_lines.append(index + 1)
            self.results[index] = ""
        else:
            log.info("line %d: %s", index + 1, error)  # the report's stopped_by carries it to the caller
            self.stop_at(index, error)

    def stop_at(self, index: int, error: SeqServeError) -> None:
        """Stop the job because of line ``index`` (0-based): send nothing more; what is in flight is still written."""
        if self.report.stopped_at_line is None or index + 1 < self.report.stopped_at_line:
            self.report.stopped_by, self.report.stopped_at_line = error, index + 1
        self.stop()

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
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
        return len(self.sent) + len(self.results) + len(self.waiting) >= self.reorder_limit


def _about_line(error: SeqServeError, index: int) -> SeqServeError:
    """The server names a stream item "text 0" or "item ID" (the id is the 0-based index): say "the line" instead."""
    message = re.sub(rf"^(?:text 0|item '?{index}'?)(?=\s)", "the line", error.message)
    return error if message == error.message else SeqServeError(error.code, message)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
