"""`seqserve serve`: serve a model repository over gRPC until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from seqserve.server.app import DeviceUnavailable, create_server
from seqserve.server.config import ADMIN_TOKEN_ENV, BatchingConfig, ConfigError, Limits, ServerConfig, read_admin_token
from seqserve.server.logs import configure
from seqserve.server.repository import ModelRepository, RepositoryError, device_id_error

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, lim, bat = ServerConfig(), Limits(), BatchingConfig()
    parser.add_argument("--repository", required=True, help="model repository folder (REPO/NAME/VERSION/...)")
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=d.port, help="gRPC port (0: any free port, logged)")
    parser.add_argument("--metrics-port", type=int, default=d.metrics_port,
                        help="Prometheus /metrics HTTP port; -1 turns the endpoint off")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default=d.device,
                        help="onnxruntime execution provider; cuda needs onnxruntime-gpu ([cuda] extra)")  # fmt: skip
    parser.add_argument("--device-id", type=int, default=d.device_id,
                        help="with --device cuda: which GPU (as onnxruntime numbers them, after "
                             "CUDA_VISIBLE_DEVICES)")  # fmt: skip
    parser.add_argument("--instances", type=int, default=d.instances,
                        help="concurrent onnxruntime runs across models (0: from the cores)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="intra-op threads per run (0: cores // instances)")  # fmt: skip
    # A flag that turns something off: the help says what is on without it (ArgumentDefaultsHelpFormatter would
    # print the dest's "(default: True)", which reads as if the flag were on), and set_defaults supplies the value.
    parser.set_defaults(cpu_mem_arena=True, shared_threads=True, admin=True)
    parser.add_argument("--no-cpu-mem-arena", dest="cpu_mem_arena", action="store_false", default=argparse.SUPPRESS,
                        help="turn off onnxruntime's CPU memory arena (on without this flag): less resident memory, "
                             "slower large batches")  # fmt: skip
    parser.add_argument("--per-session-threads", dest="shared_threads", action="store_false",
                        default=argparse.SUPPRESS,
                        help="a non-spinning onnxruntime thread pool per session (without this flag: one shared "
                             "pool for the whole process)")  # fmt: skip
    parser.add_argument("--admin-token-file", default=None, metavar="PATH",
                        help="file holding the token LoadModel and UnloadModel calls must send as "
                             f"'authorization: Bearer TOKEN' (else ${ADMIN_TOKEN_ENV}; neither: any client may "
                             "load and unload); other RPCs stay open")  # fmt: skip
    parser.add_argument("--no-admin", dest="admin", action="store_false", default=argparse.SUPPRESS,
                        help="refuse LoadModel and UnloadModel to every client (PERMISSION_DENIED); without this "
                             "flag they are served, behind the admin token when one is set")  # fmt: skip
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME",
                        help="load only these models at start (default: every model, highest version)")  # fmt: skip
    parser.add_argument("--max-batch-tokens", type=int, default=bat.max_batch_tokens,
                        help="padded tokens per batch (sequences x longest x beam); REPO/NAME/config.json "
                             "overrides")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=bat.max_batch_size, help="sequences per batch")
    parser.add_argument("--max-queue-delay-ms", type=float, default=bat.max_queue_delay_ms,
                        help="with --always-wait, how long a request waits for others to batch with; otherwise how "
                             "long a sentence a running decode leaves waiting gets before a batch of its own")
    parser.set_defaults(dispatch_when_idle=True)  # SUPPRESS below: the help must not read "(default: True)"
    parser.add_argument("--always-wait", dest="dispatch_when_idle", action="store_false", default=argparse.SUPPRESS,
                        help="wait --max-queue-delay-ms for company even when a worker is free (by default a "
                             "request starts at once then, and gathers with others only while the workers are "
                             "busy)")  # fmt: skip
    parser.add_argument("--inline-max-ms", type=float, default=bat.inline_max_ms,
                        help="a BERT request reaching an idle model runs on the event loop itself (no thread "
                             "hand-off) when the model's small batches take at most this long; 0: never")
    parser.add_argument("--max-join-ms", type=float, default=bat.max_join_ms,
                        help="how long a running translation decode takes newcomers before it finishes and frees its "
                             "worker")
    parser.add_argument("--max-texts", type=int, default=lim.max_texts, help="texts or pairs per request")
    parser.add_argument("--max-chars-per-text", type=int, default=lim.max_chars_per_text, help="characters per text")
    parser.add_argument("--max-tokens-per-text", type=int, default=lim.max_tokens_per_text,
                        help="tokens per text (0: the model's own limit; otherwise the smaller)")  # fmt: skip
    parser.add_argument("--max-message-bytes", type=int, default=lim.max_message_bytes,
                        help="largest gRPC message received or sent")  # fmt: skip
    parser.add_argument("--max-beam-size", type=int, default=lim.max_beam_size, help="largest beam a request may ask")
    parser.add_argument("--max-top-k", type=int, default=lim.max_top_k, help="largest top_k a FillMask may ask")
    parser.add_argument("--max-queue", type=int, default=lim.max_queue,
                        help="sequences queued per model before RESOURCE_EXHAUSTED")  # fmt: skip
    parser.add_argument("--stream-read-ahead", type=int, default=lim.stream_read_ahead,
                        help="TranslateStream items in flight per stream before flow control pushes back")  # fmt: skip
    parser.add_argument("--grace-period", type=float, default=d.grace_period_s,
                        help="seconds in-flight requests get to finish after SIGTERM")  # fmt: skip
    parser.add_argument("--drain-delay", type=float, default=d.drain_delay_s,
                        help="seconds after SIGTERM during which requests are still taken and served while health "
                             "and readiness say NOT_SERVING (for a load balancer to notice), before the grace "
                             "period")  # fmt: skip
    parser.add_argument("--log-format", choices=("json", "text"), default="text", help="log line format")
    parser.add_argument("--log-level", default="INFO", help="logging level")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server config the options describe; raises ConfigError naming an option outside its range (and OSError for
    an unreadable --admin-token-file)."""
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=None if args.metrics_port == -1 else args.metrics_port,
        device=args.device, device_id=args.device_id, instances=args.instances, threads=args.threads,
        models=tuple(args.models),
        cpu_mem_arena=args.cpu_mem_arena, shared_threads=args.shared_threads,
        grace_period_s=args.grace_period, drain_delay_s=args.drain_delay,
        admin_token=read_admin_token(args.admin_token_file), admin=args.admin,
        limits=Limits(
            max_texts=args.max_texts, max_chars_per_text=args.max_chars_per_text,
            max_tokens_per_text=args.max_tokens_per_text, max_message_bytes=args.max_message_bytes,
            max_beam_size=args.max_beam_size, max_top_k=args.max_top_k, max_queue=args.max_queue,
            stream_read_ahead=args.stream_read_ahead,
        ),
        batching=BatchingConfig(
            max_batch_tokens=args.max_batch_tokens, max_queue_delay_ms=args.max_queue_delay_ms,
            dispatch_when_idle=args.dispatch_when_idle,
            max_batch_size=args.max_batch_size, max_join_ms=args.max_join_ms, inline_max_ms=args.inline_max_ms,
        ),
    )  # fmt: skip


async def serve(config: ServerConfig, repository: ModelRepository) -> int:
    server, port = create_server(config, repository)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []
    starting = loop.create_task(server.start())

    async def stop_starting() -> None:
        """A signal before ready: stop loading (a load under way finishes and is dropped), serve nothing, stop."""
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.drain(delay=0)  # nothing was served: no load balancer to wait for

    failed = loop.create_future()  # a stop that raised: serve() ends with its error instead of waiting for good

    def stop_failed(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and not failed.done():
            failed.set_exception(task.exception())

    def on_signal(signame: str) -> None:
        if not stopping:
            log.info("%s received%s", signame, "" if starting.done() else " while starting: not serving")
            stopping.append(loop.create_task(server.drain() if starting.done() else stop_starting()))
            stopping[0].add_done_callback(stop_failed)
        elif server.skip_drain_delay():  # a second signal: on to the grace period at once
            log.info("%s received again: skipping the rest of the drain delay", signame)
        else:
            log.info("%s received again: already stopping", signame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await asyncio.shield(starting)  # a signal cancels the start, not this wait
    except asyncio.CancelledError:
        if not stopping:
            raise
    if not stopping:
        metrics = "metrics off" if server.metrics_port is None else f"metrics port {server.metrics_port}"
        log.info("ready: gRPC port %d, %s", port, metrics)
    stopped = loop.create_task(server.wait_stopped())
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if failed.done():
        failed.result()  # raises the stop's error
    return 0


def run(args: argparse.Namespace) -> int:
    configure(args.log_format, args.log_level)
    if (error := device_id_error(args.device, args.device_id)) is not None:
        log.error("--device-id: %s", error)
        return 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("--admin-token-file: %s", exc)
        return 2
    try:
        repository = ModelRepository(args.repository)
        return asyncio.run(serve(config, repository))
    except (DeviceUnavailable, RepositoryError, OSError) as exc:
        log.error("%s", exc)
        return 2
