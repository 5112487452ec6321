"""Prometheus metrics (prometheus-client), one registry per server so several servers can share a process (tests)."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


def http_url(host: str, port: int, path: str = "/") -> str:
    """An http URL of host and port: an IPv6 host (the default "::") goes in brackets, as URLs need."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("seqserve_requests", "RPCs received", ["method", "model"], registry=r)
        self.errors = Counter("seqserve_errors", "RPCs (or stream items) that failed, by status code",
                              ["method", "code"], registry=r)  # fmt: skip
        self.latency = Histogram("seqserve_request_latency_seconds", "RPC latency", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("seqserve_queue_seconds", "time a sequence waited before its batch ran", ["model"],
                                    buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_sequences = Histogram("seqserve_batch_sequences", "sequences per batch", ["model"],
                                         buckets=_SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_tokens = Histogram("seqserve_batch_tokens", "padded source tokens per batch", ["model"],
                                      buckets=_TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.tokens_in = Counter("seqserve_tokens_in", "input tokens (special tokens included)", ["model"], registry=r)
        self.tokens_out = Counter("seqserve_tokens_out", "output tokens of the returned hypotheses", ["model"],
                                  registry=r)  # fmt: skip
        self.decode_steps = Counter("seqserve_decode_steps", "decoder graph runs", ["model"], registry=r)
        self.decode_rows = Counter("seqserve_decode_rows", "hypothesis rows over all decoder runs", ["model"],
                                   registry=r)  # fmt: skip
        self.models_ready = Gauge("seqserve_models_ready", "model versions ready to serve", registry=r)
        self._http = None

    def observe_batch(self, model: str, waits: Sequence[float], lengths: Sequence[int]) -> None:
        self.batch_sequences.labels(model).observe(len(lengths))
        self.batch_tokens.labels(model).observe(len(lengths) * max(lengths, default=0))
        for w in waits:
            self.queue_time.labels(model).observe(w)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint (port 0 picks a free one); returns the port."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        bound = self._http.server_port
        log.info("metrics on %s", http_url(addr, bound, "/metrics"))
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start
