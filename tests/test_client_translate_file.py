"""translate-file's safety: IN and OUT are checked before OUT is changed, bad input is named by line, transient
errors are retried rather than written as empty lines, and a stopped job still reports what OUT holds."""

from __future__ import annotations

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
from test_client_cli import client, corpus, models, run_cli, server, write_lines  # noqa: F401 (fixtures)


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


def test_default_policy_rides_out_a_server_down_for_seconds(server, models, tiny_repository, tmp_path):
    name = models["translate"]
    source = write_lines(tmp_path / "in.txt", corpus(120, seed=12))
    whole, restarted = tmp_path / "whole.txt", tmp_path / "restarted.txt"
    assert translate_file_cli(server, str(source), str(whole), "-m", name)[0] == 0
    first = start_server(Path(tiny_repository), models=(name,))
    replacement = []

    def restart_after_some_lines() -> None:
        deadline = time.monotonic() + 60
        while not restarted.exists() or restarted.read_bytes().count(b"\n") < 20:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        first.stop(0.0)
        time.sleep(2.5)  # down longer than the old 1.5 s retry window
        replacement.append(start_server(Path(tiny_repository), first.port, models=(name,)))

    restarter = threading.Thread(target=restart_after_some_lines, daemon=True)
    restarter.start()
    try:
        with Client(f"127.0.0.1:{first.port}", timeout_s=30) as client:
            report = translate_file(client, name, source, restarted, window=1, progress=False)
    finally:
        restarter.join(60)
        for running in replacement:
            running.stop()
    assert report.complete and report.reconnects >= 1
    assert restarted.read_bytes() == whole.read_bytes()
