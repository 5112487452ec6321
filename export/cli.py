"""`seqserve export CHECKPOINT --repository DIR --name NAME [--version N]`: a checkpoint into the model repository."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `seqserve export` and `seqserve export-hf`."""
    from seqserve.export.parity import DEFAULT_TOLERANCE

    parser.add_argument("--repository", "-r", required=True, type=Path, metavar="DIR",
                        help="model repository folder; the version is written to DIR/NAME/VERSION")
    parser.add_argument("--name", "-n", required=True, help="model name in the repository: [a-z0-9][a-z0-9._-]*")
    parser.add_argument("--version", type=int, default=None,
                        help="version number to write; when omitted, one more than the highest existing version")
    parser.add_argument("--force", action="store_true", help="replace the version if it already exists")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="onnxruntime dynamic int8 quantization (per-channel weights), gated on task quality")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip onnxruntime's offline transformer optimizer (BERT and Transformer graphs)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest absolute difference allowed between onnxruntime and PyTorch outputs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: fp16 graphs checked on the GPU (needs a GPU and onnxruntime-gpu)")
    parser.add_argument("--split-mlm", action=argparse.BooleanOptionalAction, default=None,
                        help="BERT with heads: put the masked-LM head in its own mlm.onnx (sequence_output -> "
                             "mlm_logits) so encode and NSP requests do not pay for the B x L x V logits "
                             "(default: on for `seqserve export`, off for `seqserve export-hf`)")
    parser.add_argument("--sample", type=Path, default=None, metavar="FILE",
                        help="BERT int8 gate sample: prose, one document a line; when omitted, a small built-in sample")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while exporting; when omitted, torch's default")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="checkpoint folder written by `seqserve train` or `seqserve import-hf`")
    add_common_arguments(parser)
    parser.add_argument("--dev", type=Path, default=None, metavar="FILE.tsv",
                        help="translators with --quantize int8: source<TAB>reference dev pairs for the BLEU gate")
    parser.add_argument("--dev-limit", type=int, default=200, help="use at most this many dev pairs")


def run_export(args: argparse.Namespace, export: Callable[..., Path], **kwargs: Any) -> int:
    """Common body of both commands: set up, call `export`, turn known failures into a message and exit code 1."""
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    # onnxruntime's quantizer logs every tensor on the root logger at INFO.
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    logging.getLogger("seqserve").setLevel(args.log_level)
    import torch

    from seqserve.export.parity import ParityError
    from seqserve.export.pipeline import ExportError
    from seqserve.export.quantize import QualityGateError
    from seqserve.models.data import DataError, read_documents
    from seqserve.server.repository import RepositoryError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.sample is not None:
            kwargs["sample_documents"] = read_documents(args.sample)
        path = export(
            repository=args.repository, name=args.name, version=args.version, quantize=args.quantize,
            optimize=args.optimize, force=args.force, tolerance=args.tolerance, device=args.device,
            split_mlm=bool(args.split_mlm), **kwargs,
        )  # fmt: skip
    except (ExportError, ParityError, QualityGateError, RepositoryError, DataError) as exc:
        log.error("export failed: %s", exc)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from seqserve.export.pipeline import export_checkpoint
    from seqserve.models.checkpoint import CheckpointError
    from seqserve.models.data import DataError, read_pairs

    kwargs: dict[str, Any] = {"checkpoint_dir": args.checkpoint}
    if args.split_mlm is None:  # a split head ran encode batches 2.5x faster (docs/benchmarks.md, Levers adopted)
        args.split_mlm = True
    try:
        if args.dev is not None:
            kwargs["dev"] = read_pairs(args.dev)[: args.dev_limit]
        return run_export(args, export_checkpoint, **kwargs)
    except (CheckpointError, DataError) as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("export failed: %s", exc)
        return 1
