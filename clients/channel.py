"""Channels, call metadata and the retry loop shared by the sync and asyncio clients.

Retries: only UNAVAILABLE is retried (server not up yet, restarting, draining, model not ready), with capped
exponential backoff and jitter, until the call's deadline: the timeout bounds all attempts together, not each one,
and by default it is the only bound, so a client started a few seconds before its server still gets its answer.
Near the deadline the waits shrink so that a last attempt uses the time left instead of giving up early. A call
without a deadline makes at most ATTEMPTS_WITHOUT_DEADLINE attempts unless the policy sets its own cap. A small
explicit loop rather than grpc's service-config retry policy, because that policy caps attempts at 5 and gives
a client started before its server no say over the window. INVALID_ARGUMENT and every other code fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, TypeVar, Union

import grpc

from seqserve.clients.errors import SeqServeError

log = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
ATTEMPTS_WITHOUT_DEADLINE = 5  # the cap when neither a deadline nor RetryPolicy.attempts bounds the retries
LAST_ATTEMPT_MIN_S = 0.05  # less time than this left before the deadline: give up rather than try again
# grpc keeps a deadline as int64 nanoseconds from its clock's epoch, so about 7.4e9 s from now overflows into a
# deadline already past. Anything above this (float("inf") included) is sent as no deadline: it would never be hit.
MAX_GRPC_TIMEOUT_S = 1e9  # about 31 years
# The server's default max_message_bytes (server/config.py): the largest answer it sends. grpc's own default receive
# limit, 4 MiB, would throw away answers the server computed and sent within its limits.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
T = TypeVar("T")


class _Default:
    """The type of DEFAULT: "use the config's timeout", distinct from None ("no deadline")."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
Timeout = Union[float, None, _Default]  # a method's timeout argument


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff for UNAVAILABLE; ``attempts=1`` turns retrying off.

    ``attempts=None`` (the default) caps nothing: the call's deadline bounds the retries (without a deadline,
    ATTEMPTS_WITHOUT_DEADLINE attempts).
    """

    attempts: int | None = None
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1 (None: until the deadline), got {self.attempts}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for a TLS channel: the CA to trust (None: system roots), and a client cert and key for mutual TLS."""

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None
    server_name_override: str | None = None  # for certificates issued to another name (tests, tunnels)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both a client certificate chain and its private key")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_certificates),
            private_key=read(self.private_key),
            certificate_chain=read(self.certificate_chain),
        )


@dataclass(frozen=True)
class ConnectionConfig:
    """Everything about reaching a server, shared by Client and AsyncClient."""

    target: str = DEFAULT_TARGET
    timeout_s: float | None = 30.0  # default deadline of a call, over all its attempts; None: no deadline
    retry: RetryPolicy = RetryPolicy()
    tls: TLSConfig | None = None  # None: plaintext
    token: str | None = None  # sent as "authorization: Bearer <token>"
    metadata: tuple[tuple[str, str], ...] | Mapping[str, str] = ()  # extra headers on every call (kept as pairs)
    max_message_bytes: int | None = None  # send and receive limit; None: DEFAULT_MAX_MESSAGE_BYTES, the server's
    # grpc client interceptors (tracing, auth, counting): grpc.*ClientInterceptor for Client,
    # grpc.aio.*ClientInterceptor for AsyncClient. They see every attempt, retries included.
    interceptors: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        # metadata may be given as a dict; stored as pairs, checked now rather than at the first call
        headers = self.metadata.items() if isinstance(self.metadata, Mapping) else self.metadata
        pairs = tuple(tuple(pair) for pair in headers)
        if not all(len(pair) == 2 and all(isinstance(part, str) for part in pair) for pair in pairs):
            raise ValueError(f"metadata must be a dict or (key, value) pairs of str, got {self.metadata!r}")
        object.__setattr__(self, "metadata", pairs)
        check_timeout(self.timeout_s, "timeout_s")

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 0),  # the loop below retries, not grpc
            # A channel that failed to connect waits out its reconnect backoff (1 s, growing 1.6x) and fails calls
            # fast meanwhile; matching it to the retry backoff lets a retry reach a server that has just come up.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.retry.initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.retry.max_backoff_s * 1000))),
        ]
        limit = DEFAULT_MAX_MESSAGE_BYTES if self.max_message_bytes is None else self.max_message_bytes
        options += [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return options

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        headers = tuple(self.metadata)
        if self.token:
            headers += (("authorization", f"Bearer {self.token}"),)
        return headers

    def resolve_timeout(self, timeout: Timeout) -> float | None:
        return self.timeout_s if isinstance(timeout, _Default) else check_timeout(timeout)

    def warn_if_token_in_plaintext(self) -> None:
        """A bearer token over a plaintext channel can be read on the way; say so unless the server is this host."""
        host = self.target.removeprefix("dns:///").rsplit(":", 1)[0].strip("[]")
        local = host in ("localhost", "::1") or host.startswith("127.") or self.target.startswith("unix:")
        if self.token and self.tls is None and not local:
            log.warning("sending a bearer token to %s over plaintext (no TLS): anyone on the path can read it",
                        self.target)

    def sync_channel(self) -> grpc.Channel:
        self.warn_if_token_in_plaintext()
        if self.tls is None:
            channel = grpc.insecure_channel(self.target, options=self.channel_options())
        else:
            channel = grpc.secure_channel(self.target, self.tls.credentials(), options=self.channel_options())
        return grpc.intercept_channel(channel, *self.interceptors) if self.interceptors else channel

    def aio_channel(self) -> grpc.aio.Channel:
        self.warn_if_token_in_plaintext()
        interceptors = list(self.interceptors) or None
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self.channel_options(), interceptors=interceptors)
        return grpc.aio.secure_channel(
            self.target, self.tls.credentials(), options=self.channel_options(), interceptors=interceptors
        )


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """``timeout`` if it is seconds from 0 (inf included) or None; a TypeError or ValueError naming ``name``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be seconds (a number), or None for no deadline; got {timeout!r}")
    if not timeout >= 0:  # NaN too
        raise ValueError(f"{name} must be seconds from 0, or None for no deadline; got {timeout!r}")
    return timeout


def grpc_timeout(timeout: float | None) -> float | None:
    """The timeout to hand grpc: None (no deadline) for one too far away for grpc to represent."""
    return None if timeout is None or timeout > MAX_GRPC_TIMEOUT_S else timeout


def closed_error(client: str) -> SeqServeError:
    """What a call on a closed client raises (grpc's own ValueError or UsageError would not be a SeqServeError)."""
    return SeqServeError(grpc.StatusCode.CANCELLED, f"this {client} is closed; create a new one")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class Retrier:
    """The attempts of one retried operation: how long to wait before the next one, or the error when there is none."""

    def __init__(
        self, method: str, policy: RetryPolicy, timeout: float | None, retryable: frozenset = RETRYABLE
    ):
        self.method, self.policy, self.timeout, self.retryable = method, policy, timeout, retryable
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.attempt = 1
        if policy.attempts is not None:
            self.cap: int | None = policy.attempts
        else:
            self.cap = None if timeout is not None else ATTEMPTS_WITHOUT_DEADLINE

    def wait_after(self, failure: SeqServeError) -> float:
        """Seconds to wait before the next attempt after ``failure``; raises it when there is none."""
        if failure.code not in self.retryable:
            raise failure
        if "handshake failed" in failure.message.lower():  # UNAVAILABLE, yet no retry will change the answer
            raise SeqServeError(failure.code, f"{failure.message} (a failed TLS handshake is not retried: is the "
                                "server plaintext, or its certificate not the one trusted?)")
        elapsed = time.monotonic() - self.started
        if self.cap is not None and self.attempt >= self.cap:
            raise self._gave_up(failure, f"{self.attempt} attempts in {elapsed:.1f} s")
        wait = self.policy.backoff(self.attempt)
        remaining = _remaining(self.deadline)
        if remaining is not None:
            if remaining < LAST_ATTEMPT_MIN_S:
                raise self._gave_up(failure, f"{self.attempt} attempts in {elapsed:.1f} s, at the deadline")
            wait = min(wait, remaining / 2)  # leave the other half to a last attempt rather than give up early
        cap = "" if self.cap is None else f" of {self.cap - 1}"
        log.info("%s: %s, retry %d%s in %.2f s", self.method, failure, self.attempt, cap, wait)
        self.attempt += 1
        return wait

    def remaining(self) -> float | None:
        """Seconds left for the next attempt, as grpc takes them (None: no deadline)."""
        return grpc_timeout(_remaining(self.deadline))

    @staticmethod
    def _gave_up(failure: SeqServeError, how: str) -> SeqServeError:
        # The caller learns why the last attempt failed, not just that retrying stopped.
        return SeqServeError(failure.code, f"{failure.message} (gave up after {how})")


def call_with_retry(
    method: str,
    invoke: Callable[[float | None], T],
    timeout: float | None,
    retry: RetryPolicy,
    closed: threading.Event | None = None,
) -> T:
    """Run ``invoke(remaining_timeout)``, retrying UNAVAILABLE with backoff until the deadline (or the attempt cap).

    ``closed`` is set when the client closes: the backoff ends at once, and the call fails as closed_error.
    """
    closed = closed or threading.Event()
    retrier = Retrier(method, retry, timeout)
    while True:
        if closed.is_set():
            raise closed_error("Client")
        try:
            return invoke(retrier.remaining())
        except grpc.RpcError as error:
            if closed.is_set():  # the channel closed under the call ("Channel closed!")
                raise closed_error("Client") from None
            failure = SeqServeError.from_rpc_error(error)
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!"
            if closed.is_set():
                raise closed_error("Client") from None
            raise
        if closed.wait(retrier.wait_after(failure)):  # wait_after raises failure when there is no next attempt
            raise closed_error("Client")


def task_being_cancelled() -> bool:
    """Whether someone asked the current task to cancel (Task.cancelling, Python 3.11+; on 3.10: False)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling and cancelling())


def closed_under_call(closed: asyncio.Event) -> bool:
    """Whether a CancelledError (or grpc's UsageError) came from closing the AsyncClient, not from cancelling the task.

    grpc.aio raises CancelledError in a call whose channel closes; the caller's task was not cancelled, and a
    BaseException it would not catch as a failed call. On Python 3.10, which cannot tell, a closed client wins.
    """
    return closed.is_set() and not task_being_cancelled()


async def call_with_retry_async(
    method: str,
    invoke: Callable[[float | None], Awaitable[T]],
    timeout: float | None,
    retry: RetryPolicy,
    closed: asyncio.Event | None = None,
) -> T:
    """The asyncio twin of call_with_retry."""
    closed = closed or asyncio.Event()
    retrier = Retrier(method, retry, timeout)
    while True:
        if closed.is_set():
            raise closed_error("AsyncClient")
        try:
            return await invoke(retrier.remaining())
        except grpc.RpcError as error:
            if closed.is_set():
                raise closed_error("AsyncClient") from None
            failure = SeqServeError.from_rpc_error(error)
        except (asyncio.CancelledError, grpc.aio.UsageError):
            if closed_under_call(closed):
                raise closed_error("AsyncClient") from None
            raise
        wait = retrier.wait_after(failure)  # raises failure when there is no next attempt
        try:  # the backoff, ended at once by close
            await asyncio.wait_for(closed.wait(), wait)
        except asyncio.TimeoutError:
            continue
        raise closed_error("AsyncClient")
