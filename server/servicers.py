"""The gRPC servicers: thin translation between protobuf messages and the model manager's typed methods.

Every unary method runs under `rpc_method`, the one place where exceptions become status codes (errors.status_of),
metrics are counted and draining is refused. TranslateStream reports per-item errors in its responses instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.errors import (
    AnswerOverLimit,
    Draining,
    InvalidRequest,
    OneTextError,
    abort_call,
    outcome_seen,
    status_of,
)
from seqserve.server.manager import ModelManager, VersionStatus
from seqserve.server.metrics import Metrics
from seqserve.server.repository import shown_name
from seqserve.server.served import ServedModel, TranslationResult
from seqserve.server.translation import DecodeOptions

log = logging.getLogger(__name__)

_POOLING = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_CLS: "cls", pb.POOLING_MEAN: "mean"}
_TRUNCATE = {pb.TRUNCATION_UNSPECIFIED: False, pb.TRUNCATION_REJECT: False, pb.TRUNCATION_TRUNCATE: True}
_STATES = {
    "AVAILABLE": pb.MODEL_STATE_AVAILABLE, "LOADING": pb.MODEL_STATE_LOADING, "READY": pb.MODEL_STATE_READY,
    "UNLOADING": pb.MODEL_STATE_UNLOADING, "FAILED": pb.MODEL_STATE_FAILED,
}  # fmt: skip


class ServingState:
    """Shared between servicers: the manager, the metrics and whether the server is draining."""

    def __init__(self, manager: ModelManager, metrics: Metrics):
        self.manager = manager
        self.metrics = metrics
        self.not_ready = False  # from SIGTERM on: health and readiness say NOT_SERVING (work is still served)
        self._draining = asyncio.Event()  # after the drain delay: no new work

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:  # on the server's event loop
        if value:
            self._draining.set()
        else:
            self._draining.clear()

    async def drained(self) -> None:
        """Return once the server takes no new work (open streams stop reading then)."""
        await self._draining.wait()


def _asked(request: Any) -> str:
    """The model a request names: seqserve.v1's `model.name`; the Open Inference Protocol's `model_name` (ModelInfer)
    or `name` (ModelReady, ModelMetadata). ListModels' `name` is a filter, not a model asked for."""
    fields = request.DESCRIPTOR.fields_by_name
    if "model" in fields:
        return request.model.name
    if request.DESCRIPTOR.file.package == "inference":
        for field in ("model_name", "name"):
            if field in fields:
                return getattr(request, field)
    return ""


def answers_while_draining(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Mark a method rpc_method lets through while the server drains (liveness and readiness probes)."""
    method.answers_while_draining = True  # type: ignore[attr-defined]
    return method


def rpc_method(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """A unary method's one place for status codes (errors.status_of), metrics and refusing work while draining."""
    name = method.__name__
    while_draining = getattr(method, "answers_while_draining", False)

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        state: ServingState = self.state
        asked = _asked(request)
        model = shown_name(asked) if asked else ""  # for the logs: a client-given name, cut and escaped
        # Label only with names being served: client-chosen strings must not create unbounded metric series.
        state.metrics.requests.labels(name, asked if state.manager.serves(asked) else "other").inc()
        started = time.monotonic()
        deadline = deadline_of(context)
        try:
            if state.draining and not while_draining:
                raise Draining()
            response = await method(self, request, context)
            limit, size = state.manager.config.limits.max_message_bytes, response.ByteSize()
            if size > limit:  # gRPC would fail to send it, with a traceback in the log and no metric
                raise AnswerOverLimit(size, limit)
            return response
        except asyncio.CancelledError:
            state.metrics.errors.labels(name, _cancelled_code(deadline).name).inc()
            raise
        except Exception as exc:
            code, message = status_of(exc)
            state.metrics.errors.labels(name, code.name).inc()
            log.info("%s for %s: %s %s", name, model or "-", code.name, message,
                     extra={"rpc": name, "model": model, "code": code.name})  # fmt: skip
            await abort_call(context, code, message)
        finally:
            seconds = time.monotonic() - started
            state.metrics.latency.labels(name).observe(seconds)
            log.debug("%s for %s in %.1f ms", name, model or "-", seconds * 1000,
                      extra={"rpc": name, "model": model, "ms": round(seconds * 1000, 2)})  # fmt: skip

    return wrapper


def _cancelled_code(deadline: float | None) -> grpc.StatusCode:
    """What a cancelled handler was: gRPC cancels it both when the client cancels and when the deadline passes (a
    little before the deadline by this process's clock, at times: hence the slack)."""
    expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


DEADLINE_SLACK_S = 0.05


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _truncate(value: int) -> bool:
    if value not in _TRUNCATE:
        raise InvalidRequest(f"unknown truncation {value}; known: {sorted(_TRUNCATE)}")
    return _TRUNCATE[value]


def _options(o: pb.DecodingOptions) -> DecodeOptions:
    return DecodeOptions(
        beam_size=max(o.beam_size, 1), length_penalty=o.length_penalty, n_best=max(o.n_best, 1),
        max_output_tokens=o.max_output_tokens, max_output_ratio=o.max_output_ratio,
        return_token_scores=o.return_token_scores,
    )  # fmt: skip


def _translation(result: TranslationResult) -> pb.Translation:
    return pb.Translation(
        source_tokens=result.source_tokens,
        hypotheses=[
            pb.Hypothesis(text=h.text, score=h.score, tokens=h.tokens, token_scores=h.token_scores)
            for h in result.hypotheses
        ],
    )


def _ref(served: ServedModel) -> pb.ModelRef:
    return pb.ModelRef(name=served.name, version=served.version)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    @rpc_method
    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        served = self.state.manager.get(request.model.name, request.model.version)
        if request.pooling not in _POOLING:
            raise InvalidRequest(f"unknown pooling {request.pooling}; known: {sorted(_POOLING)}")
        vectors, counts = await served.encode(
            list(request.texts), [(p.first, p.second) for p in request.pairs], _POOLING[request.pooling],
            request.normalize, _truncate(request.truncation), deadline_of(context),
        )  # fmt: skip
        tensor = pb.Tensor(dtype="float32", shape=list(vectors.shape), data=vectors.astype("<f4").tobytes())
        return pb.EncodeResponse(model=_ref(served), embeddings=tensor, token_counts=counts)

    @rpc_method
    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        served = self.state.manager.get(request.model.name, request.model.version)
        results = await served.translate(
            list(request.texts), _options(request.options), _truncate(request.truncation), deadline_of(context)
        )
        return pb.TranslateResponse(model=_ref(served), translations=[_translation(r) for r in results])

    @rpc_method
    async def ScoreNextSentence(self, request: pb.ScoreNextSentenceRequest, context) -> pb.ScoreNextSentenceResponse:
        served = self.state.manager.get(request.model.name, request.model.version)
        probs = await served.next_sentence(
            [(p.first, p.second) for p in request.pairs], _truncate(request.truncation), deadline_of(context)
        )
        return pb.ScoreNextSentenceResponse(model=_ref(served), is_next_probability=probs)

    @rpc_method
    async def FillMask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        served = self.state.manager.get(request.model.name, request.model.version)
        results = await served.fill_mask(
            list(request.texts), request.top_k, _truncate(request.truncation), deadline_of(context)
        )
        return pb.FillMaskResponse(
            model=_ref(served),
            results=[
                pb.FillMaskResult(masks=[
                    pb.MaskPrediction(candidates=[
                        pb.TokenCandidate(token=tok, token_id=tid, probability=p) for tok, tid, p in mask
                    ]) for mask in text
                ]) for text in results
            ],
        )  # fmt: skip

    async def TranslateStream(
        self, request_iterator: AsyncIterator[pb.TranslateStreamRequest], context
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        """Bounded read-ahead: at most `stream_read_ahead` items in flight; the reader waits for a free slot, so
        gRPC flow control pushes back on a client that sends faster than the server translates."""
        state = self.state
        if state.draining:
            code, message = status_of(Draining())
            state.metrics.requests.labels("TranslateStream", "other").inc()  # counted as an item refused
            state.metrics.errors.labels("TranslateStream", code.name).inc()
            await abort_call(context, code, message)
        slots = asyncio.Semaphore(state.manager.config.limits.stream_read_ahead)
        deadline = deadline_of(context)
        done: asyncio.Queue[pb.TranslateStreamResponse | None] = asyncio.Queue()
        in_flight: set[asyncio.Task] = set()

        async def one(item: pb.TranslateStreamRequest) -> None:
            response = pb.TranslateStreamResponse(id=item.id)
            started = time.monotonic()
            asked = item.model.name
            state.metrics.requests.labels("TranslateStream", asked if state.manager.serves(asked) else "other").inc()
            try:
                served = state.manager.get(item.model.name, item.model.version)
                response.model.CopyFrom(_ref(served))
                [result] = await served.translate(
                    [item.text], _options(item.options), _truncate(item.truncation), deadline
                )
                response.translation.CopyFrom(_translation(result))
            except asyncio.CancelledError:  # the stream ended under it (cancelled, or its deadline)
                state.metrics.errors.labels("TranslateStream", _cancelled_code(deadline).name).inc()
                state.metrics.latency.labels("TranslateStream").observe(time.monotonic() - started)
                raise
            except Exception as exc:
                code, message = status_of(exc)
                if isinstance(exc, OneTextError):  # "text 0" says nothing in a stream of single texts
                    message = exc.about(f"item {shown_name(item.id)}")
                state.metrics.errors.labels("TranslateStream", code.name).inc()
                response.error_code, response.error_message = code.value[0], message
            state.metrics.latency.labels("TranslateStream").observe(time.monotonic() - started)  # an item's
            await done.put(response)

        stopped_reading: list[bool] = []  # set when the server started draining: the stream ends UNAVAILABLE

        async def read() -> None:
            items = aiter(request_iterator)
            draining = asyncio.ensure_future(state.drained())
            following: asyncio.Future | None = None
            try:
                while True:
                    # The next item, unless the server starts draining first: then the items read so far are
                    # answered and the stream ends, so the client sends the rest elsewhere instead of being cut
                    # off by gRPC with its items in flight at the end of the grace period.
                    following = asyncio.ensure_future(anext(items))
                    await asyncio.wait((following, draining), return_when=asyncio.FIRST_COMPLETED)
                    if not following.done():
                        stopped_reading.append(True)
                        break
                    try:
                        item = following.result()
                    except StopAsyncIteration:
                        break
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(one(item))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                while in_flight:
                    await asyncio.gather(*list(in_flight), return_exceptions=True)
            finally:  # also when the request stream breaks: the responses end, and `await reader` raises its error
                draining.cancel()
                if following is not None:  # a read still waiting (drain, cancellation, deadline) is dropped, quietly
                    following.cancel()
                    following.add_done_callback(outcome_seen)
                await done.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (response := await done.get()) is not None:
                yield response
                # The slot frees only once the response is handed to gRPC: a client that does not read its
                # responses stalls its own stream instead of growing the server's memory.
                slots.release()
            await reader  # surfaces a broken request stream
            if stopped_reading:
                code, message = status_of(Draining())
                await abort_call(context, code, message)
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()


def _status(s: VersionStatus) -> pb.ModelStatus:
    m = s.manifest
    metrics = {}
    if m is not None:
        for key, value in {**m.metrics, **{f"parity_{k}": v for k, v in m.parity.items()}}.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = float(value)
    return pb.ModelStatus(
        name=s.name, version=s.version, state=_STATES[s.state], reason=s.reason,
        task=m.task if m else "", architecture=m.architecture if m else "", capabilities=s.capabilities,
        metrics=metrics, quantization=(m.quantization or "") if m else "", max_input_tokens=s.max_input_tokens,
    )  # fmt: skip


class ModelsServicer(pb_grpc.ModelsServicer):
    def __init__(self, state: ServingState):
        self.state = state

    @rpc_method
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_status(s) for s in self.state.manager.statuses(request.name)])

    @rpc_method
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        return _status(await self.state.manager.load(request.model.name, request.model.version))

    @rpc_method
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.ModelStatus:
        return _status(await self.state.manager.unload(request.model.name, request.model.version))
