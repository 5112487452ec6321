"""The `seqserve` command: one entry point, a subcommand per job.

Each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen subcommand's
module is imported, so `seqserve serve` never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import sys
from typing import Iterator, Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("seqserve.models.data_cli",
             "rebuild the corpora from their registry sources, or validate TSV/prose files"),
    "train": ("seqserve.models.train_cli", "train a translator (lstm, gru, birnn-*, transformer) or a BERT"),
    "evaluate": ("seqserve.models.evaluate", "BLEU/chrF of a translator, MLM/NSP accuracy of a BERT"),
    "import-hf": ("seqserve.models.hf",
                  "turn a local Hugging Face BERT or MarianMT directory into a seqserve checkpoint"),
    "export": ("seqserve.export.cli", "export a checkpoint to ONNX into the model repository"),
    "export-hf": ("seqserve.export.cli_hf",
                  "export a local Hugging Face BERT or MarianMT directory into the model repository"),
    "build-default": ("seqserve.export.default_repo", "build the default model repository (data, training, export)"),
    "serve": ("seqserve.server.cli", "serve a model repository over gRPC"),
    "batch": ("seqserve.server.batch", "batch translation of a file in-process, locally or on Ray Data"),
}

# Top-level modules of the [train] extra (training and export); a core-only install (`pip install .`, the Docker
# runtime image) lacks them.
TRAIN_EXTRA_MODULES = frozenset(
    {"torch", "onnx", "onnxscript", "sacrebleu", "safetensors", "transformers", "sentencepiece"}
)


class MissingExtra(Exception):
    """A subcommand's module needs a dependency of the [train] extra that is not installed."""

    def __init__(self, command: str, module: str) -> None:
        self.command, self.module = command, module
        super().__init__(
            f"seqserve {command}: needs the training/export extra (torch, onnx, sacrebleu): "
            f"pip install '.[train]' (missing: {module})"
        )


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve",
        description="Train, export and serve sequence models. `seqserve COMMAND --help` explains each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="the job to run (listed below)")
    parser.add_argument("--version", action="version", version=_version())
    return parser


def _version() -> str:
    from seqserve import __version__

    return f"seqserve {__version__}"


@contextlib.contextmanager
def _train_extra_of(command: str) -> Iterator[None]:
    """Turn the ImportError of a missing [train] dependency into MissingExtra; any other ImportError stays itself."""
    try:
        yield
    except ImportError as exc:
        # Only a missing optional dependency is the user's to install; a broken seqserve module keeps its traceback.
        missing = (exc.name or "").partition(".")[0]
        if missing not in TRAIN_EXTRA_MODULES or _installed(missing):
            raise  # installed but broken (too old, a native library missing): its own message says what
        raise MissingExtra(command, missing) from exc


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
    except (ImportError, ValueError):
        return True


def build_command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The full parser of one subcommand and the module that runs it (MissingExtra where it needs the [train] extra)."""
    module_name, text = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"seqserve {name}", description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # Some modules import their dependencies in add_arguments or run rather than at the top.
    with _train_extra_of(name):
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    try:
        parser, module = build_command_parser(argv[0])
        args = parser.parse_args(argv[1:])
        # A default for every command; a command with its own logging options reconfigures with force=True.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with _train_extra_of(argv[0]):
            return int(module.run(args) or 0)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
