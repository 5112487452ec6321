"""grpc.health.v1 as grpc_health's asyncio servicer serves it, with two changes a model server needs.

- `Check` of an unknown service is NOT_FOUND with a message naming the services there are (grpc_health's is empty).
- `Watch` streams end when the server stops (`end_watches`), after sending the last status: grpc_health's never end,
  so one load balancer's open Watch held every shutdown for the whole grace period.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from seqserve.server.errors import abort_call
from seqserve.server.repository import shown_name

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()  # notified after every status change and at end_watches
        self._ending = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service not in self._server_status:
            models = sorted(s for s in self._server_status if s)
            # shown_name quotes (and escapes) a name unless it could be a model's: quote those here, so all once.
            shown = shown_name(request.service)
            shown = repr(shown) if shown == request.service else shown
            await abort_call(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no health service {shown}: ask for '' (the server) or a model's name "
                f"({', '.join(models) or 'none in the repository'})",
            )
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """The service's status now and at every change, until the server stops (the stream then ends, OK)."""
        sent = None
        while True:
            status = self._server_status.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))  # outside the lock: a slow
                sent = status  # reader must not hold up status changes (and with them model loads)
            async with self._changed:
                if self._server_status.get(request.service, SERVICE_UNKNOWN) != sent:
                    continue  # changed while writing: send it (the last status goes out before the stream ends)
                if self._ending:
                    return
                await self._changed.wait()

    async def _set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super()._set(service, status)
        async with self._changed:
            self._changed.notify_all()

    async def end_watches(self) -> None:
        """End every Watch stream once it has sent the current status (called when the server stops taking work)."""
        async with self._changed:
            self._ending = True
            self._changed.notify_all()
