"""A request that protobuf cannot parse gets INVALID_ARGUMENT naming the message type, not gRPC's bare UNKNOWN.

gRPC deserializes before any servicer code runs and reports a parse failure as UNKNOWN. This interceptor swaps the
deserializer of unary methods for one that returns a marker instead of raising, and the marker is answered with
INVALID_ARGUMENT. Streaming methods keep gRPC's behaviour (the stream ends with UNKNOWN; the process is unaffected).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError


class _Unparsable:
    def __init__(self, what: str, error: Exception):
        self.message = f"request is not a valid {what}: {error}"


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
        if handler is None or handler.request_streaming or handler.response_streaming or not handler.unary_unary:
            return handler
        key = (handler_call_details.method, handler.unary_unary)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler, handler_call_details.method)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, what: str) -> grpc.RpcMethodHandler:
        parse, behaviour = handler.request_deserializer, handler.unary_unary

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data) if parse else data
            except (DecodeError, UnicodeDecodeError, ValueError) as exc:
                return _Unparsable(f"request of {what}", exc)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=safe_parse, response_serializer=handler.response_serializer
        )
