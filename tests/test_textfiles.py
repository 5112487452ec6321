"""The line files both file tools share (seqserve.textfiles): what a line is, and how OUT is resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.textfiles import UnusablePath, check_paths, complete_lines, count_lines, line_text


@pytest.mark.parametrize("raw, first, text", [
    (b"plain\n", False, "plain"),
    (b"windows\r\n", False, "windows"),
    (b"two returns\r\r\n", False, "two returns\r"),  # one "\r" belongs to the line break, the other to the line
    (b"lone\rreturn\n", False, "lone\rreturn"),  # a line ends at "\n" only
    (b"no break", False, "no break"),
    (b"\xef\xbb\xbfmarked\n", True, "marked"),
    (b"\xef\xbb\xbfmarked\n", False, "\ufeffmarked"),  # a mark inside the file is text
])  # fmt: skip
def test_a_line_is_its_bytes_up_to_the_line_break(raw, first, text):
    assert line_text(raw, first) == text


def test_a_line_that_is_not_utf8_says_where():
    with pytest.raises(UnicodeDecodeError) as caught:
        line_text(b"caf\xe9\n", first=False)
    assert caught.value.start == 3


def test_complete_lines_cuts_a_partial_last_line_only(tmp_path: Path):
    out = tmp_path / "out.txt"
    assert complete_lines(out) == 0
    out.write_bytes(b"one\ntwo\nthr")
    assert count_lines(out) == 3 and complete_lines(out) == 2 and out.read_bytes() == b"one\ntwo\n"
    assert complete_lines(out) == 2 and out.read_bytes() == b"one\ntwo\n"


def test_in_and_out_must_be_distinct_regular_files(tmp_path: Path):
    source = tmp_path / "in.txt"
    source.write_text("a\n")
    check_paths(source, tmp_path / "new.txt", "tool")  # OUT may not exist yet
    with pytest.raises(UnusablePath, match="same file"):
        check_paths(source, source, "tool")
    with pytest.raises(UnusablePath, match="not a regular file: tool appends"):
        check_paths(source, Path("/dev/null"), "tool")
    with pytest.raises(UnusablePath, match="does not exist"):
        check_paths(tmp_path / "missing.txt", source, "tool")
