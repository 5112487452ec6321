"""Server settings: frozen dataclasses built by the CLI (or by tests) and injected into `create_server`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)


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
        keys = ("max_batch_tokens", "max_queue_delay_ms", "max_batch_size", "max_join_ms", "dispatch_when_idle",
                "inline_max_ms")
        known = {k: overrides[k] for k in keys if k in overrides}
        return replace(self, **known)


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
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

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
