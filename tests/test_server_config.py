"""Server settings are checked where they are defined: a value outside its range is a ConfigError naming the option,
for library users at construction, and for `seqserve serve` an exit 2 with one line, before anything is loaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from seqserve.cli import build_command_parser, main
from seqserve.server.config import BatchingConfig, ConfigError, Limits, ServerConfig, read_admin_token
from seqserve.server.cli import config_from_args


@pytest.mark.parametrize(
    "option, value, valid",
    [
        ("--port", "99999", "from 0 to 65535"),
        ("--port", "-1", "from 0 to 65535"),
        ("--metrics-port", "65536", "from 0 to 65535"),
        ("--metrics-port", "-2", "no endpoint: -1 on the command line"),
        ("--instances", "-1", "at least 0"),
        ("--threads", "-2", "at least 0"),
        ("--stream-read-ahead", "0", "at least 1"),
        ("--max-message-bytes", "0", "from 1024 to 2147483647"),
        ("--max-message-bytes", str(2**31), "from 1024 to 2147483647"),
        ("--max-texts", "0", "at least 1"),
        ("--max-chars-per-text", "0", "at least 1"),
        ("--max-tokens-per-text", "-1", "at least 0"),
        ("--max-queue", "-1", "at least 1"),
        ("--max-beam-size", "0", "at least 1"),
        ("--max-top-k", "0", "at least 1"),
        ("--grace-period", "-1", "at least 0"),
        ("--grace-period", "inf", "finite"),
        ("--max-batch-tokens", "0", "at least 1"),
        ("--max-batch-size", "0", "at least 1"),
        ("--max-queue-delay-ms", "-1", "at least 0"),
        ("--max-join-ms", "nan", "finite"),
        ("--inline-max-ms", "-0.5", "at least 0"),
    ],
)  # fmt: skip
def test_serve_refuses_an_option_outside_its_range_with_exit_2_and_one_line(
    option: str, value: str, valid: str, capsys: pytest.CaptureFixture[str], restore_logging: None
):
    # The repository does not exist: the option is refused before the repository is even opened.
    assert main(["serve", "--repository", "/no/such/repository", option, value]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    assert f"{option} " in lines[0] and valid in lines[0] and "Traceback" not in err
    assert "/no/such/repository" not in err


def test_a_library_config_outside_its_range_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError) as caught:
        ServerConfig(port=70000)
    assert (caught.value.option, caught.value.value) == ("--port", 70000)
    with pytest.raises(ConfigError, match="--stream-read-ahead 0"):
        ServerConfig(limits=Limits(stream_read_ahead=0))  # every TranslateStream would wait for its deadline
    with pytest.raises(ConfigError, match="--max-batch-size 0"):
        ServerConfig(batching=BatchingConfig(max_batch_size=0))
    with pytest.raises(ConfigError, match="--grace-period"):
        ServerConfig(grace_period_s=math.nan)
    assert ServerConfig(port=0, metrics_port=None).validate().port == 0  # the edges are fine
    assert ServerConfig(port=65535, metrics_port=65535, instances=0, threads=0, grace_period_s=0).port == 65535


def test_a_bad_per_model_batching_override_is_refused_naming_the_setting():
    # REPO/NAME/config.json goes through with_overrides: the model is FAILED with this reason, not served broken.
    with pytest.raises(ConfigError, match="--max-batch-tokens 0"):
        BatchingConfig().with_overrides({"max_batch_tokens": 0})
    assert BatchingConfig().with_overrides({"max_batch_tokens": 8}).max_batch_tokens == 8


def test_flags_that_turn_things_off_do_not_claim_a_default_of_true():
    parser, _ = build_command_parser("serve")
    help_text = " ".join(parser.format_help().split())
    for flag in ("--no-cpu-mem-arena", "--per-session-threads", "--no-admin"):
        described = help_text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert "(default: True)" not in described and "(default: False)" not in described, described
    # And they still parse to what they say.
    default = config_from_args(parser.parse_args(["--repository", "r"]))
    assert (default.cpu_mem_arena, default.shared_threads, default.admin) == (True, True, True)
    off = config_from_args(parser.parse_args(["--repository", "r", "--no-cpu-mem-arena", "--per-session-threads",
                                              "--no-admin"]))  # fmt: skip
    assert (off.cpu_mem_arena, off.shared_threads, off.admin) == (False, False, False)


def test_metrics_port_minus_one_turns_the_endpoint_off():
    parser, _ = build_command_parser("serve")
    assert config_from_args(parser.parse_args(["--repository", "r", "--metrics-port", "-1"])).metrics_port is None


def test_the_admin_token_comes_from_its_file_or_else_the_environment(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n", encoding="utf-8")
    assert read_admin_token(token_file, {"SEQSERVE_ADMIN_TOKEN": "from-env"}) == "s3cret-token"
    assert read_admin_token(None, {"SEQSERVE_ADMIN_TOKEN": " from-env\n"}) == "from-env"
    assert read_admin_token(None, {}) is None
    token_file.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--admin-token-file .* empty"):
        read_admin_token(token_file, {})


def test_an_empty_or_unreadable_admin_token_file_is_exit_2_without_showing_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
):
    empty = tmp_path / "empty"
    empty.write_text("", encoding="utf-8")
    assert main(["serve", "--repository", "/no/such/repository", "--admin-token-file", str(empty)]) == 2
    assert "--admin-token-file" in capsys.readouterr().err
    assert main(["serve", "--repository", "/no/such/repository", "--admin-token-file", str(tmp_path / "nope")]) == 2
    assert "--admin-token-file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"caf\xe9")  # not UTF-8: one line and exit 2, not a traceback
    assert main(["serve", "--repository", "/no/such/repository", "--admin-token-file", str(latin1)]) == 2
    assert "a UTF-8 text file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^\$SEQSERVE_ADMIN_TOKEN") as caught:  # where it came from, not "file"
        read_admin_token(None, {"SEQSERVE_ADMIN_TOKEN": "two words"})
    assert "two words" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        ServerConfig(admin_token="two words")
    assert "two words" not in str(caught.value)
    assert "ok-token" not in repr(ServerConfig(admin_token="ok-token"))  # configs get logged
