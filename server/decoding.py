"""Greedy and beam search in numpy over a small step interface, one implementation for RNN and Transformer decoders.

Letters: B sentences in a batch, R hypothesis rows (sum of live beams over sentences), S source length, V vocabulary,
k beam size.

A `StepModel` turns sources into (memory, state) and advances state one token at a time. Every memory and state tensor
is batch-first (docs/design.md), so the driver needs only two tensor operations whatever the family: gather rows by
index (reorder and expand beams: `x[index]`) and nothing else. A `Search` strategy (greedy or beam) owns one sentence:
it sees that sentence's rows of log-probabilities and says which rows continue with which tokens. The driver
(`decode_batch`) runs the strategies of a whole batch together; a sentence whose search is done, cancelled or past
its deadline leaves the running batch at once, so it stops consuming decode steps.

Phases of `decode_batch`: (1) encode the padded sources; (2) step every live row; (3) let each sentence's search pick
its continuations; (4) gather state (and, when the row layout changed, memory) by the chosen parent rows; repeat.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class StepModel(Protocol):
    """What decoding needs from a translator (the exported encoder.onnx / decoder.onnx pair implements it)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(B, S) ids and pad mask -> (memory tensors, initial state tensors), all batch-first."""
        ...

    def step(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[np.ndarray], state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(R,) previous tokens -> ((R, V) log-probabilities, new state)."""
        ...


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha; 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # output ids, without BOS/EOS
    score: float  # length-penalised sum of log-probabilities
    token_scores: tuple[float, ...]  # log-probability of each token, then of EOS when it ended with EOS
    finished: bool  # ended with EOS (False: cut at the maximum length)


@dataclass
class Search:
    """One sentence's decoding strategy; subclasses implement `advance`."""

    max_len: int  # decode steps at most (output tokens including EOS)
    eos_id: int
    alpha: float = 0.0
    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False
    steps: int = 0
    # Live hypotheses, aligned with this sentence's rows in the running batch.
    live_tokens: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    live_scores: list[tuple[float, ...]] = field(default_factory=lambda: [()])

    def advance(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        """(rows, V) log-probabilities of this sentence's live rows -> [(parent row, token)] that continue."""
        raise NotImplementedError

    def _finish(self, tokens: tuple[int, ...], scores: tuple[float, ...], ended: bool) -> Hypothesis:
        length = len(scores)
        return Hypothesis(tokens, float(sum(scores)) / length_penalty(length, self.alpha), scores, ended)

    def _close_at_max_len(self) -> None:
        """At the maximum length every live hypothesis ends as it stands (without EOS)."""
        for tokens, scores in zip(self.live_tokens, self.live_scores):
            self.finished.append(self._finish(tokens, scores, ended=False))
        self.live_tokens, self.live_scores = [], []
        self.done = True

    def results(self, n: int) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h.score)[:n]


@dataclass
class GreedySearch(Search):
    """The most likely token at each step."""

    def advance(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        self.steps += 1
        token = int(np.argmax(log_probs[0]))
        tokens, scores = self.live_tokens[0], self.live_scores[0] + (float(log_probs[0, token]),)
        if token == self.eos_id:
            self.finished.append(self._finish(tokens, scores, ended=True))
            self.live_tokens, self.live_scores, self.done = [], [], True
            return []
        self.live_tokens, self.live_scores = [tokens + (token,)], [scores]
        if self.steps >= self.max_len:
            self._close_at_max_len()
            return []
        return [(0, token)]


@dataclass
class BeamSearch(Search):
    """Beam search as in fairseq: of the 2k best extensions, EOS among the first k ends a hypothesis; the first k
    others stay live; the sentence is done once k hypotheses have ended (so a beam of 1 is exactly greedy)."""

    beam_size: int = 4

    def advance(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        self.steps += 1
        k = self.beam_size
        rows, vocab = log_probs.shape
        totals = np.array([sum(s) for s in self.live_scores], dtype=np.float64)  # (rows,)
        candidates = (totals[:, None] + log_probs).reshape(-1)  # (rows * V,)
        take = min(2 * k, candidates.size)
        best = np.argpartition(-candidates, take - 1)[:take]
        # Ties broken by index so the order does not depend on argpartition's internals.
        best = best[np.lexsort((best, -candidates[best]))]
        next_rows: list[tuple[int, int]] = []
        next_tokens, next_scores = [], []
        for rank, flat in enumerate(best):
            parent, token = divmod(int(flat), vocab)
            scores = self.live_scores[parent] + (float(log_probs[parent, token]),)
            if token == self.eos_id:
                if rank < k:
                    self.finished.append(self._finish(self.live_tokens[parent], scores, ended=True))
                continue
            if len(next_rows) < k:
                next_rows.append((parent, token))
                next_tokens.append(self.live_tokens[parent] + (token,))
                next_scores.append(scores)
        self.live_tokens, self.live_scores = next_tokens, next_scores
        if len(self.finished) >= k or not next_rows:
            self.live_tokens, self.live_scores, self.done = [], [], True
            return []
        if self.steps >= self.max_len:
            self._close_at_max_len()
            return []
        return next_rows


def make_search(beam_size: int, max_len: int, eos_id: int, alpha: float) -> Search:
    if beam_size <= 1:
        return GreedySearch(max_len=max_len, eos_id=eos_id, alpha=alpha)
    return BeamSearch(max_len=max_len, eos_id=eos_id, alpha=alpha, beam_size=beam_size)


def decode_batch(
    model: StepModel,
    sources: Sequence[Sequence[int]],
    searches: Sequence[Search],
    stopped: Callable[[int], bool] = lambda i: False,
    on_step: Callable[[int], None] = lambda rows: None,
) -> int:
    """Run the searches of a batch of sources to the end; returns the number of decode steps taken.

    `stopped(i)` is asked before every step: True (sentence i was cancelled or is past its deadline) drops its rows.
    `on_step(rows)` is told the number of rows of each step (for metrics).
    """
    from seqserve.server.text import pad_batch

    # (1) Encode. Every sentence starts with one row: its BOS.
    src_ids, src_pad_mask = pad_batch([list(s) for s in sources], model.pad_id)  # (B, S), (B, S)
    memory, state = model.encode(src_ids, src_pad_mask)
    sentence_of_row = list(range(len(sources)))  # row -> sentence
    rows_of = {i: [i] for i in range(len(sources))}  # sentence -> its rows, in its search's live order
    prev_ids = np.full((len(sources),), model.bos_id, dtype=np.int64)  # (R,)
    layout = tuple(sentence_of_row)
    row_memory, row_mask = memory, src_pad_mask
    steps = 0
    for i in list(rows_of):
        if searches[i].max_len <= 0:
            searches[i]._close_at_max_len()
            del rows_of[i]
    while rows_of:
        for i in [i for i in rows_of if stopped(i)]:
            searches[i].done = True
            del rows_of[i]
        if not rows_of:
            break
        live = [r for i in sorted(rows_of) for r in rows_of[i]]
        if len(live) != len(sentence_of_row):  # some sentences left: keep only their rows
            index = np.asarray(live, dtype=np.int64)
            state = [x[index] for x in state]
            prev_ids = prev_ids[index]
            sentence_of_row = [sentence_of_row[r] for r in live]
            start = 0
            for i in sorted(rows_of):
                n = len(rows_of[i])
                rows_of[i] = list(range(start, start + n))
                start += n
        if tuple(sentence_of_row) != layout:
            # Memory is gathered per row only when the row layout changes (beams grow, sentences leave).
            layout = tuple(sentence_of_row)
            index = np.asarray(sentence_of_row, dtype=np.int64)
            row_memory = [m[index] for m in memory]  # (R, ...)
            row_mask = src_pad_mask[index]  # (R, S)
        # (2) One step for every live row.
        on_step(len(sentence_of_row))
        log_probs, state = model.step(prev_ids, row_mask, row_memory, state)  # (R, V)
        steps += 1
        # (3) Each search picks its continuations among its own rows.
        parents: list[int] = []
        tokens: list[int] = []
        new_rows: dict[int, list[int]] = {}
        new_sentence_of_row: list[int] = []
        for i in sorted(rows_of):
            rows = rows_of[i]
            chosen = searches[i].advance(log_probs[rows])
            if not chosen:
                continue
            new_rows[i] = list(range(len(parents), len(parents) + len(chosen)))
            for parent, token in chosen:
                parents.append(rows[parent])
                tokens.append(token)
                new_sentence_of_row.append(i)
        rows_of = new_rows
        if not rows_of:
            break
        # (4) Reorder state by parent row (beam reordering and expansion are the same gather).
        index = np.asarray(parents, dtype=np.int64)
        state = [x[index] for x in state]
        prev_ids = np.asarray(tokens, dtype=np.int64)
        sentence_of_row = new_sentence_of_row
    return steps


def source_max_len(source_tokens: int, max_output_tokens: int, max_output_ratio: float, model_limit: int) -> int:
    """Decode steps allowed: the model's limit, capped by the absolute and the relative (ratio * source + 5) maximum."""
    limit = model_limit
    if max_output_tokens:
        limit = min(limit, max_output_tokens)
    if max_output_ratio > 0:
        limit = min(limit, int(math.floor(max_output_ratio * source_tokens)) + 5)
    return max(limit, 1)
