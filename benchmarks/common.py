"""What every benchmark shares: timing with warm-up and medians, the result table (throughput and the ratio of seqserve
to each contender), a `seqserve serve` subprocess (time to ready, resident memory), and the in-process model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

DEFAULT_WORK = Path(os.environ.get("SEQSERVE_BENCH_WORK", "/tmp/seqserve-bench"))


# The model repositories the benchmarks export into --work (each script reuses what it finds there); what they are
# exported from (MarianMT and CTranslate2 folders, trained RNN checkpoints) lives beside them and is kept.
EXPORTED_REPOSITORIES = ("encode_repository", "translate_repository", "rnn_repository", "all_repository")


def clear_exports(work: Path) -> list[Path]:
    """Remove the repositories the benchmarks exported into `work`, so the next run exports them with the current code
    (after a change to the export: otherwise the run would time the graphs of an earlier export); returns them."""
    import shutil

    removed = []
    for name in EXPORTED_REPOSITORIES:
        path = work / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


def base_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender (the cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="folder for built models, converted models and repositories (reused across runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and inputs, one repeat: checks the script end to end, measures nothing")
    return parser


def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxruntime", "root", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.repeats, args.warmup = 1, 1
        TIMING.update(settle_s=0.0, warmup_s=0.0, timed_s=0.0, rounds=1)
    args.work.mkdir(parents=True, exist_ok=True)


# Each measurement starts after a pause, so that the previous contender's threads have stopped spinning (onnxruntime
# pools spin for a while after a run, OpenMP's too), then warms up and times for at least these many seconds (short
# workloads get many runs: their medians were at the mercy of a few noisy ones), in `rounds` rounds across the
# contenders of a workload. setup() zeroes them for --quick.
TIMING = {"settle_s": 0.3, "warmup_s": 0.3, "timed_s": 1.5, "max_runs": 300, "rounds": 3}


def timed_interleaved(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int, rounds: int | None = None
) -> dict[str, tuple[float, Any]]:
    """The median wall time of every contender of one workload over at least `repeats` runs and TIMING["timed_s"],
    after at least `warmup` untimed runs and TIMING["warmup_s"], taken in `rounds` rounds (A B C, A B C, ...) rather
    than one contender after another, so that the machine drifting during the workload (a shared VM: the same
    workload ran 10 and 16 ms minutes apart) weighs on every contender alike: contender -> (median over all its timed
    runs, what its last run returned).
    Each round settles, warms up (the first round fully, later ones with one run) and times its share of the runs."""
    rounds = rounds or TIMING["rounds"]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    last: dict[str, Any] = {}
    for r in range(rounds):
        for name, fn in contenders.items():
            time.sleep(TIMING["settle_s"])
            started = time.perf_counter()
            done = 0
            while done < (warmup if r == 0 else 1) or (r == 0 and time.perf_counter() - started < TIMING["warmup_s"]):
                fn()
                done += 1
            share = -(-repeats // rounds)  # runs each round at least, rounded up
            started = time.perf_counter()
            taken: list[float] = []
            while len(taken) < share or (
                time.perf_counter() - started < TIMING["timed_s"] / rounds and len(taken) < TIMING["max_runs"] // rounds
            ):
                start = time.perf_counter()
                last[name] = fn()
                taken.append(time.perf_counter() - start)
            times[name].extend(taken)
    return {name: (statistics.median(times[name]), last[name]) for name in contenders}


@dataclass
class Row:
    """One contender on one workload: `items` units done per run, `seconds` the median run."""

    workload: str
    contender: str
    items: float
    unit: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


class Results:
    """Rows grouped by workload; printed with each contender's ratio seqserve / contender (> 1: seqserve faster)."""

    def __init__(self, title: str, reference: str):
        self.title = title
        self.reference = reference  # the contender the ratios are taken from (a seqserve row)
        self.rows: list[Row] = []

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        """Results as `finish` wrote them to JSON."""
        results = cls(data["title"], data["reference"])
        names = [f.name for f in fields(Row)]
        results.rows = [Row(**{k: row[k] for k in names if k in row}) for row in data["rows"]]
        return results

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        log.info("%s | %s: %.1f %s/s (%.2f ms)", row.workload, row.contender, row.throughput, row.unit,
                 row.seconds * 1e3)  # fmt: skip
        return row

    def ratio(self, workload: str, contender: str) -> float | None:
        by = {r.contender: r for r in self.rows if r.workload == workload}
        if self.reference not in by or contender not in by:
            return None
        return by[self.reference].throughput / by[contender].throughput

    def latency_ratio(self, workload: str, contender: str, baseline: str) -> float:
        """Median time of `contender` over that of `baseline` on one workload."""
        by = {r.contender: r for r in self.rows if r.workload == workload}
        return by[contender].seconds / by[baseline].seconds

    def table(self) -> str:
        lines = [f"## {self.title}", "",
                 f"| workload | contender | throughput | median ms | {self.reference} / contender |",
                 "|---|---|---:|---:|---:|"]  # fmt: skip
        for row in self.rows:
            ratio = self.ratio(row.workload, row.contender)
            extra = "".join(f" {k}={v}" for k, v in row.extra.items())
            lines.append(
                f"| {row.workload} | {row.contender}{extra} | {row.throughput:,.1f} {row.unit}/s | "
                f"{row.seconds * 1e3:,.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
            )
        return "\n".join(lines)

    def finish(self, args: argparse.Namespace, notes: Sequence[str] = ()) -> None:
        text = self.table() + "".join(f"\n\n{n}" for n in notes)
        sys.stdout.write(text + "\n")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            data = {"title": self.title, "reference": self.reference, "machine": machine(), "notes": list(notes),
                    "rows": [{**asdict(r), "throughput": r.throughput,
                              "ratio": self.ratio(r.workload, r.contender)} for r in self.rows]}  # fmt: skip
            args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def machine() -> dict[str, Any]:
    """Cores, CPU model, load average: recorded with every result."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "loadavg": os.getloadavg()}


# --------------------------------------------------------------------------------------------------------------
# seqserve, in process and as a server


def session_options(threads: int) -> Any:
    """The sessions `seqserve serve --threads N` makes: the process's shared onnxruntime pool of N threads."""
    from seqserve.server.repository import SessionOptions, shared_thread_pool

    shared_thread_pool(threads, 1)
    return SessionOptions(intra_op_threads=threads, inter_op_threads=1, allow_spinning=False)


def load_in_process(version_dir: Path, threads: int) -> Any:
    """The version as the server loads it (server/repository.py), without the server."""
    from seqserve.server.repository import load_model

    return load_model(version_dir, session_options(threads))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status memory figure (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class ServerProcess:
    """`seqserve serve` in a subprocess on a free port; `ready_seconds` is the time from start to health SERVING."""

    def __init__(self, repository: Path, threads: int, extra: Sequence[str] = (), timeout: float = 120.0):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "seqserve.cli", "serve", "--repository", str(repository), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", "-1", "--threads", str(threads), "--instances", "1",
               "--log-level", "WARNING", *extra]  # fmt: skip
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ready_seconds = self._wait_ready(start, timeout)

    def _wait_ready(self, start: float, timeout: float) -> float:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"seqserve serve exited: {self.proc.stderr.read().decode()[-2000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - start
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"seqserve serve not ready after {timeout} s")

    def rss_bytes(self) -> int:
        return _proc_status(self.proc.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def peak_rss_bytes(self) -> int:
        return _proc_status(self.proc.pid, "VmHWM")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
