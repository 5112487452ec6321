"""`seqserve-client`: call a seqserve server from a terminal or a script.

    seqserve-client [--server HOST:PORT] [--timeout S] [--json] COMMAND ...

Commands: encode, translate, nsp, fill-mask (texts from arguments, --input FILE, or stdin; one result per line,
or JSON lines with --json), models [list|load|unload], health (exit 0 when SERVING), translate-file IN OUT.
Exit codes: 0 done, 1 the server refused or failed (the status code and message go to stderr), 2 bad usage,
141 the output was closed early (`| head`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import grpc

from seqserve.clients import output
from seqserve.clients.channel import DEFAULT_TARGET, ConnectionConfig, RetryPolicy, TLSConfig
from seqserve.clients.client import Client
from seqserve.clients.errors import SeqServeError
from seqserve.clients.translate_file import (
    ON_ERROR,
    InputNotUTF8,
    OutputNotAPrefix,
    TranslateFileReport,
    translate_file,
)
from seqserve.clients.types import DecodingOptions

log = logging.getLogger("seqserve.clients.cli")

# command -> the capability a model needs for it (ModelStatus.capabilities), used when --model is left out
CAPABILITIES = {"encode": "encode", "translate": "translate", "translate-file": "translate", "nsp": "nsp",
                "fill-mask": "fill_mask"}


class UsageError(Exception):
    """A command line that cannot run (exit code 2)."""


# --------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve-client",
        description="Call a seqserve gRPC server: encode, translate, score sentence pairs, fill masks, manage models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server", default=os.environ.get("SEQSERVE_SERVER", DEFAULT_TARGET),
                        help="HOST:PORT of the server (environment: SEQSERVE_SERVER)")
    parser.add_argument("--timeout", type=number(0.0), default=30.0,
                        help="deadline of each call in seconds, over all its retries; 0: none (translate-file's "
                        "stream never has one)")
    parser.add_argument("--retries", type=whole(0), default=0,
                        help="most attempts per call while the server is UNAVAILABLE (1: no retry; 0: as many as "
                        "--timeout allows, or 5 without a timeout); translate-file: per reconnect or line retried")
    parser.add_argument("--json", action="store_true", help="write one JSON object per line instead of plain text")
    parser.add_argument("--token", help="bearer token sent as 'authorization' metadata (default: $SEQSERVE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--tls-ca", type=Path, help="PEM file of the CA to trust (implies --tls)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate chain for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of the client certificate")
    parser.add_argument("--tls-server-name", help="expect this name in the server certificate instead of HOST")
    parser.add_argument("--max-message-mb", type=number(0.0, above=True),
                        help="send and receive message size limit in MiB (default 8, the server's default)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log retries and progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encode = _command(commands, "encode", "texts (or TAB-separated pairs) to vectors, one line each")
    _inference_arguments(encode)
    encode.add_argument("--pairs", action="store_true", help="each input is 'A<TAB>B', encoded as one pair")
    encode.add_argument("--pooling", choices=["model", "cls", "mean"], default="model",
                        help="sentence pooling ('model': the model's own)")
    encode.add_argument("--normalize", action="store_true", help="L2-normalise each vector")

    translate = _command(commands, "translate", "texts to translations, one line each")
    _inference_arguments(translate)
    _decoding_arguments(translate)

    nsp = _command(commands, "nsp", "probability that sentence B follows sentence A")
    _inference_arguments(nsp, texts_help="pairs: 'A<TAB>B' arguments, or A B A B ...; files and stdin: 'A<TAB>B' lines")

    fill = _command(commands, "fill-mask", "the most likely tokens for each [MASK] in each text")
    _inference_arguments(fill)
    fill.add_argument("--top-k", type=whole(1), default=5, help="candidates per mask")

    models = _command(commands, "models", "list models, or load / unload a model version")
    models.add_argument("action", nargs="?", choices=["list", "load", "unload"], default="list", help="what to do")
    models.add_argument("name", nargs="?", default="", help="model name (list: optional filter)")
    models.add_argument("--version", type=whole(0), default=0, help="model version (0: the highest)")

    health = _command(commands, "health", "grpc.health.v1 check; exit code 0 when SERVING")
    health.add_argument("model", nargs="?", default="", help="a model's name to check (default: the whole server)")
    health.add_argument("--service", help="check this exact health service name instead")

    job = _command(commands, "translate-file", "translate a large file line by line (resumable, order kept)")
    job.add_argument("source", type=Path, metavar="IN", help="input text file, one sentence per line (UTF-8)")
    job.add_argument("target", type=Path, metavar="OUT",
                     help="output file; as many input lines as it already holds are skipped (resume)")
    job.add_argument("--model", "-m", help="model name (default: the only ready model that translates)")
    job.add_argument("--version", type=whole(0), default=0, help="model version (0: the highest ready)")
    job.add_argument("--truncate", action="store_true", help="cut lines over the model's limit instead of failing them")
    job.add_argument("--window", type=whole(1), default=16, help="lines in flight at once (bounded concurrency)")
    job.add_argument("--on-error", choices=ON_ERROR, default="stop",
                     help="a failed line stops the job (rerun to resume) or becomes an empty line")
    job.add_argument("--max-lines", type=whole(1),
                     help="translate at most this many new lines, then stop (resume later)")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")
    _decoding_arguments(job, hypotheses=False)
    return parser


def whole(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def number(low: float | None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least ``low`` (more than it, with ``above``; None: any)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {low:g}, got {value:g}")
        return value

    return parse


def _command(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = commands.add_parser(name, help=text, description=text, formatter_class=formatter)
    # also after the command (`translate --json ...`); SUPPRESS keeps a --json given before it
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="write one JSON object per line (as --json before the command)")
    return parser


def _inference_arguments(parser: argparse.ArgumentParser, texts_help: str = "texts (else --input or stdin)") -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help=texts_help)
    parser.add_argument("--model", "-m", help="model name (default: the only ready model that can do this)")
    parser.add_argument("--version", type=whole(0), default=0, help="model version (0: the highest ready)")
    parser.add_argument("--input", "-i",
                        help="read inputs from this file, one per line ('-': stdin); blank lines are skipped")
    parser.add_argument("--truncate", action="store_true", help="cut texts over the model's limit instead of failing")
    parser.add_argument("--batch-size", type=whole(1), default=32, help="inputs per request")


def _decoding_arguments(parser: argparse.ArgumentParser, hypotheses: bool = True) -> None:
    """Search options; ``hypotheses=False`` (translate-file, which writes only the best text) leaves out --n-best and
    --token-scores, which would only add server work."""
    parser.add_argument("--beam", type=whole(1), default=1, help="beam size (1: greedy)")
    if hypotheses:
        parser.add_argument("--n-best", type=whole(1), default=1, help="hypotheses per text (at most --beam)")
    parser.add_argument("--length-penalty", type=number(None), default=0.0, help="alpha of ((5 + len) / 6) ** alpha")
    parser.add_argument("--max-tokens", type=whole(0), default=0, help="maximum output tokens (0: the model's limit)")
    parser.add_argument("--max-ratio", type=number(0.0), default=0.0, help="at most ratio * source tokens + 5 (0: off)")
    if hypotheses:
        parser.add_argument("--token-scores", action="store_true", help="return per-token log-probabilities (JSON)")


def connection_config(args: argparse.Namespace) -> ConnectionConfig:
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    elif args.tls_server_name:
        raise UsageError("--tls-server-name needs TLS (--tls or --tls-ca); without it the channel is plaintext")
    return ConnectionConfig(
        target=args.server,
        timeout_s=args.timeout if args.timeout > 0 else None,
        retry=RetryPolicy(attempts=args.retries or None),
        tls=tls,
        token=args.token or os.environ.get("SEQSERVE_TOKEN") or None,
        max_message_bytes=None if args.max_message_mb is None else int(args.max_message_mb * 2**20),
    )


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    return DecodingOptions(
        beam_size=args.beam, n_best=getattr(args, "n_best", 1), length_penalty=args.length_penalty,
        max_output_tokens=args.max_tokens, max_output_ratio=args.max_ratio,
        return_token_scores=getattr(args, "token_scores", False),
    )


# --------------------------------------------------------------------------------------------------------------
# Commands


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run one command; the exit code. ``stdin``/``stdout`` default to the process's (tests pass their own)."""
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="seqserve-client: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CLIWords())
    try:
        with Client(config=connection_config(args)) as client:
            return COMMANDS[args.command](client, args, stdin, stdout)
    except SeqServeError as error:
        sys.stderr.write(f"seqserve-client: error: {_cli_message(str(error))}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("seqserve-client: interrupted (translate-file: rerun the same command to resume)\n")
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours, and nothing left to say
        if stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # what a shell reports for a process ended by SIGPIPE
    except (UsageError, OutputNotAPrefix, OSError, ValueError) as error:
        sys.stderr.write(f"seqserve-client: {error}\n")
        return 2


def run_encode(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = args.model or pick_model(client, "encode")
    texts, places = read_inputs(args, stdin)
    for batch, where in _batches(texts, places, args.batch_size):
        with _naming_inputs(where):
            if args.pairs:
                pairs = [_split_pair(line, place) for line, place in zip(batch, where)]
                vectors = client.encode(model, pairs=pairs, version=args.version, pooling=args.pooling,
                                        normalize=args.normalize, truncate=args.truncate)
            else:
                vectors = client.encode(model, batch, version=args.version, pooling=args.pooling,
                                        normalize=args.normalize, truncate=args.truncate)
        output.embeddings(stdout, batch, vectors, args.json)
    return 0


def run_translate(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = args.model or pick_model(client, "translate")
    options = decoding_options(args)
    for batch, where in _batches(*read_inputs(args, stdin), args.batch_size):
        with _naming_inputs(where):
            results = client.translate(model, batch, options, version=args.version, truncate=args.truncate)
        output.translations(stdout, batch, results, args.json)
    return 0


def run_nsp(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = args.model or pick_model(client, "nsp")
    tabs = sum("\t" in text for text in args.texts)
    if 0 < tabs < len(args.texts):
        raise UsageError("nsp takes either 'A<TAB>B' arguments or sentences in pairs (A B ...), not both: "
                         f"{tabs} of {len(args.texts)} arguments hold a TAB")
    if args.texts and not tabs:
        if len(args.texts) % 2:
            raise UsageError(f"nsp takes sentences in pairs (A B ...) or 'A<TAB>B' arguments; got {len(args.texts)}")
        pairs = list(zip(args.texts[0::2], args.texts[1::2]))
        places = [f"arguments {i} and {i + 1}" for i in range(1, len(args.texts), 2)]
    else:
        lines, places = read_inputs(args, stdin)
        pairs = [_split_pair(line, place) for line, place in zip(lines, places)]
    for batch, where in _batches(pairs, places, args.batch_size):
        with _naming_inputs(where):
            scores = client.score_next_sentence(model, batch, version=args.version, truncate=args.truncate)
        output.next_sentence(stdout, batch, scores, args.json)
    return 0


def run_fill_mask(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = args.model or pick_model(client, "fill_mask")
    for batch, where in _batches(*read_inputs(args, stdin), args.batch_size):
        with _naming_inputs(where):
            results = client.fill_mask(model, batch, top_k=args.top_k, version=args.version, truncate=args.truncate)
        output.fill_mask(stdout, batch, results, args.json)
    return 0


def run_models(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    if args.action == "list":
        listed = client.list_models(args.name)
        if args.name and not listed:
            names = sorted({info.name for info in client.list_models()})
            raise SeqServeError(grpc.StatusCode.NOT_FOUND,
                                f"no model named {args.name!r} on the server (it has: {', '.join(names) or 'none'})")
        output.models(stdout, listed, args.json)
        return 0
    if not args.name:
        raise UsageError(f"models {args.action} needs a model NAME")
    change = client.load_model if args.action == "load" else client.unload_model
    output.models(stdout, [change(args.name, args.version)], args.json)
    return 0


def run_health(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    service = args.service if args.service is not None else args.model
    # An unreachable server or an unknown service raises: main puts its code and message on stderr, exit 1, as for
    # every command. A status (SERVING, NOT_SERVING, ...) is the answer, on stdout.
    status = client.health(service)
    if args.json:
        output.json_line(stdout, {"service": service, "status": status})
    else:
        stdout.write(status + "\n")
    return 0 if status == "SERVING" else 1


def run_translate_file(client: Client, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    model = args.model or pick_model(client, "translate")
    try:
        report = translate_file(
            client, model, args.source, args.target, decoding_options(args), version=args.version,
            truncate=args.truncate, window=args.window, on_error=args.on_error, max_lines=args.max_lines,
            progress=not args.no_progress,
        )
    except InputNotUTF8 as error:
        _translate_file_summary(args, error.report, stdout, str(error))
        raise UsageError(f"{error}; {args.target} holds the {error.report.done} lines before it: fix that line "
                         "(or convert IN to UTF-8), then rerun to resume") from None
    _translate_file_summary(args, report, stdout, None if report.stopped_by is None else str(report.stopped_by))
    if report.stopped_by is None:
        return 0
    if report.line_failed:
        message = _cli_message(str(report.stopped_by))
        if "--truncate" in message:  # the server's own advice, in the CLI's words
            fix = "then rerun to resume"
        elif "max_chars_per_text" in message:  # --truncate cuts tokens: a line over the character limit stays refused
            fix = "fix that line, then rerun to resume"
        else:
            fix = "fix that line or use --truncate, then rerun to resume"
        advice = f"{message}; {fix} (--on-error empty writes an empty line for it instead)"
    else:
        advice = f"{report.stopped_by}; rerun the same command to resume"
    sys.stderr.write(
        f"seqserve-client: error: line {report.stopped_at_line}: {advice}\n"
        f"seqserve-client: {args.target} holds the first {report.done} lines of {report.total_lines}\n"
    )
    return 1


def _translate_file_summary(args: argparse.Namespace, report: TranslateFileReport, stdout: TextIO,
                            error: str | None) -> None:
    """The summary of a run, whether it finished or stopped: to stderr, or as one JSON line with --json."""
    rate = report.written / report.elapsed_s if report.elapsed_s > 0 else 0.0
    if args.json:
        output.json_line(stdout, {
            "lines": report.total_lines, "resumed_from": report.resumed_from, "written": report.written,
            "done": report.done, "complete": report.complete, "failed_lines": report.failed_lines,
            "stopped_at_line": report.stopped_at_line, "error": error, "reconnects": report.reconnects,
            "retried_lines": report.retried_lines, "elapsed_s": round(report.elapsed_s, 3),
            "lines_per_s": round(rate, 2),
        })
        return
    failed = report.failed_lines
    listed = "" if not failed else f": {', '.join(map(str, failed[:20]))}{' ...' if len(failed) > 20 else ''}"
    sys.stderr.write(
        f"seqserve-client: {args.target}: {report.done} of {report.total_lines} lines ({report.written} this run in "
        f"{report.elapsed_s:.1f} s, {rate:.1f} lines/s; {len(failed)} failed and left empty{listed}; "
        f"{report.reconnects} reconnects, {report.retried_lines} lines retried)\n"
    )


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, TextIO, TextIO], int]] = {
    "encode": run_encode,
    "translate": run_translate,
    "nsp": run_nsp,
    "fill-mask": run_fill_mask,
    "models": run_models,
    "health": run_health,
    "translate-file": run_translate_file,
}


# --------------------------------------------------------------------------------------------------------------
# Helpers


class _CLIWords(logging.Filter):
    """Log lines (translate-file's per-line warnings) in the CLI's words, as the error lines are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("seqserve.clients"):
            record.msg, record.args = _cli_message(record.getMessage()), None
        return True


def _cli_message(message: str) -> str:
    """A server message in the CLI's words: the proto's truncation enum becomes the --truncate option."""
    return message.replace("ask for truncation (TRUNCATION_TRUNCATE)", "use --truncate")


def pick_model(client: Client, capability: str) -> str:
    """The one ready model with this capability, for commands run without --model."""
    ready = sorted({m.name for m in client.list_models() if m.state == "READY" and capability in m.capabilities})
    if len(ready) == 1:
        return ready[0]
    if not ready:
        raise UsageError(f"no ready model on the server can do {capability!r}; see `seqserve-client models`")
    raise UsageError(f"several ready models can do {capability!r} ({', '.join(ready)}): choose one with --model")


def read_inputs(args: argparse.Namespace, stdin: TextIO) -> tuple[list[str], list[str]]:
    """The texts from the arguments, else --input FILE ('-': stdin), else stdin when it is not a terminal; and where
    each came from ("argument 2", "line 40": blank lines are skipped but counted), for error messages."""
    if args.texts:
        return list(args.texts), [f"argument {i}" for i in range(1, len(args.texts) + 1)]
    if args.input and args.input != "-":
        with open(args.input, encoding="utf-8") as handle:
            return _non_blank(handle)
    if args.input == "-" or not stdin.isatty():
        texts, places = _non_blank(stdin)
        if not texts:  # cron or `docker run` without -t: say why nothing was printed
            sys.stderr.write(
                "seqserve-client: no input: stdin held no text (give texts as arguments or --input FILE)\n"
            )
        return texts, places
    raise UsageError("no input: give texts as arguments, --input FILE, or pipe them on stdin")


def _non_blank(lines: Iterator[str] | TextIO) -> tuple[list[str], list[str]]:
    numbered = [(line.rstrip("\r\n"), f"line {number}") for number, line in enumerate(lines, 1) if line.strip()]
    return [text for text, _ in numbered], [where for _, where in numbered]


def _split_pair(line: str, where: str = "") -> tuple[str, str]:
    first, tab, second = line.partition("\t")
    if not tab:
        raise UsageError(f"{where + ': ' if where else ''}expected 'A<TAB>B', got {line!r}")
    return first, second


def _batches(items: list, places: list[str], size: int) -> Iterator[tuple[list, list[str]]]:
    if size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size], places[start : start + size]


@contextlib.contextmanager
def _naming_inputs(where: list[str]) -> Iterator[None]:
    """Errors about one text of a batch name the input ("line 40"), not its place in the request ("text 7")."""
    try:
        yield
    except SeqServeError as error:
        raise SeqServeError(error.code, name_inputs(error.message, where)) from None


def name_inputs(message: str, where: list[str]) -> str:
    """``message`` with "text N" (N: the index in the request) replaced by where that input came from."""

    def place(match: re.Match) -> str:
        index = int(match.group(1))
        return where[index] if index < len(where) else match.group(0)

    return re.sub(r"\btext (\d+)\b", place, message)


if __name__ == "__main__":
    sys.exit(main())
