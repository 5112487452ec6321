"""`seqserve export-hf DIR --repository REPO --name NAME`: a local Hugging Face BERT or MarianMT directory into the
repository (MarianMT by config.json's model_type, via export/hf_marian.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from seqserve.export.cli import add_common_arguments, run_export

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, metavar="DIR",
                        help="local Hugging Face BERT directory (config.json, weights, tokenizer.json; "
                             "sentence-transformers' pooling config when present), or a MarianMT (OPUS-MT) directory "
                             "(config.json, weights, source.spm, target.spm, vocab.json)")
    add_common_arguments(parser)
    parser.add_argument("--dev", type=Path, default=None, metavar="FILE.tsv",
                        help="MarianMT with --quantize int8: source<TAB>reference dev pairs for the BLEU gate")
    parser.add_argument("--dev-limit", type=int, default=200, help="use at most this many dev pairs")


def run(args: argparse.Namespace) -> int:
    from seqserve.export.hf_marian import export_hf
    from seqserve.models.data import DataError, read_pairs
    from seqserve.models.hf import HFImportError

    kwargs = {"hf_dir": args.hf_dir}
    try:
        if args.dev is not None:
            kwargs["dev"] = read_pairs(args.dev)[: args.dev_limit]
        return run_export(args, export_hf, **kwargs)
    except (HFImportError, DataError) as exc:
        logging.basicConfig(level=logging.INFO)
        log.error("export failed: %s", exc)
        return 1
