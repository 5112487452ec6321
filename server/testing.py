"""A real server on its own event loop in a background thread, for tests and notebooks that use blocking clients.

    with ServerThread(ServerConfig(port=0, metrics_port=0), ModelRepository(root)) as running:
        channel = grpc.insecure_channel(running.address)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

from seqserve.server.app import SeqServer, create_server
from seqserve.server.config import ServerConfig
from seqserve.server.repository import ModelRepository


class ServerThread:
    def __init__(self, config: ServerConfig, repository: ModelRepository, start_timeout: float = 120.0):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="seqserve-test-server", daemon=True)
        self._thread.start()
        self.server: SeqServer
        self.server, self.port = self.call(self._create(config, repository), start_timeout)
        self.call(self.server.start(), start_timeout)
        self._stopped = False

    @staticmethod
    async def _create(config: ServerConfig, repository: ModelRepository) -> tuple[SeqServer, int]:
        return create_server(config, repository)  # built inside the loop that runs it

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.server.metrics_port}/metrics"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.server.drain(grace), grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
