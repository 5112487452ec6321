"""`seqserve batch translate` and its files: what a line is (lone CR, CRLF, BOM), input that is not UTF-8, OUT checked
before anything of it is cut, and Ctrl-C leaving whole lines; through the `seqserve` command where the exit code and
message are the behaviour."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from seqserve.cli import main
from seqserve.server import batch
from seqserve.server.batch import (
    BatchError,
    BatchJob,
    BlockTranslator,
    NotUtf8,
    OutputLongerThanInput,
    UnusablePath,
    read_blocks,
    scan_input,
    translate_file,
)

MODEL = "tiny-lstm"
SENTENCES = ["a b c", "d e f g", "h i", "b a d", "c c a", "e f", "g h i a", "a"]


@pytest.fixture(scope="module")
def worker(tiny_repository: Path) -> BlockTranslator:
    return BlockTranslator(BatchJob(tiny_repository, MODEL))


def _argv(tiny_repository: Path, source: Path, out: Path) -> list[str]:
    return ["batch", "translate", str(source), str(out), "--repository", str(tiny_repository), "--model", MODEL,
            "--block-lines", "2", "--batch-size", "2"]  # fmt: skip


def _run(tiny_repository: Path, source: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    logging.basicConfig(force=True)  # a handler on this test's captured stderr
    code = main(_argv(tiny_repository, source, out))
    return code, capsys.readouterr().err


def test_a_lone_carriage_return_stays_inside_its_line(tiny_repository: Path, worker: BlockTranslator, tmp_path: Path):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"a b c\r\nd e\rf g\r\nh i\n")
    assert [b.lines for b in read_blocks(source, 0, 10)] == [("a b c", "d e\rf g", "h i")]
    result = translate_file(BatchJob(tiny_repository, MODEL, block_lines=2), source, out)
    assert (result.lines, result.translated) == (3, 3)
    outputs = out.read_text(encoding="utf-8").split("\n")
    assert len(outputs) == 4 and outputs[3] == ""  # three lines, each ended by "\n"
    assert outputs[:3] == [worker.translate([line])[0] for line in ("a b c", "d e\rf g", "h i")]


def test_a_byte_order_mark_before_the_first_line_is_dropped(
    tiny_repository: Path, worker: BlockTranslator, tmp_path: Path
):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"\xef\xbb\xbfa b c\nd e f g\n")
    assert next(read_blocks(source, 0, 10)).lines == ("a b c", "d e f g")
    translate_file(BatchJob(tiny_repository, MODEL), source, out)
    assert out.read_text(encoding="utf-8").splitlines()[0] == worker.translate(["a b c"])[0]


def test_input_that_is_not_utf8_stops_at_that_line_after_writing_the_lines_before_it(
    tiny_repository: Path, worker: BlockTranslator, tmp_path: Path, capsys, restore_logging
):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    good = "".join(line + "\n" for line in SENTENCES[:4]).encode()
    source.write_bytes(good + b"c \xff a\n" + b"e f\ng h\n")
    code, err = _run(tiny_repository, source, out, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"line 5 (byte offset {len(good) + 2}) is not UTF-8" in err and "4 translated lines" in err
    assert out.read_text(encoding="utf-8").splitlines() == worker.translate(SENTENCES[:4])
    # Fixed, the rerun resumes at that line.
    source.write_bytes(good + b"c a\ne f\ng h\n")
    code, _ = _run(tiny_repository, source, out, capsys)
    assert code == 0
    assert out.read_text(encoding="utf-8").splitlines() == worker.translate(SENTENCES[:4] + ["c a", "e f", "g h"])


def test_the_scan_finds_the_bad_line_and_is_not_fooled_by_a_character_split_between_reads(tmp_path: Path):
    path = tmp_path / "in.txt"
    path.write_bytes("é\nüü\n".encode() + b"ok\n\xc3(\nlast")
    for chunk in (1, 2, 3, 1 << 20):
        scan = scan_input(path, chunk)
        assert (scan.lines, scan.bad_line, scan.bad_offset) == (5, 4, 11), chunk  # 3 + 5 + 3 bytes before it
    path.write_bytes("é\nü".encode())
    assert (scan_input(path, 1).lines, scan_input(path, 1).bad_line) == (2, None)


def test_the_same_file_as_in_and_out_is_refused_and_left_untouched(tiny_repository: Path, tmp_path: Path, capsys,
                                                                   restore_logging):  # fmt: skip
    source = tmp_path / "in.txt"
    content = b"a b c\nd e f g\nh i"  # no line break at the end: cutting a "partial line" would lose "h i"
    source.write_bytes(content)
    code, err = _run(tiny_repository, source, source, capsys)
    assert code == 2 and "same file" in err
    assert source.read_bytes() == content
    link = tmp_path / "link.txt"
    os.link(source, link)
    with pytest.raises(BatchError, match="same file") as caught:  # a BatchError, as every refusal of a job
        translate_file(BatchJob(tiny_repository, MODEL), source, link)
    assert isinstance(caught.value, UnusablePath)
    assert source.read_bytes() == content


def test_swapped_arguments_are_refused_before_the_partial_last_line_is_cut(
    tiny_repository: Path, tmp_path: Path, capsys, restore_logging
):
    notes, corpus = tmp_path / "notes.txt", tmp_path / "corpus.txt"
    notes.write_bytes(b"a b\n")
    corpus.write_bytes(b"a b c\nd e")  # 2 lines, the last without a line break
    code, err = _run(tiny_repository, notes, corpus, capsys)  # OUT is the corpus: it is not notes' partial output
    assert code == 2 and "already holds 2 lines but the input has only 1" in err
    assert corpus.read_bytes() == b"a b c\nd e"
    with pytest.raises(OutputLongerThanInput):
        translate_file(BatchJob(tiny_repository, MODEL), notes, corpus)
    assert corpus.read_bytes() == b"a b c\nd e"


def test_an_out_that_is_not_a_regular_file_is_refused_without_reading_it(
    tiny_repository: Path, tmp_path: Path, capsys, restore_logging
):
    source, fifo = tmp_path / "in.txt", tmp_path / "out.fifo"
    source.write_bytes(b"a b c\n")
    os.mkfifo(fifo)
    result: list[tuple[int, str]] = []
    # Reading a FIFO with no writer would block for good: run in a thread and give it a deadline.
    thread = threading.Thread(target=lambda: result.append(_run(tiny_repository, source, fifo, capsys)), daemon=True)
    thread.start()
    thread.join(60)
    assert result, "batch translate hung on a FIFO as OUT"
    code, err = result[0]
    assert code == 2 and "not a regular file" in err
    code, err = _run(tiny_repository, source, tmp_path, capsys)  # a directory
    assert code == 2 and "not a regular file" in err


def test_ctrl_c_exits_130_without_a_traceback_and_out_holds_whole_blocks(
    tiny_repository: Path, worker: BlockTranslator, tmp_path: Path, capsys, restore_logging, monkeypatch
):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(line + "\n" for line in SENTENCES), encoding="utf-8")
    real = batch.BlockTranslator.translate
    calls = []

    def interrupted_at_the_third_block(self, lines, start=0):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a decode
        return real(self, lines, start)

    monkeypatch.setattr(batch.BlockTranslator, "translate", interrupted_at_the_third_block)
    code, err = _run(tiny_repository, source, out, capsys)
    assert code == 130 and "Traceback" not in err and "holds 4 translated lines" in err and "resume" in err
    assert out.read_text(encoding="utf-8").splitlines() == worker.translate(SENTENCES[:4])
    monkeypatch.setattr(batch.BlockTranslator, "translate", real)
    code, _ = _run(tiny_repository, source, out, capsys)
    assert code == 0 and out.read_text(encoding="utf-8").splitlines() == worker.translate(SENTENCES)


def test_an_interrupt_while_a_block_is_written_leaves_only_whole_blocks(tiny_repository: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C in the middle of a block's write (half its bytes on disk): OUT is cut back to the blocks written whole,
    and a rerun completes it."""
    import io

    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(line + "\n" for line in SENTENCES), encoding="utf-8")

    class HalfWrite(io.FileIO):
        writes = 0

        def write(self, data) -> int:
            HalfWrite.writes += 1
            if HalfWrite.writes == 2:  # the second block: half of it reaches the file, then the interrupt
                super().write(bytes(data)[: len(data) // 2])
                raise KeyboardInterrupt
            return super().write(data)

    def engine(job, blocks):
        for block in blocks:
            yield block.start, [f"line {block.start + i}" for i in range(len(block.lines))]

    monkeypatch.setattr(batch, "open", lambda path, mode, buffering=-1: HalfWrite(path, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        translate_file(BatchJob(tiny_repository, MODEL, block_lines=2), source, out, engine)
    assert out.read_text(encoding="utf-8") == "line 0\nline 1\n"  # not "line 0\nline 1\nli"
    monkeypatch.undo()
    translate_file(BatchJob(tiny_repository, MODEL, block_lines=2), source, out, engine)
    assert out.read_text(encoding="utf-8") == "".join(f"line {i}\n" for i in range(len(SENTENCES)))
