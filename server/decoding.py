"""Greedy and beam search in numpy over a small step interface, one implementation for RNN and Transformer decoders.

Letters: B sentences in a batch, R hypothesis rows (sum of live beams over sentences), S source length, V vocabulary,
k beam size.

A `StepModel` turns sources into (memory, state) and advances state one token at a time. Every memory and state tensor
is batch-first (docs/design.md), so the driver's hot path needs one tensor operation whatever the family: gather rows
by index (reorder and expand beams: `x[index]`, the model's `gather_rows`, so tensors kept on a GPU are gathered
there). Joining and trimming, which happen once per sentence at most, go through numpy (`to_host`, `to_device`).
A `Search` strategy (greedy or beam) owns one sentence: it sees that sentence's rows of log-probabilities and says
which rows continue with which tokens. The driver
(`decode_batch`) runs the strategies of a whole batch together; a sentence whose search is done, cancelled or past
its deadline leaves the running batch at once, so it stops consuming decode steps.

Phases of `decode_batch`: (1) encode the padded sources; (2) step every live row; (3) let each sentence's search pick
its continuations; (4) gather state (and, when the row layout changed, memory) by the chosen parent rows; repeat.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from seqserve.server.ranking import Ranked, best_candidates, rank_beams

log = logging.getLogger(__name__)

# A memory or state tensor as the StepModel keeps it: a numpy array, or a value on the model's device (an onnxruntime
# OrtValue on a GPU, server/translation.py). The driver only passes them back to the model.
Tensor = Any


class StepModel(Protocol):
    """What decoding needs from a translator (the exported encoder.onnx / decoder.onnx pair implements it)."""

    bos_id: int
    eos_id: int
    pad_id: int
    joinable: bool  # sentences may join a running batch (no state tensor has a time axis, or it is masked)
    memory_src_axes: list[int]  # the source-length axis of each memory tensor
    # With masks_cache (Transformers), step and step_top_k also take cache_mask (R, P), True at cached positions a
    # row must not see, and state_cache_axes gives each state tensor's cache axis (P).
    top_k: bool  # step_top_k exists: the graph ranks each row's best K tokens itself
    vocab_size: int  # V (0: unknown)

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> tuple[list[Tensor], list[Tensor]]:
        """(B, S) ids and pad mask -> (memory tensors, initial state tensors), all batch-first."""
        ...

    def step(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[Tensor], state: list[Tensor],
        **cache_mask: np.ndarray,
    ) -> tuple[np.ndarray, list[Tensor]]:  # fmt: skip
        """(R,) previous tokens -> ((R, V) log-probabilities, new state)."""
        ...

    def step_top_k(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[Tensor], state: list[Tensor],
        k: int, **cache_mask: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, list[Tensor]]:  # fmt: skip
        """(R,) previous tokens -> ((R, k) best log-probabilities, (R, k) their token ids, new state); each row best
        first, ties to the lower id. Only called when `top_k` is true."""
        ...

    def gather_rows(self, group: str, tensors: list[Tensor], rows: np.ndarray) -> list[Tensor]:
        """tensor[rows] along axis 0 for each tensor of `group` ("state" or "memory"), where the tensors are."""
        ...

    def to_host(self, tensors: list[Tensor]) -> list[np.ndarray]:
        """The tensors as numpy arrays."""
        ...

    def to_device(self, tensors: list[np.ndarray]) -> list[Tensor]:
        """numpy arrays back to where the model keeps its tensors."""
        ...

    def shape(self, x: Tensor) -> tuple[int, ...]:
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

    def candidates(self) -> int:
        """How many best tokens per row `advance_top` needs to decide exactly as `advance` would."""
        return 1

    def advance_top(self, values: np.ndarray, ids: np.ndarray, complete: bool) -> list[tuple[int, int]] | None:
        """`advance` from each row's best tokens: (rows, K) log-probabilities best first (ties to the lower id) and
        their ids, K >= candidates() unless `complete` (K is the whole vocabulary). None, with nothing changed, when
        these candidates cannot settle the step exactly: the caller then passes the full log-probabilities to
        `advance`."""
        return None

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
        token = int(np.argmax(log_probs[0]))  # the first of equal maxima: the lower id, as TopK orders ties
        return self.take(token, float(log_probs[0, token]))

    def advance_top(self, values: np.ndarray, ids: np.ndarray, complete: bool) -> list[tuple[int, int]]:
        return self.take(int(ids[0, 0]), float(values[0, 0]))

    def take(self, token: int, log_prob: float) -> list[tuple[int, int]]:
        """Advance by `token`, chosen elsewhere (the row's best, as in greedy.onnx's loop); [(0, token)] while live,
        [] once the sentence has ended (EOS, or max_len reached)."""
        self.steps += 1
        tokens, scores = self.live_tokens[0], self.live_scores[0] + (log_prob,)
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

    def candidates(self) -> int:
        return 2 * self.beam_size + 1  # the 2k best of each row, and one more to prove the 2k-th is not tied

    def advance(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        vocab = log_probs.shape[1]
        # The 2k best extensions of totals[:, None] + log_probs, ties broken by flat index.
        best = best_candidates(log_probs, self._totals(), 2 * self.beam_size)  # (2k,) flat indices into (rows, V)
        parents, tokens = np.divmod(best, vocab)
        return self.advance_ranked(parents, tokens, log_probs[parents, tokens])

    def advance_top(self, values: np.ndarray, ids: np.ndarray, complete: bool) -> list[tuple[int, int]] | None:
        [ranked] = rank_beams([self], [np.arange(len(values))], values, ids, complete)
        return None if ranked is None else self.advance_ranked(*ranked)

    def _totals(self) -> np.ndarray:
        return np.array([sum(s) for s in self.live_scores], dtype=np.float64)  # (rows,)

    def advance_ranked(self, parents: np.ndarray, tokens: np.ndarray, log_probs: np.ndarray) -> list[tuple[int, int]]:
        """`advance` from the 2k best (parent row, token, log-probability) extensions, already ranked best first."""
        self.steps += 1
        k = self.beam_size
        next_rows: list[tuple[int, int]] = []
        next_tokens, next_scores = [], []
        for rank, (parent, token, log_prob) in enumerate(zip(parents.tolist(), tokens.tolist(), log_probs.tolist())):
            scores = self.live_scores[parent] + (float(log_prob),)
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


def _pad_axis(x: np.ndarray, axis: int, length: int, value: float | bool = 0) -> np.ndarray:
    """Pad `x` along `axis` up to `length` with `value` (masked positions: their content never matters)."""
    if x.shape[axis] >= length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return np.pad(x, widths, constant_values=value)


class RunningBatch:
    """The rows being decoded: one per live hypothesis, each with its state, memory, source mask and last token.

    Sentences are numbered in the order they joined. Memory is kept per row (gathered only when the row layout
    changes), so a sentence can join a running batch when the model allows it (`StepModel.joinable`: no state tensor
    has a time axis, as in RNN decoders, or the caches are masked). A Transformer's key/value caches share one length
    P per batch: a sentence joining at P gets P masked positions in front of its own (`cache_mask` (R, P), True
    there), and positions every row masks leave the caches once the sentences that had them are gone.
    """

    def __init__(self, model: StepModel):
        self.model = model
        self.searches: list[Search] = []
        self.rows_of: dict[int, list[int]] = {}  # sentence -> its rows, in its search's live order
        self.sentence_of_row: list[int] = []
        self.state: list[Tensor] = []
        self.memory: list[Tensor] = []  # per row
        self.mask = np.zeros((0, 0), dtype=bool)  # (R, S) True at padding
        self.prev_ids = np.zeros((0,), dtype=np.int64)  # (R,)
        self.masks_cache = bool(getattr(model, "masks_cache", False))
        self.cache_mask = np.zeros((0, 0), dtype=bool)  # (R, P) True at cached positions not the row's own

    @property
    def rows(self) -> int:
        return len(self.sentence_of_row)

    @property
    def src_len(self) -> int:
        return self.mask.shape[1]

    def join(self, sources: Sequence[Sequence[int]], searches: Sequence[Search]) -> list[int]:
        """Encode new sources and add one row (BOS) per sentence; returns their sentence numbers."""
        from seqserve.server.text import pad_batch

        src_ids, src_pad_mask = pad_batch([list(x) for x in sources], self.model.pad_id)  # (B, S)
        memory, state = self.model.encode(src_ids, src_pad_mask)
        first = len(self.searches)
        self.searches.extend(searches)
        numbers = list(range(first, first + len(sources)))
        if not self.rows:
            self.memory, self.state, self.mask = list(memory), list(state), src_pad_mask
            self.prev_ids = np.full((len(sources),), self.model.bos_id, dtype=np.int64)
            self.sentence_of_row = list(numbers)
            self.cache_mask = np.zeros((len(sources), self._cache_len()), dtype=bool)
        else:  # through numpy, where the tensors are kept elsewhere (a GPU): once per join
            model = self.model
            length = max(self.src_len, src_pad_mask.shape[1])
            axes = model.memory_src_axes
            old = [_pad_axis(m, a, length) for m, a in zip(model.to_host(self.memory), axes)]
            new = [_pad_axis(m, a, length) for m, a in zip(model.to_host(memory), axes)]
            self.memory = model.to_device([np.concatenate([a, b]) for a, b in zip(old, new)])  # (R + B, ...)
            self.mask = np.concatenate(
                [_pad_axis(self.mask, 1, length, True), _pad_axis(src_pad_mask, 1, length, True)]
            )  # (R + B, S)
            state = model.to_host(state)
            if self.masks_cache:  # the newcomers' (empty) caches, padded in front to the batch's length and masked
                cached = self._cache_len()
                state = [_pad_axis(x, a, cached) for x, a in zip(state, model.state_cache_axes)]
                self.cache_mask = np.concatenate([self.cache_mask, np.ones((len(sources), cached), dtype=bool)])
            self.state = model.to_device([np.concatenate([a, b]) for a, b in zip(model.to_host(self.state), state)])
            bos = np.full((len(sources),), self.model.bos_id, dtype=np.int64)
            self.prev_ids = np.concatenate([self.prev_ids, bos])
            self.sentence_of_row = self.sentence_of_row + numbers
        start = self.rows - len(sources)
        for j, i in enumerate(numbers):
            self.rows_of[i] = [start + j]
        return numbers

    def drop(self, sentences: Sequence[int]) -> None:
        """Remove sentences (done elsewhere, cancelled, past their deadline) from the running batch."""
        for i in sentences:
            self.searches[i].done = True
            del self.rows_of[i]
        self._keep([r for i in sorted(self.rows_of) for r in self.rows_of[i]])

    def _keep(self, rows: list[int]) -> None:
        index = np.asarray(rows, dtype=np.int64)
        self.state = self.model.gather_rows("state", self.state, index)
        self.memory = self.model.gather_rows("memory", self.memory, index)
        self.mask = self.mask[index]
        if self.masks_cache:
            self.cache_mask = self.cache_mask[index]
        self.prev_ids = self.prev_ids[index]
        self.sentence_of_row = [self.sentence_of_row[r] for r in rows]
        start = 0
        for i in sorted(self.rows_of):
            n = len(self.rows_of[i])
            self.rows_of[i] = list(range(start, start + n))
            start += n
        self._trim()

    def _trim(self) -> None:
        """Drop source positions that are padding in every row (a long sentence left), and cached positions every
        row masks (the sentences that joined first left)."""
        model = self.model
        if not self.rows or not model.joinable:
            return
        longest = int((~self.mask).sum(axis=1).max())
        if longest < self.src_len:
            self.mask = self.mask[:, :longest]
            kept = np.arange(longest)
            memory = model.to_host(self.memory)
            self.memory = model.to_device([np.take(m, kept, axis=a) for m, a in zip(memory, model.memory_src_axes)])
        if self.masks_cache and self.cache_mask.shape[1]:
            own = ~self.cache_mask.all(axis=0)  # (P,) positions some row still sees
            first = int(own.argmax()) if own.any() else self.cache_mask.shape[1]
            if first:
                kept = np.arange(first, self.cache_mask.shape[1])
                self.cache_mask = self.cache_mask[:, first:]
                state = model.to_host(self.state)
                self.state = model.to_device([np.take(x, kept, axis=a) for x, a in zip(state, model.state_cache_axes)])

    def _cache_len(self) -> int:
        """P, the cached positions of the batch (0 for models without masked caches)."""
        if not self.masks_cache or not self.state:
            return 0
        return self.model.shape(self.state[0])[self.model.state_cache_axes[0]]

    def _cache_kwargs(self) -> dict[str, np.ndarray]:
        return {"cache_mask": self.cache_mask} if self.masks_cache else {}

    def step(self) -> list[int]:
        """One decoder run for every row, then each search picks its continuations; returns the sentences done.

        With a TopK graph (`model.top_k`) the run returns each row's best K tokens, K the most any live search
        needs, instead of the (R, V) log-probabilities; a search those cannot settle exactly (a tie at its cut,
        rare) gets the full log-probabilities of this same step, from a second run on the same inputs."""
        log_probs = values = ids = None
        vocab = self.model.vocab_size
        if self.model.top_k:
            k = max(self.searches[i].candidates() for i in self.rows_of)
            k = min(k, vocab) if vocab else k
            values, ids, state = self.model.step_top_k(
                self.prev_ids, self.mask, self.memory, self.state, k, **self._cache_kwargs()
            )  # fmt: skip
        else:
            log_probs, state = self.model.step(
                self.prev_ids, self.mask, self.memory, self.state, **self._cache_kwargs()
            )  # (R, V)
        parents: list[int] = []
        tokens: list[int] = []
        new_rows: dict[int, list[int]] = {}
        new_sentence_of_row: list[int] = []
        finished = []
        ranked = self._rank_beams(values, ids, vocab) if values is not None else {}
        for i in sorted(self.rows_of):
            rows = self.rows_of[i]
            chosen = None
            if i in ranked:  # a beam search: ranked with the others of its beam size, None when not settled
                chosen = None if ranked[i] is None else self.searches[i].advance_ranked(*ranked[i])
            elif log_probs is None:
                chosen = self.searches[i].advance_top(values[rows], ids[rows], complete=values.shape[1] == vocab)
            if chosen is None:
                if log_probs is None:
                    log_probs, _ = self.model.step(
                        self.prev_ids, self.mask, self.memory, self.state, **self._cache_kwargs()
                    )  # (R, V)
                chosen = self.searches[i].advance(log_probs[rows])
            if not chosen:
                finished.append(i)
                continue
            new_rows[i] = list(range(len(parents), len(parents) + len(chosen)))
            for parent, token in chosen:
                parents.append(rows[parent])
                tokens.append(token)
                new_sentence_of_row.append(i)
        # Reorder state by parent row: beam reordering and expansion are the same gather along axis 0. Greedy rows
        # that all continue keep their places: no copy.
        index = np.asarray(parents, dtype=np.int64)
        unmoved = len(parents) == self.rows and parents == list(range(self.rows))
        self.state = list(state) if unmoved else self.model.gather_rows("state", state, index)
        if self.masks_cache:  # the position just cached is every row's own
            grown = np.concatenate([self.cache_mask, np.zeros((self.rows, 1), dtype=bool)], axis=1)  # (R, P+1)
            self.cache_mask = grown if unmoved else grown[index]
        if new_sentence_of_row != self.sentence_of_row:
            # Rows of one sentence share their memory, so memory moves only when the row layout changes.
            self.memory = self.model.gather_rows("memory", self.memory, index)
            self.mask = self.mask[index]
            self.sentence_of_row = new_sentence_of_row
            self.rows_of = new_rows
            if finished:
                self._trim()
        self.rows_of = new_rows
        self.prev_ids = np.asarray(tokens, dtype=np.int64)
        return finished


    def _rank_beams(self, values: np.ndarray, ids: np.ndarray, vocab: int) -> dict[int, Ranked | None]:
        """Rank the beam searches of each beam size together (rank_beams): sentence -> its ranking, or None when the
        fetched candidates cannot settle it."""
        groups: dict[int, list[int]] = {}
        for i in self.rows_of:
            if isinstance(self.searches[i], BeamSearch):
                groups.setdefault(self.searches[i].beam_size, []).append(i)
        ranked: dict[int, Ranked | None] = {}
        for sentences in groups.values():
            rows = [np.asarray(self.rows_of[i]) for i in sentences]
            found = rank_beams([self.searches[i] for i in sentences], rows, values, ids, values.shape[1] == vocab)
            ranked.update(zip(sentences, found))
        return ranked


# refill(rows, src_len) -> new (source ids, search) pairs to join the running batch
Refill = Callable[[int, int], list[tuple[Sequence[int], Search]]]


def decode_batch(
    model: StepModel,
    sources: Sequence[Sequence[int]],
    searches: Sequence[Search],
    stopped: Callable[[int], bool] = lambda i: False,
    on_step: Callable[[int], None] = lambda rows: None,
    on_done: Callable[[int], None] = lambda i: None,
    refill: Refill | None = None,
) -> int:
    """Run the searches of a batch to the end; returns the number of decode steps taken.

    Sentences are numbered in order of arrival: the initial sources first, then whatever `refill` adds.
    `stopped(i)` is asked before every step: True (sentence i was cancelled or is past its deadline) drops its rows.
    `on_done(i)` is told as soon as sentence i is finished or dropped, so its result can be sent at once.
    `refill(rows, src_len)` is asked before every step when the model lets sentences join a running batch
    (`model.joinable`), and whenever the batch has emptied otherwise.
    `on_step(rows)` is told the number of rows of each step (for metrics).
    """
    batch = RunningBatch(model)
    if sources:
        batch.join(sources, searches)
    steps = 0
    while True:
        # (1) Sentences that were cancelled or ran out of time leave before the step.
        gone = [i for i in batch.rows_of if stopped(i)]
        if gone:
            batch.drop(gone)
            for i in gone:
                on_done(i)
        # (2) Newcomers join: at any step when the family allows it, else only into an empty batch.
        if refill is not None and (model.joinable or not batch.rows_of):
            if not batch.rows_of:
                batch = _fresh(batch)
            new = refill(batch.rows, batch.src_len)
            if new:
                batch.join([src for src, _ in new], [search for _, search in new])
        if not batch.rows_of:
            return steps
        # (3) One step; (4) finished sentences leave.
        on_step(batch.rows)
        for i in batch.step():
            on_done(i)
        steps += 1


def _fresh(batch: RunningBatch) -> RunningBatch:
    """An empty batch that keeps numbering sentences where `batch` stopped."""
    fresh = RunningBatch(batch.model)
    fresh.searches = batch.searches
    return fresh


def source_max_len(source_tokens: int, max_output_tokens: int, max_output_ratio: float, model_limit: int) -> int:
    """Decode steps allowed: the model's limit, capped by the absolute and the relative (ratio * source + 5) maximum."""
    limit = model_limit
    if max_output_tokens:
        limit = min(limit, max_output_tokens)
    if max_output_ratio > 0:
        limit = min(limit, int(math.floor(max_output_ratio * source_tokens)) + 5)
    return max(limit, 1)
