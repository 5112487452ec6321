"""The `seqserve` command: every subcommand parses, and every option of every subcommand explains itself."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from seqserve.cli import COMMANDS, build_command_parser, main


def _options_without_help(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    missing = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _options_without_help(sub, f"{prefix} {name}")
            continue
        if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
            missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_subcommand_has_help(command: str) -> None:
    parser, module = build_command_parser(command)
    assert callable(module.run)
    assert _options_without_help(parser, f"seqserve {command}") == []


def test_top_level_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "seqserve.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_serve_help_imports_no_torch() -> None:
    code = "import sys; from seqserve.cli import build_command_parser; build_command_parser('serve'); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_device_id_reaches_the_server_config_and_the_batch_job() -> None:
    from seqserve.server.batch import job_from_args
    from seqserve.server.cli import config_from_args

    parser, _ = build_command_parser("serve")
    args = parser.parse_args(["--repository", "repo", "--device", "cuda", "--device-id", "1"])
    config = config_from_args(args)
    assert (config.device, config.device_id) == ("cuda", 1)
    assert config_from_args(parser.parse_args(["--repository", "repo"])).device_id == 0
    parser, _ = build_command_parser("batch")
    args = parser.parse_args(["translate", "in.txt", "out.txt", "--repository", "repo", "--model", "m",
                              "--device", "cuda", "--device-id", "2"])  # fmt: skip
    assert job_from_args(args).device_id == 2
