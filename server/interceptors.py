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
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming or not handler.unary_unary:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary
        what = handler_call_details.method

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
