"""The export gate: onnx.checker, then onnxruntime against PyTorch on real inputs of several batch sizes and lengths.

Letters: B batch, S source length, L BERT sequence length, V vocabulary.

Translators are checked three ways: the encoder outputs, a chain of decoder steps fed by onnxruntime's own state
(so differences that accumulate through the state are seen), and a whole greedy decode through the step graph, which
must give the same tokens as ``models/decoding.greedy_decode``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from seqserve.export.graphs import (
    example_bert_inputs,
    example_source,
    source_vocab_size,
    target_vocab_size,
)
from seqserve.models.decoding import greedy_decode
from seqserve.server.repository import (
    DECODER_CACHE_PAD_MASK, DECODER_TOP_K_INPUT, GATHER_ROWS_INPUT, GATHERED_PREFIX, SessionOptions,
)

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
# A larger difference is no rounding: the graph computes something else (a log-probability off by 0.1 is a 10% change
# in probability). The gate must not be a switch.
MAX_TOLERANCE = 0.1
BERT_CASES = ((1, 5), (3, 11), (2, 16))  # (B, L): none is the export example's (2, 7)
TRANSLATOR_CASES = ((1, 4), (3, 9), (4, 13))  # (B, S)
CHAIN_STEPS = 5


class ParityError(Exception):
    """onnxruntime disagrees with PyTorch beyond the tolerance, or greedy decoding differs."""

    def __init__(self, what: str, max_abs_diff: float | None, tolerance: float, detail: str = "", relative: str = ""):
        self.what, self.max_abs_diff, self.tolerance = what, max_abs_diff, tolerance
        if max_abs_diff is None:
            message = f"{what}: {detail}"
        else:
            advice = (
                " (raise it with --tolerance / tolerance= if this difference is acceptable)" if tolerance < MAX_TOLERANCE
                else " (the most --tolerance allows: the graph computes something else)"
            )
            message = (
                f"{what}: onnxruntime differs from PyTorch by {max_abs_diff:.3g}, over the tolerance {tolerance:g}"
                f"{relative}{advice}{detail}"
            )
        super().__init__(message)


@dataclass
class ParityReport:
    """The largest |onnxruntime - PyTorch| per output; an output passes where every element is within
    tolerance + rtol * |PyTorch's value| (numpy.allclose's rule; rtol 0 for fp32, a relative part for fp16, whose
    error grows with the magnitude: a log-probability of -12 is only held to ~0.006 in fp16)."""

    tolerance: float
    max_abs_diff: float = 0.0
    per_output: dict[str, float] = field(default_factory=dict)
    cases: list[list[int]] = field(default_factory=list)  # (batch, length) pairs checked
    greedy_tokens_equal: bool | None = None  # translators only
    # [row, step, torch's margin] where greedy tokens first differ at a near-tie (greedy_divergences)
    greedy_near_ties: list[list[float]] = field(default_factory=list)
    rtol: float = 0.0
    # per output, the largest |difference| - rtol * |reference|: what the tolerance must cover
    excess: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, ours: np.ndarray, reference: np.ndarray) -> None:
        if ours.shape != reference.shape:
            raise ParityError(name, None, self.tolerance, f"shape {ours.shape} != PyTorch's {reference.shape}")
        diff, excess = 0.0, 0.0
        if ours.size:
            reference = reference.astype(np.float64)
            error = np.abs(ours.astype(np.float64) - reference)
            diff, excess = float(np.max(error)), float(np.max(error - self.rtol * np.abs(reference)))
        if not (np.isfinite(diff) and np.isfinite(excess)):  # NaN on either side: max() would silently skip it
            diff = excess = float("inf")
        self.per_output[name] = max(self.per_output.get(name, 0.0), diff)
        self.excess[name] = max(self.excess.get(name, -float("inf")), excess)
        self.max_abs_diff = max(self.max_abs_diff, diff)

    def check(self, what: str) -> None:
        worst = max(self.excess, key=self.excess.get, default=None)
        if worst is not None and not self.excess[worst] <= self.tolerance:  # NaN fails too
            nonfinite = " (NaN or infinity in an output)" if self.max_abs_diff == float("inf") else ""
            relative = f" + {self.rtol:g} x |PyTorch's value|" if self.rtol else ""
            raise ParityError(what, self.per_output[worst], self.tolerance, f"; worst output: {worst}{nonfinite}",
                              relative)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "per_output": self.per_output,
            "cases": self.cases,
        }
        if self.rtol:
            d["rtol"] = self.rtol
        if self.greedy_tokens_equal is not None:
            d["greedy_tokens_equal"] = self.greedy_tokens_equal
        if self.greedy_near_ties:
            d["greedy_near_ties"] = self.greedy_near_ties
        return d


def check_onnx(path: Path) -> None:
    """onnx.checker with shape inference; raises onnx.checker.ValidationError."""
    onnx.checker.check_model(str(path), full_check=True)


def open_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    # One thread, no spinning; or the process's shared pools when it has them (onnxruntime then refuses others).
    # The graph as the server will run it (SessionOptions.open), quietly: "shape mismatch" warnings stay out of the
    # log, parity catches real mismatches.
    provider = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    options = SessionOptions(provider=provider, intra_op_threads=1, inter_op_threads=1, graph_optimization="all")
    return options.open(path, log_severity_level=3)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# BERT


@torch.no_grad()
def bert_parity(
    model: nn.Module, session: ort.InferenceSession, tolerance: float = DEFAULT_TOLERANCE, cases=BERT_CASES,
    mlm_session: ort.InferenceSession | None = None, rtol: float = 0.0,
) -> ParityReport:  # fmt: skip
    """Every output of model.onnx (and mlm.onnx, fed model.onnx's sequence_output) against Bert.forward on rows of
    unequal length with both segments; `rtol` adds a relative part to the tolerance (ParityReport)."""
    report = ParityReport(tolerance, rtol=rtol)
    names = [o.name for o in session.get_outputs()]
    for i, (batch, length) in enumerate(cases):
        ids, mask, types = example_bert_inputs(batch, length, model.config.vocab_size, seed=100 + i)
        reference = model(ids, mask, types)
        ours = dict(zip(names, session.run(names, {"input_ids": _np(ids), "attention_mask": _np(mask),
                                                   "token_type_ids": _np(types)})))  # fmt: skip
        if mlm_session is not None:
            (ours["mlm_logits"],) = mlm_session.run(None, {"sequence_output": ours["sequence_output"]})
        for name, value in ours.items():
            report.record(name, value, _np(getattr(reference, name)))
        report.cases.append([batch, length])
    report.check("model.onnx" if mlm_session is None else "model.onnx/mlm.onnx")
    return report


# --------------------------------------------------------------------------------------------------------------
# Translators


@dataclass(frozen=True)
class StepGraphs:
    """A translator's two onnxruntime sessions and the names that join them."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    memory: tuple[str, ...]
    state: tuple[str, ...]

    @functools.cached_property
    def _feeds_top_k(self) -> bool:
        """The decoder ends in TopK (export/graphs.add_top_k), whose K input must be fed."""
        return DECODER_TOP_K_INPUT in {i.name for i in self.decoder.get_inputs()}

    @functools.cached_property
    def masks_cache(self) -> bool:
        """The decoder takes a cache_pad_mask (Transformers: sentences can join a running batch)."""
        return DECODER_CACHE_PAD_MASK in {i.name for i in self.decoder.get_inputs()}

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        out = self.encoder.run(None, {"src_ids": src_ids, "src_pad_mask": src_pad_mask})
        return out[: len(self.memory)], out[len(self.memory) :]

    def step(
        self, prev_ids: np.ndarray, memory: list[np.ndarray], src_pad_mask: np.ndarray, state: list[np.ndarray],
        cache_pad_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
        """One decoder step; a cache-masking decoder gets `cache_pad_mask`, all False (every cached position the
        row's own) unless given."""
        feeds = {"prev_ids": prev_ids, "src_pad_mask": src_pad_mask}
        if self.masks_cache:
            if cache_pad_mask is None:
                cache_pad_mask = np.zeros((prev_ids.shape[0], state[0].shape[2]), dtype=bool)  # (B, P)
            feeds[DECODER_CACHE_PAD_MASK] = cache_pad_mask
        feeds.update(zip(self.memory, memory))
        feeds.update(zip(self.state, state))
        if self._feeds_top_k:
            feeds[DECODER_TOP_K_INPUT] = np.array([1], dtype=np.int64)  # the graph's TopK output is not checked here
        log_probs, *new_state = self.decoder.run(["log_probs", *(f"new_{name}" for name in self.state)], feeds)
        return log_probs, new_state


def greedy_decode_onnx(
    graphs: StepGraphs, src_ids: np.ndarray, src_pad_mask: np.ndarray, max_len: int, bos_id: int, eos_id: int,
    pad_id: int,
) -> np.ndarray:  # fmt: skip
    """models/decoding.greedy_decode in numpy over the step graphs -> (B, T<=max_len), EOS kept, padding after it."""
    memory, state = graphs.encode(src_ids, src_pad_mask)
    return _greedy_steps(graphs, memory, state, src_pad_mask, max_len, bos_id, eos_id, pad_id)[0]


def _greedy_steps(
    graphs: StepGraphs, memory: list[np.ndarray], state: list[np.ndarray], src_pad_mask: np.ndarray, max_len: int,
    bos_id: int, eos_id: int, pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """greedy_decode_onnx from the encoder's outputs: tokens (B, T) and the log-probability of each row's best token
    at each step (B, T)."""
    batch = src_pad_mask.shape[0]
    prev = np.full((batch,), bos_id, dtype=np.int64)  # (B,)
    finished = np.zeros((batch,), dtype=bool)  # (B,)
    tokens, scores = [], []
    for _ in range(max_len):
        log_probs, state = graphs.step(prev, memory, src_pad_mask, state)  # (B, V)
        best = log_probs.argmax(axis=-1)  # (B,)
        next_ids = np.where(finished, pad_id, best).astype(np.int64)  # (B,)
        tokens.append(next_ids)
        scores.append(log_probs[np.arange(batch), best])
        finished |= next_ids == eos_id
        prev = next_ids
        if finished.all():
            break
    if not tokens:
        return np.zeros((batch, 0), dtype=np.int64), np.zeros((batch, 0), dtype=np.float32)
    return np.stack(tokens, axis=1), np.stack(scores, axis=1)


GREEDY_LOOP_CASES = ((1, 4), (1, 12), (4, 11))  # (B, S)
ROW_GATHER_CASES = ((2, 0, 0, 1, 2), ())  # rows of 3: reordered, repeated and dropped (a beam step); none (all done)


def row_gather_check(
    gathers: dict[str, ort.InferenceSession], graphs: StepGraphs, bos_id: int, src_vocab: int, pad_id: int,
) -> dict[str, Any]:  # fmt: skip
    """The row gather graphs (export/graphs.add_row_gather, `gathers`: "state" / "memory" -> session) on a real
    encoder's memory and the state after two decoder steps, against numpy's take: equal bit for bit, for an index
    that reorders, repeats and drops rows (a beam step) and for an empty one (every sentence done)."""
    src_ids, pad_mask = (_np(t) for t in example_source(3, 7, src_vocab, seed=700, pad_id=pad_id))
    memory, state = graphs.encode(src_ids, pad_mask)
    prev = np.full((3,), bos_id, dtype=np.int64)
    for _ in range(2):
        log_probs, state = graphs.step(prev, memory, pad_mask, state)
        prev = log_probs.argmax(axis=-1).astype(np.int64)
    tensors = {"memory": dict(zip(graphs.memory, memory)), "state": dict(zip(graphs.state, state))}
    for index in ROW_GATHER_CASES:
        rows = np.asarray(index, dtype=np.int64)
        for group, session in gathers.items():
            names = [i.name for i in session.get_inputs()][1:]
            got = session.run(None, {GATHER_ROWS_INPUT: rows, **{n: tensors[group][n] for n in names}})
            for name, value in zip(names, got):
                want = np.take(tensors[group][name], rows, axis=0)
                if value.shape != want.shape or not np.array_equal(value, want):
                    raise ParityError(
                        f"gather_{group}.onnx", None, 0.0,
                        f"{GATHERED_PREFIX}{name} for rows {list(index)} differs from numpy's take "
                        f"(shape {value.shape}, expected {want.shape})",
                    )  # fmt: skip
    return {"groups": sorted(gathers), "rows_checked": [list(index) for index in ROW_GATHER_CASES], "equal": True}


def greedy_loop_parity(
    loop: ort.InferenceSession, graphs: StepGraphs, bos_id: int, eos_id: int, pad_id: int, src_vocab: int,
    tolerance: float = DEFAULT_TOLERANCE, max_len: int = 24, cases=GREEDY_LOOP_CASES,
) -> ParityReport:  # fmt: skip
    """greedy.onnx (export/graphs.add_greedy_loop) against a greedy decode through the step graphs it was built from:
    the same tokens, and each token's log-probability within the tolerance; also cut short by max_steps."""
    report = ParityReport(tolerance)
    for i, (batch, length) in enumerate(cases):
        src_ids, pad_mask = (_np(t) for t in example_source(batch, length, src_vocab, seed=500 + i, pad_id=pad_id))
        memory, state = graphs.encode(src_ids, pad_mask)
        feeds = {"prev_ids": np.full((batch,), bos_id, dtype=np.int64), "src_pad_mask": pad_mask}
        feeds.update(zip(graphs.memory, memory))
        feeds.update(zip(graphs.state, state))
        for steps in (max_len, 3):
            ids, log_probs = loop.run(None, {**feeds, "max_steps": np.array(steps, dtype=np.int64)})
            ref_ids, ref_log_probs = _greedy_steps(graphs, memory, state, pad_mask, steps, bos_id, eos_id, pad_id)
            if ids.shape != ref_ids.shape or not (ids == ref_ids).all():
                raise ParityError(
                    "greedy.onnx", None, tolerance,
                    f"tokens differ from a greedy decode through decoder.onnx (max_steps {steps}):\n step graph "
                    f"{ref_ids.tolist()}\n loop       {ids.tolist()}",
                )  # fmt: skip
            report.record("greedy_log_probs", log_probs, ref_log_probs)
        report.cases.append([batch, length])
    report.greedy_tokens_equal = True
    report.check("greedy.onnx")
    return report


def decoder_start_id(config: Any) -> int:
    """The first decoder input: config.decoder_start_id where the family has one (Marian starts with pad), else BOS."""
    start = getattr(config, "decoder_start_id", None)
    return config.bos_id if start is None else int(start)


@torch.no_grad()
def greedy_divergences(
    model: nn.Module, src_ids: torch.Tensor, pad_mask: torch.Tensor, reference: np.ndarray, ours: np.ndarray,
    bos: int, pad: int,
) -> list[tuple[int, int, float, float]]:  # fmt: skip
    """For each row whose greedy tokens differ (reference: torch's, ours: onnxruntime's, (B, T) padded after EOS):
    (row, first differing step, torch's log-probability of its token there given the shared prefix, and its margin
    over ours). A margin near 0 is a near-tie that either choice decodes correctly."""
    length = max(reference.shape[1], ours.shape[1])
    ref, our = (np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=pad) for x in (reference, ours))
    out = []
    for row in np.flatnonzero((ref != our).any(axis=1)).tolist():
        step = int(np.flatnonzero(ref[row] != our[row])[0])
        memory, state = model.encode(src_ids[row : row + 1], pad_mask[row : row + 1])
        for token in [bos, *ref[row, :step].tolist()]:
            log_probs, state = model.decode_step(torch.tensor([token]), memory, pad_mask[row : row + 1], state)
        best = float(log_probs[0, int(ref[row, step])])
        out.append((row, step, best, best - float(log_probs[0, int(our[row, step])])))
    return out


@torch.no_grad()
def translator_parity(
    model: nn.Module,
    graphs: StepGraphs,
    tolerance: float = DEFAULT_TOLERANCE,
    cases=TRANSLATOR_CASES,
    max_len: int = 24,
    check_greedy: bool = True,
    rtol: float = 0.0,
    near_tie_tolerance: float = DEFAULT_TOLERANCE,
) -> ParityReport:
    """Encoder outputs, a chain of decoder steps, and greedy tokens, against the torch model; `rtol` adds a relative
    part to the tolerance (ParityReport). Greedy tokens may differ only where torch's margin is within two of
    min(tolerance, near_tie_tolerance): raising the tolerance does not let greedy decoding differ more."""
    report = ParityReport(tolerance, rtol=rtol)
    config = model.config
    bos, eos, pad = decoder_start_id(config), config.eos_id, config.pad_id
    src_vocab, tgt_vocab = source_vocab_size(model), target_vocab_size(model)
    for i, (batch, length) in enumerate(cases):
        src_ids, pad_mask = example_source(batch, length, src_vocab, seed=200 + i, pad_id=pad)
        ids_np, mask_np = _np(src_ids), _np(pad_mask)
        # 1. Encoder.
        memory, state = model.encode(src_ids, pad_mask)
        o_memory, o_state = graphs.encode(ids_np, mask_np)
        for name, ours, ref in zip((*graphs.memory, *graphs.state), (*o_memory, *o_state), (*memory, *state)):
            report.record(f"encoder.{name}", ours, _np(ref))
        # 2. Decoder steps on the same (random) tokens, each side carrying its own state.
        g = torch.Generator().manual_seed(300 + i)
        for step in range(CHAIN_STEPS):
            prev = torch.randint(4, tgt_vocab, (batch,), generator=g)  # (B,)
            masked = {}
            if graphs.masks_cache:
                # The last row sees its cache from the second position on, as a sentence that joined a step later.
                masked["cache_pad_mask"] = torch.zeros(batch, step, dtype=torch.bool)  # (B, P)
                masked["cache_pad_mask"][-1, :1] = True
            log_probs, state = model.decode_step(prev, memory, pad_mask, state, **masked)
            o_cache_mask = _np(masked["cache_pad_mask"]) if masked else None
            o_log_probs, o_state = graphs.step(_np(prev), o_memory, mask_np, o_state, o_cache_mask)
            report.record("decoder.log_probs", o_log_probs, _np(log_probs))
            for name, ours, ref in zip(graphs.state, o_state, state):
                report.record(f"decoder.new_{name}", ours, _np(ref))
        report.cases.append([batch, length])
    report.check("encoder.onnx/decoder.onnx")
    if check_greedy:
        # 3. Whole greedy decodes, batch > 1 with unequal source lengths.
        src_ids, pad_mask = example_source(4, 11, src_vocab, seed=400, pad_id=pad)
        reference = _np(greedy_decode(model, src_ids, pad_mask, max_len, bos, eos, pad))
        ours = greedy_decode_onnx(graphs, _np(src_ids), _np(pad_mask), max_len, bos, eos, pad)
        report.greedy_tokens_equal = reference.shape == ours.shape and bool((reference == ours).all())
        if not report.greedy_tokens_equal:
            # A divergence is within the gate only at a near-tie: where torch's log-probabilities of the two choices
            # are closer than two tolerances (each may be off by one; fp16 flips such ties).
            divergences = greedy_divergences(model, src_ids, pad_mask, reference, ours, bos, pad)
            tie = min(tolerance, near_tie_tolerance)
            wide = [(row, step, margin) for row, step, best, margin in divergences
                    if not margin <= 2 * (tie + rtol * abs(best))]  # fmt: skip
            if wide:
                row, step, margin = wide[0]
                raise ParityError(
                    "greedy decoding through decoder.onnx", None, tolerance,
                    f"tokens differ from models.decoding.greedy_decode (row {row}, step {step}: torch prefers its "
                    f"token by {margin:.3g} in log-probability, more than a near-tie of {2 * tie:g}):"
                    f"\n torch {reference.tolist()}"
                    f"\n onnx  {ours.tolist()}",
                )  # fmt: skip
            report.greedy_near_ties = [[row, step, margin] for row, step, _, margin in divergences]
    return report

