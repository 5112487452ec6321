"""Per-model request queue cut into batches under a token budget and a maximum queue delay.

While the model has a free worker, a request starts at once (`dispatch_when_idle`, the default); while its batches
occupy every worker, requests gather until one ends or a full batch waits (continuous batching at batch boundaries).
Without dispatch_when_idle, the first sequence to arrive opens a collection window of `max_queue_delay_ms`.
Everything queued by then (or until the budget is full) is sorted by length and cut into batches whose padded
size (sequences x longest x beam) stays within `max_batch_tokens`, so similar lengths travel together. Batches run in
the shared worker pool (onnxruntime releases the GIL); the pool's size is the number of concurrent runs across all
models. A sequence whose request was cancelled or whose deadline passed is dropped before its batch runs (when the
batch is cut, and again when a worker takes it up: under load a batch may wait for a worker while its clients give
up), and inside a translation batch it leaves the running decode at the next step (see decoding.py). The queue limit
(`max_queue`) counts what waits in the queue and in batches not yet taken up by a worker; abandoned sequences are
cleared from the queue before a request is refused for it.

A batcher made `inline` (BERT models) runs a small batch that found its model idle on the event loop itself, skipping
the two thread hand-offs of the worker pool, as long as its small batches have been taking at most
`inline_max_ms` (the loop is blocked meanwhile, so the bound is learnt from the model's own runs, and only a model with
nothing else running qualifies).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from seqserve.server.config import BatchingConfig
from seqserve.server.errors import Cancelled, DeadlineExceeded, LargerThanQueue, QueueFull, model_unavailable

log = logging.getLogger(__name__)

INLINE_TOKENS = 64  # padded tokens of a batch that may run inline; the run times of such batches decide whether they do


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


class BatchContext(Protocol):
    """What a running batch may ask of its batcher, from the worker thread."""

    def pull(self, rows: int, src_len: int, limit: int | None = None) -> list[WorkItem]:
        """Queued items (at most `limit`) that fit beside `rows` rows of `src_len` tokens (sequences joining a running
        decode)."""
        ...

    def finish(self, item: WorkItem) -> None:
        """Send this item's result now, without waiting for the rest of its batch."""
        ...


# run_batch(items, context) runs in a worker thread and fills each item's job.result
BatchRunner = Callable[[list[WorkItem], BatchContext], None]


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


def _padded(batch: list[WorkItem]) -> int:
    return len(batch) * max(it.length * it.cost for it in batch)


class Batcher:
    """The queue and batching loop of one model version.

    With `joinable` (translators whose sentences can join a running decode), a queued sequence is first offered to
    the running decode, which pulls what fits its budget before each step; a new batch starts only for sequences that
    waited `max_queue_delay_ms` without being pulled, or when nothing of this model is running.
    """

    def __init__(
        self,
        name: str,
        version: int,
        run_batch: BatchRunner,
        executor: Executor,
        config: BatchingConfig,
        max_queue: int,
        observe: Callable[[list[WorkItem], float], None] = lambda batch, started: None,
        joinable: bool = False,
        workers: int = 1,
        inline: bool = False,
    ):
        self.name = name
        self.version = version
        self.run_batch = run_batch
        self.executor = executor
        self.config = config
        self.max_queue = max_queue
        self.observe = observe
        self.joinable = joinable
        self.workers = max(workers, 1)  # batches of this model that can run at once (the server's instances)
        self.inline = inline and not joinable and config.inline_max_ms > 0
        self._small_batch_s: float | None = None  # recent run time of batches of <= INLINE_TOKENS, rising at once
        self._queue: deque[WorkItem] = deque()
        self._lock = threading.Lock()  # the queue is shared with worker threads pulling joiners
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        # Started batches that no worker has taken up yet, by id (under self._lock): their sequences count as queued.
        self._waiting: dict[int, list[WorkItem]] = {}
        self._closed = False
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._local = threading.local()  # per worker thread: the sequences its running batch pulled in

    def start(self) -> None:
        self._loop_ref = asyncio.get_running_loop()
        self._task = self._loop_ref.create_task(self._loop(), name=f"batcher-{self.name}")

    @property
    def queued(self) -> int:
        """Sequences waiting: in the queue, and in batches no worker has taken up yet (read under the lock: workers
        take batches out of _waiting while the event loop asks)."""
        with self._lock:
            return len(self._queue) + sum(len(batch) for batch in self._waiting.values())

    async def submit(self, jobs: list[tuple[Any, int, int]], deadline: float | None) -> list[Any]:
        """Queue (job, length, cost) triples and wait for all; cancellation of the caller drops them from work."""
        if self._closed:
            raise model_unavailable(self.name, self.version, "UNLOADING")
        if len(jobs) > self.max_queue:
            raise LargerThanQueue(self.name, len(jobs), self.max_queue)
        if self.queued + len(jobs) > self.max_queue:
            live = self._clear_abandoned()
            if live + len(jobs) > self.max_queue:
                raise QueueFull(self.name, live + len(jobs), self.max_queue)
        loop = asyncio.get_running_loop()
        items = [WorkItem(job, length, cost, deadline, loop.create_future()) for job, length, cost in jobs]
        if self.config.dispatch_when_idle and len(self._running) < self.workers and not self._queue:
            # An idle model: the batches start now, without a turn through the batching loop.
            self._start(loop, items, idle=True)
        else:
            with self._lock:
                self._queue.extend(items)
            self._wakeup.set()
        try:
            await (items[0].future if len(items) == 1 else asyncio.gather(*(it.future for it in items)))
        except BaseException:
            for it in items:
                it.cancelled = True
            raise
        return [it.job for it in items]

    # ---------------------------------------------------------------------------------------------------------
    # Event loop side

    async def _loop(self) -> None:
        delay = self.config.max_queue_delay_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            if self.joinable and self._running:
                # A decode is running and pulls joiners itself before each step; another batch starts only for what
                # it left waiting max_queue_delay_ms, and only on a free worker: on a busy one that batch would just
                # wait, and while it waits the running decode takes no more (`pull`), so newcomers would trickle
                # into small batches queued one behind the other. Until a worker frees, they wait to be pulled.
                oldest = self._oldest_enqueued()
                if oldest is None:
                    continue
                waited = time.monotonic() - oldest
                if waited < delay:
                    loop.call_later(delay - waited, self._wakeup.set)
                    continue
                if len(self._running) >= self.workers:
                    continue  # _run_done wakes the loop when a batch ends
            elif self.config.dispatch_when_idle:
                # Start at once while this model has a free worker (a lone request never waits for company that is
                # not coming); while its batches fill the workers, requests gather until one ends or a full batch
                # waits: a batch started earlier would only wait for a worker, and the next one grows meanwhile.
                while len(self._running) >= self.workers and self._queued_cost() < self.config.max_batch_tokens:
                    await self._wakeup.wait()
                    self._wakeup.clear()
            else:
                # Collect: wait for company until the delay passes or the budget is full.
                opened = self._oldest_enqueued()
                while opened is not None and self._queued_cost() < self.config.max_batch_tokens:
                    remaining = opened + delay - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                        self._wakeup.clear()
                    except asyncio.TimeoutError:
                        break
            with self._lock:
                items = list(self._queue)
                self._queue.clear()
            if items:  # running decodes may have pulled every one meanwhile
                self._start(loop, items)

    def _clear_abandoned(self) -> int:
        """Drop queued sequences whose request was cancelled or is past its deadline (their clients are gone); returns
        the sequences still waiting, those of batches waiting for a worker included (they drop theirs when taken up)."""
        kept: deque[WorkItem] = deque()
        gone: list[WorkItem] = []
        with self._lock:
            for it in self._queue:
                (gone if it.stopped() or it.future.done() else kept).append(it)
            self._queue = kept
            waiting = sum(1 for batch in self._waiting.values() for it in batch if not it.stopped())
        for it in gone:
            self._refuse(it)
        return len(kept) + waiting

    def _start(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem], idle: bool = False) -> None:
        """Start the items that may still run (not cancelled, not past their deadline), cut into batches; `idle`: the
        model had nothing running or queued."""
        live = [it for it in items if not self._refuse(it)]
        for batch in cut_batches(live, self.config.max_batch_tokens, self.config.max_batch_size):
            with self._lock:
                self._waiting[id(batch)] = batch
            task = loop.create_task(self._run(batch, idle))
            self._running.add(task)
            task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if self._queue:
            self._wakeup.set()

    def _queued_cost(self) -> int:
        with self._lock:  # running decodes pull joiners out of the queue from their worker threads
            return sum(it.length * it.cost for it in self._queue)

    def _oldest_enqueued(self) -> float | None:
        """When the longest-waiting item was queued; None once workers pulled the queue empty."""
        with self._lock:
            return self._queue[0].enqueued if self._queue else None

    def _refuse(self, it: WorkItem) -> bool:
        """Fail an item that must not run (cancelled, past its deadline); True when it was refused."""
        if it.future.done():
            return True
        if it.cancelled:
            it.future.set_exception(Cancelled())
            return True
        if it.expired():
            it.future.set_exception(DeadlineExceeded(f"after {time.monotonic() - it.enqueued:.3f} s in the queue"))
            return True
        return False

    def _resolve(self, it: WorkItem) -> None:
        if not self._refuse(it):
            it.future.set_result(it.job)

    def _may_inline(self, batch: list[WorkItem]) -> bool:
        """A small batch, alone in its model, whose like have been running within inline_max_ms."""
        return (
            self.inline
            and len(self._running) == 1
            and self._small_batch_s is not None
            and self._small_batch_s * 1000.0 <= self.config.inline_max_ms
            and _padded(batch) <= INLINE_TOKENS
        )

    async def _run(self, batch: list[WorkItem], idle: bool = False) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.observe(batch, started)
        try:
            if idle and self._may_inline(batch):
                self._execute(batch)
            else:
                await loop.run_in_executor(self.executor, self._execute, batch)
        except BaseException as exc:  # a failed batch fails its requests, never the loop
            with self._lock:  # if it never reached a worker (cancelled while it waited)
                self._waiting.pop(id(batch), None)
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("batch of %d for %s failed", len(batch), self.name)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc if isinstance(exc, Exception) else Cancelled())
            return
        for it in batch:
            self._resolve(it)

    # ---------------------------------------------------------------------------------------------------------
    # Worker thread side (BatchContext)

    def _execute(self, batch: list[WorkItem]) -> None:
        """Run a batch; if it fails, the sequences it pulled in fail with it (the batch's own fail in `_run`). The
        sequences whose clients gave up while the batch waited for this worker are left out (`_run` refuses them)."""
        with self._lock:
            self._waiting.pop(id(batch), None)
        batch = [it for it in batch if not it.stopped()]
        if not batch:
            return
        self._local.pulled = []
        try:
            started = time.perf_counter()
            self.run_batch(batch, self)
            if self.inline and _padded(batch) <= INLINE_TOKENS:
                seconds, recent = time.perf_counter() - started, self._small_batch_s
                self._small_batch_s = seconds if recent is None or seconds > recent else 0.9 * recent + 0.1 * seconds
        except Exception as exc:
            for it in self._local.pulled:
                self._call(self._fail, it, exc)
            raise
        finally:
            self._local.pulled = []

    def _fail(self, it: WorkItem, exc: Exception) -> None:
        if not it.future.done():
            it.future.set_exception(exc)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop_ref is None:
            raise RuntimeError(f"batcher {self.name} was never started")
        self._loop_ref.call_soon_threadsafe(fn, *args)

    def pull(self, rows: int, src_len: int, limit: int | None = None) -> list[WorkItem]:
        if len(self._running) > 1:
            # Another batch of this model already waits for (or holds) a worker: newer sequences must not overtake
            # the older ones it carries, so the running decode takes no more and finishes.
            return []
        if limit is not None and limit <= 0:  # the running decode is at max_batch_size
            return []
        taken: list[WorkItem] = []
        refused: list[WorkItem] = []
        budget = self.config.max_batch_tokens
        with self._lock:
            while self._queue:
                it = self._queue[0]
                if it.stopped() or it.future.done():
                    refused.append(self._queue.popleft())
                    continue
                longest = max(src_len, it.length)
                if (rows and (rows + it.cost) * longest > budget) or (limit is not None and len(taken) >= limit):
                    break
                taken.append(self._queue.popleft())
                rows, src_len = rows + it.cost, longest
        for it in refused:
            self.finish(it)
        getattr(self._local, "pulled", []).extend(taken)
        if taken:
            self.observe(taken, time.monotonic())
        return taken

    def finish(self, item: WorkItem) -> None:
        self._call(self._resolve, item)

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
