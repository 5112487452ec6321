"""Ranking beam-search candidates exactly: by score descending, then by flat index (parent row, token) ascending.

Letters: R hypothesis rows, V vocabulary, K candidates fetched a row, k beam size, B searches ranked together,
w rows a search (padded to the widest).

`best_candidates_full` is the reference; `best_candidates` ranks the (R, V) log-probs of graphs without TopK with a
per-row preselection; `rank_beams` ranks from the best K tokens a row that TopK graphs return (export/graphs.py
`add_top_k`), for many searches at once. All three give exactly the reference order (tests/test_server_speed.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from seqserve.server.decoding import BeamSearch


def _rank(values: np.ndarray, index: np.ndarray, take: int) -> np.ndarray:
    """Positions in `values` of its `take` best, best first, ties by `index` (ascending). Every entry equal to the
    take-th best value is ranked, so which tied entries make the cut never depends on argpartition's internals."""
    take = min(take, values.size)
    cut = np.partition(values, values.size - take)[values.size - take]  # the take-th largest value
    tied = np.flatnonzero(values >= cut)  # (N,) N >= take
    return tied[np.lexsort((index[tied], -values[tied]))][:take]


def best_candidates_full(candidates: np.ndarray, take: int) -> np.ndarray:
    """Reference ranking: flat indices of the `take` best of (R, V) `candidates`, best first, ties by flat index."""
    flat = candidates.reshape(-1)  # (R * V,)
    return _rank(flat, np.arange(flat.size), take)


def best_candidates(log_probs: np.ndarray, totals: np.ndarray, take: int) -> np.ndarray:
    """`best_candidates_full(totals[:, None] + log_probs, take)` with per-row preselection on the float32 (R, V)
    log-probs: adding a row's float64 total keeps the row's order, so the global best `take` lie among each row's best
    `take` (ties by column, which orders a row as the flat index does), and only those get the float64 add.

    Every entry equal to a row's cut value is kept (a superset of the row's best `take` whatever the ties). The add
    can still round two different float32 values of a row to one float64 sum; when that happens at a row's cut (the
    best value below the cut sums to the cut's sum) the call takes the full path, so the result is always exactly
    the reference one."""
    rows, vocab = log_probs.shape
    if take >= vocab or rows == 1:
        return best_candidates_full(totals[:, None] + log_probs, take)
    part = np.argpartition(log_probs, vocab - take, axis=1)[:, vocab - take:]  # (R, take) each row's best, unordered
    cut = np.take_along_axis(log_probs, part, axis=1).min(axis=1)  # (R,) each row's take-th best value
    below = np.where(log_probs < cut[:, None], log_probs, -np.inf).max(axis=1)  # (R,) best value under the cut
    if np.any(totals + below.astype(np.float64) >= totals + cut.astype(np.float64)):
        return best_candidates_full(totals[:, None] + log_probs, take)
    kept = np.flatnonzero(log_probs >= cut[:, None])  # (N,) flat indices, N >= R * take (more on ties at the cut)
    values = totals[kept // vocab] + log_probs.reshape(-1)[kept]  # (N,) float64, as in the full (R, V) sum
    return kept[_rank(values, kept, take)]


Ranked = tuple[np.ndarray, np.ndarray, np.ndarray]  # (parent rows, tokens, log-probabilities), best first


def rank_beams(
    searches: Sequence[BeamSearch], rows: Sequence[np.ndarray], values: np.ndarray, ids: np.ndarray, complete: bool
) -> list[Ranked | None]:
    """The 2k best extensions of each of several beam searches of one beam size k, ranked at once from each row's
    best tokens: values, ids (R, K) best first per row (ties to the lower id), `rows[j]` search j's rows in them.

    Exactly the full ranking (`best_candidates_full` on totals + log-probs): by score descending, then by flat index
    (parent row, token) ascending. None for a search whose candidates cannot settle it: a row whose 2k-th sum is not
    strictly above the next fetched one could be tied by an unfetched token (a lower id, or a float32 value the
    float64 total rounds to the same sum); unless `complete` (K is the whole vocabulary), its caller then ranks the
    full log-probabilities."""
    k = searches[0].beam_size
    take, fetched = 2 * k, values.shape[1]
    n = min(take, fetched)
    if not complete and fetched <= take:
        return [None] * len(searches)
    if len(searches) == 1:
        return [_rank_one(searches[0], values[rows[0]], ids[rows[0]], take, n, complete)]
    width = max(len(r) for r in rows)  # rows per search, padded to the widest
    index = np.full((len(searches), width), -1, dtype=np.int64)  # (B, w) rows in values, -1 where padded
    totals = np.zeros((len(searches), width), dtype=np.float64)  # (B, w)
    for j, (search, r) in enumerate(zip(searches, rows)):
        index[j, : len(r)] = r
        totals[j, : len(r)] = [sum(scores) for scores in search.live_scores]
    real = index >= 0
    safe = np.where(real, index, 0)
    sums = totals[..., None] + values[safe].astype(np.float64)  # (B, w, K), each row descending
    settled = np.ones(len(searches), dtype=bool)
    if not complete:
        settled = np.all((sums[..., take] < sums[..., take - 1]) | ~real, axis=1)  # (B,)
    tokens = ids[safe][..., :n]  # (B, w, n)
    # Lay each search's candidates out in flat-index order (parent row, then token), padded rows last with -inf: a
    # stable sort by score descending then breaks ties by flat index, as the full ranking does.
    by_token = np.argsort(tokens, axis=2, kind="stable")  # (B, w, n)
    tokens = np.take_along_axis(tokens, by_token, axis=2)
    scores = np.where(real[..., None], np.take_along_axis(sums[..., :n], by_token, axis=2), -np.inf)
    log_probs = np.take_along_axis(values[safe][..., :n], by_token, axis=2)
    B = len(searches)
    flat_scores = scores.reshape(B, -1)  # (B, w * n)
    best = np.argsort(-flat_scores, axis=1, kind="stable")[:, :take]  # (B, 2k)
    parents = best // n  # (B, 2k) the search's own row numbers
    picked_tokens = np.take_along_axis(tokens.reshape(B, -1), best, axis=1)
    picked_log_probs = np.take_along_axis(log_probs.reshape(B, -1), best, axis=1)
    ranked: list[Ranked | None] = []
    for j in range(B):
        keep = best[j] < len(rows[j]) * n  # never a padded row (only when a search has fewer than 2k candidates)
        ranked.append((parents[j][keep], picked_tokens[j][keep], picked_log_probs[j][keep]) if settled[j] else None)
    return ranked


def _rank_one(
    search: BeamSearch, values: np.ndarray, ids: np.ndarray, take: int, n: int, complete: bool
) -> Ranked | None:
    """rank_beams for a single search (the usual online request): the same order with fewer numpy calls."""
    totals = np.array([sum(scores) for scores in search.live_scores], dtype=np.float64)  # (rows,)
    sums = totals[:, None] + values.astype(np.float64)  # (rows, K)
    if not complete and not np.all(sums[:, take] < sums[:, take - 1]):
        return None
    rows = len(totals)
    parents = np.repeat(np.arange(rows), n)  # (rows * n,)
    tokens, sums, log_probs = ids[:, :n].reshape(-1), sums[:, :n].reshape(-1), values[:, :n].reshape(-1)
    best = np.lexsort((tokens, parents, -sums))[:take]  # score descending, then flat index (parent, token)
    return parents[best], tokens[best], log_probs[best]
