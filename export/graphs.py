"""torch models -> ONNX graphs with the names and dynamic axes of docs/design.md.

Letters: B batch, S source length, t cache length (decoder steps so far), V vocabulary, L sequence length (BERT).

We use the TorchScript exporter (``dynamo=False``): onnxruntime's BERT optimizer fuses attention only in the graphs it
produces, and it exports our tiny graphs in about a second where torch.export takes several. Dynamic axes are not
guessed from the model code: each graph's example is run at two batch sizes and two lengths, and every output axis
that moved is declared dynamic (an LSTM's memory would otherwise keep the example's length as a fixed dimension).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from seqserve.server.repository import (
    DECODER_CACHE_PAD_MASK, DECODER_TOP_K_INPUT, DECODER_TOP_K_OUTPUTS, GATHER_ROWS_INPUT, GATHERED_PREFIX, GraphSpec,
    TensorSpec,
)

log = logging.getLogger(__name__)

OPSET = 17
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BERT_OUTPUTS = ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits")

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.bool: "bool"}


# --------------------------------------------------------------------------------------------------------------
# Graph wrappers: flat tensor tuples in and out, in the order of the contract.


class BertGraph(nn.Module):
    """Bert.forward with the outputs that exist, as a flat tuple."""

    def __init__(self, model: nn.Module, outputs: Sequence[str]):
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        return tuple(getattr(out, name) for name in self.outputs)


class MLMHeadGraph(nn.Module):
    """The masked-LM head alone: sequence_output (B, L, H) -> mlm_logits (B, L, V), position by position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.mlm

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.head(sequence_output)  # (B, L, V)


class EncoderGraph(nn.Module):
    """encode(src_ids, src_pad_mask) -> (*memory, *initial state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, ...]:
        memory, state = self.model.encode(src_ids, src_pad_mask)
        return (*memory, *state)


class DecoderStepGraph(nn.Module):
    """decode_step(prev_ids, memory, src_pad_mask, state) -> (log_probs, *new state), memory and state flattened; for
    a model whose caches can be masked (`masks_cache`, the Transformer), cache_pad_mask follows src_pad_mask."""

    def __init__(self, model: nn.Module, n_memory: int):
        super().__init__()
        self.model = model
        self.n_memory = n_memory
        self.masks_cache = bool(getattr(model, "masks_cache", False))

    def forward(self, prev_ids: Tensor, src_pad_mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        extra = {"cache_pad_mask": tensors[0]} if self.masks_cache else {}
        memory_and_state = tensors[1:] if self.masks_cache else tensors
        memory = tuple(memory_and_state[: self.n_memory])
        state = tuple(memory_and_state[self.n_memory :])
        log_probs, new_state = self.model.decode_step(prev_ids, memory, src_pad_mask, state, **extra)
        return (log_probs, *new_state)


def memory_names(model: nn.Module) -> list[str]:
    return list(model.memory_names())


def state_names(model: nn.Module) -> list[str]:
    return list(model.state_names())


# --------------------------------------------------------------------------------------------------------------
# Dynamic axes by experiment


def _moved_axes(a: Sequence[Tensor], b: Sequence[Tensor], label: str) -> list[dict[int, str]]:
    """For each pair of same-named tensors, the axes whose size differs between the two runs, labelled."""
    axes = []
    for x, y in zip(a, b):
        if x.dim() != y.dim():
            raise ValueError(f"an output changed rank between example runs: {tuple(x.shape)} vs {tuple(y.shape)}")
        axes.append({i: label for i in range(x.dim()) if x.shape[i] != y.shape[i]})
    return axes


def _merge(*axis_maps: list[dict[int, str]]) -> list[dict[int, str]]:
    merged = [dict() for _ in axis_maps[0]]
    for maps in axis_maps:
        for m, extra in zip(merged, maps):
            for axis, name in extra.items():
                if axis in m and m[axis] != name:
                    raise ValueError(f"axis {axis} moves with both {m[axis]} and {name}")
                m[axis] = name
    return merged


def _specs(names: Sequence[str], tensors: Sequence[Tensor], axes: Sequence[dict[int, str]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name, _DTYPES[t.dtype], tuple(ax.get(i, int(t.shape[i])) for i in range(t.dim())))
        for name, t, ax in zip(names, tensors, axes)
    )


@dataclass(frozen=True)
class ExportedGraph:
    spec: GraphSpec
    path: Path


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
) -> ExportedGraph:
    dynamic_axes = {
        spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in (*inputs, *outputs)
    }
    # Grad mode on: under no_grad the tracer fails on the custom autograd.Function that models/rnn.py exports as one
    # ONNX LSTM/GRU node ("unordered_map::at").
    with warnings.catch_warnings(), torch.enable_grad():
        # The TorchScript exporter is deprecated in favour of dynamo; see the module docstring for why we keep it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return ExportedGraph(GraphSpec(path.name, inputs, outputs), path)


# --------------------------------------------------------------------------------------------------------------
# Examples


def example_source(batch: int, length: int, vocab: int, seed: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """src_ids (B, S) with unequal lengths (row i shorter by i, at least 1) and src_pad_mask (B, S), True at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)  # (B, S), past the special tokens
    lengths = torch.tensor([max(1, length - i) for i in range(batch)])  # (B,)
    pad_mask = torch.arange(length)[None, :] >= lengths[:, None]  # (B, S)
    return ids.masked_fill(pad_mask, pad_id), pad_mask


def example_bert_inputs(batch: int, length: int, vocab: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask (1 at real tokens, rows of unequal length), token_type_ids (second half = 1)."""
    ids, pad_mask = example_source(batch, length, vocab, seed)
    attention_mask = (~pad_mask).long()  # (B, L)
    token_type_ids = (torch.arange(length)[None, :] >= length // 2).long().expand(batch, length) * attention_mask
    return ids, attention_mask, token_type_ids.contiguous()


# --------------------------------------------------------------------------------------------------------------
# Exports


def bert_outputs(model: nn.Module, split_mlm: bool = False) -> list[str]:
    """The outputs of model.onnx: sequence_output, plus pooled_output and the heads when configured
    (without mlm_logits when the MLM head is a graph of its own)."""
    config = model.config
    names = ["sequence_output"]
    if config.with_pooler:
        names.append("pooled_output")
    if config.with_heads:
        names += ["nsp_logits"] if split_mlm else ["mlm_logits", "nsp_logits"]
    return names


@torch.no_grad()
def export_bert(model: nn.Module, folder: Path, file: str = "model.onnx", split_mlm: bool = False) -> ExportedGraph:
    """model.onnx: input_ids, attention_mask, token_type_ids -> the outputs `bert_outputs(model, split_mlm)` names."""
    # Export a copy: the TorchScript tracer can leave hooks on the module it traced.
    graph = BertGraph(copy.deepcopy(model).eval(), bert_outputs(model, split_mlm))
    vocab = model.config.vocab_size
    a = example_bert_inputs(2, 7, vocab, seed=0)
    b = example_bert_inputs(3, 7, vocab, seed=1)
    c = example_bert_inputs(2, 9, vocab, seed=2)
    out_a, out_b, out_c = graph(*a), graph(*b), graph(*c)
    in_axes = [{0: "batch", 1: "seq"}] * 3
    out_axes = _merge(_moved_axes(out_a, out_b, "batch"), _moved_axes(out_a, out_c, "seq"))
    return _export(
        graph, a, folder / file, _specs(BERT_INPUTS, a, in_axes), _specs(graph.outputs, out_a, out_axes)
    )


@torch.no_grad()
def export_mlm_head(model: nn.Module, folder: Path, file: str = "mlm.onnx") -> ExportedGraph:
    """mlm.onnx: sequence_output (batch, seq, H) -> mlm_logits (batch, seq, V). onnxruntime computes every node of a
    graph whatever outputs are asked for, so a BERT whose model.onnx carries the B x L x V head pays for it on every
    encode request; apart, the head runs only for fill-mask (and only on the rows given to it)."""
    graph = MLMHeadGraph(copy.deepcopy(model).eval())
    hidden = model.config.hidden_size
    example = (torch.randn(2, 7, hidden, generator=torch.Generator().manual_seed(0)),)  # (B, L, H)
    out = graph(*example)  # (B, L, V)
    axes = [{0: "batch", 1: "seq"}]
    return _export(graph, example, folder / file, _specs(["sequence_output"], example, axes),
                   _specs(["mlm_logits"], (out,), axes))  # fmt: skip


def target_vocab_size(model: nn.Module) -> int:
    config = model.config
    for field in ("tgt_vocab_size", "target_vocab_size", "vocab_size"):
        if hasattr(config, field):
            return int(getattr(config, field))
    raise AttributeError(f"{type(config).__name__} has no target vocabulary size field")


def source_vocab_size(model: nn.Module) -> int:
    config = model.config
    for field in ("src_vocab_size", "source_vocab_size", "vocab_size"):
        if hasattr(config, field):
            return int(getattr(config, field))
    raise AttributeError(f"{type(config).__name__} has no source vocabulary size field")


@torch.no_grad()
def export_translator(model: nn.Module, folder: Path) -> tuple[ExportedGraph, ExportedGraph]:
    """encoder.onnx and decoder.onnx (one incremental step) of an RNN or Transformer translator."""
    model = copy.deepcopy(model).eval()
    mem_names, st_names = memory_names(model), state_names(model)
    n_mem = len(mem_names)
    src_vocab, tgt_vocab = source_vocab_size(model), target_vocab_size(model)

    # Encoder: src_ids, src_pad_mask -> memory, initial state.
    encoder = EncoderGraph(model)
    # Three examples: a, then one more row (b), then a longer source (c).
    a, b, c = (example_source(B, S, src_vocab, seed) for seed, (B, S) in enumerate([(2, 7), (3, 7), (2, 10)]))
    out_a, out_b, out_c = encoder(*a), encoder(*b), encoder(*c)
    enc_out_axes = _merge(_moved_axes(out_a, out_b, "batch"), _moved_axes(out_a, out_c, "src_len"))
    src_axes = [{0: "batch", 1: "src_len"}] * 2
    enc = _export(
        encoder, a, folder / "encoder.onnx",
        _specs(("src_ids", "src_pad_mask"), a, src_axes), _specs([*mem_names, *st_names], out_a, enc_out_axes),
    )  # fmt: skip

    # Decoder step: examples differ in batch, source length and cache length (steps already taken).
    decoder = DecoderStepGraph(model, n_mem)

    def step_example(src: tuple[Tensor, Tensor], steps: int, seed: int) -> tuple[Tensor, ...]:
        """The inputs of the decoder step after `steps` random tokens: (prev_ids, src_pad_mask, [cache_pad_mask,]
        *memory, *state); the cache mask hides the first cached position of the last row (as if it joined later)."""
        memory, state = model.encode(*src)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            prev = torch.randint(4, tgt_vocab, (src[0].shape[0],), generator=g)  # (B,)
            _, state = model.decode_step(prev, memory, src[1], state)
        prev = torch.randint(4, tgt_vocab, (src[0].shape[0],), generator=g)  # (B,)
        if not decoder.masks_cache:
            return (prev, src[1], *memory, *state)
        cache_pad_mask = torch.zeros(src[0].shape[0], steps, dtype=torch.bool)  # (B, P)
        cache_pad_mask[-1, 0] = True
        return (prev, src[1], cache_pad_mask, *memory, *state)

    da, db, dc, dd = step_example(a, 2, 0), step_example(b, 2, 1), step_example(c, 2, 2), step_example(a, 3, 3)
    in_axes = _merge(_moved_axes(da, db, "batch"), _moved_axes(da, dc, "src_len"), _moved_axes(da, dd, "cache_len"))
    oa, ob, oc, od = decoder(*da), decoder(*db), decoder(*dc), decoder(*dd)
    out_axes = _merge(
        _moved_axes(oa, ob, "batch"), _moved_axes(oa, oc, "src_len"), _moved_axes(oa, od, "new_cache_len")
    )
    cache_mask = [DECODER_CACHE_PAD_MASK] if decoder.masks_cache else []
    in_names = ["prev_ids", "src_pad_mask", *cache_mask, *mem_names, *st_names]
    out_names = ["log_probs", *(f"new_{n}" for n in st_names)]
    dec = _export(decoder, da, folder / "decoder.onnx", _specs(in_names, da, in_axes), _specs(out_names, oa, out_axes))
    return enc, add_top_k(dec)


def add_top_k(decoder: ExportedGraph) -> ExportedGraph:
    """Append TopK over log_probs to a decoder step graph: input `topk` (int64 [1], K), outputs topk_log_probs and
    topk_ids (batch, K), each row best first with ties to the lower token id (ONNX TopK's order).

    A search then fetches K candidates a row instead of the (rows, V) log-probs: onnxruntime's TopK took 0.8 ms
    where numpy's argpartition took 8 ms over 128 x 8000 log-probs (docs/benchmarks.md). log_probs stays an output
    for the parity gate and for the rare step whose ranking the K candidates cannot settle (server/decoding.py)."""
    import numpy as np
    import onnx
    from onnx import helper

    def element_type(dtype: str) -> int:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    log_probs = next(spec for spec in decoder.spec.outputs if spec.name == "log_probs")
    batch = log_probs.shape[0]
    model = onnx.load(str(decoder.path))
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info(DECODER_TOP_K_INPUT, element_type("int64"), [1]))
    values, ids = DECODER_TOP_K_OUTPUTS
    graph.node.append(
        helper.make_node("TopK", ["log_probs", DECODER_TOP_K_INPUT], [values, ids], name="top_k", axis=-1,
                         largest=1, sorted=1)
    )  # fmt: skip
    graph.output.extend([
        helper.make_tensor_value_info(values, element_type(log_probs.dtype), [batch, "topk"]),
        helper.make_tensor_value_info(ids, element_type("int64"), [batch, "topk"]),
    ])  # fmt: skip
    onnx.save(model, str(decoder.path))
    spec = GraphSpec(
        decoder.spec.file,
        (*decoder.spec.inputs, TensorSpec(DECODER_TOP_K_INPUT, "int64", (1,))),
        (*decoder.spec.outputs, TensorSpec(values, log_probs.dtype, (batch, "topk")),
         TensorSpec(ids, "int64", (batch, "topk"))),
    )  # fmt: skip
    return ExportedGraph(spec, decoder.path)


def add_row_gather(decoder: GraphSpec, names: Sequence[str], path: Path) -> ExportedGraph:
    """A graph that gathers rows of the decoder inputs `names` (state or memory tensors, batch-first): input int64
    `rows` (R',) and each tensor as the decoder step takes it; outputs `gathered_NAME` = NAME[rows] (R', ...).

    A beam step reorders the state by parent row and a changed row layout moves the memory; on a GPU these run as
    this graph on the tensors where the decoder left them, so state and memory stay on the device between steps
    (server/translation.py). On the CPU only large gathers run it (HOST_GATHER_GRAPH_BYTES); small ones use numpy."""
    import numpy as np
    import onnx
    from onnx import helper

    by_name = {spec.name: spec for spec in decoder.inputs}
    specs = [by_name[name] for name in names]

    def info(name: str, spec: TensorSpec, first: str) -> onnx.ValueInfoProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        return helper.make_tensor_value_info(name, elem, [first, *spec.shape[1:]])

    graph = helper.make_graph(
        [helper.make_node("Gather", [spec.name, GATHER_ROWS_INPUT], [GATHERED_PREFIX + spec.name], axis=0)
         for spec in specs],
        path.stem,
        [helper.make_tensor_value_info(GATHER_ROWS_INPUT, onnx.TensorProto.INT64, ["rows"]),
         *(info(spec.name, spec, spec.shape[0]) for spec in specs)],
        [info(GATHERED_PREFIX + spec.name, spec, "rows") for spec in specs],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save(model, str(path))
    spec = GraphSpec(
        path.name,
        (TensorSpec(GATHER_ROWS_INPUT, "int64", ("rows",)), *specs),
        tuple(TensorSpec(GATHERED_PREFIX + s.name, s.dtype, ("rows", *s.shape[1:])) for s in specs),
    )
    return ExportedGraph(spec, path)


def add_greedy_loop(decoder: Path, spec: GraphSpec, state: Sequence[str], eos_id: int, pad_id: int,
                    path: Path) -> ExportedGraph:  # fmt: skip
    """greedy.onnx: a whole greedy decode in one onnxruntime run, an ONNX Loop whose body is the decoder step graph
    at `decoder` (a TopK graph, add_top_k, with state that has no time axis: RNN decoders).

    Inputs: the step graph's, without `topk`, plus `max_steps` (int64 scalar): prev_ids (batch,) holds each row's start
    token. Each iteration takes every row's best token (TopK's: ties to the lower id); a row that has produced EOS gets
    `pad_id` from then on, and the loop ends once every row has or after max_steps, as export/parity.py's
    greedy_decode_onnx does over the step graph. Outputs: greedy_ids (batch, steps) and greedy_log_probs (batch,
    steps), each token's log-probability.

    It saves what a step costs outside the graph (the Python of a decode loop, a session.run's feeds and fetches):
    ~0.6 ms of a ~2.9 ms batch-1 LSTM decode (docs/benchmarks.md, the levers' greedy loop). The server uses it for
    one greedy sentence at a time; sentences cannot join it, so batches keep the step graph."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(decoder))
    graph = model.graph
    inputs = [i.name for i in graph.input]
    outputs = {o.name: o for o in graph.output}
    if DECODER_CACHE_PAD_MASK in inputs or DECODER_TOP_K_INPUT not in inputs:
        raise ValueError(f"{decoder.name}: a greedy loop needs a TopK step graph without a cache mask, got {inputs}")
    carried = ["prev_ids", *state]  # loop-carried besides the finished flags; in the body they are NAME_in
    body_nodes = []
    for node in graph.node:
        node = copy.deepcopy(node)
        for k, name in enumerate(node.input):
            if name in carried:
                node.input[k] = f"{name}_in"
        body_nodes.append(node)

    def const(name: str, value: Any, dtype: int, shape: Sequence[int] = ()) -> onnx.NodeProto:
        values = list(value) if shape else [value]
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}_value", dtype, shape, values))

    # State laid out (batch, layers, hidden) is carried as (layers, batch, hidden), the layout of the ONNX LSTM/GRU
    # nodes inside: the transposes added here meet the step graph's own and onnxruntime cancels them.
    by_name = {s.name: s for s in (*spec.inputs, *spec.outputs)}
    stacked = [n for n in state if len(by_name[n].shape) == 3 and isinstance(by_name[n].shape[1], int)]
    swap = [1, 0, 2]
    entry = [helper.make_node("Transpose", [f"{n}_stacked"], [f"{n}_in"], perm=swap) for n in stacked]
    leave = [helper.make_node("Transpose", [f"new_{n}"], [f"{n}_stacked_out"], perm=swap) for n in stacked]

    k_ids, k_values = DECODER_TOP_K_OUTPUTS[1], DECODER_TOP_K_OUTPUTS[0]
    body_nodes = [
        *entry,
        const(DECODER_TOP_K_INPUT, [1], TensorProto.INT64, [1]),
        const("loop_axis_1", [1], TensorProto.INT64, [1]),
        const("loop_eos", eos_id, TensorProto.INT64),
        const("loop_pad", pad_id, TensorProto.INT64),
        *body_nodes,
        helper.make_node("Squeeze", [k_ids, "loop_axis_1"], ["loop_best"]),  # (B,)
        helper.make_node("Where", ["finished_in", "loop_pad", "loop_best"], ["loop_token"]),  # (B,)
        helper.make_node("Squeeze", [k_values, "loop_axis_1"], ["loop_log_prob"]),  # (B,)
        helper.make_node("Identity", ["loop_token"], ["prev_ids_out"]),
        helper.make_node("Equal", ["loop_token", "loop_eos"], ["loop_is_eos"]),
        helper.make_node("Or", ["finished_in", "loop_is_eos"], ["finished_out"]),
        helper.make_node("Cast", ["finished_out"], ["loop_finished_int"], to=TensorProto.INT32),
        helper.make_node("ReduceMin", ["loop_finished_int"], ["loop_all_int"], keepdims=0),
        helper.make_node("Cast", ["loop_all_int"], ["loop_all"], to=TensorProto.BOOL),
        helper.make_node("Not", ["loop_all"], ["loop_cond_out"]),
        *leave,
    ]  # fmt: skip
    info = helper.make_tensor_value_info
    batch = ["batch"]
    score_type = outputs["log_probs"].type.tensor_type.elem_type

    def carried_in(name: str) -> onnx.ValueInfoProto:
        value = copy.deepcopy(next(i for i in graph.input if i.name == name))
        if name in stacked:  # (layers, batch, hidden)
            return info(f"{name}_stacked", value.type.tensor_type.elem_type, None)
        value.name = f"{name}_in"
        return value

    def carried_out(name: str) -> onnx.ValueInfoProto:
        value = outputs[f"new_{name}"]
        return info(f"{name}_stacked_out", value.type.tensor_type.elem_type, None) if name in stacked else value

    # The weights move into the body: onnxruntime treats only a graph's own initializers as constants (prepacked
    # weights, constant folding); read from the outer scope they would be plain inputs of every iteration.
    body = helper.make_graph(
        body_nodes, "greedy_step",
        [info("loop_iteration", TensorProto.INT64, []), info("loop_cond_in", TensorProto.BOOL, []),
         info("prev_ids_in", TensorProto.INT64, batch), info("finished_in", TensorProto.BOOL, batch),
         *(carried_in(name) for name in state)],
        [info("loop_cond_out", TensorProto.BOOL, []), info("prev_ids_out", TensorProto.INT64, batch),
         info("finished_out", TensorProto.BOOL, batch), *(carried_out(name) for name in state),
         info("loop_token", TensorProto.INT64, batch), info("loop_log_prob", score_type, batch)],
        initializer=list(graph.initializer),
    )  # fmt: skip
    outer_inputs = [i for i in graph.input if i.name != DECODER_TOP_K_INPUT]
    nodes = [
        const("loop_cond", True, TensorProto.BOOL),
        helper.make_node("Equal", ["prev_ids", "prev_ids"], ["loop_same"]),
        helper.make_node("Not", ["loop_same"], ["loop_finished"]),  # (B,) all False
        *(helper.make_node("Transpose", [n], [f"{n}_stacked"], perm=swap) for n in stacked),
        helper.make_node(
            "Loop", ["max_steps", "loop_cond", "prev_ids", "loop_finished",
                     *(f"{n}_stacked" if n in stacked else n for n in state)],
            ["last_ids", "last_finished", *(f"last_{name}" for name in state), "loop_tokens", "loop_log_probs"],
            body=body,
        ),  # (steps, B) scan outputs
        helper.make_node("Transpose", ["loop_tokens"], ["greedy_ids"], perm=[1, 0]),
        helper.make_node("Transpose", ["loop_log_probs"], ["greedy_log_probs"], perm=[1, 0]),
    ]  # fmt: skip
    loop_graph = helper.make_graph(
        nodes, "greedy", [*outer_inputs, info("max_steps", TensorProto.INT64, [])],
        [info("greedy_ids", TensorProto.INT64, ["batch", "steps"]),
         info("greedy_log_probs", score_type, ["batch", "steps"])],
    )  # fmt: skip
    loop_model = helper.make_model(loop_graph, opset_imports=list(model.opset_import))
    loop_model.ir_version = model.ir_version
    onnx.save(loop_model, str(path))
    loop_spec = GraphSpec(
        path.name,
        (*(by_name[i.name] for i in outer_inputs), TensorSpec("max_steps", "int64", ())),
        (TensorSpec("greedy_ids", "int64", ("batch", "steps")),
         TensorSpec("greedy_log_probs", by_name["log_probs"].dtype, ("batch", "steps"))),
    )  # fmt: skip
    return ExportedGraph(loop_spec, path)
