"""Per-model request queue cut into batches under a token budget and a maximum queue delay.

The first sequence to arrive opens a collection window of `max_queue_delay_ms`; everything queued by then (or until
the budget is full) is sorted by length and cut into batches whose padded size (sequences x longest x beam) stays
within `max_batch_tokens`, so similar lengths travel together. Batches run in the shared worker pool (onnxruntime
releases the GIL); the pool's size is the number of concurrent runs across all models. A sequence whose request was
cancelled or whose deadline passed is dropped before its batch runs, and inside a translation batch it leaves the
running decode at the next step (see decoding.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from seqserve.server.config import BatchingConfig
from seqserve.server.errors import Cancelled, DeadlineExceeded, ModelUnavailable, QueueFull

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkItem:
    """One sequence waiting for a batch; `job` is the task's own record (TranslationJob, BertJob)."""

    job: Any
    length: int  # tokens, for grouping
    cost: int  # padded tokens it adds per unit of batch length (beam size for translation, 1 otherwise)
    deadline: float | None  # time.monotonic() deadline, None for none
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from the event loop, read by the worker thread (a bool store is atomic)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def stopped(self) -> bool:
        return self.cancelled or self.expired()


# run_batch(items) runs in a worker thread and fills each item's job.result
BatchRunner = Callable[[Sequence[WorkItem]], None]


def cut_batches(items: list[WorkItem], budget: int, max_size: int) -> list[list[WorkItem]]:
    """Sort by length and cut into batches whose padded cost (n x longest x cost) stays within the budget."""
    batches: list[list[WorkItem]] = []
    batch: list[WorkItem] = []
    longest = 0
    for item in sorted(items, key=lambda it: it.length):
        grown = max(longest, item.length)
        widest = max([it.cost for it in batch] + [item.cost])
        if batch and ((len(batch) + 1) * grown * widest > budget or len(batch) >= max_size):
            batches.append(batch)
            batch, grown = [], item.length
        batch.append(item)
        longest = grown
    if batch:
        batches.append(batch)
    return batches


class Batcher:
    """The queue and batching loop of one model version."""

    def __init__(
        self,
        name: str,
        version: int,
        run_batch: BatchRunner,
        executor: Executor,
        config: BatchingConfig,
        max_queue: int,
        observe: Callable[[list[WorkItem], float], None] = lambda batch, seconds: None,
    ):
        self.name = name
        self.version = version
        self.run_batch = run_batch
        self.executor = executor
        self.config = config
        self.max_queue = max_queue
        self.observe = observe
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, jobs: list[tuple[Any, int, int]], deadline: float | None) -> list[Any]:
        """Queue (job, length, cost) triples and wait for all; cancellation of the caller drops them from work."""
        if self._closed:
            raise ModelUnavailable(self.name, self.version, "UNLOADING")
        if len(self._queue) + len(jobs) > self.max_queue:
            raise QueueFull(self.name, len(self._queue) + len(jobs), self.max_queue)
        loop = asyncio.get_running_loop()
        items = [WorkItem(job, length, cost, deadline, loop.create_future()) for job, length, cost in jobs]
        self._queue.extend(items)
        self._wakeup.set()
        try:
            await asyncio.gather(*(it.future for it in items))
        except BaseException:
            for it in items:
                it.cancelled = True
            raise
        return [it.job for it in items]

    async def _loop(self) -> None:
        delay = self.config.max_queue_delay_ms / 1000.0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            # Collect: wait for company until the delay passes or the budget is full.
            opened = self._queue[0].enqueued
            while self._queued_cost() < self.config.max_batch_tokens:
                remaining = opened + delay - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                    self._wakeup.clear()
                except asyncio.TimeoutError:
                    break
            items = [it for it in self._queue]
            self._queue.clear()
            live = []
            for it in items:
                if it.future.done():
                    continue
                if it.cancelled:
                    it.future.set_exception(Cancelled())
                elif it.expired():
                    it.future.set_exception(DeadlineExceeded(f"after {time.monotonic() - it.enqueued:.3f} s in the queue"))
                else:
                    live.append(it)
            for batch in cut_batches(live, self.config.max_batch_tokens, self.config.max_batch_size):
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    def _queued_cost(self) -> int:
        return sum(it.length * it.cost for it in self._queue)

    async def _run(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            await loop.run_in_executor(self.executor, self.run_batch, batch)
        except BaseException as exc:  # a failed batch fails its requests, never the loop
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("batch of %d for %s failed", len(batch), self.name)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc if isinstance(exc, Exception) else Cancelled())
            return
        self.observe(batch, started)
        for it in batch:
            if it.future.done():
                continue
            if it.cancelled:
                it.future.set_exception(Cancelled())
            elif it.expired():
                it.future.set_exception(DeadlineExceeded("while decoding"))
            else:
                it.future.set_result(it.job)

    async def close(self) -> None:
        """Take no new work, finish what is queued and running, stop the loop."""
        self._closed = True
        self._wakeup.set()
        while self._queue and self._task and not self._task.done():
            await asyncio.sleep(0.005)
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
