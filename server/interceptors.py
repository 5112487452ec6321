"""A request that protobuf cannot parse gets INVALID_ARGUMENT naming the message type, not gRPC's bare UNKNOWN.

gRPC deserializes before any servicer code runs and reports a parse failure as UNKNOWN (for an item of a request
stream it never reports it: the stream hangs). This interceptor swaps the deserializer of unary and stream-stream
methods for one that returns a marker instead of raising: a unary request that is the marker is answered with
INVALID_ARGUMENT, and a stream that reaches one ends with INVALID_ARGUMENT (the responses to the items before it
were sent). Such a refusal is counted in the request and error metrics as rpc_method counts its own (model label
"other" where the request would name a model, as for a name not being served).

AdminAccessInterceptor guards model management (Models.LoadModel and UnloadModel) and nothing else: with an admin
token configured a call must send "authorization: Bearer <token>" (UNAUTHENTICATED without one, PERMISSION_DENIED
with another), and with management turned off every such call is PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.server.config import ADMIN_TOKEN_ENV
from seqserve.server.errors import abort_call

if TYPE_CHECKING:
    from seqserve.server.config import ServerConfig
    from seqserve.server.metrics import Metrics

log = logging.getLogger(__name__)

_MODELS_SERVICE = pb.DESCRIPTOR.services_by_name["Models"].full_name
MANAGEMENT_METHODS = frozenset(f"/{_MODELS_SERVICE}/{name}" for name in ("LoadModel", "UnloadModel"))


def _rpc_name(method: str) -> str:
    """The metric label of a method path: "/seqserve.v1.Inference/Translate" -> "Translate" (as rpc_method names it)."""
    return method.rsplit("/", 1)[-1]


def _count_refusal(metrics: "Metrics | None", name: str, model: str | None, code: grpc.StatusCode) -> None:
    """Count a call refused before its servicer ran, as rpc_method counts the calls it refuses (model None: the
    request was counted already). Its latency is taken as 0, so the latency histogram still counts every request."""
    if metrics is None:
        return
    if model is not None:
        metrics.requests.labels(name, model).inc()
        metrics.latency.labels(name).observe(0.0)
    metrics.errors.labels(name, code.name).inc()


def _model_label(parse: Any) -> str:
    """The model label of a request that could not be parsed: "other" (an unknown name) where its message type names a
    model (seqserve.v1's `model`, the Open Inference Protocol's `model_name`/`name`), "" where it names none."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    if descriptor is None:
        return ""
    fields = descriptor.fields_by_name
    if "model" in fields or (descriptor.file.package == "inference" and ("model_name" in fields or "name" in fields)):
        return "other"
    return ""


class _Unparsable:
    def __init__(self, what: str, error: Exception):
        self.message = f"request is not a valid {what}: {error}"


class _UnparsableItem(Exception):
    """Raised into a streaming servicer from its request iterator at an item protobuf could not parse."""


class ParseErrorsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: "Metrics | None" = None) -> None:
        self._metrics = metrics
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
            wrapped = self._wrapped[key] = wrap(handler, handler_call_details.method, self._metrics)
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
    def _wrap_stream(
        cls, handler: grpc.RpcMethodHandler, what: str, metrics: "Metrics | None"
    ) -> grpc.RpcMethodHandler:
        behaviour = handler.stream_stream
        name = _rpc_name(what)

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
                # TranslateStream counts each item as a request: the unparsable one, as an unknown model's.
                _count_refusal(metrics, name, "other", grpc.StatusCode.INVALID_ARGUMENT)
                await abort_call(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return grpc.stream_stream_rpc_method_handler(
            guarded, request_deserializer=cls._safe(handler, f"stream item of {what}"),
            response_serializer=handler.response_serializer,
        )  # fmt: skip

    @classmethod
    def _wrap(cls, handler: grpc.RpcMethodHandler, what: str, metrics: "Metrics | None") -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary
        name, model = _rpc_name(what), _model_label(handler.request_deserializer)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                _count_refusal(metrics, name, model, grpc.StatusCode.INVALID_ARGUMENT)
                await abort_call(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=cls._safe(handler, f"request of {what}"),
            response_serializer=handler.response_serializer,
        )  # fmt: skip


class AdminAccessInterceptor(grpc.aio.ServerInterceptor):
    """LoadModel and UnloadModel only with the admin token (or never, with management turned off); every other
    method passes untouched. A refused call is answered before its request is parsed, and counted."""

    def __init__(self, token: str | None, enabled: bool = True, metrics: "Metrics | None" = None):
        # Digests of equal length, compared in constant time: neither the token's contents nor its length leak.
        self._digest = None if token is None else hashlib.sha256(token.encode("utf-8")).digest()
        self._enabled = enabled
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in MANAGEMENT_METHODS:
            refusal = self.refusal(_rpc_name(method), handler_call_details.invocation_metadata)
            if refusal is not None:
                return self._refuse(_rpc_name(method), *refusal)
        return await continuation(handler_call_details)

    def refusal(self, name: str, metadata: Sequence[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a management call with this metadata is refused (status code, message), or None when it may run."""
        if not self._enabled:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{name}: model management is turned off on this server (--no-admin)"
            )
        if self._digest is None:
            return None
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{name} needs the admin token: send 'authorization: Bearer <token>' "
                "(seqserve-client --token or $SEQSERVE_TOKEN; Client(token=...))"
            )
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not credential:
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{name}: malformed authorization metadata; expected one 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(hashlib.sha256(credential.encode("utf-8")).digest(), self._digest):
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{name}: the bearer token is not this server's admin token (--admin-token-file or ${ADMIN_TOKEN_ENV})"
            )
        return None

    def _refuse(self, name: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        metrics = self._metrics

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            _count_refusal(metrics, name, "other", code)
            log.warning("%s from %s refused: %s %s", name, context.peer(), code.name, message,
                        extra={"rpc": name, "code": code.name})  # fmt: skip
            await abort_call(context, code, message)

        # No deserializer: the request's bytes are never parsed for a caller that may not send it.
        return grpc.unary_unary_rpc_method_handler(refuse)


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only ("localhost", 127.0.0.0/8, "[::1]")."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def server_interceptors(config: "ServerConfig", metrics: "Metrics") -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every seqserve gRPC server runs, outermost first: access to model management is decided
    before anything of the request is parsed."""
    if config.admin and config.admin_token is None and not is_loopback(config.host):
        log.warning(
            "model management (LoadModel, UnloadModel) is open to every client that reaches %s: set "
            "--admin-token-file or $%s to require a token, or --no-admin to turn it off", config.host, ADMIN_TOKEN_ENV,
        )  # fmt: skip
    return [AdminAccessInterceptor(config.admin_token, config.admin, metrics), ParseErrorsInterceptor(metrics)]
