"""The synchronous client: one typed method per RPC of seqserve.v1.Inference and seqserve.v1.Models.

Letters: n number of texts, H hidden size.

    with Client("localhost:50051", timeout_s=10) as client:
        vectors = client.encode("minilm", ["a sentence", "another"])        # (n, H) float32
        best = client.translate("en-de", ["Hello."])[0].text
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.clients import types as t
from seqserve.clients.channel import (
    DEFAULT,
    ConnectionConfig,
    Timeout,
    call_with_retry,
    check_timeout,
    closed_error,
    grpc_timeout,
)
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import DecodingOptions, ModelInfo, StreamResult, TokenCandidate, Translation
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc


_END = object()  # the end of the caller's items (None may be an item, a malformed one)


class Client:
    """A blocking seqserve client over one channel; safe to share between threads. Use as a context manager.

    Every method takes ``timeout`` (seconds over all retry attempts; None: no deadline; default: the config's)
    and raises SeqServeError(code, message) when the call fails.
    """

    def __init__(self, target: str | None = None, *, config: ConnectionConfig | None = None, **overrides: Any):
        """``Client("host:port", timeout_s=5, token=...)``: keywords are ConnectionConfig fields."""
        if target is not None:
            overrides["target"] = target
        self.config = dataclasses.replace(config or ConnectionConfig(), **overrides)
        self._channel = self.config.sync_channel()
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._models = pb_grpc.ModelsStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = threading.Event()  # set by close; ends a retry's backoff at once

    # ----------------------------------------------------------------------------------------------------------
    # Inference

    def encode(
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
        return t.embeddings(self._unary("Encode", self._inference.Encode, request, timeout).embeddings)  # (n, H)

    def translate(
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
        response = self._unary("Translate", self._inference.Translate, request, timeout)
        ref = t.model_ref(response.model)
        return [t.translation(item, ref) for item in response.translations]

    def translate_stream(
        self,
        model: str,
        items: Iterable[tuple[str, str]],
        options: DecodingOptions = DecodingOptions(),
        *,
        version: int = 0,
        truncate: bool = False,
        window: int = 16,
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """(id, text) items through TranslateStream, yielded as they finish (not in order).

        At most ``window`` items are in flight: the next request goes out only when an answer frees a slot, so
        neither side buffers the whole input. A failed item comes back as a StreamResult with ``error`` set; a
        failed stream raises SeqServeError and is not retried (the caller knows which ids are done and resumes).
        ``timeout`` bounds the whole stream (default None: a batch job has no deadline).
        """
        if self._closed.is_set():
            raise closed_error("Client")
        timeout = grpc_timeout(check_timeout(timeout))
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        t.refuse_single_text(items, "items", "(id, text) pairs of str")
        build = t.stream_request_factory(model, options, version, truncate)
        slots = threading.Semaphore(window)
        in_flight = t.InFlightIds()
        finished = threading.Event()
        calls: list[grpc.Future] = []  # the call, for the request thread to cancel
        failure: list[Exception] = []  # what the caller's iterable (or a malformed item) raised

        def requests() -> Iterator[pb.TranslateStreamRequest]:
            # grpc consumes this generator in its own thread; blocking here is the flow control. The slot is taken
            # before the next item is read, so the caller's iterable is read no further ahead than the window.
            pending = iter(items)
            while True:
                while not slots.acquire(timeout=0.1):
                    if finished.is_set():
                        return
                try:
                    item = next(pending, _END)
                    if item is _END or finished.is_set():
                        return
                    item_id, text = t.stream_item(item)
                    in_flight.sent(item_id)
                    request = build(item_id, text)
                except Exception as error:  # noqa: BLE001 - grpc would log it and fail the call as UNKNOWN
                    failure.append(error)
                    if calls:
                        calls[0].cancel()
                    return
                yield request

        call = self._inference.TranslateStream(requests(), timeout=timeout, metadata=self.config.call_metadata())
        calls.append(call)
        try:
            for response in call:
                if failure:
                    break
                in_flight.answered(response.id)  # before the slot frees: the next item may reuse the id
                slots.release()
                yield t.stream_result(response)
        except grpc.RpcError as error:
            if self._closed.is_set():
                raise closed_error("Client") from None
            if not failure:  # a call we cancelled because the caller's iterable failed raises that instead
                raise SeqServeError.from_rpc_error(error) from None
        finally:
            finished.set()
            call.cancel()  # a no-op after a clean end; stops the server's work when the caller stopped early
        if failure:
            raise failure[0]

    def score_next_sentence(
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
        response = self._unary("ScoreNextSentence", self._inference.ScoreNextSentence, request, timeout)
        return list(response.is_next_probability)

    def fill_mask(
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
        response = self._unary("FillMask", self._inference.FillMask, request, timeout)
        return [t.fill_mask_result(result) for result in response.results]

    # ----------------------------------------------------------------------------------------------------------
    # Models (admin) and health

    def list_models(self, name: str = "", *, timeout: Timeout = DEFAULT) -> list[ModelInfo]:
        """Every model version the server knows (or only those of ``name``), with state and manifest summary."""
        response = self._unary("ListModels", self._models.ListModels, pb.ListModelsRequest(name=name), timeout)
        return [t.model_info(status) for status in response.models]

    def load_model(self, name: str, version: int = 0, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """Load a model version (0: the highest in the repository); its status after the load."""
        request = pb.LoadModelRequest(model=t.model_spec(name, version))
        return t.model_info(self._unary("LoadModel", self._models.LoadModel, request, timeout))

    def unload_model(self, name: str, version: int = 0, *, timeout: Timeout = DEFAULT) -> ModelInfo:
        """Unload a model version (0: the highest loaded); its status after the unload."""
        request = pb.UnloadModelRequest(model=t.model_spec(name, version))
        return t.model_info(self._unary("UnloadModel", self._models.UnloadModel, request, timeout))

    def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """The grpc.health.v1 status of the server ("") or of one service: "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary("Health.Check", self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ----------------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(self, method: str, rpc: grpc.UnaryUnaryMultiCallable, request: Any, timeout: Timeout) -> Any:
        if self._closed.is_set():
            raise closed_error("Client")
        metadata = self.config.call_metadata()
        return call_with_retry(
            method,
            lambda remaining: rpc(request, timeout=remaining, metadata=metadata),
            self.config.resolve_timeout(timeout),
            self.config.retry,
            self._closed,
        )
