"""Where one request's time goes, in process: a translator's decode or a BERT encode, timed as the server's own code
runs it (server/translation.py's Translator, server/bert.py's BertModel, tokenizing included), then run again with
onnxruntime's profiler on: each graph's runs a request and its kernels' time by operator type, and what is left outside
onnxruntime (Python: search, bookkeeping, tokenizing; and the profiler's own cost, so compare the two walls).

    python -m benchmarks.breakdown --repository REPO --model NAME [--batch 32] [--beam 4] [--tokens 20] [--runs 5]
        [--threads 2] [--nodes N] [--json FILE]

Translators decode `--tokens` target tokens from sources of about `--tokens` tokens (an EOS that comes earlier ends a
sentence earlier, as in serving); BERT models encode `--batch` texts of `--tokens` tokens.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import load_in_process, machine, session_options

TOP_NODES = 16  # slowest nodes kept per graph


def workload(loaded: Any, batch: int, beam: int, tokens: int) -> tuple[str, Callable[[], Any]]:
    """(description, one request) for the loaded version: a translation or an encode."""
    if loaded.manifest.task == "translation":
        from benchmarks.translate_transformer import InProcess, sources_of_length

        sources = sources_of_length(loaded.tokenizers["source"], batch, tokens, seed=1)
        translator = InProcess(loaded)
        search = f"beam {beam}" if beam > 1 else "greedy"
        return f"translate batch {batch} {search}, {tokens} target tokens", lambda: translator.translate(
            sources, beam, tokens)  # fmt: skip
    from benchmarks.encode import InProcess, texts_of_length

    texts = texts_of_length(next(iter(loaded.tokenizers.values())), batch, tokens, seed=1)
    encoder = InProcess(loaded)
    return f"encode batch {batch} x {tokens} tokens", lambda: encoder.encode(texts)


def profiled(loaded: Any, threads: int, folder: Path) -> Any:
    """The same version with every graph opened again with onnxruntime's profiler on."""
    from seqserve.server.repository import LoadedModel

    options = session_options(threads)
    sessions = {graph: options.open(loaded.path / spec.file, profile_file_prefix=str(folder / graph))
                for graph, spec in loaded.manifest.graphs.items()}  # fmt: skip
    return LoadedModel(loaded.manifest, sessions, loaded.tokenizers, loaded.path)


def read_trace(path: str, requests: int) -> tuple[list[float], dict[str, float], dict[str, float]]:
    """A session's profile over `requests` identical requests, the first a warm-up: each later run's duration (ms),
    kernel time by operator type and by node (ms). Identical requests make the same runs, so the warm-up's are the
    first 1/`requests` of them (checked)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])  # fmt: skip
    if len(runs) % requests:
        raise RuntimeError(f"{path}: {len(runs)} runs in {requests} requests: the requests did not make the same "
                           f"runs, so the warm-up's cannot be told apart")  # fmt: skip
    skip_runs = len(runs) // requests
    start = runs[skip_runs]["ts"] if len(runs) > skip_runs else float("inf")
    ops: dict[str, float] = collections.Counter()
    nodes: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            ops[e["args"]["op_name"]] += e["dur"] / 1e3
            nodes[f"{e['name'][: -len('_kernel_time')]} ({e['args']['op_name']})"] += e["dur"] / 1e3
    return [e["dur"] / 1e3 for e in runs[skip_runs:]], dict(ops), dict(nodes)


def breakdown(version_dir: Path, threads: int, batch: int, beam: int, tokens: int, runs: int) -> dict[str, Any]:
    loaded = load_in_process(version_dir, threads)
    label, request = workload(loaded, batch, beam, tokens)
    for _ in range(2):
        request()
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        request()
        walls.append((time.perf_counter() - start) * 1e3)
    with tempfile.TemporaryDirectory(prefix="seqserve-breakdown-") as tmp:
        traced = profiled(loaded, threads, Path(tmp))
        _, traced_request = workload(traced, batch, beam, tokens)
        traced_request()  # warm-up: each session's first runs allocate
        start = time.perf_counter()
        for _ in range(runs):
            traced_request()
        traced_wall = (time.perf_counter() - start) * 1e3 / runs
        graphs = {}
        for graph, session in traced.sessions.items():
            durations, ops, nodes = read_trace(session.end_profiling(), runs + 1)
            if durations:
                slowest = sorted(nodes.items(), key=lambda kv: -kv[1])[:TOP_NODES]
                graphs[graph] = {"runs": len(durations) / runs, "ms": sum(durations) / runs,
                                 "ops_ms": {op: ms / runs for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])},
                                 "top_nodes_ms": {node: ms / runs for node, ms in slowest}}  # fmt: skip
    in_ort = sum(g["ms"] for g in graphs.values())
    return {"model": str(version_dir), "workload": label, "threads": threads, "runs": runs, "machine": machine(),
            "wall_ms": statistics.median(walls), "profiled_wall_ms": traced_wall, "graphs": graphs,
            "onnxruntime_ms": in_ort, "outside_onnxruntime_ms": traced_wall - in_ort}  # fmt: skip


def report(result: dict[str, Any], top: int = 8, nodes: int = 0) -> str:
    lines = [f"{result['model']}: {result['workload']}, {result['threads']} threads, {result['runs']} runs",
             f"  wall {result['wall_ms']:.1f} ms (median); profiled {result['profiled_wall_ms']:.1f} ms a request, of "
             f"which onnxruntime {result['onnxruntime_ms']:.1f} ms and outside it "
             f"{result['outside_onnxruntime_ms']:.1f} ms"]  # fmt: skip
    for graph, g in sorted(result["graphs"].items(), key=lambda kv: -kv[1]["ms"]):
        ops = ", ".join(f"{op} {ms:.1f}" for op, ms in list(g["ops_ms"].items())[:top])
        lines.append(f"  {graph}: {g['runs']:.0f} runs, {g['ms']:.1f} ms; kernels (ms): {ops}")
        lines.extend(f"    {node}: {ms:.1f} ms" for node, ms in list(g["top_nodes_ms"].items())[:nodes])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--model", required=True, help="model name in --repository (its highest version)")
    parser.add_argument("--batch", type=int, default=32, help="sentences a request")
    parser.add_argument("--beam", type=int, default=4, help="beam size (translators; 1: greedy)")
    parser.add_argument("--tokens", type=int, default=20, help="tokens a sentence (target tokens for translators)")
    parser.add_argument("--runs", type=int, default=5, help="timed requests (median wall; profiled mean)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (the process's shared pool)")
    parser.add_argument("--nodes", type=int, default=0, help=f"also print each graph's slowest nodes (at most "
                        f"{TOP_NODES}; the JSON keeps {TOP_NODES})")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    from seqserve.server.repository import ModelRepository, RepositoryError

    try:
        versions = ModelRepository(args.repository).models().get(args.model)
    except RepositoryError as exc:
        parser.error(str(exc))
    if not versions:
        parser.error(f"no model {args.model!r} in {args.repository}")
    result = breakdown(args.repository / args.model / str(max(versions)), args.threads, args.batch, args.beam,
                       args.tokens, args.runs)  # fmt: skip
    sys.stdout.write(report(result, nodes=args.nodes) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
