"""`seqserve batch translate`: translate a file of sentences in-process with onnxruntime, no server needed.

    seqserve batch translate IN OUT --repository DIR --model NAME [--engine local|ray]

IN holds one sentence a line; OUT gets one translation a line, in input order. The input is cut into blocks of
`--block-lines` lines; every block is translated by `BlockTranslator.translate` (the server's `Translator` over the
exported encoder/decoder, batches of `--batch-size` sentences), so the local and the Ray engine decode exactly the same
batches and write the same bytes. Resume: OUT's complete lines are kept and their input lines skipped (a half-written
last line, left by a crash, is cut off first, but only once OUT is known to be a partial output of IN); blocks are
appended and flushed one by one.

Lines end at "\n" only (a "\r\n" ending loses its "\r"; a lone "\r" stays inside its line), the way OUT's lines
are counted; a UTF-8 byte order mark before the first line is dropped. IN must be UTF-8: its first line that is not
ends the job (exit 2) after the lines before it are written, naming the line and byte offset.

Engines: `local` translates block after block in this process; `ray` (server/batch_ray.py, the `ray` extra) hands the
blocks to a Ray Data actor pool, each actor holding one onnxruntime session of the model, and writes the results back
in input order as they arrive.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from seqserve.server.repository import ModelRepository, RepositoryError, SessionOptions, device_id_error
from seqserve.server.translation import DecodeOptions, Translator
from seqserve import textfiles
from seqserve.textfiles import complete_lines, count_lines, line_text

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


# --------------------------------------------------------------------------------------------------------------
# Errors


class BatchError(Exception):
    """A batch job that cannot run (exit code 2)."""


class OutputLongerThanInput(BatchError):
    def __init__(self, out: Path, out_lines: int, in_lines: int):
        self.out_lines, self.in_lines = out_lines, in_lines
        super().__init__(
            f"{out} already holds {out_lines} lines but the input has only {in_lines}: it is not a partial output "
            f"of this input (remove it to start over)"
        )


class UnusablePath(textfiles.UnusablePath, BatchError):
    """IN or OUT that the job cannot use safely (textfiles.check_paths' refusal, as a BatchError)."""


def _check_paths(source: Path, out: Path) -> None:
    try:
        textfiles.check_paths(source, out, "batch translate")
    except textfiles.UnusablePath as exc:
        raise UnusablePath(str(exc)) from None


class NotUtf8(BatchError):
    def __init__(self, source: Path, line: int, offset: int, reason: str, written: int):
        self.line, self.offset, self.written = line, offset, written
        super().__init__(
            f"{source} line {line} (byte offset {offset}) is not UTF-8 ({reason}); OUT holds {written} translated "
            f"lines: fix that line and rerun to resume"
        )


class NotATranslator(BatchError):
    def __init__(self, model: str, task: str):
        self.model, self.task = model, task
        super().__init__(f"model {model} is a {task!r} model; batch translate needs a 'translation' model")


class BlockOutOfOrder(BatchError):
    def __init__(self, expected: int, got: int):
        self.expected, self.got = expected, got
        super().__init__(f"the engine returned the block starting at line {got} where line {expected} was due")


# --------------------------------------------------------------------------------------------------------------
# The job and its worker


@dataclass(frozen=True)
class BatchJob:
    """What every worker needs to translate blocks: the model, decoding options and onnxruntime settings."""

    repository: Path
    model: str
    version: int | None = None
    options: DecodeOptions = DecodeOptions()
    batch_size: int = 32  # sentences decoded together
    block_lines: int = 256  # lines per block (the unit of work, of ordering and of resume)
    threads: int = 1  # onnxruntime intra-op threads per worker
    device: str = "cpu"  # "cpu" | "cuda"
    device_id: int = 0  # with device "cuda": which GPU

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.block_lines < 1 or self.threads < 0:
            raise BatchError(
                f"batch size {self.batch_size} and block lines {self.block_lines} must be >= 1, "
                f"threads {self.threads} >= 0"
            )
        if (error := device_id_error(self.device, self.device_id)) is not None:
            raise BatchError(error)
        if self.options.beam_size < 1 or self.options.max_output_tokens < 0 or self.options.max_output_ratio < 0:
            raise BatchError(
                f"beam size {self.options.beam_size} must be >= 1, max output tokens "
                f"{self.options.max_output_tokens} and ratio {self.options.max_output_ratio} >= 0"
            )


@dataclass(frozen=True)
class Block:
    start: int  # 0-based index of its first line in the input
    lines: tuple[str, ...]  # without line breaks


class BlockTranslator:
    """One onnxruntime session of the model; translates a block of lines into as many lines."""

    def __init__(self, job: BatchJob):
        self.job = job
        repository = ModelRepository(job.repository)
        options = SessionOptions(provider=job.device, device_id=job.device_id, intra_op_threads=job.threads,
                                 inter_op_threads=1)  # fmt: skip
        loaded = repository.load(job.model, job.version, options)
        manifest = loaded.manifest
        if manifest.task != "translation":
            raise NotATranslator(job.model, manifest.task)
        self.translator = Translator.for_model(loaded)
        self.codec = self.translator.codec
        self.name, self.version = manifest.name, manifest.version
        self.truncated = 0  # sentences cut to the model's source limit so far

    def translate(self, lines: Sequence[str], start: int = 0) -> list[str]:
        """Translations of `lines` (input lines start + 1, ... for log messages), one per line."""
        out = [""] * len(lines)
        encoded = {}
        for i, line in enumerate(lines):
            if not line.strip():
                continue  # an empty line stays empty, as the server answers "" without running the model
            enc = self.codec.encode(line, truncate=True, index=i)
            if enc.truncated_from:
                self.truncated += 1
                log.warning("line %d: %d tokens cut to the model's limit of %d", start + i + 1, enc.truncated_from,
                            len(enc))  # fmt: skip
            encoded[i] = enc.ids
        # Longest first, so each batch holds similar lengths and pads little; the order is fixed by the block alone.
        order = sorted(encoded, key=lambda i: (-len(encoded[i]), i))
        size = self.job.batch_size
        for first in range(0, len(order), size):
            rows = order[first : first + size]
            jobs = [self.translator.job(encoded[i], self.job.options) for i in rows]
            self.translator.run_batch(jobs, stopped=lambda i: False, on_step=lambda r: None, on_done=lambda i: None)
            for i, job in zip(rows, jobs):
                best = job.result[0] if job.result else None
                # A translation is one output line whatever its text holds.
                out[i] = " ".join(self.codec.decode(list(best.tokens)).splitlines()) if best else ""
        return out


# --------------------------------------------------------------------------------------------------------------
# Input, output, resume


@dataclass(frozen=True)
class InputScan:
    lines: int  # lines of IN, a last line without a line break included
    # The first line that is not UTF-8, 1-based, and the byte offset of its first bad byte; None: all of it is
    bad_line: int | None = None
    bad_offset: int = 0
    reason: str = ""


def scan_input(path: Path, chunk: int = 1 << 20) -> InputScan:
    """Count IN's lines and find its first line that is not UTF-8, reading it once in binary."""
    lines, offset, carry, last = 0, 0, b"", b"\n"
    bad: tuple[int, int, str] | None = None
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            last = block[-1:] or last
            if bad is not None:
                lines += block.count(b"\n")
            else:
                # Decode whole lines only, so that a character split between two reads is not taken for an error.
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                whole, carry = data[:cut], data[cut:]
                try:
                    whole.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = (lines + whole.count(b"\n", 0, exc.start) + 1, offset + exc.start, exc.reason)
                lines += whole.count(b"\n")
                offset += len(whole)
            if not block:
                break
    total = lines + (last != b"\n")
    return InputScan(total) if bad is None else InputScan(total, *bad)


def read_blocks(path: Path, skip: int, block_lines: int, stop: int | None = None) -> Iterator[Block]:
    """Blocks of the input's lines skip..stop-1 (0-based; stop None: to the end), read lazily."""
    with open(path, "rb") as f:  # binary: lines end at b"\n" only, as count_lines counts them
        lines = (_text_of(raw, i, path) for i, raw in enumerate(islice(f, stop)))
        for _ in islice(lines, skip):
            pass
        start = skip
        while chunk := tuple(islice(lines, block_lines)):
            yield Block(start, chunk)
            start += len(chunk)


def _text_of(raw: bytes, index: int, path: Path) -> str:
    try:
        return line_text(raw, first=index == 0)
    except UnicodeDecodeError as exc:  # scan_input stops the reading before such a line: IN changed meanwhile
        raise BatchError(f"{path} line {index + 1} is not UTF-8 ({exc.reason}): did the input change?") from None


# engine(job, blocks) -> (block start, translations) pairs, in input order
Engine = Callable[[BatchJob, Iterable[Block]], Iterable[tuple[int, list[str]]]]


def local_engine(job: BatchJob, blocks: Iterable[Block]) -> Iterator[tuple[int, list[str]]]:
    worker = BlockTranslator(job)
    for block in blocks:
        yield block.start, worker.translate(block.lines, block.start)


@dataclass(frozen=True)
class BatchResult:
    lines: int  # lines the input holds
    resumed_from: int  # lines OUT already held
    translated: int  # lines translated by this run
    seconds: float


def translate_file(job: BatchJob, source: Path, out: Path, engine: Engine = local_engine) -> BatchResult:
    """Translate SOURCE into OUT with `engine`, resuming after OUT's complete lines.

    Raises NotUtf8 after translating the lines before IN's first line that is not UTF-8. Interrupted (Ctrl-C), OUT is
    left holding the blocks written in full, and KeyboardInterrupt goes on."""
    started = time.perf_counter()
    _check_paths(source, out)
    scan = scan_input(source)
    total = scan.lines
    # OUT must be a partial output of IN before anything of it is cut: a partial last line counts as a line here.
    if out.exists() and (held := count_lines(out)) > total:
        raise OutputLongerThanInput(out, held, total)
    done = complete_lines(out)
    stop = total if scan.bad_line is None else scan.bad_line - 1
    if done:
        log.info("%s holds %d of %d lines: resuming", out, done, total)
    expected = done
    # Unbuffered, one write per block, and on Ctrl-C cut back to the last block written in full: OUT stays whole lines.
    with open(out, "ab", buffering=0) as f:
        written = f.seek(0, os.SEEK_END)
        try:
            for start, translations in engine(job, read_blocks(source, done, job.block_lines, stop)):
                if start != expected:
                    raise BlockOutOfOrder(expected, start)
                data = "".join(t + "\n" for t in translations).encode("utf-8")
                view = memoryview(data)
                while view:
                    view = view[f.write(view) :]
                written += len(data)
                expected += len(translations)
                log.info("%d/%d lines", expected, total)
        except KeyboardInterrupt:
            os.ftruncate(f.fileno(), written)
            raise
    if scan.bad_line is not None:
        raise NotUtf8(source, scan.bad_line, scan.bad_offset, scan.reason, expected)
    seconds = time.perf_counter() - started
    log.info("translated %d lines into %s in %.1f s", expected - done, out, seconds)
    return BatchResult(total, done, expected - done, seconds)


# --------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    p = jobs.add_parser("translate", help="translate a file, one sentence a line, into OUT in the same order",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    d = BatchJob(repository=Path("."), model="")
    p.add_argument("input", type=Path, metavar="IN", help="text file, one sentence a line")
    p.add_argument("output", type=Path, metavar="OUT",
                   help="translations, one a line; complete lines already there are kept and skipped (resume)")
    p.add_argument("--repository", type=Path, required=True, help="model repository folder (REPO/NAME/VERSION/...)")
    p.add_argument("--model", required=True, help="name of a translation model in the repository")
    p.add_argument("--version", type=int, default=None, help="model version (None: the highest)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process; ray: a Ray Data actor pool (the `ray` extra)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences decoded together")
    p.add_argument("--block-lines", type=int, default=d.block_lines,
                   help="lines per block: the unit handed to a worker, written in order, and resumed")
    p.add_argument("--threads", type=int, default=d.threads, help="onnxruntime intra-op threads per worker")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                   help="onnxruntime execution provider; cuda needs onnxruntime-gpu ([cuda] extra)")
    p.add_argument("--device-id", type=int, default=d.device_id, help="with --device cuda: which GPU")
    p.add_argument("--beam-size", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha of beam search")
    p.add_argument("--max-output-tokens", type=int, default=0, help="output tokens at most (0: the model's limit)")
    p.add_argument("--max-output-ratio", type=float, default=0.0,
                   help="output tokens at most ratio x source tokens + 5 (0: no relative limit)")
    p.add_argument("--workers", type=int, default=0,
                   help="ray: actors in the pool, each with one onnxruntime session (0: the cluster's CPUs / threads)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="ray: cluster to join (auto: the running one; from $RAY_ADDRESS; None: start a local one)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="ray: CPUs of the local cluster started when no address is given (None: all)")


def job_from_args(args: argparse.Namespace) -> BatchJob:
    options = DecodeOptions(
        beam_size=args.beam_size, length_penalty=args.length_penalty,
        max_output_tokens=args.max_output_tokens, max_output_ratio=args.max_output_ratio,
    )  # fmt: skip
    return BatchJob(
        repository=args.repository, model=args.model, version=args.version, options=options,
        batch_size=args.batch_size, block_lines=args.block_lines, threads=args.threads, device=args.device,
        device_id=args.device_id,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        job = job_from_args(args)
        _check_paths(args.input, args.output)
        if args.engine == "ray":
            from seqserve.server.batch_ray import ray_engine

            engine = ray_engine(workers=args.workers, address=args.ray_address, num_cpus=args.ray_cpus)
        else:
            engine = local_engine
        result = translate_file(job, args.input, args.output, engine)
    except (BatchError, RepositoryError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        held = count_lines(args.output) if args.output.is_file() else 0
        log.error("interrupted: %s holds %d translated lines; rerun the same command to resume", args.output, held)
        return 130
    log.info("done: %d lines (%d resumed, %d translated) in %.1f s", result.lines, result.resumed_from,
             result.translated, result.seconds)  # fmt: skip
    return 0
