"""The one exception the client library raises for a failed call."""

from __future__ import annotations

import grpc

MESSAGE_LIMIT_ADVICE = (
    "the client's message size limit: raise ConnectionConfig.max_message_bytes (Client(max_message_bytes=...)), "
    "or seqserve-client --max-message-mb"
)


class SeqServeError(Exception):
    """A call that failed: the gRPC status code and the server's message (which names the limit or what exists)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "SeqServeError":
        """Wrap a grpc.RpcError (sync or aio call) without losing its code and details."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        if "CLIENT: " in details and "message larger than max" in details:  # the client's own limit, not the server's
            details += f" ({MESSAGE_LIMIT_ADVICE})"
        return cls(code or grpc.StatusCode.UNKNOWN, details)

    @classmethod
    def from_code_number(cls, number: int, message: str) -> "SeqServeError":
        """From a google.rpc.Code number (as TranslateStreamResponse.error_code carries it)."""
        for code in grpc.StatusCode:
            if code.value[0] == number:
                return cls(code, message)
        return cls(grpc.StatusCode.UNKNOWN, f"(status {number}) {message}")
