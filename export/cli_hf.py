"""`seqserve export-hf DIR --repository REPO --name NAME`: a local Hugging Face BERT or MarianMT directory into the
repository (MarianMT by config.json's model_type, via export/hf_marian.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from seqserve.export.cli import add_common_arguments, add_dev_arguments, run_export

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, metavar="DIR",
                        help="local Hugging Face BERT directory (config.json, weights, tokenizer.json; "
                             "sentence-transformers' pooling config when present), or a MarianMT (OPUS-MT) directory "
                             "(config.json, weights, source.spm, target.spm, vocab.json)")
    add_common_arguments(parser)
    add_dev_arguments(parser, "MarianMT")


def run(args: argparse.Namespace) -> int:
    from seqserve.export.hf_marian import export_hf

    return run_export(args, export_hf, "export-hf", hf_dir=args.hf_dir)
