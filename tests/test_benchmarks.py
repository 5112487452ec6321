"""Smoke tests: every benchmark script runs end to end at its --quick size and reports every contender on every
workload. Behaviour only: the timings of a loaded test machine are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where benchmarks/ lives


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work folder for the module, so the load benchmark reuses the models the others exported."""
    return tmp_path_factory.mktemp("bench_work")


def _run(module: str, work: Path, tmp_path: Path, *extra: str) -> dict:
    """`python -m benchmarks.MODULE --quick` in its own process, as it is run: a benchmark process makes onnxruntime's
    shared thread pool (as `seqserve serve` does), which binds every later session of that process."""
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--threads", "1", "--work", str(work),
               "--json", str(out), *extra]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _contenders(result: dict) -> dict[str, set[str]]:
    by: dict[str, set[str]] = {}
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["items"] > 0
        by.setdefault(row["workload"], set()).add(row["contender"])
    return by


def test_encode_benchmark_reports_every_contender_with_int8_close_to_fp32(work, tmp_path):
    result = _run("encode", work, tmp_path)
    by = _contenders(result)
    assert set(by) == {f"{p} {w}" for p in ("fp32", "int8") for w in ("batch 1 x 10 tokens", "batch 4 x 16 tokens")}
    for contenders in by.values():
        assert contenders == {"seqserve-grpc", "seqserve-inproc", "onnxruntime", "sentence-transformers fp32"}
    fp32_cosines = [n for n in result["notes"] if n.startswith("fp32") and "cosine" in n]
    assert fp32_cosines and all("mean 1.0000" in n for n in fp32_cosines)


def test_transformer_translation_benchmark_matches_ctranslate2_greedy_in_fp32(work, tmp_path):
    result = _run("translate_transformer", work, tmp_path)
    by = _contenders(result)
    assert set(by) == {f"{p} batch {b} {s}" for p in ("fp32", "int8") for b in (1, 4) for s in ("greedy", "beam 2")}
    assert by["fp32 batch 4 greedy"] == {"seqserve-inproc", "seqserve-grpc", "ctranslate2 float32",
                                         "transformers eager fp32"}  # fmt: skip
    assert any(c.startswith("ctranslate2 int8") for c in by["int8 batch 4 greedy"])
    tokens = {r["contender"]: r["items"] for r in result["rows"] if r["workload"] == "fp32 batch 4 greedy"}
    assert len(set(tokens.values())) == 1  # every toolkit decoded the same number of target tokens
    assert "fp32 batch 4 greedy: seqserve and CTranslate2 greedy outputs identical for 4 of 4 sentences" in result[
        "notes"]


def test_rnn_translation_benchmark_equals_the_torch_reference(work, tmp_path):
    result = _run("translate_rnn", work, tmp_path)
    by = _contenders(result)
    assert set(by) == {f"{a} batch {b} greedy" for a in ("lstm", "gru") for b in (1, 4)}
    assert all(c == {"seqserve-inproc", "torch-reference"} for c in by.values())
    for note in result["notes"]:
        same, total = note.split("identical tokens for ")[1].split(" sentences")[0].split(" of ")
        assert same == total


def test_cuda_translation_benchmark_runs_on_a_gpu_or_refuses_clearly(work, tmp_path):
    from conftest import gpu_available

    if gpu_available():
        result = _run("translate_cuda", work, tmp_path)
        by = _contenders(result)
        assert set(by) == {f"batch {b} {s}" for b in (1, 4) for s in ("greedy", "beam 2")}
        assert all(c == {"seqserve-cuda fp16", "seqserve-cuda fp16, state on host", "seqserve-cpu fp32 (1 threads)",
                         "transformers-cuda fp32", "transformers-cuda fp16"} for c in by.values())  # fmt: skip
        return
    command = [sys.executable, "-m", "benchmarks.translate_cuda", "--quick", "--work", str(work)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "needs a GPU" in done.stderr and "CUDAExecutionProvider" in done.stderr


def test_load_benchmark_reports_every_setting_without_errors(work, tmp_path):
    result = _run("load", work, tmp_path)
    settings = {(r["task"], r["setting"], r["clients"]) for r in result["rows"]}
    expected_settings = {("encode", "batching on"), ("encode", "batching off"),
                         ("translate", "batching on, joining on"), ("translate", "batching on, joining off"),
                         ("translate", "batching off")}  # fmt: skip
    assert settings == {(t, s, c) for t, s in expected_settings for c in (1, 4)}
    for row in result["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0
        assert row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_peak_rss_mib"] > 0 and row["ready_s"] > 0 and row["server_cpu_cores"] > 0
    assert result["repository"]["ready_s"] > 0 and result["repository"]["rss_mib"] > 0


def test_levers_benchmark_measures_every_lever(tmp_path, tiny_repository):
    out = tmp_path / "levers.json"
    command = [sys.executable, "-m", "benchmarks.levers", "--quick", "--threads", "1", "--json", str(out),
               "--repository", str(tiny_repository), "--bert", "tiny-bert", "--rnn-repository", str(tiny_repository),
               "--rnn", "tiny-lstm", "tiny-gru", "--open-repository", str(tiny_repository),
               "--state-repository", str(tiny_repository), "--translator", "tiny-transformer"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    pools = result["pool (ms a batch-1 run)"]
    assert set(pools) == {"session", "shared"}
    assert all(set(p) == {"gap 0 ms", "gap 1 ms", "gap 5 ms"} and min(p.values()) > 0 for p in pools.values())
    for lever in ("topk", "gather", "mha past", "cross attention", "layernorm", "rank",
                  "inline (ms a batch-1 Encode over gRPC)",
                  "open (ms to open a repository's graphs)"):
        assert result[lever] and min(result[lever].values()) > 0
    assert len(result["layernorm"]) == 4  # fused and apart, at 1024 rows and at 1
    assert len(result["gather"]) == 5 and len(result["mha past"]) == 2 and len(result["cross attention"]) == 2
    assert set(result["open (ms to open a repository's graphs)"]) == {
        f"{n} graphs, optimisation {level} ms" for level in ("all", "disable")
        for n in [sum(1 for _ in tiny_repository.glob("*/1/*.onnx"))]
    }  # fmt: skip
    assert len(result["inline (ms a batch-1 Encode over gRPC)"]) == 3  # inline on, off, and a health check
    state = result["decoder state (ms a translation)"]
    assert set(state) == {f"batch {b} beam {k} state as {label}" for b, k in ((1, 1), (1, 4), (8, 4), (32, 4))
                          for label in ("numpy, take", "numpy, graph", "numpy", "io binding")}  # fmt: skip
    assert min(state.values()) > 0
    loops = result["greedy loop (ms a batch-1 RNN translation)"]
    assert len(loops) == 4 and min(loops.values()) > 0  # two models, each through greedy.onnx and the step graph


@pytest.mark.parametrize(("model", "graphs"), [("tiny-transformer", {"encoder", "decoder"}),
                                               ("tiny-bert", {"model"})])  # fmt: skip
def test_breakdown_splits_a_request_by_graph_and_operator(tmp_path, tiny_repository, model, graphs):
    out = tmp_path / "breakdown.json"
    command = [sys.executable, "-m", "benchmarks.breakdown", "--repository", str(tiny_repository), "--model", model,
               "--batch", "3", "--beam", "2", "--tokens", "6", "--runs", "2", "--threads", "1", "--nodes", "2",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # Graphs that ran: a tiny beam's reorders are numpy's (the gather graphs take over from HOST_GATHER_GRAPH_BYTES).
    assert graphs == set(result["graphs"])
    for graph in result["graphs"].values():
        assert graph["runs"] > 0 and graph["ms"] > 0
        assert graph["ops_ms"] and sum(graph["ops_ms"].values()) <= graph["ms"] * 1.05
        assert 0 < len(graph["top_nodes_ms"]) <= 16
    # The warm-up request's runs are left out: one encoder (or BERT) run a request, one decoder run a target token.
    assert result["graphs"].get("encoder", result["graphs"].get("model"))["runs"] == 1
    if "decoder" in result["graphs"]:
        assert 1 <= result["graphs"]["decoder"]["runs"] <= 6
    assert result["onnxruntime_ms"] == pytest.approx(sum(g["ms"] for g in result["graphs"].values()))
    assert result["wall_ms"] > 0 and result["profiled_wall_ms"] > result["onnxruntime_ms"] * 0.95
    assert f"{model}/1: " in done.stdout and "kernels (ms)" in done.stdout


def test_beam_search_operator_wraps_our_graphs_and_decodes_as_our_greedy_search(tmp_path, tiny_repository):
    """The BeamSearch lever's model (our encoder.onnx and decoder.onnx as the T5 subgraphs) runs in onnxruntime and,
    with one beam, gives exactly our greedy translations: the wrapping feeds the graphs right."""
    out = tmp_path / "beam_search_op.json"
    command = [sys.executable, "-m", "benchmarks.beam_search_op", "--repository", str(tiny_repository),
               "--translator", "tiny-transformer", "--batches", "1", "4", "--beam", "1", "--max-new", "12",
               "--runs", "1", "--rounds", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["batch 1 beam 1"]["same best hypothesis"] == "1 of 1"
    assert result["batch 4 beam 1"]["same best hypothesis"] == "4 of 4"
    for workload in ("batch 1 beam 1", "batch 4 beam 1"):
        row = result[workload]
        assert row["seqserve Translator ms"] > 0 and row["BeamSearch operator ms"] > 0
        ratio = row["BeamSearch operator ms"] / row["seqserve Translator ms"]
        assert row["operator / seqserve time"] == pytest.approx(ratio)


def test_report_rebuilds_a_runs_tables_from_its_json():
    """`benchmarks.report --tables` on a recorded run (benchmarks/results/run-seventh): every row of every JSON file,
    under its benchmark's heading, with the ratios the benchmark printed."""
    run = ROOT / "benchmarks" / "results" / "run-seventh"
    done = subprocess.run([sys.executable, "-m", "benchmarks.report", "--tables", str(run)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = {p.name: json.loads(p.read_text()) for p in run.glob("*.json")}
    lines = done.stdout.splitlines()
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == [f"## {data[n]['title']}" for n in ("encode.json", "translate_base.json",
                                                            "translate_small.json", "translate_rnn.json")] + [
        "## Under load (single-sentence requests, mixed lengths)"]  # fmt: skip
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| workload", "| task"))]
    assert len(rows) == sum(len(d["rows"]) for d in data.values())
    first = data["encode.json"]["rows"][3]  # sentence-transformers at batch 1: seqserve-grpc / it
    assert f"| {first['workload']} | {first['contender']} |" in done.stdout
    assert any(line.startswith(f"| {first['workload']} | {first['contender']} |") and
               line.endswith(f"| {first['ratio']:.2f}x |") for line in rows)  # fmt: skip
    assert all(note in done.stdout for d in data.values() for note in d.get("notes", []))


def test_contenders_are_timed_in_interleaved_rounds(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import common

    monkeypatch.setitem(common.TIMING, "settle_s", 0.0)
    monkeypatch.setitem(common.TIMING, "warmup_s", 0.0)
    monkeypatch.setitem(common.TIMING, "timed_s", 0.0)
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b")}
    timings = common.timed_interleaved(contenders, repeats=6, warmup=1, rounds=3)
    # Round 1: one warm-up and two timed runs each; rounds 2 and 3: one warm-up and two timed runs each.
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {name: result for name, (_, result) in timings.items()} == {"a": "a", "b": "b"}
    assert all(seconds >= 0 for seconds, _ in timings.values())


def test_fresh_removes_the_exported_repositories_and_keeps_what_they_come_from(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import EXPORTED_REPOSITORIES, clear_exports

    for name in EXPORTED_REPOSITORIES[:-1]:
        (tmp_path / name / "model" / "1").mkdir(parents=True)
        (tmp_path / name / "model" / "1" / "manifest.json").write_text("{}")
    (tmp_path / "all_repository").mkdir()
    (tmp_path / "all_repository" / "model").symlink_to(tmp_path / "encode_repository" / "model")
    kept = [tmp_path / "marian-small" / "hf", tmp_path / "marian-small" / "ct2", tmp_path / "rnn" / "lstm-h256-l2"]
    for folder in kept:
        folder.mkdir(parents=True)
    removed = clear_exports(tmp_path)
    assert sorted(p.name for p in removed) == sorted(EXPORTED_REPOSITORIES)
    assert not any((tmp_path / name).exists() for name in EXPORTED_REPOSITORIES)
    assert all(folder.is_dir() for folder in kept)
    assert clear_exports(tmp_path) == []  # nothing left to remove
