"""Server settings: frozen dataclasses built by the CLI (or by tests) and injected into `create_server`."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PORT = 65535
# gRPC's message limits are C ints; a limit under 1 KiB refuses ordinary requests (a model name and one sentence).
MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES = 1024, 2**31 - 1
ADMIN_TOKEN_ENV = "SEQSERVE_ADMIN_TOKEN"


class ConfigError(ValueError):
    """A setting outside its valid range; names the setting as `seqserve serve` spells it, the value and the range."""

    def __init__(self, option: str, value: object, valid: str):
        self.option, self.value, self.valid = option, value, valid
        super().__init__(f"{option} {value!r} is not valid: {valid}")


def _check_int(option: str, value: object, low: int, high: int | None = None, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
        raise ConfigError(option, value, valid + note)


def _check_float(option: str, value: object, low: float, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ConfigError(option, value, f"a finite number of at least {low:g}{note}")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each violation is INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit."""

    max_texts: int = 256  # texts (or pairs) per request
    max_chars_per_text: int = 20_000
    max_tokens_per_text: int = 0  # 0: the model's own limit; otherwise the smaller of the two
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC receive limit: RESOURCE_EXHAUSTED from gRPC itself
    max_beam_size: int = 16
    max_top_k: int = 100
    max_queue: int = 4096  # sequences waiting per model
    stream_read_ahead: int = 32  # TranslateStream requests in flight per stream before flow control pushes back

    def validate(self) -> "Limits":
        """Raise ConfigError for a limit that would refuse every request (or hang every stream); returns self."""
        _check_int("--max-texts", self.max_texts, 1)
        _check_int("--max-chars-per-text", self.max_chars_per_text, 1)
        _check_int("--max-tokens-per-text", self.max_tokens_per_text, 0, note=" (0: the model's own limit)")
        _check_int("--max-message-bytes", self.max_message_bytes, MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES)
        _check_int("--max-beam-size", self.max_beam_size, 1)
        _check_int("--max-top-k", self.max_top_k, 1)
        _check_int("--max-queue", self.max_queue, 1)
        # 0 would leave TranslateStream no slot for its first item: every stream would wait for its deadline.
        _check_int("--stream-read-ahead", self.stream_read_ahead, 1)
        return self


# BatchingConfig's settings, which REPO/NAME/config.json may also set for one model: key -> (the `seqserve serve`
# option, type, minimum, note). One table for both: the CLI's and config.json's checks are the same checks.
SERVING_CONFIG_KEYS: dict[str, tuple[str, type, float, str]] = {
    "max_batch_tokens": ("--max-batch-tokens", int, 1, ""),
    "max_batch_size": ("--max-batch-size", int, 1, ""),
    "max_queue_delay_ms": ("--max-queue-delay-ms", float, 0.0, ""),
    "max_join_ms": ("--max-join-ms", float, 0.0, ""),
    "inline_max_ms": ("--inline-max-ms", float, 0.0, " (0: never inline)"),
    "dispatch_when_idle": ("dispatch_when_idle (--always-wait)", bool, 0, ""),
}


def check_batching_setting(key: str, value: object, name: str | None = None) -> None:
    """ConfigError, naming the setting as `name` (default: its serve option), for a value outside its range."""
    option, kind, low, note = SERVING_CONFIG_KEYS[key]
    name = name or option
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "true or false")
    elif kind is int:
        _check_int(name, value, int(low), note=note)
    else:
        _check_float(name, value, low, note)


@dataclass(frozen=True)
class BatchingConfig:
    """How a model's queue is cut into batches (REPO/NAME/config.json may override per model)."""

    max_batch_tokens: int = 4096  # padded tokens per batch (sequences x longest)
    # With dispatch_when_idle: how long a sentence a running decode does not take in waits before a batch of its own
    # starts. Without: how long the first request of every batch waits for company.
    max_queue_delay_ms: float = 5.0
    # Start at once while the model has a free worker, and while its batches fill the workers gather until one ends
    # (or a full batch waits): a lone request pays no queue delay, and batches grow with the load.
    dispatch_when_idle: bool = True
    max_batch_size: int = 64  # sequences per batch
    # A running translation decode takes newcomers for this long, then finishes and frees its worker, so one
    # model's steady stream cannot starve the others of the worker pool.
    max_join_ms: float = 500.0
    # A BERT batch started on an idle model runs on the event loop itself, without the two thread hand-offs of the
    # worker pool (0.02-0.2 ms of a 2-4 ms request here: benchmarks/levers.py inline), when its model's small batches
    # have been taking at most this long: the loop is then blocked for at most about this long. 0 turns it off.
    inline_max_ms: float = 4.0

    def with_overrides(self, overrides: dict[str, Any]) -> "BatchingConfig":
        known = {k: overrides[k] for k in SERVING_CONFIG_KEYS if k in overrides}
        return replace(self, **known).validate()

    def validate(self) -> "BatchingConfig":
        """Raise ConfigError for a setting outside its range; returns self."""
        for key in SERVING_CONFIG_KEYS:
            check_batching_setting(key, getattr(self, key))
        return self


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int | None = 9090  # None: no metrics HTTP endpoint
    device: str = "cpu"  # "cpu" | "cuda"
    device_id: int = 0  # with device "cuda": which GPU (onnxruntime's numbering, after CUDA_VISIBLE_DEVICES)
    instances: int = 0  # concurrent onnxruntime runs; 0: chosen from the cores
    threads: int = 0  # intra-op threads per run; 0: cores // instances
    cpu_mem_arena: bool = True  # onnxruntime's CPU memory arena: faster, more resident memory
    # One onnxruntime thread pool for every session of the process (`seqserve serve` turns it on; it binds the whole
    # process, so library and test servers leave it off unless asked): see repository.shared_thread_pool.
    shared_threads: bool = False
    models: tuple[str, ...] = ()  # load only these at start; empty: every model (highest version)
    grace_period_s: float = 10.0
    # After SIGTERM, how long the server keeps taking and serving requests while its health and readiness say
    # NOT_SERVING (a load balancer's endpoints update meanwhile), before it stops taking new ones.
    drain_delay_s: float = 0.0
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # Model management (LoadModel, UnloadModel): with admin_token set, only calls sending
    # "authorization: Bearer <admin_token>" may use it; admin False refuses it to everyone. Other RPCs stay open.
    admin_token: str | None = field(default=None, repr=False)
    admin: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ServerConfig":
        """Raise ConfigError for a setting outside its range (the nested limits and batching included); returns self."""
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("--host", self.host, "an address to listen on, such as [::] or 127.0.0.1")
        _check_int("--port", self.port, 0, MAX_PORT, " (0: any free port)")
        if self.metrics_port is not None:
            _check_int("--metrics-port", self.metrics_port, 0, MAX_PORT,
                       " (0: any free port; no endpoint: -1 on the command line, None in ServerConfig)")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("--device", self.device, "cpu or cuda")
        _check_int("--device-id", self.device_id, 0)
        _check_int("--instances", self.instances, 0, note=" (0: chosen from the cores)")
        _check_int("--threads", self.threads, 0, note=" (0: cores // instances)")
        _check_float("--grace-period", self.grace_period_s, 0.0, " seconds")
        _check_float("--drain-delay", self.drain_delay_s, 0.0, " seconds")
        if self.admin_token is not None and not _valid_token(self.admin_token):
            raise ConfigError("admin_token", "<hidden>", _TOKEN_RULE)  # never the token itself: messages get logged
        self.limits.validate()
        self.batching.validate()
        return self

    def resolved_threads(self, cores: int | None = None) -> tuple[int, int]:
        """(instances, intra-op threads) with instances x threads <= cores unless both were set explicitly."""
        cores = cores or available_cores()
        instances = self.instances or (1 if cores < 4 else 2)
        threads = self.threads or max(1, cores // instances)
        if instances * threads > cores:
            log.warning(
                "instances %d x intra-op threads %d = %d exceeds the %d cores: runs will compete for cores",
                instances, threads, instances * threads, cores,
            )  # fmt: skip
        return instances, threads


_TOKEN_RULE = "a non-empty token of printable ASCII without spaces (it is sent as a header value)"


def _valid_token(token: str) -> bool:
    return bool(token) and all(33 <= ord(c) <= 126 for c in token)


def read_admin_token(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from the file at `path` (surrounding whitespace stripped) or else from $SEQSERVE_ADMIN_TOKEN;
    None when neither is given. Raises ConfigError naming where the token came from for an empty, non-UTF-8 or
    unusable one, and OSError for an unreadable file."""
    if path is not None:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError("--admin-token-file", str(path), "a UTF-8 text file holding the token") from None
        source, shown = "--admin-token-file", str(path)
        if not token:
            raise ConfigError(source, shown, "a file holding the token (this one is empty)")
    else:
        token = (os.environ if environ is None else environ).get(ADMIN_TOKEN_ENV, "").strip()
        if not token:
            return None
        source, shown = f"${ADMIN_TOKEN_ENV}", "<hidden>"
    if not _valid_token(token):
        # The token itself is never put in the message: it may be shown in logs.
        raise ConfigError(source, shown, _TOKEN_RULE)
    return token
