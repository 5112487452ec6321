"""The client library's edges against real servers: deadlines grpc cannot represent, closing with calls in flight,
message limits. Models come from the `tiny_repository` fixture (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import gc
import math
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from seqserve.clients import AsyncClient, Client, ConnectionConfig, RetryPolicy, SeqServeError
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread


@pytest.fixture(scope="module")
def model_server(tiny_repository):
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, grace_period_s=1)
    server = ServerThread(config, ModelRepository(Path(tiny_repository)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def translator(model_server) -> str:
    with Client(model_server.address, timeout_s=60) as client:
        return next(m.name for m in client.list_models() if m.state == "READY" and "translate" in m.capabilities)


# --------------------------------------------------------------------------------------------------------------
# Deadlines


@pytest.mark.parametrize("timeout", [math.inf, 1e12])
def test_a_timeout_beyond_what_grpc_represents_means_no_deadline(model_server, translator, timeout):
    with Client(model_server.address) as client:
        assert client.health(timeout=timeout) == "SERVING"
        assert [r.id for r in client.translate_stream(translator, [("1", "a b")], timeout=timeout)] == ["1"]
    with Client(model_server.address, timeout_s=timeout) as client:
        assert client.health() == "SERVING"

    async def use() -> None:
        async with AsyncClient(model_server.address) as aclient:
            assert await aclient.health(timeout=timeout) == "SERVING"
            results = [r.id async for r in aclient.translate_stream(translator, [("1", "a b")], timeout=timeout)]
            assert results == ["1"]

    asyncio.run(use())


@pytest.mark.parametrize("timeout, error", [(-1, ValueError), (math.nan, ValueError), ("5", TypeError)])
def test_a_stream_timeout_is_checked_like_a_unary_one(model_server, translator, timeout, error):
    with Client(model_server.address) as client:
        with pytest.raises(error, match="timeout"):
            client.health(timeout=timeout)
        with pytest.raises(error, match="timeout"):
            list(client.translate_stream(translator, [("1", "a b")], timeout=timeout))

    async def use() -> None:
        async with AsyncClient(model_server.address) as aclient:
            with pytest.raises(error, match="timeout"):
                [r async for r in aclient.translate_stream(translator, [("1", "a b")], timeout=timeout)]

    asyncio.run(use())


def test_a_bad_config_timeout_is_refused_at_construction():
    with pytest.raises(ValueError, match="timeout_s"):
        ConnectionConfig(timeout_s=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        Client("127.0.0.1:1", timeout_s=math.nan)


# --------------------------------------------------------------------------------------------------------------
# Closing a client with calls in flight


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SLOW_RETRY = RetryPolicy(initial_backoff_s=5.0, max_backoff_s=5.0, jitter=0.0)  # a call waits 5 s between attempts


def test_closing_a_client_ends_a_retry_backoff_at_once_with_the_closed_error():
    client = Client(f"127.0.0.1:{free_port()}", retry=SLOW_RETRY, timeout_s=60)  # nothing listens there
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.health()
        except BaseException as error:  # noqa: BLE001 - the test reports whatever it was
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the first attempt has failed; the call waits out its backoff
    closed_at = time.monotonic()
    client.close()
    caller.join(10)
    assert time.monotonic() - closed_at < 2
    assert isinstance(outcome[0], SeqServeError), outcome
    assert outcome[0].code == grpc.StatusCode.CANCELLED and "Client is closed" in outcome[0].message


def test_a_stream_cut_off_by_close_raises_the_closed_error(model_server, translator):
    client = Client(model_server.address)
    release = threading.Event()

    def items():
        yield ("1", "a b")
        release.wait(10)  # the stream stays open, waiting for the caller's next item

    stream = client.translate_stream(translator, items())
    assert next(stream).id == "1"
    threading.Timer(0.3, client.close).start()
    try:
        with pytest.raises(SeqServeError, match="Client is closed") as failure:
            next(stream)
    finally:
        release.set()
    assert failure.value.code == grpc.StatusCode.CANCELLED


class SlowHealth(health.HealthServicer):
    """The standard health service, answering after SLOW_ANSWER_S: a call that is surely in flight when closed."""

    def Check(self, request, context):
        time.sleep(SLOW_ANSWER_S)
        return super().Check(request, context)


SLOW_ANSWER_S = 3.0


@pytest.fixture(scope="module")
def slow_server():
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


async def outcome_of(awaitable) -> BaseException | None:
    """What awaiting it raised (CancelledError included), or None."""
    try:
        await awaitable
    except BaseException as error:  # noqa: BLE001 - the test asserts on whatever it was
        return error
    return None


def assert_closed_error(error: BaseException | None, client: str = "AsyncClient") -> None:
    assert isinstance(error, SeqServeError), repr(error)
    assert error.code == grpc.StatusCode.CANCELLED and f"{client} is closed" in error.message


def test_closing_an_async_client_fails_calls_in_flight_with_the_closed_error(slow_server):
    async def scenario() -> list[BaseException | None]:
        aclient = AsyncClient(slow_server)
        calls = [asyncio.create_task(outcome_of(aclient.health())) for _ in range(3)]
        await asyncio.sleep(0.3)
        await aclient.close()
        return await asyncio.wait_for(asyncio.gather(*calls), 10)

    for error in asyncio.run(scenario()):
        assert_closed_error(error)


def test_closing_an_async_client_ends_a_retry_backoff_at_once_with_the_closed_error():
    async def scenario() -> tuple[BaseException | None, float]:
        aclient = AsyncClient(f"127.0.0.1:{free_port()}", retry=SLOW_RETRY, timeout_s=60)  # nothing listens there
        call = asyncio.create_task(outcome_of(aclient.health()))
        await asyncio.sleep(0.5)  # the first attempt has failed; the call waits out its backoff
        closed_at = time.monotonic()
        await aclient.close()
        error = await asyncio.wait_for(call, 10)
        return error, time.monotonic() - closed_at

    error, took = asyncio.run(scenario())
    assert_closed_error(error)
    assert took < 2


def test_an_async_stream_cut_off_by_close_raises_the_closed_error(model_server, translator):
    async def scenario() -> BaseException | None:
        aclient = AsyncClient(model_server.address)
        release = asyncio.Event()

        async def items():
            yield ("1", "a b")
            await release.wait()  # the stream stays open, waiting for the caller's next item

        async def consume() -> None:
            async for _ in aclient.translate_stream(translator, items()):
                asyncio.get_running_loop().call_later(0.3, asyncio.ensure_future, aclient.close())

        try:
            return await asyncio.wait_for(outcome_of(consume()), 10)
        finally:
            release.set()

    assert_closed_error(asyncio.run(scenario()))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() tells a cancelled task from a closed client")
def test_a_cancelled_task_still_gets_cancelled_error_when_the_client_closes_too(slow_server):
    async def scenario() -> BaseException | None:
        aclient = AsyncClient(slow_server)
        task = asyncio.create_task(aclient.health())
        await asyncio.sleep(0.3)
        task.cancel()
        await aclient.close()
        return await outcome_of(task)

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


def test_a_failed_async_stream_leaves_no_unretrieved_task_exception(model_server, translator):
    async def scenario() -> list[dict]:
        unhandled: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        async with AsyncClient(model_server.address) as aclient:
            with pytest.raises(SeqServeError):  # DEADLINE_EXCEEDED, or INTERNAL when grpc core is that early
                async for _ in aclient.translate_stream(translator, [(str(i), "a b") for i in range(50)], timeout=1e-3):
                    pass
            await asyncio.sleep(0.2)  # the writer task ends
            gc.collect()  # asyncio reports an unretrieved exception when the task is collected
            await asyncio.sleep(0)
        return unhandled

    assert [context["message"] for context in asyncio.run(scenario())] == []


# --------------------------------------------------------------------------------------------------------------
# Message size limits


class LargeAnswers(pb_grpc.InferenceServicer):
    """Encode answers with ``rows`` vectors of 1024 float32 (4 KiB each), whatever was asked."""

    def Encode(self, request, context):
        rows = int(request.texts[0])
        data = np.zeros((rows, 1024), dtype="<f4").tobytes()
        return pb.EncodeResponse(embeddings=pb.Tensor(dtype="float32", shape=[rows, 1024], data=data))


@pytest.fixture(scope="module")
def large_answers():
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=[("grpc.max_send_message_length", -1)])
    pb_grpc.add_InferenceServicer_to_server(LargeAnswers(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_default_client_receives_answers_up_to_the_servers_default_message_limit(large_answers):
    rows = ServerConfig().limits.max_message_bytes // 4096 - 8  # just under the server's limit, over grpc's 4 MiB
    with Client(large_answers) as client:
        assert client.encode("any", [str(rows)]).shape == (rows, 1024)


def test_a_message_over_the_clients_limit_names_the_option_to_raise(large_answers):
    with Client(large_answers, max_message_bytes=64 * 1024) as client:
        with pytest.raises(SeqServeError, match="Received.*max_message_bytes.*--max-message-mb") as received:
            client.encode("any", ["100"])  # 400 KiB
        with pytest.raises(SeqServeError, match="Sent.*max_message_bytes.*--max-message-mb") as sent:
            client.encode("any", ["1", "x" * 100_000])
    assert received.value.code == sent.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_async_call_that_is_not_retried_leaves_no_unawaited_coroutine(large_answers):
    async def fail() -> None:
        async with AsyncClient(large_answers) as aclient:
            with pytest.raises(SeqServeError, match="UNIMPLEMENTED"):
                await aclient.translate("any", ["a"])  # LargeAnswers serves only Encode

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(fail())
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
