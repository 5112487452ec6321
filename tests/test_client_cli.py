"""`seqserve-client` against a real server: each command's text and JSON output, health exit codes, and the
resumable translate-file job (order kept, killed and resumed equals uninterrupted, partial last line, errors)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from seqserve.clients import Client
from seqserve.clients.cli import main
from seqserve.clients.translate_file import complete_lines, translate_file
from test_client import FAST_RETRY, free_port, start_server

WORDS = list("abcdefgh")  # the tiny translators reverse sequences of these letters


@pytest.fixture(scope="module")
def server(tiny_repository):
    server = start_server(Path(tiny_repository))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def models(client) -> dict[str, str]:
    """capability -> the name of a ready model that has it."""
    found: dict[str, str] = {}
    for info in sorted(client.list_models(), key=lambda m: m.name):
        for capability in info.capabilities:
            found.setdefault(capability, info.name)
    return found


def run_cli(server, *argv: str, stdin: str = "") -> tuple[int, str]:
    """Exit code and stdout of `seqserve-client --server TARGET argv...`."""
    out = io.StringIO()
    code = main(["--server", server.address, *argv], stdin=io.StringIO(stdin), stdout=out)
    return code, out.getvalue()


def corpus(lines: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(lines)]


# --------------------------------------------------------------------------------------------------------------
# The terminal commands


def test_translate_prints_one_translation_per_argument(server, client, models):
    code, out = run_cli(server, "translate", "--model", models["translate"], "a c b", "d e f g")
    expected = [t.text for t in client.translate(models["translate"], ["a c b", "d e f g"])]
    assert code == 0 and out.splitlines() == expected


def test_translate_json_lines_carry_hypotheses_and_model(server, client, models):
    code, out = run_cli(server, "--json", "translate", "-m", models["translate"], "--beam", "2", "--n-best", "2",
                        "h a b")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and record["source"] == "h a b" and len(record["hypotheses"]) == 2
    assert record["translation"] == record["hypotheses"][0]["text"]
    assert record["model"]["name"] == models["translate"]


def test_translate_reads_stdin_and_skips_blank_lines(server, client, models):
    code, out = run_cli(server, "translate", "-m", models["translate"], stdin="a c b\n\nd e f g\n")
    expected = [t.text for t in client.translate(models["translate"], ["a c b", "d e f g"])]
    assert code == 0 and out.splitlines() == expected


def test_model_left_out_with_several_candidates_is_a_usage_error_listing_them(server, client, capsys):
    translators = sorted({m.name for m in client.list_models() if "translate" in m.capabilities})
    assert len(translators) > 1  # the tiny repository holds several translators
    assert run_cli(server, "translate", "a c b") == (2, "")
    assert ", ".join(translators) in capsys.readouterr().err


def test_encode_prints_vectors_as_text_and_json(server, client, models, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("a c b\nd e f g\n", encoding="utf-8")
    code, out = run_cli(server, "encode", "-m", models["encode"], "--input", str(source))
    expected = client.encode(models["encode"], ["a c b", "d e f g"])
    printed = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
    assert code == 0 and printed.shape == expected.shape
    np.testing.assert_allclose(printed, expected, rtol=1e-5, atol=1e-6)
    code, out = run_cli(server, "--json", "encode", "-m", models["encode"], "--normalize", "the cat sat")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["text"] == "the cat sat" and np.linalg.norm(record["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_nsp_prints_probability_per_pair(server, client, models):
    code, out = run_cli(server, "nsp", "-m", models["nsp"], "the cat sat", "on the mat", "a dog", "runs")
    expected = client.score_next_sentence(models["nsp"], [("the cat sat", "on the mat"), ("a dog", "runs")])
    assert code == 0 and [float(v) for v in out.split()] == pytest.approx(expected, abs=1e-4)
    code, out = run_cli(server, "--json", "nsp", "-m", models["nsp"], stdin="the cat sat\ton the mat\n")
    assert json.loads(out)["is_next_probability"] == pytest.approx(expected[0], abs=1e-6)


def test_nsp_odd_number_of_sentences_is_a_usage_error(server, models):
    assert run_cli(server, "nsp", "-m", models["nsp"], "only one sentence") == (2, "")


def test_fill_mask_prints_candidates_per_mask(server, client, models):
    code, out = run_cli(server, "fill-mask", "-m", models["fill_mask"], "--top-k", "2", "the [MASK] sat on the [MASK]")
    masks = client.fill_mask(models["fill_mask"], ["the [MASK] sat on the [MASK]"], top_k=2)[0]
    assert code == 0 and out.count(" | ") == 1
    assert out.split(" | ")[0].startswith(f"{masks[0][0].token} (")
    code, out = run_cli(server, "--json", "fill-mask", "-m", models["fill_mask"], "--top-k", "2", "a [MASK] runs")
    record = json.loads(out)
    assert len(record["masks"]) == 1 and len(record["masks"][0]) == 2 and "token_id" in record["masks"][0][0]


def test_models_lists_every_model_as_table_and_json(server, client):
    names = {m.name for m in client.list_models()}
    code, out = run_cli(server, "models")
    assert code == 0 and out.startswith("NAME") and all(name in out for name in names)
    code, out = run_cli(server, "--json", "models", "list")
    assert code == 0 and {json.loads(line)["name"] for line in out.splitlines()} == names


def test_models_unload_and_load_report_state(server, models):
    name = models["fill_mask"]
    code, out = run_cli(server, "--json", "models", "unload", name)
    assert code == 0 and json.loads(out)["state"] in ("AVAILABLE", "UNLOADING")
    code, out = run_cli(server, "--json", "models", "load", name)
    assert code == 0 and json.loads(out)["state"] == "READY"


def test_unknown_model_exits_one_with_status_on_stderr(server, capsys):
    code, out = run_cli(server, "translate", "--model", "no-such-model", "hello")
    assert code == 1 and out == "" and "NOT_FOUND" in capsys.readouterr().err


def test_health_exits_zero_when_serving(server, models):
    assert run_cli(server, "health") == (0, "SERVING\n")
    assert run_cli(server, "health", models["translate"]) == (0, "SERVING\n")


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_health_exits_one_for_unknown_model_with_the_error_on_stderr(server, capsys, json_flag):
    code, out = run_cli(server, *json_flag, "health", "no-such-model")
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err.startswith("seqserve-client: error: NOT_FOUND") and "no health service 'no-such-model'" in err, err


def test_health_exits_one_for_unreachable_server_with_the_error_on_stderr(capsys):
    out = io.StringIO()
    code = main(["--server", f"127.0.0.1:{free_port()}", "--retries", "1", "health"], stdout=out)
    assert code == 1 and out.getvalue() == ""
    assert capsys.readouterr().err.startswith("seqserve-client: error: UNAVAILABLE")


def test_health_not_serving_is_an_answer_on_stdout(server, client, models, capsys):
    name = models["fill_mask"]
    client.unload_model(name)
    try:
        assert run_cli(server, "health", name) == (1, "NOT_SERVING\n")
        code, out = run_cli(server, "--json", "health", name)
        assert code == 1 and json.loads(out) == {"service": name, "status": "NOT_SERVING"}
        assert capsys.readouterr().err == ""
    finally:
        client.load_model(name)


# --------------------------------------------------------------------------------------------------------------
# translate-file


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_translate_file_output_equals_per_line_translate_in_order(server, client, models, tmp_path):
    lines = corpus(40)
    lines[7] = ""  # a blank line stays blank
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    code, _ = run_cli(server, "translate-file", str(source), str(target), "-m", models["translate"], "--window", "8",
                      "--no-progress")
    translated = iter(client.translate(models["translate"], [line for line in lines if line]))
    expected = [next(translated).text if line else "" for line in lines]
    assert code == 0 and target.read_text(encoding="utf-8").splitlines() == expected


def test_translate_file_in_chunks_equals_one_run(server, models, tmp_path):
    source = write_lines(tmp_path / "in.txt", corpus(30, seed=1))
    whole, chunked = tmp_path / "whole.txt", tmp_path / "chunked.txt"
    args = ["-m", models["translate"], "--no-progress", "--window", "4"]
    assert run_cli(server, "translate-file", str(source), str(whole), *args)[0] == 0
    for _ in range(3):
        assert run_cli(server, "translate-file", str(source), str(chunked), *args, "--max-lines", "11")[0] == 0
    assert chunked.read_bytes() == whole.read_bytes()


def test_translate_file_cuts_partial_last_line_then_resumes(server, models, tmp_path):
    source = write_lines(tmp_path / "in.txt", corpus(12, seed=2))
    whole, resumed = tmp_path / "whole.txt", tmp_path / "resumed.txt"
    args = ["-m", models["translate"], "--no-progress"]
    assert run_cli(server, "translate-file", str(source), str(whole), *args)[0] == 0
    done = whole.read_bytes().split(b"\n")
    resumed.write_bytes(b"\n".join(done[:5]) + b"\n" + done[5][:3])  # five whole lines and a torn sixth
    assert complete_lines(resumed) == 5 and resumed.read_bytes().endswith(b"\n")
    assert run_cli(server, "translate-file", str(source), str(resumed), *args)[0] == 0
    assert resumed.read_bytes() == whole.read_bytes()


def test_translate_file_killed_midway_then_resumed_equals_uninterrupted_run(server, models, tmp_path):
    lines = corpus(300, seed=3)
    source, whole, killed = write_lines(tmp_path / "in.txt", lines), tmp_path / "whole.txt", tmp_path / "killed.txt"
    args = ["-m", models["translate"], "--no-progress"]
    command = [sys.executable, "-m", "seqserve.clients.cli", "--server", server.address, "translate-file",
               str(source), str(killed), *args, "--window", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if killed.exists() and killed.read_bytes().count(b"\n") >= 20:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    written = complete_lines(killed)
    assert 20 <= written < len(lines)
    assert run_cli(server, "translate-file", str(source), str(killed), *args, "--window", "8")[0] == 0
    assert run_cli(server, "translate-file", str(source), str(whole), *args, "--window", "8")[0] == 0
    assert killed.read_bytes() == whole.read_bytes()


def test_translate_file_error_stops_after_writing_the_lines_before_it(server, client, models, tmp_path, capsys):
    lines = corpus(10, seed=4)
    lines[6] = " ".join(["word"] * 5000)  # over the model's token limit: INVALID_ARGUMENT
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    code, _ = run_cli(server, "translate-file", str(source), str(target), "-m", models["translate"], "--no-progress")
    assert code == 1 and "line 7" in capsys.readouterr().err
    expected = [t.text for t in client.translate(models["translate"], lines[:6])]
    assert target.read_text(encoding="utf-8").splitlines() == expected


def test_translate_file_on_error_empty_writes_an_empty_line(server, client, models, tmp_path):
    lines = corpus(10, seed=5)
    lines[3] = " ".join(["word"] * 5000)
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    code, out = run_cli(server, "--json", "translate-file", str(source), str(target), "-m", models["translate"],
                        "--no-progress", "--on-error", "empty")
    good = lines[:3] + lines[4:]
    expected = [t.text for t in client.translate(models["translate"], good)]
    assert code == 0 and json.loads(out)["failed_lines"] == [4]
    assert target.read_text(encoding="utf-8").splitlines() == expected[:3] + [""] + expected[3:]


def test_translate_file_refuses_output_longer_than_input(server, models, tmp_path):
    source = write_lines(tmp_path / "in.txt", ["a dog runs"])
    target = write_lines(tmp_path / "out.txt", ["one", "two"])
    code, _ = run_cli(server, "translate-file", str(source), str(target), "-m", models["translate"], "--no-progress")
    assert code == 2 and target.read_text() == "one\ntwo\n"


def translate_across_a_restart(models, tiny_repository, tmp_path, lines: int, down_s: float, **client_options):
    """translate_file against a server stopped after 20 lines and started again on its port `down_s` later; returns
    (report, the output, the output of an undisturbed run)."""
    name = models["translate"]
    source = write_lines(tmp_path / "in.txt", corpus(lines, seed=6))
    whole, restarted = tmp_path / "whole.txt", tmp_path / "restarted.txt"
    first = start_server(Path(tiny_repository), models=(name,))
    with Client(f"127.0.0.1:{first.port}", timeout_s=30) as client:
        translate_file(client, name, source, whole, progress=False)
    replacement = []

    def restart_after_some_lines() -> None:
        deadline = time.monotonic() + 60
        while not restarted.exists() or restarted.read_bytes().count(b"\n") < 20:
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        first.stop(0.0)  # the stream in flight fails with UNAVAILABLE
        time.sleep(down_s)
        replacement.append(start_server(Path(tiny_repository), first.port, models=(name,)))

    restarter = threading.Thread(target=restart_after_some_lines, daemon=True)
    restarter.start()
    try:
        with Client(f"127.0.0.1:{first.port}", **client_options) as client:
            report = translate_file(client, name, source, restarted, window=1, progress=False)
    finally:
        restarter.join(60)
        for running in replacement:
            running.stop()
    return report, restarted.read_bytes(), whole.read_bytes()


def test_translate_file_reopens_its_stream_across_a_server_restart(models, tiny_repository, tmp_path):
    report, restarted, whole = translate_across_a_restart(models, tiny_repository, tmp_path, 200, 0.0,
                                                          retry=FAST_RETRY)  # fmt: skip
    assert report.complete and report.reconnects >= 1 and restarted == whole


def test_translate_file_with_a_small_reorder_limit_keeps_order(client, models, tmp_path):
    lines = corpus(50, seed=7)
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    report = translate_file(client, models["translate"], source, target, window=8, reorder_limit=3, progress=False)
    expected = [t.text for t in client.translate(models["translate"], lines)]
    assert report.complete and target.read_text(encoding="utf-8").splitlines() == expected


def test_every_option_of_every_command_has_help():
    import argparse

    from seqserve.clients.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, sub in [("seqserve-client", parser), *commands.choices.items()]
        for action in sub._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help
    ]
    assert set(commands.choices) == {"encode", "translate", "nsp", "fill-mask", "models", "health", "translate-file"}
    assert missing == []


# --------------------------------------------------------------------------------------------------------------
# Errors name the input line


def test_error_in_a_batch_names_the_input_line_and_the_cli_option(server, models, capsys):
    lines = corpus(45, seed=8)
    lines[39] = " ".join(["a"] * 3000)  # input line 41 below: one blank line comes first; under the character limit
    stdin = "\n" + "\n".join(lines) + "\n"
    code, out = run_cli(server, "translate", "-m", models["translate"], "--batch-size", "32", stdin=stdin)
    err = capsys.readouterr().err
    assert code == 1 and len(out.splitlines()) == 32
    assert "line 41 has 30" in err and "tokens" in err and "text 7" not in err
    assert "--truncate" in err and "TRUNCATION_TRUNCATE" not in err


def test_translate_file_error_names_the_line_not_the_stream_item(server, models, tmp_path, capsys):
    lines = corpus(10, seed=9)
    lines[6] = " ".join(["a"] * 3000)  # over the token limit, under the character limit
    source, target = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    code, _ = run_cli(server, "translate-file", str(source), str(target), "-m", models["translate"], "--no-progress")
    err = capsys.readouterr().err
    assert code == 1 and "line 7: INVALID_ARGUMENT: the line has 30" in err
    assert "item 6" not in err and "text 0" not in err and "use --truncate" in err
    lines[6] = " ".join(["word"] * 5000)  # over the character limit: --truncate would not help
    write_lines(source, lines)
    code, _ = run_cli(server, "translate-file", str(source), str(target), "-m", models["translate"], "--no-progress")
    err = capsys.readouterr().err
    assert code == 1 and "max_chars_per_text" in err and "--truncate" not in err


# --------------------------------------------------------------------------------------------------------------
# Bad option values are refused naming the option


@pytest.mark.parametrize(
    "argv, option",
    [
        (["translate", "--beam", "-1", "a"], "--beam"),
        (["translate", "--max-tokens", "-5", "a"], "--max-tokens"),
        (["translate", "--max-ratio", "nan", "a"], "--max-ratio"),
        (["fill-mask", "--top-k", "-1", "a [MASK]"], "--top-k"),
        (["translate", "--version", "-1", "a"], "--version"),
        (["translate", "--batch-size", "0", "a"], "--batch-size"),
        (["--max-message-mb", "0", "health"], "--max-message-mb"),
        (["--timeout", "-1", "health"], "--timeout"),
        (["--retries", "-2", "health"], "--retries"),
    ],
)
def test_bad_option_value_is_a_usage_error_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--server", "127.0.0.1:1", *argv], stdout=io.StringIO())
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--window", "0"), ("--max-lines", "-5")])
def test_bad_translate_file_option_leaves_no_out_behind(option, value, tmp_path, capsys):
    source, target = write_lines(tmp_path / "in.txt", ["a b"]), tmp_path / "out.txt"
    with pytest.raises(SystemExit) as exit_:
        main(["--server", "127.0.0.1:1", "translate-file", str(source), str(target), "-m", "x", option, value])
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err and not target.exists()


def test_library_refuses_out_of_range_values_naming_the_argument(client, models, tmp_path):
    from seqserve.clients import DecodingOptions

    with pytest.raises(ValueError, match="version"):
        client.translate(models["translate"], ["a b"], version=-1)
    with pytest.raises(ValueError, match="beam_size"):
        DecodingOptions(beam_size=-1)
    with pytest.raises(ValueError, match="top_k"):
        client.fill_mask(models["fill_mask"], ["a [MASK]"], top_k=-1)
    with pytest.raises(ValueError, match="timeout"):
        client.list_models(timeout=-1)
    source, target = write_lines(tmp_path / "in.txt", ["a b"]), tmp_path / "out.txt"
    with pytest.raises(ValueError, match="window"):
        translate_file(client, models["translate"], source, target, window=0, progress=False)
    assert not target.exists()


# --------------------------------------------------------------------------------------------------------------
# Small things


def test_tls_server_name_without_tls_is_a_usage_error(capsys):
    assert main(["--server", "127.0.0.1:1", "--tls-server-name", "x", "health"], stdout=io.StringIO()) == 2
    assert "--tls-server-name needs TLS" in capsys.readouterr().err


def test_token_over_plaintext_to_another_host_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="seqserve.clients"):
        Client("localhost:1", token="t").close()
        assert "plaintext" not in caplog.text
        Client("example.invalid:50051", token="t").close()
    assert "over plaintext" in caplog.text


def test_models_list_of_an_unknown_name_exits_one_naming_what_exists(server, client, capsys):
    code, out = run_cli(server, "models", "list", "no-such-model")
    err = capsys.readouterr().err
    assert code == 1 and out == "" and "no-such-model" in err
    assert all(info.name in err for info in client.list_models())


def test_broken_pipe_exits_quietly(server, models):
    command = [sys.executable, "-m", "seqserve.clients.cli", "--server", server.address, "translate", "-m",
               models["translate"], *corpus(64, seed=10)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and err == b""


def test_json_may_come_after_the_command(server, models):
    code, out = run_cli(server, "translate", "-m", models["translate"], "--json", "a c b")
    assert code == 0 and json.loads(out)["source"] == "a c b"


def test_translate_file_has_no_options_that_only_add_server_work(tmp_path, capsys):
    source = write_lines(tmp_path / "in.txt", ["a b"])
    for option in ("--n-best", "--token-scores"):
        with pytest.raises(SystemExit):
            main(["translate-file", str(source), str(tmp_path / "out.txt"), option, *(["3"] if option == "--n-best"
                                                                                      else [])])
        assert option in capsys.readouterr().err


def test_nsp_arguments_mixing_tab_pairs_and_loose_sentences_are_a_usage_error(server, models, capsys):
    assert run_cli(server, "nsp", "-m", models["nsp"], "a b\tc d", "e f", "g h") == (2, "")
    assert "not both" in capsys.readouterr().err


def test_empty_stdin_warns_that_there_was_no_input(server, models, capsys):
    assert run_cli(server, "translate", "-m", models["translate"], stdin="") == (0, "")
    assert "no input" in capsys.readouterr().err
