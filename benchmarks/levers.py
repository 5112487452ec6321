"""Micro-benchmarks of the levers docs/benchmarks.md cites (each A/B in one run, medians of many repetitions):

  pool     one model at batch 1 back to back and with 1 ms / 5 ms between runs, in two fresh processes: a per-session
           non-spinning onnxruntime pool (the server before) and the process's shared spinning pool (`seqserve serve`)
  topk     each row's best 9 of (128, 8000) log-probs: onnxruntime TopK (what add_top_k puts in decoder graphs) vs
           numpy argpartition
  gather   reordering a (128, 4, 20, 64) key/value cache by beam parents: fancy indexing vs np.take vs onnxruntime
           Gather; and with 42 % of rows moved (MarianMT small, batch 32 x beam 4): np.take of every row vs copying
           the moved rows in place
  mha past one decoder self-attention sublayer at batch 1 with 10 cached positions (MarianMT small's sizes): the
           exported form (projections, bias Adds, Reshape/Transpose/Concat onto the caches, MultiHeadAttention) vs
           MultiHeadAttention taking the bias and the caches itself (past/present)
  cross attention  a beam search's cross-attention at MarianMT small's sizes (batch 32 x beam 4, 24 source
           positions): each of the 128 beam rows one query over its own copy of the memory (the exported decoder) vs
           each sentence's 4 queries together over one copy
  open     opening every graph of a model repository with onnxruntime's optimisation `all` (the server's) vs none
           (the most that saving optimised graphs into the repository could spare at start-up)
  layernorm  a residual add and layer norm of (1024, 384) floats (MiniLM's batch 32 x 32) and of (1, 384): onnxruntime's
           com.microsoft SkipLayerNormalization vs ONNX Add + Add + LayerNormalization (what encoders keep on CPU)
  rank     the exact ranking of one beam-4 search's candidates: the single-search path vs the batched one
  greedy   one batch-1 greedy RNN translation in process: greedy.onnx (the whole decode in one run) vs a step graph
           run a step
  inline   batch-1 Encode over gRPC against two `seqserve serve` processes, small BERT batches on the event loop
           (--inline-max-ms, the default) and always in the worker pool (--inline-max-ms 0), in alternating rounds;
           and a health check's round trip to the same server, the floor any gRPC request pays
  state    one translation in process (batch 1 greedy, batch 1, 8 and 32 beam 4): decoder state as numpy between
           steps reordered by numpy's take, by the gather graphs always, by them from HOST_GATHER_GRAPH_BYTES (the
           CPU's path), and as OrtValues with IO binding and the gather graphs (device_state, the GPU's path)

    python -m benchmarks.levers --threads 2 [--model WORK/encode_repository/minilm/1/model.onnx]
        [--repository WORK/encode_repository --bert minilm] [--rnn-repository WORK/rnn_repository --rnn NAME ...]
        [--open-repository model_repository] [--state-repository REPO --translator NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import DEFAULT_WORK


def median_us(fn: Callable[[], Any], runs: int, gap_s: float = 0.0) -> float:
    for _ in range(max(3, runs // 10)):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if gap_s:
            time.sleep(gap_s)
    return statistics.median(times) * 1e6


def _graph(nodes: list, inputs: list, outputs: list, initializer: list = ()) -> bytes:
    """A serialized opset-17 model (com.microsoft operators allowed) of these nodes."""
    from onnx import helper

    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(nodes, "lever", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def _session(graph: bytes, threads: int, disabled_optimizers: list[str] = ()) -> Any:
    """A plain onnxruntime session of `threads` intra-op threads (its own pool) on a lever's graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))  # fmt: skip


def _mlp() -> bytes:
    """Stand-in model when no exported one is given: six 384 -> 1536 -> 384 blocks (MiniLM's matmul sizes)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(6):
        for j, shape in enumerate(((384, 1536), (1536, 384))):
            w = f"w{i}_{j}"
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.02, w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"{w}_out"]))
            x = f"{w}_out"
    return _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L", 384])],
                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)  # fmt: skip


def _feeds(session: Any) -> dict[str, np.ndarray]:
    """Batch 1, 11 positions: token-like ids for int64 inputs, random floats otherwise."""
    feeds = {}
    for spec in session.get_inputs():
        shape = [1, 11] + [d if isinstance(d, int) else 1 for d in spec.shape[2:]]
        if spec.type == "tensor(int64)":
            value = 1 if "mask" in spec.name else 0 if "type" in spec.name else 7  # mask, token types, token ids
            feeds[spec.name] = np.full(shape, value, dtype=np.int64)
        else:
            feeds[spec.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return feeds


def pool_child(kind: str, model: str, threads: int, runs: int) -> dict[str, float]:
    """In a fresh process: one model at batch 1 with the pool `kind` ("session" or "shared")."""
    import onnxruntime as ort

    from seqserve.server.repository import SessionOptions, shared_thread_pool

    if kind == "shared":
        shared_thread_pool(threads, 1)
    options = SessionOptions(intra_op_threads=threads, inter_op_threads=1)
    source = _mlp() if model == "mlp" else model  # bytes or a path: the graph as the server opens one
    session = ort.InferenceSession(source, options.ort_options(), providers=options.providers(),
                                   disabled_optimizers=options.disabled_optimizers())  # fmt: skip
    feeds = _feeds(session)
    return {f"gap {gap * 1e3:.0f} ms": median_us(lambda: session.run(None, feeds), runs, gap) / 1e3
            for gap in (0.0, 0.001, 0.005)}  # fmt: skip


def pool(model: str, threads: int, runs: int) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("session", "shared"):
        command = [sys.executable, "-m", "benchmarks.levers", "--pool-child", kind, "--model", model,
                   "--threads", str(threads), "--runs", str(runs)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the {kind} pool measurement failed: {done.stderr[-2000:]}")
        out[kind] = json.loads(done.stdout)
    return out


def topk(threads: int, runs: int, rows: int = 128, vocab: int = 8000, k: int = 9) -> dict[str, float]:
    from onnx import TensorProto, helper

    graph = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", "v"]),
                    helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                   [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info("i", TensorProto.INT64, None)])  # fmt: skip
    session = _session(graph, threads)
    x = np.random.default_rng(0).standard_normal((rows, vocab)).astype(np.float32)
    feeds = {"x": x, "k": np.array([k], dtype=np.int64)}
    return {
        "onnxruntime TopK us": median_us(lambda: session.run(None, feeds), runs),
        "numpy argpartition us": median_us(lambda: np.argpartition(x, vocab - k, axis=1), runs),
    }


def gather(threads: int, runs: int, shape: tuple[int, ...] = (128, 4, 20, 64)) -> dict[str, float]:
    from onnx import TensorProto, helper

    graph = _graph([helper.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", *shape[1:]]),
                    helper.make_tensor_value_info("i", TensorProto.INT64, ["n"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # fmt: skip
    session = _session(graph, threads)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    index = np.random.default_rng(1).integers(0, shape[0], shape[0])
    # Beam steps mostly keep a row's parent in its slot (58 % at MarianMT small, batch 32 x beam 4).
    partial = np.arange(shape[0])
    moved = np.random.default_rng(2).choice(shape[0], int(0.42 * shape[0]), replace=False)
    partial[moved] = np.random.default_rng(3).integers(0, shape[0], len(moved))
    rows = np.flatnonzero(partial != np.arange(shape[0]))

    def in_place() -> None:
        x[rows] = x[partial[rows]]

    return {
        "fancy indexing us": median_us(lambda: x[index], runs),
        "np.take us": median_us(lambda: np.take(x, index, axis=0), runs),
        "onnxruntime Gather us": median_us(lambda: session.run(None, {"x": x, "i": index}), runs),
        "np.take, 42 % moved us": median_us(lambda: np.take(x, partial, axis=0), runs),
        "in place, 42 % moved us": median_us(in_place, runs),
    }


def mha_past(threads: int, runs: int, hidden: int = 256, heads: int = 4, cached: int = 10) -> dict[str, float]:
    from onnx import TensorProto, helper, numpy_helper

    size = hidden // heads
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.05 for k in "qkv"}
    biases = {k: rng.standard_normal(hidden).astype(np.float32) * 0.1 for k in "qkv"}
    shared = [numpy_helper.from_array(weights[k], f"w{k}") for k in "qkv"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, hidden]),
              *(helper.make_tensor_value_info(f"past_{k}", TensorProto.FLOAT, ["b", heads, "p", size]) for k in "kv"),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 1, 1, "p1"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_k", "present_v")]
    attention = {"domain": "com.microsoft", "num_heads": heads, "scale": 1 / np.sqrt(size)}
    exported = [helper.make_node("MatMul", ["x", f"w{k}"], [f"m{k}"]) for k in "qkv"]
    exported += [helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"]) for k in "qkv"]
    for k in "kv":
        exported += [helper.make_node("Reshape", [f"a{k}", "heads"], [f"r{k}"]),
                     helper.make_node("Transpose", [f"r{k}"], [f"t{k}"], perm=[0, 2, 1, 3]),
                     helper.make_node("Concat", [f"past_{k}", f"t{k}"], [f"present_{k}"], axis=2)]  # fmt: skip
    exported.append(helper.make_node("MultiHeadAttention", ["aq", "present_k", "present_v", "", "", "bias"], ["out"],
                                     **attention))  # fmt: skip
    fused = [helper.make_node("MatMul", ["x", f"w{k}"], [f"m{k}"]) for k in "qkv"]
    fused.append(helper.make_node("MultiHeadAttention", ["mq", "mk", "mv", "bqkv", "", "bias", "past_k", "past_v"],
                                  ["out", "present_k", "present_v"], **attention))  # fmt: skip
    apart = [numpy_helper.from_array(biases[k], f"b{k}") for k in "qkv"]
    apart.append(numpy_helper.from_array(np.array([0, 1, heads, size], dtype=np.int64), "heads"))
    packed = [numpy_helper.from_array(np.concatenate([biases[k] for k in "qkv"]), "bqkv")]
    sessions = {"exported": _session(_graph(exported, inputs, outputs, shared + apart), threads),
                "past/present": _session(_graph(fused, inputs, outputs, shared + packed), threads)}
    bias = np.zeros((1, 1, 1, cached + 1), dtype=np.float32)
    bias[..., :2] = -10000.0  # two masked positions, as a row that joined late has
    feeds = {"x": rng.standard_normal((1, 1, hidden)).astype(np.float32), "bias": bias,
             **{f"past_{k}": rng.standard_normal((1, heads, cached, size)).astype(np.float32) for k in "kv"}}
    for a, b in zip(*(session.run(None, feeds) for session in sessions.values())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # the same outputs, or the lever measures nothing
    return {f"{name} us": median_us(lambda s=session: s.run(None, feeds), runs) for name, session in sessions.items()}


def cross_attention(
    threads: int, runs: int, sentences: int = 32, beam: int = 4, source: int = 24, hidden: int = 256, heads: int = 4,
) -> dict[str, float]:  # fmt: skip
    """A beam search's cross-attention at MarianMT small's sizes: every beam row as its own query over its own copy
    of the sentence's memory (the exported decoder: batch x beam rows, one query each) against the beam's queries
    together over one copy (batch rows of `beam` queries), as a decoder could if it knew the beam grouping."""
    from onnx import TensorProto, helper

    size = hidden // heads
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", hidden]),
              *(helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", heads, "t", size]) for k in "kv"),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 1, "s", "t"])]  # fmt: skip
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["out"], domain="com.microsoft",
                            num_heads=heads, scale=1 / np.sqrt(size))  # fmt: skip
    session = _session(_graph([node], inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]), threads)
    rng = np.random.default_rng(0)
    memory = {k: rng.standard_normal((sentences, heads, source, size)).astype(np.float32) for k in "kv"}
    bias = np.zeros((sentences, 1, 1, source), dtype=np.float32)
    bias[::2, ..., -3:] = -10000.0  # every other sentence 3 positions shorter: padding
    queries = rng.standard_normal((sentences, beam, hidden)).astype(np.float32)
    rows = {"q": queries.reshape(sentences * beam, 1, hidden), "bias": np.repeat(bias, beam, axis=0),
            **{k: np.repeat(m, beam, axis=0) for k, m in memory.items()}}  # fmt: skip
    grouped = {"q": queries, "bias": np.repeat(bias, beam, axis=2), **memory}
    (by_row,), (by_sentence,) = session.run(None, rows), session.run(None, grouped)
    np.testing.assert_allclose(by_row.reshape(by_sentence.shape), by_sentence, rtol=1e-5, atol=1e-5)
    return {f"{sentences * beam} rows x 1 query us": median_us(lambda: session.run(None, rows), runs),
            f"{sentences} sentences x {beam} queries us": median_us(lambda: session.run(None, grouped), runs)}


def open_graphs(repository: Path, threads: int, rounds: int = 3) -> dict[str, float]:
    """ms to open every graph of the repository's highest versions, best of `rounds`, at two optimisation levels."""
    from seqserve.server.repository import ModelRepository, SessionOptions

    repo = ModelRepository(repository)
    graphs = [repo.version_dir(name) / spec.file for name in repo.models()
              for spec in repo.manifest(name).graphs.values()]  # fmt: skip
    out = {}
    for level in ("all", "disable"):
        options = SessionOptions(intra_op_threads=threads, graph_optimization=level)
        best = []
        for _ in range(rounds):
            start = time.perf_counter()
            for graph in graphs:
                options.open(graph)
            best.append(time.perf_counter() - start)
        out[f"{len(graphs)} graphs, optimisation {level} ms"] = min(best) * 1e3
    return out


def layernorm(threads: int, runs: int, hidden: int = 384) -> dict[str, float]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.random(hidden).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    io = ([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", hidden]) for n in ("x", "skip")],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # fmt: skip
    fused = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                              domain="com.microsoft", epsilon=1e-12)]  # fmt: skip
    apart = [helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("Add", ["xb", "skip"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    # Without the fusion onnxruntime would turn the second graph into the first.
    forms = {"SkipLayerNormalization": fused, "Add + LayerNormalization": apart}
    sessions = {name: _session(_graph(nodes, *io, weights), threads, ["SkipLayerNormFusion"])
                for name, nodes in forms.items()}  # fmt: skip
    out = {}
    for rows in (1024, 1):
        feeds = {n: rng.random((rows, hidden)).astype(np.float32) for n in ("x", "skip")}
        for name, session in sessions.items():
            out[f"{name}, {rows} rows us"] = median_us(lambda: session.run(None, feeds), runs)
    return out


def rank(runs: int, beam: int = 4, vocab: int = 8000) -> dict[str, float]:
    from seqserve.server.decoding import BeamSearch
    from seqserve.server.ranking import rank_beams

    search = BeamSearch(max_len=10, eos_id=2, beam_size=beam)
    search.live_tokens, search.live_scores = [(1,)] * beam, [(-0.5, -1.0)] * beam
    log_probs = np.log(np.random.default_rng(0).dirichlet(np.ones(vocab), beam)).astype(np.float32)
    ids = np.argsort(-log_probs, axis=1, kind="stable")[:, : 2 * beam + 1]
    values = np.take_along_axis(log_probs, ids, axis=1)
    rows = np.arange(beam)
    two = [np.arange(beam), np.arange(beam, 2 * beam)]
    both_values, both_ids = np.concatenate([values, values]), np.concatenate([ids, ids])
    return {
        "one search us": median_us(lambda: rank_beams([search], [rows], values, ids, False), runs),
        "two searches batched us": median_us(lambda: rank_beams([search, search], two, both_values, both_ids, False),
                                             runs),  # fmt: skip
    }


def inline(repository: Path, bert: str, threads: int, runs: int, rounds: int = 6) -> dict[str, float]:
    """Median ms of a batch-1 Encode over gRPC: inline on vs off, `rounds` alternating rounds of `runs` requests."""
    from benchmarks.common import ServerProcess
    from seqserve.clients import Client

    text = ["the model server runs fast on every small machine"]
    times: dict[str, list[float]] = {"event loop (default)": [], "worker pool (--inline-max-ms 0)": []}
    round_trips: list[float] = []
    off = ["--models", bert, "--inline-max-ms", "0"]
    servers = {"event loop (default)": ServerProcess(repository, threads, ["--models", bert]),
               "worker pool (--inline-max-ms 0)": ServerProcess(repository, threads, off)}  # fmt: skip
    try:
        clients = {name: Client(server.address) for name, server in servers.items()}
        health = clients["event loop (default)"].health
        for _ in range(rounds):
            for name, client in clients.items():
                times[name].append(median_us(lambda: client.encode(bert, text, truncate=True), runs) / 1000)
            round_trips.append(median_us(lambda: health(""), runs) / 1000)
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.close()
    return {**{name: statistics.median(values) for name, values in times.items()},
            "health check round trip": statistics.median(round_trips)}  # fmt: skip


def greedy_loop(repository: Path, models: list[str], threads: int, runs: int, rounds: int = 6) -> dict[str, float]:
    """Median ms of one batch-1 greedy translation in process (the server's Translator, tokenizing included) of each RNN
    model: through greedy.onnx (the default) and a step graph run a step, in `rounds` alternating rounds."""
    from benchmarks.common import load_in_process
    from benchmarks.translate_transformer import InProcess
    from seqserve.models.synthetic import reversal_pairs
    from seqserve.server.repository import ModelRepository

    [text] = [source for source, _ in reversal_pairs(1, seed=1, min_len=18, max_len=22)]
    out: dict[str, float] = {}
    for name in models:
        loaded = load_in_process(ModelRepository(repository).version_dir(name), threads)
        loop, stepping = InProcess(loaded), InProcess(loaded)  # one model's sessions, two step models over them
        if not loop.translator.step_model.has_loop:
            raise SystemExit(f"{name} in {repository} has no greedy.onnx (exported before it, or not an RNN)")
        stepping.translator.step_model.loop = None
        [a], [b] = loop.translate([text], 1, 44), stepping.translate([text], 1, 44)
        if a.tokens != b.tokens:
            raise SystemExit(f"{name}: greedy.onnx gave {a.tokens}, the step graph {b.tokens}")
        times: dict[str, list[float]] = {"greedy.onnx": [], "step graph": []}
        for _ in range(rounds):
            for label, contender in (("greedy.onnx", loop), ("step graph", stepping)):
                times[label].append(median_us(lambda: contender.translate([text], 1, 44), runs) / 1000)
        out.update({f"{name} {label} ({len(a.tokens)} tokens)": statistics.median(v) for label, v in times.items()})
    return out


def decoder_state(repository: Path, model: str, threads: int, runs: int, rounds: int = 6) -> dict[str, float]:
    """Median ms of one translation in process (the server's Translator) of `model`, batch 1 greedy and batch 1, 8 and
    32 beam 4, in `rounds` alternating rounds, with the decoder state: as numpy between steps, reordered by numpy's
    take; as numpy, every reorder through the gather graphs; as numpy, through the gather graphs once a gather is
    HOST_GATHER_GRAPH_BYTES or more (the CPU's default); as OrtValues bound with IO binding and reordered by the
    gather graphs (device_state, the GPU's)."""
    from benchmarks.common import load_in_process
    from benchmarks.translate_transformer import InProcess
    from seqserve.models.synthetic import reversal_pairs
    from seqserve.server.repository import ModelRepository

    loaded = load_in_process(ModelRepository(repository).version_dir(model), threads)
    try:
        ours = {label: InProcess(loaded, device_state=False) for label in ("numpy, take", "numpy, graph", "numpy")}
        ours["io binding"] = InProcess(loaded, device_state=True)
    except ValueError as exc:  # an export that predates the gather graphs
        raise SystemExit(str(exc))
    ours["numpy, take"].translator.step_model.host_gather_graph_bytes = float("inf")
    ours["numpy, graph"].translator.step_model.host_gather_graph_bytes = 0
    texts = [source for source, _ in reversal_pairs(32, seed=2, min_len=14, max_len=20)]
    out: dict[str, float] = {}
    for batch, beam in ((1, 1), (1, 4), (8, 4), (32, 4)):
        work = texts[:batch]
        a, *others = [[r.tokens for r in o.translate(work, beam, 20)] for o in ours.values()]
        if any(a != b for b in others):
            raise SystemExit(f"{model}: the state paths decode differently: {a} against {others}")
        times: dict[str, list[float]] = {label: [] for label in ours}
        for _ in range(rounds):
            for label, contender in ours.items():
                times[label].append(median_us(lambda: contender.translate(work, beam, 20), max(runs // 10, 3)) / 1000)
        out.update({f"batch {batch} beam {beam} state as {label}": statistics.median(v) for label, v in times.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--runs", type=int, default=300, help="timed repetitions a measurement (median reported)")
    parser.add_argument("--model", default=None, help="ONNX model for the pool lever; default: the exported MiniLM "
                        "of benchmarks.encode when present, else a stand-in MLP of MiniLM's matmul sizes")
    parser.add_argument("--repository", type=Path, default=DEFAULT_WORK / "encode_repository",
                        help="model repository holding --bert, for the inline lever")  # fmt: skip
    parser.add_argument("--bert", default="minilm", help="BERT model of --repository for the inline lever")
    parser.add_argument("--rnn-repository", type=Path, default=DEFAULT_WORK / "rnn_repository",
                        help="model repository holding the --rnn models, for the greedy-loop lever")  # fmt: skip
    parser.add_argument("--rnn", nargs="+", default=["lstm-h256-l2", "gru-h256-l2"],
                        help="RNN translators of --rnn-repository for the greedy-loop lever")  # fmt: skip
    parser.add_argument("--translator", default="tiny-transformer",
                        help="translator of --state-repository for the decoder-state lever")
    parser.add_argument("--state-repository", type=Path, default=Path("model_repository"),
                        help="model repository holding --translator, exported with the gather graphs")
    parser.add_argument("--open-repository", type=Path, default=Path("model_repository"),
                        help="model repository whose graphs the open lever opens (default: make serve's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="few repetitions: checks the script, measures nothing")
    parser.add_argument("--pool-child", choices=("session", "shared"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 5
    if args.model is None:
        minilm = DEFAULT_WORK / "encode_repository" / "minilm" / "1" / "model.onnx"
        args.model = str(minilm) if minilm.is_file() and not args.quick else "mlp"
    if args.pool_child:
        sys.stdout.write(json.dumps(pool_child(args.pool_child, args.model, args.threads, args.runs)))
        return 0
    results = {
        "pool (ms a batch-1 run)": pool(args.model, args.threads, args.runs),
        "topk": topk(args.threads, args.runs),
        "gather": gather(args.threads, args.runs),
        "mha past": mha_past(args.threads, args.runs),
        "cross attention": cross_attention(args.threads, args.runs),
        "open (ms to open a repository's graphs)": open_graphs(args.open_repository, args.threads,
                                                               1 if args.quick else 3),  # fmt: skip
        "layernorm": layernorm(args.threads, args.runs),
        "rank": rank(args.runs),
        "inline (ms a batch-1 Encode over gRPC)": inline(args.repository, args.bert, args.threads, args.runs,
                                                         2 if args.quick else 6),  # fmt: skip
        "greedy loop (ms a batch-1 RNN translation)": greedy_loop(args.rnn_repository, args.rnn, args.threads,
                                                                  args.runs, 2 if args.quick else 6),  # fmt: skip
        "decoder state (ms a translation)": decoder_state(args.state_repository, args.translator, args.threads,
                                                          args.runs, 2 if args.quick else 6),  # fmt: skip
    }
    for name, values in results.items():
        sys.stdout.write(f"{name}: {json.dumps(values)}\n")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
