"""Command line of ``seqserve data``: build the corpora (models/corpora.py) or validate files (models/data.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import IO, Sequence

from seqserve.models.corpora import (
    DEFAULT_SEED,
    DEFAULT_SHARED,
    DEV_FILE,
    DEV_SIZE,
    SHARED_ENV,
    BuildError,
    prepare_corpora,
)
from seqserve.models.data import DataError, validate_file

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "`seqserve data` (or `seqserve data build`) writes the LibreOffice en-de and State of the Union corpora to "
        "--output, copying prepared copies when present or rebuilding them from apt/npm. "
        "`seqserve data validate FILE...` checks TSV pairs (.tsv, .tsv.gz) and prose files and reports each bad line."
    )
    parser.add_argument("action", nargs="?", choices=("build", "validate"), default="build",
                        help="build the corpora, or validate the FILEs given after it")
    parser.add_argument("files", nargs="*", metavar="FILE", help="files to validate (with the validate action)")
    parser.add_argument("--validate", nargs="+", metavar="FILE", default=None,
                        help="validate these files (same as the validate action)")
    parser.add_argument("--kind", choices=("auto", "pairs", "prose"), default="auto",
                        help="how to read validated files: auto means .tsv/.tsv.gz are pairs, anything else prose")
    parser.add_argument("--max-problems", type=int, default=20, metavar="N",
                        help="problems to print per file when validating (all are counted)")
    parser.add_argument("--output", type=Path, default=Path("data"), metavar="DIR",
                        help="folder the corpora are written to")
    parser.add_argument("--rebuild", action="store_true",
                        help="always rebuild from apt/npm, even when prepared copies exist")
    parser.add_argument("--from-shared", type=Path, default=None, metavar="DIR",
                        help=f"copy the prepared corpora from DIR; when not given, ${SHARED_ENV} or {DEFAULT_SHARED} "
                        "is used if it holds them (and --rebuild is not given)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the dev split and train shuffle")
    parser.add_argument("--dev-size", type=int, default=DEV_SIZE, metavar="N",
                        help="held-apart dev pairs (of 4-40 English words)")
    parser.add_argument("--hold-out", nargs="+", type=Path, default=None, metavar="FILE",
                        help="TSV files whose English the rebuilt train and dev must not contain; when not given, "
                        f"the prepared {DEV_FILE} if one is found (results are reported on it)")
    parser.add_argument("--no-hold-out", action="store_true", help="hold nothing out of the rebuilt corpora")
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="keep downloads and unpacked packages in DIR; when not given, a temporary folder is "
                        "used and deleted")


def _validate(files: Sequence[str], kind: str, max_problems: int, out: IO[str]) -> int:
    status = 0
    for name in files:
        report = validate_file(name, kind)
        noun = "pairs" if report.kind == "pairs" else "documents"
        if report.ok:
            out.write(f"{name}: OK, {report.records} {noun}\n")
            continue
        status = 1
        out.write(f"{name}: {len(report.problems)} problem(s), {report.records} good {noun}\n")
        for problem in report.problems[:max_problems]:
            out.write(f"  {problem}\n")
        if len(report.problems) > max_problems:
            out.write(f"  ... and {len(report.problems) - max_problems} more\n")
    return status


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.validate is not None or args.action == "validate":
        files = list(args.files) + list(args.validate or [])
        if not files:
            sys.stderr.write("seqserve data validate: give at least one FILE\n")
            return 2
        return _validate(files, args.kind, args.max_problems, sys.stdout)
    if args.files:
        sys.stderr.write(f"seqserve data: FILE arguments need the validate action (got {' '.join(args.files)})\n")
        return 2
    try:
        hold_out = [] if args.no_hold_out else args.hold_out
        corpora = prepare_corpora(
            args.output, args.rebuild, args.from_shared, args.seed, args.dev_size, args.workdir, hold_out
        )
    except (BuildError, DataError) as exc:
        logger.error("%s", exc)
        return 1
    sys.stdout.write(f"corpora in {args.output} ({corpora.origin}): {corpora.train.name}, {corpora.dev.name}, "
                     f"{corpora.prose.name}\n")
    return 0
