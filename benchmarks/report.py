"""`python -m benchmarks.report benchmarks/results`: the issue's targets checked against the JSON results of one run.

Prints a markdown table: target, measured value (from the same run's rows), met or not. With --tables, the run's
result tables instead, rebuilt from its JSON files as each benchmark printed them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _rows(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["contender"]): r for r in data["rows"]}


def _speedup(rows, workload: str, ours: str, theirs: str) -> float | None:
    a, b = rows.get((workload, ours)), rows.get((workload, theirs))
    return a["throughput"] / b["throughput"] if a and b else None


def _line(target: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}x") -> str:
    shown = "n/a" if value is None else fmt.format(value)
    verdict = "" if ok is None else ("met" if ok else "**not met**")
    return f"| {target} | {shown} | {verdict} |"


def encode_targets(data: dict[str, Any]) -> list[str]:
    rows, out = _rows(data), []
    for ours in ("seqserve-grpc", "seqserve-inproc"):
        v = _speedup(rows, "fp32 batch 1 x 10 tokens", ours, "sentence-transformers fp32")
        out.append(_line(f"encode fp32 batch 1: {ours} >= 4x sentence-transformers", v, v is not None and v >= 4))
        for w in ("batch 32 x 32 tokens", "batch 32 x 128 tokens"):
            v = _speedup(rows, f"int8 {w}", ours, "sentence-transformers fp32")
            out.append(_line(f"encode int8 {w}: {ours} >= 2.5x sentence-transformers fp32", v,
                             v is not None and v >= 2.5))  # fmt: skip
    # Runs before the third round also timed a second server with --max-queue-delay-ms 0 (by then the same
    # behaviour).
    for ours in sorted({c for _, c in rows if c.startswith("seqserve-grpc")}):
        for p in ("fp32", "int8"):
            a, b = rows.get((f"{p} batch 1 x 10 tokens", ours)), rows.get((f"{p} batch 1 x 10 tokens", "onnxruntime"))
            v = a["seconds"] / b["seconds"] if a and b else None
            out.append(_line(f"encode {p} batch-1 latency: {ours} <= 1.3x raw onnxruntime", v,
                             v is not None and v <= 1.3))  # fmt: skip
    return out


def translate_targets(data: dict[str, Any], label: str) -> list[str]:
    rows, out = _rows(data), []
    workloads = sorted({w for w, _ in rows})
    for ours in ("seqserve-inproc", "seqserve-grpc"):
        for w in workloads:
            ct2 = next((c for ww, c in rows if ww == w and c.startswith("ctranslate2")), None)
            v = _speedup(rows, w, ours, ct2) if ct2 else None
            out.append(_line(f"{label} {w}: {ours} >= 1.5x {ct2} (never < 1.0x)", v, v is not None and v >= 1.5))
            if (w, "transformers eager fp32") in rows:
                v = _speedup(rows, w, ours, "transformers eager fp32")
                out.append(_line(f"{label} {w}: {ours} >= 3x transformers eager", v, v is not None and v >= 3))
    return out


def rnn_targets(data: dict[str, Any]) -> list[str]:
    rows = _rows(data)
    out = []
    for w in sorted({w for w, _ in rows}):
        v = _speedup(rows, w, "seqserve-inproc", "torch-reference")
        target = 5 if "batch 1 " in w else None
        out.append(_line(f"RNN {w}: seqserve >= 5x torch reference" if target else f"RNN {w}: seqserve / torch",
                         v, (v is not None and v >= 5) if target else None))  # fmt: skip
    return out


def load_targets(data: dict[str, Any]) -> list[str]:
    out = []
    rows = data["rows"]
    for r in rows:
        if r["clients"] != 32:
            continue
        single = next(x for x in rows if (x["task"], x["setting"], x["clients"]) == (r["task"], r["setting"], 1))
        v = r["throughput"] / single["throughput"]
        out.append(_line(f"load {r['task']} ({r['setting']}), 32 clients: >= 4x one at a time", v, v >= 4))
        v = r["p99_ms"] / r["p50_ms"]
        out.append(_line(f"load {r['task']} ({r['setting']}), 32 clients: p99 <= 3x p50", v, v <= 3))
    repo = data.get("repository")
    if repo:
        models = ", ".join(repo["models"])
        out.append(_line(f"repository ({models}) ready <= 5 s", repo["ready_s"], repo["ready_s"] <= 5, "{:.2f} s"))
        out.append(_line(f"repository ({models}) resident memory <= 600 MB", repo["rss_mib"],
                         repo["rss_mib"] <= 600 / 1.048576, "{:.0f} MiB"))  # fmt: skip
    ready = max(r["ready_s"] for r in rows)
    rss = max(r["server_peak_rss_mib"] for r in rows)
    out.append(_line("load servers: slowest start <= 5 s", ready, ready <= 5, "{:.2f} s"))
    out.append(_line("load servers: largest peak resident memory <= 600 MB", rss, rss <= 600 / 1.048576,
                     "{:.0f} MiB"))  # fmt: skip
    return out


def tables(folder: Path) -> str:
    """Each benchmark's table and notes from the run's JSON files, as the benchmark printed them."""
    from benchmarks.common import Results
    from benchmarks.load import table

    order = ["encode.json", *sorted(p.name for p in folder.glob("translate_*.json") if p.name != "translate_rnn.json"),
             "translate_rnn.json", "load.json"]  # fmt: skip
    parts = []
    for name in order:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        text = table(data["rows"]) if name == "load.json" else Results.from_dict(data).table()
        parts.append(text + "".join(f"\n\n{note}" for note in data.get("notes", [])))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder with encode.json, translate_*.json, translate_rnn.json, "
                                                  "load.json")  # fmt: skip
    parser.add_argument("--tables", action="store_true",
                        help="print the run's result tables (each benchmark's, with its notes) instead of the targets")
    args = parser.parse_args(argv)
    lines = ["| target | measured | |", "|---|---:|---|"]

    def read(name: str) -> dict[str, Any] | None:
        path = args.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    if args.tables:
        sys.stdout.write(tables(args.folder) + "\n")
        return 0

    if (data := read("encode.json")) is not None:
        lines += encode_targets(data)
    for path in sorted(args.folder.glob("translate_*.json")):
        if path.name != "translate_rnn.json":
            lines += translate_targets(json.loads(path.read_text()), path.stem.removeprefix("translate_"))
    if (data := read("translate_rnn.json")) is not None:
        lines += rnn_targets(data)
    if (data := read("load.json")) is not None:
        lines += load_targets(data)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
