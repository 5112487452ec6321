"""The asyncio client: the same methods as Client, awaitable, over a grpc.aio channel.

Letters: n number of texts, H hidden size.

    async with AsyncClient("localhost:50051") as client:
        vectors = await client.encode("minilm", ["a sentence"])             # (n, H) float32
        async for result in client.translate_stream("en-de", [("1", "Hello.")]):
            ...
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.clients import types as t
from seqserve.clients.channel import (
    DEFAULT,
    ConnectionConfig,
    Timeout,
    call_with_retry_async,
    check_timeout,
    closed_error,
    closed_under_call,
    grpc_timeout,
)
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import DecodingOptions, ModelInfo, StreamResult, TokenCandidate, Translation
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc

T = TypeVar("T")
_END = object()  # the end of the caller's items (None may be an item, a malformed one)


class AsyncClient:
    """An asyncio seqserve client over one grpc.aio channel; create and use it inside one event loop.

    Timeouts, retries and errors behave as in Client.
    """

    def __init__(self, target: str | None = None, *, config: ConnectionConfig | None = None, **overrides: Any):
        """``AsyncClient("host:port", timeout_s=5, token=...)``: keywords are ConnectionConfig fields."""
        if target is not None:
            overrides["target"] = target
        self.config = dataclasses.replace(config or ConnectionConfig(), **overrides)
        self._channel = self.config.aio_channel()
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._models = pb_grpc.ModelsStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = asyncio.Event()  # set by close; ends a retry's backoff at once

    # ----------------------------------------------------------------------------------------------------------
    # Inference

    async def encode(
        self,
        model: str,
        texts: Sequence[str] = (),
        *,
        pairs: Sequence[tuple[str, str]] = (),
        version: int = 0,
        pooling: str = "model",
        normalize: bool = False,
        truncate: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> np.ndarray:
        """Texts (or pairs) to one vector each: an (n, H) float32 array. pooling: "model" | "cls" | "mean"."""
        request = t.encode_request(model, texts, pairs, version, pooling, normalize, truncate)
        response = await self._unary("Encode", self._inference.Encode, request, timeout)
        return t.embeddings(response.embeddings)  # (n, H)

    async def translate(
        self,
        model: str,
        texts: Sequence[str],
        options: DecodingOptions = DecodingOptions(),
        *,
        version: int = 0,
        truncate: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[Translation]:
        """Texts to translations, one per text in order, each with its hypotheses best first."""
        request = t.translate_request(model, texts, options, version, truncate)
        response = await self._unary("Translate", self._inference.Translate, request, timeout)
        ref = t.model_ref(response.model)
        return [t.translation(item, ref) for item in response.translations]

    async def translate_stream(
        self,
        model: str,
        items: Iterable[tuple[str, str]] | AsyncIterable[tuple[str, str]],
        options: DecodingOptions = DecodingOptions(),
        *,
        version: int = 0,
        truncate: bool = False,
        window: int = 16,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """(id, text) items (an iterable or async iterable) through TranslateStream, yielded as they finish.

        At most ``window`` items are in flight; failed items and streams behave as in Client.translate_stream.
        """
        if self._closed.is_set():
            raise closed_error("AsyncClient")
        timeout = grpc_timeout(check_timeout(timeout))
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        t.refuse_single_text(items, "items", "(id, text) pairs of str")
        build = t.stream_request_factory(model, options, version, truncate)
        slots = asyncio.Semaphore(window)
        in_flight = t.InFlightIds()
        call = self._inference.TranslateStream(timeout=timeout, metadata=self.config.call_metadata())
        failure: list[Exception] = []  # what the caller's iterable (or a malformed item) raised

        async def write_all() -> None:
            pending = _aiter(items)
            while True:
                await slots.acquire()  # the flow control: wait for an answer to free a slot, then read the next item
                try:
                    item = await anext(pending, _END)
                    request = None
                    if item is not _END:
                        item_id, text = t.stream_item(item)
                        in_flight.sent(item_id)
                        request = build(item_id, text)
                except Exception as error:  # noqa: BLE001 - without done_writing the reader would wait forever
                    failure.append(error)
                    call.cancel()
                    return
                if request is None:
                    break
                await call.write(request)
            await call.done_writing()

        writer = asyncio.create_task(write_all())
        # A failed call fails the writer's write too; the caller gets that failure from the reader, so the writer's
        # copy is retrieved here, else asyncio logs "Task exception was never retrieved" for every failed stream.
        writer.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    if failure:  # the writer cancelled the call: the caller gets its own exception below
                        break
                    raise
                if response is grpc.aio.EOF or failure:
                    break
                in_flight.answered(response.id)  # before the slot frees: the next item may reuse the id
                slots.release()
                yield t.stream_result(response)
            await writer  # surfaces a failed write
        except grpc.RpcError as error:
            if self._closed.is_set():
                raise closed_error("AsyncClient") from None
            if not failure:
                raise SeqServeError.from_rpc_error(error) from None
        except (asyncio.CancelledError, grpc.aio.UsageError):
            if closed_under_call(self._closed):
                raise closed_error("AsyncClient") from None
            raise
        finally:
            if not writer.done():
                writer.cancel()
            call.cancel()
        if failure:
            raise failure[0]

    async def score_next_sentence(
        self,
        model: str,
        pairs: Sequence[tuple[str, str]],
        *,
        version: int = 0,
        truncate: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[float]:
        """Pairs (A, B) to the probability that B follows A, in order."""
        request = t.nsp_request(model, pairs, version, truncate)
        response = await self._unary("ScoreNextSentence", self._inference.ScoreNextSentence, request, timeout)
        return list(response.is_next_probability)

    async def fill_mask(
        self,
        model: str,
        texts: Sequence[str],
        *,
        top_k: int = 5,
        version: int = 0,
        truncate: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[list[list[TokenCandidate]]]:
        """Per text, per [MASK] (left to right), the top_k candidates most likely first."""
        request = t.fill_mask_request(model, texts, top_k, version, truncate)
        response = await self._unary("FillMask", self._inference.FillMask, request, timeout)
        return [t.fill_mask_result(result) for result in response.results]

    # ----------------------------------------------------------------------------------------------------------
    # Models (admin) and health

    async def list_models(self, name: str = "", *, timeout: Timeout = DEFAULT) -> list[ModelInfo]:
        """Every model version the server knows (or only those of ``name``), with state and manifest summary."""
        response = await self._unary("ListModels", self._models.ListModels, pb.ListModelsRequest(name=name), timeout)
        return [t.model_info(status) for status in response.models]

    async def load_model(self, name: str, version: int = 0, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """Load a model version (0: the highest in the repository); its status after the load."""
        request = pb.LoadModelRequest(model=t.model_spec(name, version))
        return t.model_info(await self._unary("LoadModel", self._models.LoadModel, request, timeout))

    async def unload_model(self, name: str, version: int = 0, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """Unload a model version (0: the highest loaded); its status after the unload."""
        request = pb.UnloadModelRequest(model=t.model_spec(name, version))
        return t.model_info(await self._unary("UnloadModel", self._models.UnloadModel, request, timeout))

    async def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """The grpc.health.v1 status of the server ("") or of one service: "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary("Health.Check", self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ----------------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed.set()
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(self, method: str, rpc: Any, request: Any, timeout: Timeout) -> Any:
        if self._closed.is_set():
            raise closed_error("AsyncClient")
        metadata = self.config.call_metadata()

        async def invoke(remaining: float | None) -> Any:
            return await rpc(request, timeout=remaining, metadata=metadata)

        timeout_s = self.config.resolve_timeout(timeout)
        return await call_with_retry_async(method, invoke, timeout_s, self.config.retry, self._closed)


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
