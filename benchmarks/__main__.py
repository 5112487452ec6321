"""`python -m benchmarks`: every benchmark, one after another, each writing its JSON beside the others.

    python -m benchmarks --threads 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks import encode, load, translate_rnn, translate_transformer
from benchmarks.common import DEFAULT_WORK

log = logging.getLogger("benchmarks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender (the cores)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON results")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for built and exported models")
    parser.add_argument("--sizes", nargs="+", default=["base", "small"], help="MarianMT sizes to translate with")
    parser.add_argument("--repository", type=Path, default=None,
                        help="repository whose time to ready and memory the load benchmark measures (e.g. seqserve "
                             "build-default's); default: every model the benchmarks exported")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts, measures nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = ["tiny"]
    common = ["--threads", str(args.threads), "--work", str(args.work)] + (["--quick"] if args.quick else [])
    status = encode.main([*common, "--json", str(args.out / "encode.json")])
    for size in args.sizes:
        out = str(args.out / f"translate_{size}.json")
        timing = ["--repeats", "3", "--warmup", "1"]
        status |= translate_transformer.main([*common, "--size", size, *timing, "--json", out])
    status |= translate_rnn.main([*common, "--json", str(args.out / "translate_rnn.json")])
    extra = ["--repository", str(args.repository)] if args.repository else []
    status |= load.main([*common, *extra, "--json", str(args.out / "load.json")])
    return status


if __name__ == "__main__":
    sys.exit(main())
