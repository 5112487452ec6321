"""The per-model batcher (server/batcher.py) on a real event loop and thread pool, with plain-Python batch runners."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from seqserve.server.batcher import Batcher, WorkItem, cut_batches
from seqserve.server.config import BatchingConfig
from seqserve.server.errors import DeadlineExceeded, QueueFull


def _item(length: int, cost: int = 1) -> WorkItem:
    return WorkItem(job=None, length=length, cost=cost, deadline=None, future=None)  # type: ignore[arg-type]


def test_batches_group_similar_lengths_within_the_token_budget():
    items = [_item(n) for n in (30, 2, 29, 3, 31, 2)]
    batches = cut_batches(items, budget=64, max_size=8)
    assert [[it.length for it in b] for b in batches] == [[2, 2, 3], [29, 30], [31]]
    for batch in batches:
        assert len(batch) * max(it.length for it in batch) <= 64


def test_beam_cost_counts_against_the_budget():
    batches = cut_batches([_item(10, cost=4) for _ in range(4)], budget=100, max_size=8)
    assert [len(b) for b in batches] == [2, 2]


def test_batch_size_is_capped():
    assert [len(b) for b in cut_batches([_item(1) for _ in range(5)], budget=1000, max_size=2)] == [2, 2, 1]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_queued_sequence_joins_the_running_batch():
    started, release = threading.Event(), threading.Event()
    runs: list[list[str]] = []

    def run(items, context):
        names = [it.job["name"] for it in items]
        runs.append(names)
        started.set()
        release.wait(10)
        for it in context.pull(rows=len(items), src_len=4):
            names.append(it.job["name"])
            it.job["by"] = names[0]
            context.finish(it)
        for it in items:
            it.job["by"] = names[0]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=200.0), 100, joinable=True)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit([({"name": "a"}, 4, 1)], None))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            second = asyncio.ensure_future(batcher.submit([({"name": "b"}, 3, 1)], None))
            await asyncio.sleep(0)
            release.set()
            done = await asyncio.gather(first, second)
            await batcher.close()
            return done

    [[a], [b]] = _run(scenario())
    assert runs == [["a", "b"]]  # one run: "b" was pulled into "a"'s batch, no second batch
    assert a["by"] == b["by"] == "a"


def test_a_sequence_past_its_deadline_never_runs():
    ran: list[str] = []

    def run(items, context):
        ran.extend(it.job for it in items)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=50.0, dispatch_when_idle=False), 100)
            batcher.start()
            late = asyncio.ensure_future(batcher.submit([("late", 1, 1)], time.monotonic() + 0.001))
            ok = asyncio.ensure_future(batcher.submit([("ok", 1, 1)], None))
            with pytest.raises(DeadlineExceeded):
                await late
            await ok
            await batcher.close()

    _run(scenario())
    assert ran == ["ok"]


def test_a_cancelled_request_never_runs():
    ran: list[str] = []

    def run(items, context):
        ran.extend(it.job for it in items)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=50.0, dispatch_when_idle=False), 100)
            batcher.start()
            gone = asyncio.ensure_future(batcher.submit([("gone", 1, 1)], None))
            ok = asyncio.ensure_future(batcher.submit([("ok", 1, 1)], None))
            await asyncio.sleep(0.005)
            gone.cancel()
            await ok
            await batcher.close()

    _run(scenario())
    assert ran == ["ok"]


def test_a_batch_waiting_for_a_worker_drops_the_sequences_whose_clients_gave_up():
    """Under load a batch can wait for the worker while its requests' deadlines pass: when the worker takes it up,
    those sequences are left out (their callers already have DEADLINE_EXCEEDED), and a batch of only such runs not."""
    ran: list[list[str]] = []
    release = threading.Event()

    def run(items, context):
        ran.append([it.job for it in items])
        if items[0].job == "blocker":
            release.wait(10)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            config = BatchingConfig(max_batch_tokens=1, max_batch_size=1)  # one sequence a batch
            batcher = Batcher("m", 1, run, pool, config, 100)
            batcher.start()
            blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 1)], None))
            await asyncio.sleep(0.05)  # the worker is busy with it
            soon = time.monotonic() + 0.05
            late = [asyncio.ensure_future(batcher.submit([(f"late{i}", 1, 1)], soon)) for i in range(3)]
            ok = asyncio.ensure_future(batcher.submit([("ok", 1, 1)], None))
            await asyncio.sleep(0.02)
            assert batcher.queued == 4  # in started batches that wait for the worker: they count against max_queue
            await asyncio.sleep(0.1)  # the deadlines pass while the batches wait
            release.set()
            for future in late:
                with pytest.raises(DeadlineExceeded):
                    await future
            await asyncio.gather(blocker, ok)
            assert batcher.queued == 0
            await batcher.close()

    _run(scenario())
    assert ran == [["blocker"], ["ok"]]


def test_the_queue_limit_counts_waiting_batches_and_forgets_abandoned_sequences():
    release = threading.Event()

    def run(items, context):
        release.wait(10)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            config = BatchingConfig(max_batch_tokens=1, max_batch_size=1, dispatch_when_idle=False,
                                    max_queue_delay_ms=0.0)  # fmt: skip
            batcher = Batcher("m", 1, run, pool, config, max_queue=2)
            batcher.start()
            first = [asyncio.ensure_future(batcher.submit([("a0", 1, 1)], None))]
            await asyncio.sleep(0.05)  # a0 runs (and holds the worker)
            first += [asyncio.ensure_future(batcher.submit([(f"a{i}", 1, 1)], None)) for i in (1, 2)]
            await asyncio.sleep(0.05)
            assert batcher.queued == 2  # a1 and a2 wait for the worker in batches of their own
            with pytest.raises(QueueFull):  # 2 waiting + 1 > 2
                await batcher.submit([("b", 1, 1)], None)
            for future in first:
                future.cancel()  # their clients give up
            await asyncio.sleep(0.01)
            gone = asyncio.ensure_future(batcher.submit([("c", 1, 1)], time.monotonic() + 0.01))
            await asyncio.sleep(0.05)
            release.set()
            with pytest.raises(DeadlineExceeded):
                await gone
            await asyncio.wait_for(batcher.submit([("d", 1, 1)], None), 5)  # served: nothing abandoned is counted
            await batcher.close()

    _run(scenario())


def test_a_failing_batch_fails_the_sequences_it_pulled_in():
    started, release = threading.Event(), threading.Event()

    def run(items, context):
        started.set()
        release.wait(10)
        context.pull(rows=1, src_len=1)
        raise RuntimeError("graph failed")

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=200.0), 100, joinable=True)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit([("a", 1, 1)], None))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            second = asyncio.ensure_future(batcher.submit([("b", 1, 1)], None))
            await asyncio.sleep(0)
            release.set()
            results = await asyncio.gather(first, second, return_exceptions=True)
            await batcher.close()
            return results

    results = _run(scenario())
    assert [str(r) for r in results] == ["graph failed", "graph failed"]


def test_an_idle_model_starts_at_once_and_a_busy_one_gathers_what_arrives_meanwhile():
    started, release = threading.Event(), threading.Event()
    runs: list[list[str]] = []

    def run(items, context):
        runs.append([it.job for it in items])
        if len(runs) == 1:
            started.set()
            release.wait(10)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            # A 10 s queue delay: the lone first request must not wait for it, nor the two queued behind a batch.
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=10_000.0), 100)
            batcher.start()
            began = time.monotonic()
            first = asyncio.ensure_future(batcher.submit([("a", 1, 1)], None))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            waited_first = time.monotonic() - began
            rest = [asyncio.ensure_future(batcher.submit([(name, 1, 1)], None)) for name in ("b", "c")]
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(first, *rest)
            elapsed = time.monotonic() - began
            await batcher.close()
            return waited_first, elapsed

    waited_first, elapsed = _run(scenario())
    assert waited_first < 1.0 and elapsed < 2.0  # neither batch waited out the 10 s delay
    assert runs == [["a"], ["b", "c"]]  # what arrived during the first batch ran as one batch right after it


def _threads_of_runs(config: BatchingConfig, requests: list[int], seconds: float = 0.0, overlap: bool = False):
    """Submit single-sequence requests of these lengths to an idle `inline` batcher one after another (or, with
    `overlap`, the last two together); returns, per run, whether it ran on the event loop's own thread."""
    on_loop: list[bool] = []
    loop_thread: list[threading.Thread] = []

    def run(items, context):
        on_loop.append(threading.current_thread() is loop_thread[0])
        time.sleep(seconds)

    async def scenario():
        loop_thread.append(threading.current_thread())
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, config, 100, inline=True, workers=2)
            batcher.start()
            for length in requests[:-2] if overlap else requests:
                await batcher.submit([(None, length, 1)], None)
            if overlap:
                await asyncio.gather(*(batcher.submit([(None, n, 1)], None) for n in requests[-2:]))
            await batcher.close()

    _run(scenario())
    return on_loop


def test_small_batches_on_an_idle_model_run_on_the_event_loop_once_known_to_be_quick():
    # The first run teaches the batcher how long small batches take; it goes to the pool.
    assert _threads_of_runs(BatchingConfig(inline_max_ms=50.0), [8, 8, 12]) == [False, True, True]


def test_batches_stay_in_the_pool_when_slow_large_off_or_not_alone():
    assert _threads_of_runs(BatchingConfig(inline_max_ms=5.0), [8, 8], seconds=0.02) == [False, False]  # too slow
    assert _threads_of_runs(BatchingConfig(inline_max_ms=50.0), [8, 200]) == [False, False]  # more than INLINE_TOKENS
    assert _threads_of_runs(BatchingConfig(inline_max_ms=0.0), [8, 8]) == [False, False]  # turned off
    # Two requests at once: the second starts while the first runs (two workers), so neither blocks the loop.
    assert _threads_of_runs(BatchingConfig(inline_max_ms=50.0), [8, 8, 8], seconds=0.01, overlap=True)[1:] == [
        False, False,
    ]  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sequence_the_running_decode_leaves_waiting_starts_on_a_free_worker_only(workers):
    """A joinable decode with no room for a newcomer: after max_queue_delay_ms the newcomer gets a batch of its own if
    a worker is free; with every worker busy it stays queued, so the running decode can still take it once room frees
    (a batch queued behind the running one would stop it taking anyone: newcomers would trickle into tiny batches)."""
    release = threading.Event()
    runs: list[str] = []
    pulled: list[str] = []

    def run(items, context):
        runs.append(items[0].job)
        if items[0].job != "first":
            return
        assert context.pull(rows=1, src_len=4) == []  # the budget leaves no room beside its one row
        release.wait(10)
        for it in context.pull(rows=0, src_len=4):  # its sentence has left: room for anyone waiting
            pulled.append(it.job)
            context.finish(it)

    async def scenario():
        with ThreadPoolExecutor(workers) as pool:
            config = BatchingConfig(max_queue_delay_ms=20.0, max_batch_tokens=4)
            batcher = Batcher("m", 1, run, pool, config, 100, joinable=True, workers=workers)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit([("first", 4, 1)], None))
            while not runs:
                await asyncio.sleep(0.001)
            second = asyncio.ensure_future(batcher.submit([("second", 4, 1)], None))
            await asyncio.sleep(0.2)  # ten times the queue delay
            release.set()
            await asyncio.gather(first, second)
            await batcher.close()

    _run(scenario())
    if workers == 2:
        assert runs == ["first", "second"] and pulled == []  # its own batch, on the free worker
    else:
        assert runs == ["first"] and pulled == ["second"]  # taken by the running decode when room freed


def test_a_running_decode_takes_at_most_the_limit_it_asks_for():
    release = threading.Event()
    taken: list[list[str]] = []

    def run(items, context):
        if items[0].job != "first":
            return
        release.wait(10)
        for limit in (0, 2, None):  # max_batch_size leaves no room, then room for two, then the rest
            got = context.pull(rows=1, src_len=1, limit=limit)
            taken.append([it.job for it in got])
            for it in got:
                context.finish(it)

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", 1, run, pool, BatchingConfig(max_queue_delay_ms=10_000.0), 100, joinable=True)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit([("first", 1, 1)], None))
            await asyncio.sleep(0.05)
            others = [asyncio.ensure_future(batcher.submit([(name, 1, 1)], None)) for name in "abc"]
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(first, *others)
            await batcher.close()

    _run(scenario())
    assert taken == [[], ["a", "b"], ["c"]]


def test_the_queue_is_read_under_the_lock_that_workers_change_it_under():
    # The event loop reads the queue (`queued` on every submit, its cost and oldest item while batching) while worker
    # threads take started batches out of `_waiting` and running decodes pull joiners out of `_queue`, under the
    # batcher's lock: unlocked, "dictionary changed size during iteration" (an INTERNAL answer under load) and "deque
    # mutated during iteration" (which would stop the model's batching loop).
    import sys

    batcher = Batcher("m", 1, lambda items, ctx: None, ThreadPoolExecutor(1), BatchingConfig(), 4096)
    for key in range(200):
        batcher._waiting[-1 - key] = [_item(1)]
        batcher._queue.append(_item(1))
    stop = threading.Event()

    def worker() -> None:  # as _start adds a started batch and a worker then takes one up
        key = 0
        while not stop.is_set():
            with batcher._lock:
                batcher._waiting[key] = [_item(1)]
            with batcher._lock:
                batcher._waiting.pop(key - 50, None)
            with batcher._lock:  # as `pull` takes a joiner and a submit queues another
                batcher._queue.append(_item(1))
                batcher._queue.popleft()
            key += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        lengths = [batcher.queued + batcher._queued_cost() for _ in range(25_000)]
        assert all(batcher._oldest_enqueued() is not None for _ in range(25_000))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert min(lengths) >= 600  # 200 queued + 200 or more waiting, and the queue's cost 200: never an exception
