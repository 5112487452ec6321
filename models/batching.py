"""Length-bucketed batches under a token budget, deterministic given a seed.

An epoch's order: shuffle the examples, cut them into buckets of ``bucket_size``, sort each bucket by length, cut each
bucket into batches whose *padded* size stays within the budget, then shuffle the batches. Sorting within shuffled
buckets keeps padding low while leaving batches different from epoch to epoch.

An example's length is an int, or a tuple of ints for several padded tensors (source, target): a batch of ``n`` examples
costs ``n * sum(max over the batch of each component)`` tokens, exactly the padded tokens the model sees.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

Length = int | tuple[int, ...]


class BatchingError(ValueError):
    """The batching parameters cannot produce batches."""


def _components(length: Length) -> tuple[int, ...]:
    return (length,) if isinstance(length, int) else tuple(length)


def padded_tokens(lengths: Sequence[Length]) -> int:
    """Tokens a batch of these lengths occupies once every component is padded to its longest."""
    if not lengths:
        return 0
    parts = [_components(x) for x in lengths]
    return len(parts) * sum(max(column) for column in zip(*parts))


def token_budget_batches(
    lengths: Sequence[Length], budget: int, seed: int, bucket_size: int = 1024, shuffle: bool = True
) -> list[list[int]]:
    """One epoch of batches (lists of example indices) whose padded size is at most ``budget`` tokens.

    An example longer than the budget on its own gets a batch to itself (filter such examples beforehand when that
    matters). With ``shuffle=False`` the examples are only sorted by length (for evaluation).
    """
    if budget <= 0:
        raise BatchingError(f"token budget must be positive, got {budget}")
    if bucket_size <= 0:
        raise BatchingError(f"bucket size must be positive, got {bucket_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
        buckets = [order[i : i + bucket_size] for i in range(0, len(order), bucket_size)]
    else:
        buckets = [order]
    key = [_components(x) for x in lengths]
    batches: list[list[int]] = []
    for bucket in buckets:
        # Stable sort on the (shuffled) bucket: equal lengths keep their random order.
        bucket = sorted(bucket, key=lambda i: key[i])
        batch: list[int] = []
        maxima: tuple[int, ...] = ()
        for index in bucket:
            grown = tuple(max(a, b) for a, b in zip(maxima, key[index])) if maxima else key[index]
            if batch and (len(batch) + 1) * sum(grown) > budget:
                batches.append(batch)
                batch, grown = [], key[index]
            batch.append(index)
            maxima = grown
        if batch:
            batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class BatchPosition:
    """Where a run stands in the data: the epoch and the number of batches of it already consumed."""

    epoch: int = 0
    batch: int = 0


class BatchStream:
    """Endless batches over epochs; epoch ``e`` is ordered by seed ``seed + e``, so a position resumes it exactly."""

    def __init__(
        self,
        lengths: Sequence[Length],
        budget: int,
        seed: int,
        bucket_size: int = 1024,
        position: BatchPosition = BatchPosition(),
    ) -> None:
        if not lengths:
            raise BatchingError("no examples to batch")
        self._lengths = list(lengths)
        self._budget = budget
        self._seed = seed
        self._bucket_size = bucket_size
        self.position = position
        self._epoch_batches: list[list[int]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        return token_budget_batches(self._lengths, self._budget, self._seed + epoch, self._bucket_size)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        epoch, index = self.position.epoch, self.position.batch
        if self._epoch_batches is None:
            self._epoch_batches = self._batches(epoch)
        if index >= len(self._epoch_batches):
            epoch, index = epoch + 1, 0
            self._epoch_batches = self._batches(epoch)
            logger.debug("epoch %d: %d batches", epoch, len(self._epoch_batches))
        self.position = BatchPosition(epoch, index + 1)
        return self._epoch_batches[index]
