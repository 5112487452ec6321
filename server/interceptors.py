"""A request that protobuf cannot parse gets INVALID_ARGUMENT naming the message type, not gRPC's bare UNKNOWN.

gRPC deserializes before any servicer code runs and reports a parse failure as UNKNOWN (for an item of a request
stream it never reports it: the stream hangs). This interceptor swaps the deserializer of unary and stream-stream
methods for one that returns a marker instead of raising: a unary request that is the marker is answered with
INVALID_ARGUMENT, and a stream that reaches one ends with INVALID_ARGUMENT (the responses to the items before it
were sent).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

if TYPE_CHECKING:
    from seqserve.server.config import ServerConfig
    from seqserve.server.metrics import Metrics


class _Unparsable:
    def __init__(self, what: str, error: Exception):
        self.message = f"request is not a valid {what}: {error}"


class _UnparsableItem(Exception):
    """Raised into a streaming servicer from its request iterator at an item protobuf could not parse."""


class ParseErrorsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # The wrapped handler of each unary method, built once (the servicers' handlers never change while serving).
        self._wrapped: dict[tuple[str, Any], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        behaviour = handler.unary_unary or handler.stream_stream
        if behaviour is None or (handler.stream_stream and not inspect.isasyncgenfunction(behaviour)):
            return handler  # unary-stream, stream-unary, or a stream written with context.write: gRPC's own behaviour
        key = (handler_call_details.method, behaviour)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrap = self._wrap if handler.unary_unary else self._wrap_stream
            wrapped = self._wrapped[key] = wrap(handler, handler_call_details.method)
        return wrapped

    @staticmethod
    def _safe(handler: grpc.RpcMethodHandler, what: str) -> Callable[[bytes], Any]:
        """The handler's deserializer, returning an _Unparsable (`what` could not be parsed) instead of raising."""
        parse = handler.request_deserializer

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data) if parse else data
            except (DecodeError, UnicodeDecodeError, ValueError) as exc:
                return _Unparsable(what, exc)

        return safe_parse

    @classmethod
    def _wrap_stream(cls, handler: grpc.RpcMethodHandler, what: str) -> grpc.RpcMethodHandler:
        behaviour = handler.stream_stream

        async def checked(requests: Any) -> Any:
            async for request in requests:
                if isinstance(request, _Unparsable):
                    raise _UnparsableItem(request.message)
                yield request

        async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in behaviour(checked(requests), context):
                    yield response
            except _UnparsableItem as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return grpc.stream_stream_rpc_method_handler(
            guarded, request_deserializer=cls._safe(handler, f"stream item of {what}"),
            response_serializer=handler.response_serializer,
        )  # fmt: skip

    @classmethod
    def _wrap(cls, handler: grpc.RpcMethodHandler, what: str) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=cls._safe(handler, f"request of {what}"),
            response_serializer=handler.response_serializer,
        )  # fmt: skip


def server_interceptors(config: "ServerConfig", metrics: "Metrics") -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every seqserve gRPC server runs, outermost first."""
    return [ParseErrorsInterceptor()]
