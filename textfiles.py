"""Line files as both file tools read and write them: `seqserve-client translate-file` (seqserve.clients) and
`seqserve batch translate` (seqserve.server). Standard library only, so the client may use it too.

A line ends at "\n" only (a lone "\r" is part of its line); its text drops that "\n" and one "\r" before it, and a
UTF-8 byte order mark at the start of the file. OUT is appended to in whole lines; a run killed mid-write leaves a
partial last line, which `complete_lines` cuts off before a rerun appends.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

class UnusablePath(ValueError):
    """IN or OUT cannot take part in a resumable job (missing, the same file, or not a regular file); nothing was
    changed."""


def check_paths(source: Path, target: Path, tool: str) -> None:
    """Refuse IN and OUT that a job could not use safely, before anything is read from or written to them.

    IN is read twice (counted, then translated) and OUT is counted, cut and appended to: both must be regular files,
    and distinct. A device or FIFO as OUT (/dev/stdout, /dev/full) would be read forever or read from our own pipe,
    and IN as OUT would lose its last line and be appended to itself.
    """
    if not source.exists():
        raise UnusablePath(f"IN {source} does not exist")
    if not stat.S_ISREG(source.stat().st_mode):
        raise UnusablePath(f"IN {source} is not a regular file (it is read twice: counted, then translated)")
    if not target.exists():
        return
    if not stat.S_ISREG(target.stat().st_mode):
        raise UnusablePath(f"OUT {target} is not a regular file: {tool} appends to a file it can count")
    if os.path.samefile(source, target):
        raise UnusablePath(f"IN and OUT are the same file ({source}): OUT must be a different file")


def count_lines(path: Path, chunk: int = 1 << 20) -> int:
    """Lines in a file, a last line without "\\n" included."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def complete_lines(path: Path) -> int:
    """How many whole lines OUT holds (0 when absent), after cutting off a partial last line left by a killed run."""
    if not path.exists():
        return 0
    count = count_lines(path)
    with open(path, "r+b") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        # Walk back from the end to the last line break (a partial line is short: a few reads at most).
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


def line_text(raw: bytes, first: bool) -> str:
    """A line as read in binary, as text: its "\\n" and one "\\r" before it removed, and on the file's first line a
    byte order mark. Raises UnicodeDecodeError (its `start` counts from the line's first byte) for a line that is
    not UTF-8."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    text = raw.decode("utf-8")
    return text.removeprefix("\ufeff") if first else text
