"""The issue's lever "the whole search inside onnxruntime": a Transformer version's encoder.onnx and decoder.onnx
wrapped as the two subgraphs of one com.microsoft BeamSearch node (model_type 1, the T5 contract that the CPU wheel
registers), timed against the server's Translator on the same sessions' graphs, batch 1 and 32, beam 4.

The wrapping is an A/B for this measurement, not a serving path: the BeamSearch operator runs Hugging Face's search
(length penalty as a power of the length, no joining, no per-sentence cancellation or deadline), so it cannot stand
in for the server's search; the two best hypotheses are compared in the output (with no EOS before the last step, as
in benchmarks.translate_transformer's MarianMT, both searches keep the k best prefixes by their summed
log-probabilities, and should agree).

The T5 contract (onnxruntime/contrib_ops/cpu/transformers/subgraph_t5_{encoder,decoder}.cc), "old" form:
  encoder subgraph: encoder_input_ids, encoder_attention_mask, decoder_input_ids (int32) -> logits (B, 1, V),
                    encoder_hidden_states, present_key_self_i / present_value_self_i (B, nh, 1, hs) for each layer,
                    then present_key_cross_i / present_value_cross_i (B, nh, S, hs)
                    (our encoder, then our decoder's first step from the start token)
  decoder subgraph: input_ids (B, 1), encoder_attention_mask, past_key_self_i / past_value_self_i ...,
                    past_key_cross_i / past_value_cross_i ... -> logits (B, 1, V), present_key_self_i / ...
Our decoder's log_probs serve as logits (the operator's log-softmax of log-probabilities is the identity).

    python -m benchmarks.beam_search_op --repository WORK/translate_repository --translator marian-small \\
        [--threads 2] [--batches 1 32] [--beam 4] [--max-new 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import load_in_process, machine, session_options


def _prefixed(path: Path, prefix: str) -> Any:
    """The graph of the ONNX file at `path` with every name prefixed (so two graphs can share a subgraph)."""
    import onnx
    from onnx import compose

    return compose.add_prefix(onnx.load(str(path)), prefix).graph


def _prune(nodes: list, outputs: set[str]) -> list:
    """The nodes `outputs` need, in their order."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if needed & set(node.output):
            kept.append(node)
            needed |= {name for name in node.input if name}
    return kept[::-1]


def contract(manifest: Any) -> tuple[list[str], list[str]]:
    """The version's memory and state names (cross_key_i, cross_value_i, ... / self_key_i, ...); ValueError unless it
    is a Transformer translator with the graph inputs this wrapping feeds."""
    memory = list((manifest.decoder or {}).get("memory", []))
    state = list((manifest.decoder or {}).get("state", []))
    graphs = manifest.graphs
    inputs = {g: sorted(spec.name for spec in graphs[g].inputs) if g in graphs else [] for g in ("encoder", "decoder")}
    expected = {"encoder": ["src_ids", "src_pad_mask"],
                "decoder": sorted({"prev_ids", "src_pad_mask", "cache_pad_mask", "topk", *memory, *state})}
    if manifest.architecture != "transformer" or inputs != expected:
        raise ValueError(
            f"{manifest.name}: the wrapping takes a Transformer translator whose graphs take {expected} "
            f"(docs/design.md); this is a {manifest.architecture!r} whose graphs take {inputs}"
        )  # fmt: skip
    return memory, state


def beam_search_model(version_dir: Path) -> Any:
    """A model of one com.microsoft BeamSearch node over the version's encoder.onnx and decoder.onnx."""
    from onnx import TensorProto, helper

    from seqserve.server.repository import Manifest

    manifest = Manifest.read(version_dir)
    memory, state = contract(manifest)
    special = manifest.special_tokens
    start = int(special.get("decoder_start", special.get("bos", 1)))
    vocab = next(s.shape[-1] for s in manifest.graphs["decoder"].outputs if s.name == "log_probs")
    layers = len(state) // 2
    i32, f32 = TensorProto.INT32, TensorProto.FLOAT

    def const(name: str, values: list[int], dtype: int = TensorProto.INT64) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    # Our decoder step, its names prefixed "d/", read once: both subgraphs run it (make_graph copies the nodes).
    decoder = _prefixed(version_dir / manifest.graphs["decoder"].file, "d/")

    def decoder_nodes(ids: str, mask: str, cached: str, inputs: dict[str, str]) -> tuple[list, list]:
        """The decoder step's nodes (and its weights), fed from `ids` (B, 1) int32, `mask` (B, S) int32, the cache
        length taken from `cached` and `inputs` (our input name -> value)."""
        prefix = "d/"
        x = "bs/" + prefix + "in/"  # the values fed to the decoder's inputs ("bs/": no imported name starts so)
        nodes = [
            const(x + "axis1", [1]),
            helper.make_node("Squeeze", [ids, x + "axis1"], [x + "ids1"]),
            helper.make_node("Cast", [x + "ids1"], [x + "prev_ids"], to=TensorProto.INT64),
            const(x + "zero_i32", [0], i32),
            helper.make_node("Equal", [mask, x + "zero_i32"], [x + "src_pad_mask"]),
            helper.make_node("Shape", [ids], [x + "rows"], start=0, end=1),
            helper.make_node("Shape", [cached], [x + "cache_len"], start=2, end=3),
            helper.make_node("Concat", [x + "rows", x + "cache_len"], [x + "cache_shape"], axis=0),
            helper.make_node("ConstantOfShape", [x + "cache_shape"], [x + "cache_pad_mask"],
                             value=helper.make_tensor("false", TensorProto.BOOL, [1], [False])),  # fmt: skip
            const(x + "topk", [1]),
        ]
        wiring = {name: x + name for name in ("prev_ids", "src_pad_mask", "cache_pad_mask", "topk")}
        wiring.update(inputs)
        nodes += [helper.make_node("Identity", [value], [prefix + name]) for name, value in wiring.items()]
        wanted = {prefix + "log_probs", *(prefix + f"new_{n}" for n in state)}
        return nodes + _prune(list(decoder.node), wanted), list(decoder.initializer)

    # The encoder subgraph: encode, then the first decoder step from the start token.
    encoder = _prefixed(version_dir / manifest.graphs["encoder"].file, "e/")
    nodes = [helper.make_node("Cast", ["encoder_input_ids"], ["e/src_ids"], to=TensorProto.INT64),
             const("bs/e/zero_i32", [0], i32),
             helper.make_node("Equal", ["encoder_attention_mask", "bs/e/zero_i32"], ["e/src_pad_mask"]),
             *encoder.node]  # fmt: skip
    step, step_weights = decoder_nodes("decoder_input_ids", "encoder_attention_mask", f"e/{state[0]}",
                                       {n: f"e/{n}" for n in memory + state})  # fmt: skip
    nodes += step
    nodes += [const("bs/e/axis1", [1]), helper.make_node("Unsqueeze", ["d/log_probs", "bs/e/axis1"], ["logits"]),
              helper.make_node("Transpose", [f"e/{memory[0]}"], ["bs/e/hidden_t"], perm=[0, 2, 1, 3]),
              const("bs/e/hidden_shape", [0, 0, -1]),
              helper.make_node("Reshape", ["bs/e/hidden_t", "bs/e/hidden_shape"],
                               ["encoder_hidden_states"])]  # fmt: skip
    outputs = ["logits", "encoder_hidden_states"]
    for i in range(layers):
        for kind in ("key", "value"):
            nodes.append(helper.make_node("Identity", [f"d/new_self_{kind}_{i}"], [f"present_{kind}_self_{i}"]))
            outputs.append(f"present_{kind}_self_{i}")
    for i in range(layers):
        for kind in ("key", "value"):
            nodes.append(helper.make_node("Identity", [f"e/cross_{kind}_{i}"], [f"present_{kind}_cross_{i}"]))
            outputs.append(f"present_{kind}_cross_{i}")
    encoder_graph = helper.make_graph(
        nodes, "t5_encoder",
        [helper.make_tensor_value_info(n, i32, ["B", s]) for n, s in
         (("encoder_input_ids", "S"), ("encoder_attention_mask", "S"), ("decoder_input_ids", 1))],
        [helper.make_tensor_value_info("logits", f32, ["B", 1, vocab]),
         helper.make_tensor_value_info("encoder_hidden_states", f32, ["B", "S", "H"]),
         *(helper.make_tensor_value_info(n, f32, ["B", "nh", "P" if "self" in n else "S", "hs"]) for n in outputs[2:])],
        initializer=[*encoder.initializer, *step_weights],
    )  # fmt: skip

    # The decoder subgraph: one step.
    past = [f"past_{kind}_{side}_{i}" for side in ("self", "cross") for i in range(layers) for kind in ("key", "value")]
    inputs = {f"self_{kind}_{i}": f"past_{kind}_self_{i}" for i in range(layers) for kind in ("key", "value")}
    inputs.update({f"cross_{kind}_{i}": f"past_{kind}_cross_{i}" for i in range(layers) for kind in ("key", "value")})
    step, step_weights = decoder_nodes("input_ids", "encoder_attention_mask", "past_key_self_0", inputs)
    step += [const("bs/d/axis1", [1]), helper.make_node("Unsqueeze", ["d/log_probs", "bs/d/axis1"], ["logits"])]
    presents = [f"present_{kind}_self_{i}" for i in range(layers) for kind in ("key", "value")]
    step += [helper.make_node("Identity", [f"d/new_self_{kind}_{i}"], [f"present_{kind}_self_{i}"])
             for i in range(layers) for kind in ("key", "value")]  # fmt: skip
    decoder_graph = helper.make_graph(
        step, "t5_decoder",
        [helper.make_tensor_value_info("input_ids", i32, ["B", 1]),
         helper.make_tensor_value_info("encoder_attention_mask", i32, ["B", "S"]),
         *(helper.make_tensor_value_info(n, f32, ["B", "nh", "P" if "self" in n else "S", "hs"]) for n in past)],
        [helper.make_tensor_value_info("logits", f32, ["B", 1, vocab]),
         *(helper.make_tensor_value_info(n, f32, ["B", "nh", "P1", "hs"]) for n in presents)],
        initializer=step_weights,
    )  # fmt: skip

    search = helper.make_node(
        "BeamSearch",
        ["input_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
         "repetition_penalty", "", "", "attention_mask"],
        ["sequences"], domain="com.microsoft", model_type=1, encoder=encoder_graph, decoder=decoder_graph,
        eos_token_id=int(special.get("eos", 2)), pad_token_id=int(special.get("pad", 0)),
        decoder_start_token_id=start, vocab_size=vocab, early_stopping=0, no_repeat_ngram_size=0,
    )  # fmt: skip
    graph = helper.make_graph(
        [search], "beam_search",
        [helper.make_tensor_value_info("input_ids", i32, ["batch", "S"]),
         *(helper.make_tensor_value_info(n, i32, [1])
           for n in ("max_length", "min_length", "num_beams", "num_return_sequences")),
         *(helper.make_tensor_value_info(n, f32, [1]) for n in ("length_penalty", "repetition_penalty")),
         helper.make_tensor_value_info("attention_mask", i32, ["batch", "S"])],
        [helper.make_tensor_value_info("sequences", i32, ["batch", "n", "T"])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


class OperatorSearch:
    """One BeamSearch session: token ids in, each sentence's best hypothesis (without start token, EOS, padding) out."""

    def __init__(self, version_dir: Path, threads: int, eos_id: int, pad_id: int):
        import tempfile

        import onnx

        with tempfile.TemporaryDirectory(prefix="seqserve-beamsearch-") as tmp:
            path = Path(tmp) / "beam_search.onnx"
            onnx.save(beam_search_model(version_dir), str(path))
            self.session = session_options(threads).open(path)
        self.eos_id, self.pad_id = eos_id, pad_id

    def translate_ids(self, sources: list[list[int]], beam: int, max_new: int) -> list[list[int]]:
        longest = max(len(s) for s in sources)
        ids = np.full((len(sources), longest), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(sources), longest), dtype=np.int32)
        for i, s in enumerate(sources):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        # min_length: onnxruntime 1.32's kernel refuses to run without it ("Node input max_length is required").
        feeds = {"input_ids": ids, "attention_mask": mask, "max_length": np.array([max_new + 1], np.int32),
                 "min_length": np.array([0], np.int32),
                 "num_beams": np.array([beam], np.int32), "num_return_sequences": np.array([1], np.int32),
                 # No length penalty: the server's default (DecodeOptions.length_penalty 0, a plain sum).
                 "length_penalty": np.array([0.0], np.float32), "repetition_penalty": np.array([1.0], np.float32)}
        (sequences,) = self.session.run(None, feeds)  # (B, 1, T), the start token first
        out = []
        for row in sequences[:, 0, 1:].tolist():
            tokens = []
            for t in row:
                if t in (self.eos_id, self.pad_id):
                    break
                tokens.append(t)
            out.append(tokens)
        return out


def measure(version_dir: Path, threads: int, batches: list[int], beam: int, max_new: int, runs: int,
            rounds: int) -> dict[str, Any]:  # fmt: skip
    from benchmarks.levers import median_us
    from benchmarks.translate_transformer import sources_of_length
    from seqserve.server.translation import DecodeOptions, Translator

    loaded = load_in_process(version_dir, threads)
    translator = Translator.for_model(loaded)
    step = translator.step_model
    operator = OperatorSearch(version_dir, threads, step.eos_id, step.pad_id)
    options = DecodeOptions(beam_size=beam, max_output_tokens=max_new)
    texts = sources_of_length(loaded.tokenizers["source"], max(batches), 20, seed=3)
    sources = [translator.codec.encode(t).ids for t in texts]

    def ours(work: list[list[int]]) -> list[list[int]]:
        jobs = [translator.job(ids, options) for ids in work]
        translator.run_batch(jobs, stopped=lambda i: False, on_step=lambda rows: None, on_done=lambda i: None)
        return [list(job.result[0].tokens) for job in jobs]

    result: dict[str, Any] = {"model": str(version_dir), "beam": beam, "max_new": max_new, "threads": threads,
                              "machine": machine()}  # fmt: skip
    for batch in batches:
        work = sources[:batch]
        a, b = ours(work), operator.translate_ids(work, beam, max_new)
        same = sum(x == y for x, y in zip(a, b))
        times: dict[str, list[float]] = {"seqserve Translator": [], "BeamSearch operator": []}
        for _ in range(rounds):
            times["seqserve Translator"].append(median_us(lambda: ours(work), runs) / 1000)
            times["BeamSearch operator"].append(
                median_us(lambda: operator.translate_ids(work, beam, max_new), runs) / 1000)
        ms = {label: statistics.median(v) for label, v in times.items()}
        result[f"batch {batch} beam {beam}"] = {
            **{f"{label} ms": value for label, value in ms.items()},
            "operator / seqserve time": ms["BeamSearch operator"] / ms["seqserve Translator"],
            "same best hypothesis": f"{same} of {batch}",
        }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--translator", required=True, help="a Transformer translator of --repository")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (the process's shared pool)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sentences a call")
    parser.add_argument("--beam", type=int, default=4, help="beam size")
    parser.add_argument("--max-new", type=int, default=20, help="target tokens at most")
    parser.add_argument("--runs", type=int, default=10, help="timed calls a round (median)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (median of the rounds' medians)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    from seqserve.server.repository import Manifest, ModelRepository, RepositoryError

    try:
        version_dir = ModelRepository(args.repository).version_dir(args.translator)
        contract(Manifest.read(version_dir))
    except (RepositoryError, ValueError) as exc:
        parser.error(str(exc))
    result = measure(version_dir, args.threads, args.batches, args.beam, args.max_new, args.runs, args.rounds)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
