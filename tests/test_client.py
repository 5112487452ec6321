"""The client library against real seqserve servers on local ports: every method sync and async, retries, errors.

The models come from the `tiny_repository` fixture (tests/conftest.py); tests find them by capability.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from seqserve.clients import AsyncClient, Client, DecodingOptions, RetryPolicy, SeqServeError, TLSConfig

FAST_RETRY = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=0.2)


# --------------------------------------------------------------------------------------------------------------
# A real server in a background event loop (the client under test blocks the test's own thread)


class BackgroundServer:
    """seqserve's create_server running in its own thread and event loop, stopped with a drain."""

    def __init__(self, repository: Path, port: int = 0):
        from seqserve.server.app import create_server
        from seqserve.server.config import ServerConfig
        from seqserve.server.repository import ModelRepository

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        config = ServerConfig(host="127.0.0.1", port=port, metrics_port=None, instances=1, threads=1, grace_period_s=1)

        async def start():
            server, bound = create_server(config, ModelRepository(repository))
            await server.start()
            return server, bound

        self.server, self.port = self._run(start())
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self._run(self.server.drain(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts the attempts a Client makes per method (a real grpc interceptor on the real channel)."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = client_call_details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return continuation(client_call_details, request)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    server = BackgroundServer(tmp_path_factory.mktemp("empty_repository"))
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------------------------
# Retries, deadlines, errors (no models needed)


def test_client_started_before_server_retries_until_it_answers(tmp_path):
    port = free_port()
    counter = CountingInterceptor()
    servers: list[BackgroundServer] = []
    starter = threading.Timer(0.6, lambda: servers.append(BackgroundServer(tmp_path, port)))
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout_s=30, interceptors=(counter,)) as client:
            assert client.list_models() == []
        assert counter.calls["ListModels"] > 1
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_call_survives_server_restart_on_same_port(tmp_path):
    first = BackgroundServer(tmp_path)
    port = first.port
    counter = CountingInterceptor()
    with Client(first.target, retry=FAST_RETRY, timeout_s=30, interceptors=(counter,)) as client:
        assert client.health() == "SERVING"
        first.stop()
        servers: list[BackgroundServer] = []
        restarter = threading.Timer(0.5, lambda: servers.append(BackgroundServer(tmp_path, port)))
        restarter.start()
        try:
            assert client.health() == "SERVING"
            assert counter.calls["Check"] > 2  # one before the stop, at least one refused, the one that got through
        finally:
            restarter.join()
            for server in servers:
                server.stop()


def test_unavailable_gives_up_after_configured_attempts():
    counter = CountingInterceptor()
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    with Client(f"127.0.0.1:{free_port()}", retry=policy, timeout_s=10, interceptors=(counter,)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.list_models()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert counter.calls["ListModels"] == 3


def test_unknown_model_raises_not_found_once(empty_server):
    counter = CountingInterceptor()
    with Client(empty_server.target, retry=FAST_RETRY, interceptors=(counter,)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.translate("no-such-model", ["hello"])
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in failure.value.message
    assert counter.calls["Translate"] == 1


def test_timeout_bounds_all_attempts_together():
    policy = RetryPolicy(attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05)
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(SeqServeError) as failure:
            client.list_models(timeout=0.5)
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0


def test_async_client_retries_until_server_answers(tmp_path):
    port = free_port()
    servers: list[BackgroundServer] = []
    starter = threading.Timer(0.5, lambda: servers.append(BackgroundServer(tmp_path, port)))

    async def call() -> str:
        async with AsyncClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout_s=30) as client:
            starter.start()
            return await client.health()

    try:
        assert asyncio.run(call()) == "SERVING"
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_error_carries_status_code_and_server_message(empty_server):
    with Client(empty_server.target) as client:
        with pytest.raises(SeqServeError) as failure:
            client.encode("missing", ["text"])
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert str(failure.value).startswith("NOT_FOUND: ")


def test_client_modules_import_no_torch():
    code = (
        "import sys\n"
        "import seqserve.clients, seqserve.clients.cli, seqserve.clients.aio, seqserve.clients.translate_file\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'seqserve.models',"
        " 'seqserve.export', 'seqserve.server')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
