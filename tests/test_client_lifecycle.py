"""The client library's edges against real servers: deadlines grpc cannot represent, closing with calls in flight,
message limits. Models come from the `tiny_repository` fixture (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest

from seqserve.clients import AsyncClient, Client, ConnectionConfig, SeqServeError
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
