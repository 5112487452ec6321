"""`seqserve export-hf DIR --repository REPO --name NAME`: a local Hugging Face BERT directory into the repository."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from seqserve.export.cli import add_common_arguments, run_export

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, metavar="DIR",
                        help="local Hugging Face BERT directory (config.json, weights, tokenizer.json; "
                             "sentence-transformers' pooling config when present)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from seqserve.export.pipeline import export_hf_bert
    from seqserve.models.hf import HFImportError

    try:
        return run_export(args, export_hf_bert, hf_dir=args.hf_dir)
    except HFImportError as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("export failed: %s", exc)
        return 1
