"""`python -m benchmarks`: every benchmark, one after another, each writing its JSON beside the others.

    python -m benchmarks --threads 2 --out benchmarks/results [--fresh]

Models are built and exported into --work once and reused; after changing the export, pass --fresh so the
repositories are exported again (the trained and converted models they come from are kept).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from benchmarks.common import DEFAULT_WORK, clear_exports

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
    parser.add_argument("--fresh", action="store_true",
                        help="export the model repositories in --work again first (after a change to the export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fresh:
        for path in clear_exports(args.work):
            log.info("removed %s: exported again by this run", path)
    if args.quick:
        args.sizes = ["tiny"]
    common = ["--threads", str(args.threads), "--work", str(args.work)] + (["--quick"] if args.quick else [])
    runs = [("encode", [*common, "--json", str(args.out / "encode.json")])]
    for size in args.sizes:
        timing = ["--repeats", "3", "--warmup", "1"]
        runs.append(("translate_transformer", [*common, "--size", size, *timing, "--json",
                                               str(args.out / f"translate_{size}.json")]))  # fmt: skip
    runs.append(("translate_rnn", [*common, "--json", str(args.out / "translate_rnn.json")]))
    extra = ["--repository", str(args.repository)] if args.repository else []
    runs.append(("load", [*common, *extra, "--json", str(args.out / "load.json")]))
    status = 0
    for module, arguments in runs:
        # Each in its own process, as a server runs: onnxruntime's shared thread pool is made once per process.
        log.info("python -m benchmarks.%s %s", module, " ".join(arguments))
        status |= subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *arguments]).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
