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


# Runs `seqserve ARGS` in a process where the named top-level modules cannot be imported, as in a core-only install.
WITHOUT_MODULES = """
import importlib.abc, sys
blocked = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from seqserve.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_without(modules: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_MODULES, modules, *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("command", ["train", "evaluate", "import-hf", "export", "export-hf"])
@pytest.mark.parametrize("args", [["--help"], []], ids=["help", "use"])
def test_training_commands_without_the_train_extra_say_how_to_install_it(command: str, args: list[str]) -> None:
    out = _run_without("torch,sacrebleu,onnx", command, *args)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"seqserve {command}: needs the training/export extra")
    assert "pip install '.[train]'" in lines[0]
    assert "(missing: " in lines[0] and "Traceback" not in out.stderr


def test_train_without_torch_names_torch() -> None:
    out = _run_without("torch", "train", "--help")
    assert out.returncode == 2
    assert out.stderr.strip() == ("seqserve train: needs the training/export extra (torch, onnx, sacrebleu): "
                                  "pip install '.[train]' (missing: torch)")  # fmt: skip


def test_an_installed_but_broken_dependency_keeps_its_own_error() -> None:
    # torch is installed but cannot load (here its native part; elsewhere too old, a library missing): "pip install"
    # would not help, so the real error is shown.
    out = _run_without("torch._C", "train", "--help")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "torch._C" in out.stderr and "pip install '.[train]'" not in out.stderr


def test_a_broken_seqserve_module_keeps_its_traceback() -> None:
    out = _run_without("seqserve.models", "train", "--help")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ModuleNotFoundError" in out.stderr


OFF_BY_DEFAULT_FLAGS = [("serve", "--always-wait", "dispatch_when_idle", ["--repository", "repo"]),
                        ("export", "--no-optimize", "optimize", ["--repository", "repo", "--name", "m", "ckpt"]),
                        ("export-hf", "--no-optimize", "optimize", ["--repository", "repo", "--name", "m", "hf"])]


@pytest.mark.parametrize("command, flag, dest, required", OFF_BY_DEFAULT_FLAGS)
def test_an_off_by_default_flag_shows_no_default_true(command: str, flag: str, dest: str, required: list[str]) -> None:
    parser, _ = build_command_parser(command)
    lines = parser.format_help().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
    entry = " ".join(" ".join(lines[start:end]).split())  # the flag's own help, on one line
    assert entry.startswith(flag) and "default: True" not in entry, entry
    # The parsed values are unchanged: the destination is True without the flag, False with it.
    assert getattr(parser.parse_args(required), dest) is True
    assert getattr(parser.parse_args([*required, flag]), dest) is False
