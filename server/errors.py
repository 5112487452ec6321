"""Domain errors of the server, each carrying its numbers, and the ONE mapping from them to gRPC status codes.

Domain code (tokenization, batching, decoding, the model manager) raises these; only `status_of` turns an exception
into a (code, message) pair, used by the servicers for whole RPCs and by TranslateStream for per-item errors.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from seqserve.server.repository import ModelNotFound, RepositoryError

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of every error a request can cause; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServeError):
    """A request that is malformed in itself (both texts and pairs, an unknown enum value, n_best > beam size...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OneTextError(ServeError):
    """An error about one input, named "text INDEX" (its place in the request) unless `about` names it otherwise."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, index: int):
        self.index = index
        super().__init__(self.about(f"text {index}"))

    def about(self, subject: str) -> str:
        raise NotImplementedError


class InputTooLong(OneTextError):
    def __init__(self, tokens: int, limit: int, index: int = 0):
        self.tokens, self.limit = tokens, limit
        super().__init__(index)

    def about(self, subject: str, truncation: str = "ask for truncation (TRUNCATION_TRUNCATE)") -> str:
        """The message about `subject`; `truncation`: how this protocol asks to cut it to the limit."""
        return (
            f"{subject} has {self.tokens} tokens, over the model's limit of {self.limit} tokens "
            f"(max_tokens_per_text); shorten it or {truncation}"
        )


class TextTooLong(OneTextError):
    def __init__(self, characters: int, limit: int, index: int = 0):
        self.characters, self.limit = characters, limit
        super().__init__(index)

    def about(self, subject: str) -> str:
        return (
            f"{subject} has {self.characters} characters, over the limit of {self.limit} characters "
            "(max_chars_per_text)"
        )


class TooManyTexts(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, texts: int, limit: int):
        self.texts, self.limit = texts, limit
        super().__init__(f"request has {texts} texts, over the limit of {limit} texts per request (max_texts)")


class OptionOutOfRange(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, option: str, value: float, limit: float | str):
        self.option, self.value, self.limit = option, value, limit
        super().__init__(f"{option} = {value} is out of range (limit: {limit})")


class QueueFull(ServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, model: str, queued: int, limit: int):
        self.model, self.queued, self.limit = model, queued, limit
        super().__init__(
            f"model {model} has {queued} sequences queued, the limit is {limit} (max_queue); retry later"
        )


class LargerThanQueue(ServeError):
    """A request with more sequences than the model's whole queue holds: no retry can make it fit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, model: str, sequences: int, limit: int):
        self.model, self.sequences, self.limit = model, sequences, limit
        super().__init__(
            f"request has {sequences} sequences for model {model}, more than its queue holds ({limit}, max_queue); "
            f"send at most {limit} a request"
        )


class AnswerTooLarge(ServeError):
    """A request whose answer could not be sent (over max_message_bytes), refused before any work is done."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, what: str, estimate: int, limit: int, advice: str):
        self.estimate, self.limit = estimate, limit
        super().__init__(
            f"the answer to {what} would take at least {estimate} bytes, over the {limit}-byte message limit "
            f"(max_message_bytes); {advice}"
        )


class AnswerOverLimit(ServeError):
    """An answer computed and found larger than max_message_bytes (gRPC would fail to send it)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit
        super().__init__(
            f"the answer takes {size} bytes, over the {limit}-byte message limit (max_message_bytes); send fewer "
            "texts a request, or ask for less of each (n_best, token scores, top_k)"
        )


class ModelUnavailable(ServeError):
    """The model exists in the repository but is not ready. As itself: LOADING, ready soon (clients retry it); the
    other states are ModelNotLoaded. `model_unavailable` picks the class from the state."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, name: str, version: int, state: str, reason: str = ""):
        self.name, self.version, self.state, self.reason = name, version, state, reason
        why = f": {reason}" if reason else ""
        advice = _UNAVAILABLE_ADVICE.get(state, "retry later")
        super().__init__(f"model {name} version {version} is not ready (state {state}{why}); {advice}")


class ModelNotLoaded(ModelUnavailable):
    """Not loaded (AVAILABLE), being unloaded, or FAILED: only a LoadModel (after a fix, for FAILED) changes that, so
    not UNAVAILABLE, which clients retry until their deadline."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def model_unavailable(name: str, version: int, state: str, reason: str = "") -> ModelUnavailable:
    """The error for a version in `state` that is not READY."""
    return (ModelUnavailable if state == "LOADING" else ModelNotLoaded)(name, version, state, reason)


_UNAVAILABLE_ADVICE = {  # what may help, by the version's state
    "AVAILABLE": "LoadModel loads it",
    "LOADING": "it is loading; retry shortly",
    "UNLOADING": "it is being unloaded; LoadModel loads it again once it is AVAILABLE",
    "FAILED": "fix what the reason names in the repository, then LoadModel it again",
}


class WrongTask(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, name: str, capability: str, capabilities: list[str]):
        self.name, self.capability, self.capabilities = name, capability, capabilities
        super().__init__(
            f"model {name} does not serve {capability}; it serves: {', '.join(capabilities) or 'nothing'}"
        )


class Draining(ServeError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("server is shutting down and takes no new work; retry on another replica")


class DeadlineExceeded(ServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, where: str):
        self.where = where
        super().__init__(f"deadline exceeded {where}")


class Cancelled(ServeError):
    code = grpc.StatusCode.CANCELLED

    def __init__(self) -> None:
        super().__init__("request cancelled by the client")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while serving a request."""
    if isinstance(exc, ServeError):
        return exc.code, str(exc)
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, RepositoryError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    log.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"


async def abort_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """`context.abort(code, message)` for a call that may have ended meanwhile: when its deadline passed first, gRPC's
    core can no longer send a status and raised an internal error that it logged with a traceback, one per request of
    a short-deadline storm (the client had its DEADLINE_EXCEEDED already). Such a call unwinds as cancelled."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise  # the normal way out: gRPC sends the status
    except Exception:
        remaining = context.time_remaining()
        if not (context.done() or context.cancelled() or (remaining is not None and remaining <= 0)):
            raise
        log.debug("%s not sent: the call had ended (%s)", code.name, message)
        raise asyncio.CancelledError() from None


def outcome_seen(future: asyncio.Future) -> None:
    """A done callback for a future nobody awaits any more: retrieve its exception, so asyncio does not log it as
    never retrieved (whoever dropped it has logged or recorded what matters)."""
    if not future.cancelled():
        future.exception()
