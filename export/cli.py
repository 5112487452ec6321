"""`seqserve export CHECKPOINT --repository DIR --name NAME [--version N]`: a checkpoint into the model repository.

Options are checked as they are parsed (a bad value is a usage error, exit 2, before any work); the package's typed
errors become one logged line and exit 1 in one place, `run_export`, shared with `seqserve export-hf`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from seqserve.models.arguments import positive_int

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Option values


def _converted(text: str, parse: Callable[[str], Any], what: str, check: Callable[[Any], Any], errors: type) -> Any:
    """argparse's conversion: `parse` the text ("'x' is not WHAT" when it cannot), then `check` the value (its
    `errors` become argparse's, with their own message)."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    try:
        return check(value)
    except errors as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def version_number(text: str) -> int:
    """argparse type: a version the repository and the API can carry (1 .. 2^32-1)."""
    from seqserve.export.writer import check_version
    from seqserve.server.repository import RepositoryError

    return _converted(text, int, "an integer", check_version, RepositoryError)


def tolerance_value(text: str) -> float:
    """argparse type: a finite tolerance above 0 and within export.parity.MAX_TOLERANCE."""
    from seqserve.export.pipeline import ExportError, check_tolerance

    return _converted(text, float, "a number", check_tolerance, ExportError)


def dev_limit(text: str) -> int:
    """argparse type: a dev sample size the BLEU gate accepts (at least quantize.MIN_DEV_SENTENCES)."""
    from seqserve.export.quantize import MIN_DEV_SENTENCES

    value = positive_int(text)
    if value < MIN_DEV_SENTENCES:
        raise argparse.ArgumentTypeError(
            f"the int8 BLEU gate needs at least {MIN_DEV_SENTENCES} dev pairs (fewer make one sentence worth several "
            f"BLEU points), got {value}"
        )
    return value


def repository_folder(text: str) -> Path:
    """argparse type: a folder, or a path where one can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a folder")
    return path


# --------------------------------------------------------------------------------------------------------------
# Arguments


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `seqserve export` and `seqserve export-hf`."""
    from seqserve.export.parity import DEFAULT_TOLERANCE
    from seqserve.export.pipeline import MAX_TOLERANCE

    parser.add_argument("--repository", "-r", required=True, type=repository_folder, metavar="DIR",
                        help="model repository folder; the version is written to DIR/NAME/VERSION")
    parser.add_argument("--name", "-n", required=True, help="model name in the repository: [a-z0-9][a-z0-9._-]*")
    parser.add_argument("--version", type=version_number, default=None,
                        help="version number to write, 1 to 4294967295 (the API's uint32); when omitted, one more "
                             "than the highest existing version")
    parser.add_argument("--force", action="store_true",
                        help="replace the version if it already exists (a server that has it loaded keeps serving "
                             "the old files until it unloads and loads it again)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="onnxruntime dynamic int8 quantization (per-channel weights), gated on task quality "
                             "(docs/training.md, int8 gates)")
    parser.set_defaults(optimize=True)  # SUPPRESS below: the help must not read "(default: True)"
    parser.add_argument("--no-optimize", dest="optimize", action="store_false", default=argparse.SUPPRESS,
                        help="skip onnxruntime's offline transformer optimizer (BERT and Transformer graphs)")
    parser.add_argument("--tolerance", type=tolerance_value, default=DEFAULT_TOLERANCE,
                        help=f"largest absolute difference allowed between onnxruntime and PyTorch outputs, above 0 "
                             f"and at most {MAX_TOLERANCE:g}; greedy tokens must agree whatever its value")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: fp16 graphs checked on the GPU (needs a GPU and onnxruntime-gpu)")
    parser.add_argument("--split-mlm", action=argparse.BooleanOptionalAction, default=None,
                        help="BERT with heads: put the masked-LM head in its own mlm.onnx (sequence_output -> "
                             "mlm_logits) so encode and NSP requests do not pay for the B x L x V logits "
                             "(default: on for `seqserve export`, off for `seqserve export-hf`)")
    parser.add_argument("--sample", type=Path, default=None, metavar="FILE",
                        help="BERT with --quantize int8: prose for the int8 gates, one document a line; when omitted, "
                             "a small built-in sample")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads while exporting; when omitted, torch's default")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level")


def add_dev_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    from seqserve.export.quantize import MIN_DEV_SENTENCES

    parser.add_argument("--dev", type=Path, default=None, metavar="FILE.tsv",
                        help=f"{who} with --quantize int8: source<TAB>reference dev pairs for the BLEU gate (at least "
                             f"{MIN_DEV_SENTENCES})")
    parser.add_argument("--dev-limit", type=dev_limit, default=200,
                        help=f"use at most this many dev pairs (at least {MIN_DEV_SENTENCES})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="checkpoint folder written by `seqserve train` or `seqserve import-hf`")
    add_common_arguments(parser)
    add_dev_arguments(parser, "translators")


# --------------------------------------------------------------------------------------------------------------
# Running


def export_errors() -> tuple[type[BaseException], ...]:
    """The errors an export ends with that are the user's to fix: each becomes one line and exit code 1."""
    from seqserve.export.parity import ParityError
    from seqserve.export.pipeline import ExportError
    from seqserve.export.quantize import QualityGateError
    from seqserve.models.checkpoint import CheckpointError
    from seqserve.models.data import DataError
    from seqserve.models.hf import HFImportError
    from seqserve.server.repository import RepositoryError

    return (ExportError, ParityError, QualityGateError, RepositoryError, DataError, CheckpointError, HFImportError,
            OSError)  # fmt: skip


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options (each value was checked on its own by argparse), or None."""
    if args.quantize is None:
        unused = [flag for flag, value in (("--dev", args.dev), ("--sample", args.sample)) if value is not None]
        if unused:
            verb = "feeds" if len(unused) == 1 else "feed"
            return f"{' and '.join(unused)} {verb} only the int8 quality gates: add --quantize int8, or leave them out"
    return None


def run_export(args: argparse.Namespace, export: Callable[..., Path], command: str, **kwargs: Any) -> int:
    """Common body of both commands: check, set up, call `export`; known failures become one line (exit 1)."""
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # onnxruntime's quantizer logs every tensor on the root logger at INFO.
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    logging.getLogger("seqserve").setLevel(args.log_level)
    problem = usage_problem(args)
    if problem:
        sys.stderr.write(f"seqserve {command}: error: {problem}\n")
        return 2
    import torch

    from seqserve.models.data import read_documents, read_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.sample is not None:
            kwargs["sample_documents"] = read_documents(args.sample)
        if args.dev is not None:
            kwargs["dev"] = read_pairs(args.dev)[: args.dev_limit]
        path = export(
            repository=args.repository, name=args.name, version=args.version, quantize=args.quantize,
            optimize=args.optimize, force=args.force, tolerance=args.tolerance, device=args.device,
            split_mlm=bool(args.split_mlm), **kwargs,
        )  # fmt: skip
    except export_errors() as exc:
        log.debug("export failed", exc_info=True)
        log.error("export failed: %s", exc)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from seqserve.export.pipeline import export_checkpoint

    if args.split_mlm is None:  # a split head ran encode batches 2.5x faster (docs/benchmarks.md, Levers adopted)
        args.split_mlm = True
    return run_export(args, export_checkpoint, "export", checkpoint_dir=args.checkpoint)
