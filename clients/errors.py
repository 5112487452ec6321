"""The one exception the client library raises for a failed call."""

from __future__ import annotations

import grpc


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
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_code_number(cls, number: int, message: str) -> "SeqServeError":
        """From a google.rpc.Code number (as TranslateStreamResponse.error_code carries it)."""
        for code in grpc.StatusCode:
            if code.value[0] == number:
                return cls(code, message)
        return cls(grpc.StatusCode.UNKNOWN, f"(status {number}) {message}")
