"""translate-file's safety: IN and OUT are checked before OUT is changed, bad input is named by line, transient
errors are retried rather than written as empty lines, and a stopped job still reports what OUT holds."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from seqserve.clients import Client
from seqserve.clients.cli import main
from seqserve.clients.translate_file import translate_file
from test_client import start_server
from test_client_cli import (  # noqa: F401 (fixtures)
    client, corpus, models, run_cli, server, translate_across_a_restart, write_lines,
)


def translate_file_cli(server, *argv: str) -> tuple[int, str]:
    return run_cli(server, "translate-file", *argv, "--no-progress")


# --------------------------------------------------------------------------------------------------------------
# IN and OUT are validated before OUT is touched


def test_same_file_as_in_and_out_is_refused_and_left_unchanged(server, models, tmp_path):
    both = tmp_path / "same.txt"
    both.write_bytes(b"a b c\nd e f")  # no trailing newline: the old code cut this last line
    code, _ = translate_file_cli(server, str(both), str(both), "-m", models["translate"])
    assert code == 2 and both.read_bytes() == b"a b c\nd e f"


def test_swapped_arguments_leave_the_longer_file_unchanged(server, models, tmp_path, capsys):
    notes = write_lines(tmp_path / "notes.txt", ["a b"])
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_bytes(b"a c b\nd e f")  # 2 lines, the last without "\n"
    code, _ = translate_file_cli(server, str(notes), str(corpus_file), "-m", models["translate"])
    assert code == 2 and corpus_file.read_bytes() == b"a c b\nd e f"
    assert "holds 2 lines but IN has only 1" in capsys.readouterr().err


def test_out_that_is_not_a_regular_file_is_refused(server, models, tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", ["a b"])
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)  # reading it to count lines would block forever
    code, _ = translate_file_cli(server, str(source), str(fifo), "-m", models["translate"])
    assert code == 2 and "not a regular file" in capsys.readouterr().err
    code, _ = translate_file_cli(server, str(source), "/dev/null", "-m", models["translate"])
    assert code == 2


def test_a_partial_last_line_within_in_is_still_cut_and_resumed(server, client, models, tmp_path):
    lines = corpus(6, seed=11)
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    expected = [t.text for t in client.translate(models["translate"], lines)]
    target.write_bytes(("\n".join(expected[:3]) + "\n" + expected[3][:1]).encode())
    code, _ = translate_file_cli(server, str(source), str(target), "-m", models["translate"])
    assert code == 0 and target.read_text(encoding="utf-8").splitlines() == expected


# --------------------------------------------------------------------------------------------------------------
# Retries


def test_default_policy_rides_out_a_server_down_for_seconds(models, tiny_repository, tmp_path):
    # Down longer than the old 1.5 s retry window; the default policy retries until the 30 s timeout.
    report, restarted, whole = translate_across_a_restart(models, tiny_repository, tmp_path, 120, 2.5, timeout_s=30)
    assert report.complete and report.reconnects >= 1 and restarted == whole


# --------------------------------------------------------------------------------------------------------------
# Only the line's own faults become empty lines


def test_unknown_model_or_capability_stops_before_out_is_created(server, models, tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", corpus(5, seed=13))
    target = tmp_path / "out.txt"
    code, _ = translate_file_cli(server, str(source), str(target), "-m", "no-such-model", "--on-error", "empty")
    err = capsys.readouterr().err
    assert code == 1 and not target.exists() and "NOT_FOUND" in err and models["translate"] in err
    assert "--on-error empty" not in err
    encoder = models["encode"]
    code, _ = translate_file_cli(server, str(source), str(target), "-m", encoder, "--on-error", "empty")
    assert code == 1 and not target.exists() and "does not translate" in capsys.readouterr().err


def test_a_model_unloaded_mid_run_stops_the_job_resumably_never_with_empty_lines(models, tiny_repository, tmp_path):
    """An unloaded model is FAILED_PRECONDITION (only a LoadModel helps): the job stops where it was, OUT a clean
    prefix, and a rerun once the model is back completes it."""
    import grpc

    name = models["translate"]
    own = start_server(Path(tiny_repository), models=(name,))
    source = write_lines(tmp_path / "in.txt", corpus(150, seed=14))
    target = tmp_path / "out.txt"

    def unload() -> None:
        deadline = time.monotonic() + 60
        while not target.exists() or target.read_bytes().count(b"\n") < 20:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        with Client(own.address, timeout_s=60) as admin:
            admin.unload_model(name)

    changer = threading.Thread(target=unload, daemon=True)
    changer.start()
    try:
        with Client(own.address, timeout_s=30) as client:
            expected = [t.text for t in client.translate(name, source.read_text().splitlines())]
            report = translate_file(client, name, source, target, window=4, on_error="empty", progress=False)
            changer.join(60)
            assert not report.complete and report.stopped_by.code == grpc.StatusCode.FAILED_PRECONDITION
            assert report.failed_lines == []
            written = target.read_text(encoding="utf-8").splitlines()
            assert 20 <= len(written) < len(expected) and written == expected[: len(written)]
            client.load_model(name)
            rerun = translate_file(client, name, source, target, window=4, on_error="empty", progress=False)
    finally:
        own.stop()
    assert rerun.complete and target.read_text(encoding="utf-8").splitlines() == expected


def test_a_full_server_queue_is_retried_not_written_empty(client, models, tiny_repository, tmp_path):
    from seqserve.server.config import Limits, ServerConfig
    from seqserve.server.repository import ModelRepository
    from seqserve.server.testing import ServerThread

    name = models["translate"]
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, grace_period_s=1, models=(name,),
                          limits=Limits(max_queue=2))
    own = ServerThread(config, ModelRepository(Path(tiny_repository)))
    source = write_lines(tmp_path / "in.txt", corpus(200, seed=15))
    target = tmp_path / "out.txt"
    expected = [t.text for t in client.translate(name, source.read_text().splitlines())]  # the module's server
    try:
        with Client(own.address, timeout_s=30) as small:
            report = translate_file(small, name, source, target, window=32, on_error="empty", progress=False)
    finally:
        own.stop()
    assert report.complete and report.failed_lines == [] and report.retried_lines > 0
    assert target.read_text(encoding="utf-8").splitlines() == expected


# --------------------------------------------------------------------------------------------------------------
# Input that is not UTF-8, a byte order mark


def test_non_utf8_line_is_a_usage_error_naming_it_after_the_lines_before_it(server, client, models, tmp_path, capsys):
    lines = corpus(12, seed=16)
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"".join(line.encode() + b"\n" for line in lines[:7]) + b"a \xff b\n" + b"c d\n")
    code, _ = translate_file_cli(server, str(source), str(target), "-m", models["translate"], "--window", "4")
    err = capsys.readouterr().err
    assert code == 2 and "line 8" in err and "UTF-8" in err and "Traceback" not in err
    expected = [t.text for t in client.translate(models["translate"], lines[:7])]
    assert target.read_text(encoding="utf-8").splitlines() == expected


def test_a_stream_dropped_after_the_bad_line_was_read_still_writes_the_lines_before_it(client, models, tmp_path):
    """IN's non-UTF-8 line is read while the lines before it are still unanswered, and then the stream drops: it is
    reopened for them (they were lost, and the error said OUT held them)."""
    import grpc

    from seqserve.clients import SeqServeError
    from seqserve.clients.translate_file import InputNotUTF8

    lines = corpus(6, seed=18)
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"".join(line.encode() + b"\n" for line in lines) + b"a \xff b\n")

    class DropsItsFirstStream:
        """The real client, but its first stream takes every line (and so reads the bad one), then drops."""

        def __init__(self, real: Client):
            self.real, self.dropped = real, False

        def __getattr__(self, name: str):
            return getattr(self.real, name)

        def translate_stream(self, model, items, *args, **kwargs):
            if self.dropped:
                yield from self.real.translate_stream(model, items, *args, **kwargs)
                return
            self.dropped = True
            for _ in range(len(lines)):
                next(items)
            # Reading on reaches the bad line, then waits for answers that never come: in a thread of its own.
            threading.Thread(target=lambda: next(items, None), daemon=True).start()
            time.sleep(0.3)
            raise SeqServeError(grpc.StatusCode.UNAVAILABLE, "the server went away")

    with pytest.raises(InputNotUTF8) as caught:
        translate_file(DropsItsFirstStream(client), models["translate"], source, target, window=16, progress=False)
    assert caught.value.line == len(lines) + 1 and caught.value.report.reconnects == 1
    expected = [t.text for t in client.translate(models["translate"], lines)]
    assert target.read_text(encoding="utf-8").splitlines() == expected


def test_byte_order_mark_is_not_translated(server, client, models, tmp_path):
    lines = corpus(3, seed=17)
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\n" for line in lines).encode())
    assert translate_file_cli(server, str(source), str(target), "-m", models["translate"])[0] == 0
    expected = [t.text for t in client.translate(models["translate"], lines)]
    assert target.read_text(encoding="utf-8").splitlines() == expected


# --------------------------------------------------------------------------------------------------------------
# A stopped job still reports


def test_stream_that_cannot_be_reopened_still_prints_summary_and_resume_hint(models, tiny_repository, tmp_path,
                                                                            capsys):
    name = models["translate"]
    own = start_server(Path(tiny_repository), models=(name,))
    source = write_lines(tmp_path / "in.txt", corpus(300, seed=18))
    target = tmp_path / "out.txt"

    def stop_after_some_lines() -> None:
        deadline = time.monotonic() + 60
        while not target.exists() or target.read_bytes().count(b"\n") < 20:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        own.stop(0.0)

    stopper = threading.Thread(target=stop_after_some_lines, daemon=True)
    stopper.start()
    out = io.StringIO()
    code = main(["--server", own.address, "--timeout", "1", "--json", "translate-file", str(source), str(target),
                 "-m", name, "--no-progress", "--window", "1"], stdout=out)
    stopper.join(60)
    summary = json.loads(out.getvalue())
    held = target.read_bytes().count(b"\n")
    err = capsys.readouterr().err
    assert code == 1 and summary["complete"] is False and summary["done"] == held >= 20
    assert "UNAVAILABLE" in summary["error"] and summary["reconnects"] >= 1 and "elapsed_s" in summary
    assert f"holds the first {held} lines" in err and "rerun" in err and "--on-error empty" not in err


def test_a_refused_line_before_a_non_utf8_line_is_the_one_reported(server, models, tmp_path, capsys):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"a b\nc d\n" + b"a " * 3000 + b"\ne f\n\xff\n")  # line 3 over the token limit, line 5 bad
    code, _ = translate_file_cli(server, str(source), str(target), "-m", models["translate"], "--window", "8")
    err = capsys.readouterr().err
    assert code == 1 and "line 3:" in err and "holds the first 2 lines" in err and "UTF-8" not in err
