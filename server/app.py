"""The server object: gRPC (grpc.aio) with the two seqserve services, the Open Inference Protocol (KServe v2), health,
reflection and metrics, and its drain.

    server, port = create_server(config, ModelRepository(root))   # inside the event loop that will run it
    await server.start()                                           # loads the models, then serves
    await server.drain()                                           # NOT_SERVING, no new work, in-flight finishes
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqserve.protos.inference import open_inference_pb2 as open_inference
from seqserve.protos.inference import open_inference_pb2_grpc as open_inference_grpc
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig, available_cores
from seqserve.server.health import Health
from seqserve.server.interceptors import server_interceptors
from seqserve.server.manager import SERVING, ModelManager
from seqserve.server.metrics import Metrics
from seqserve.server.open_inference import OpenInferenceServicer
from seqserve.server.repository import ModelRepository, SessionOptions, shared_thread_pool
from seqserve.server.servicers import InferenceServicer, ModelsServicer, ServingState

log = logging.getLogger(__name__)


class DeviceUnavailable(RuntimeError):
    def __init__(self, device: str, available: list[str]):
        self.device, self.available = device, available
        super().__init__(
            f"--device {device}: onnxruntime has no CUDAExecutionProvider here (available: {', '.join(available)}); "
            "install the [cuda] extra (onnxruntime-gpu) with a matching CUDA, or serve with --device cpu"
        )


def session_options(config: ServerConfig) -> SessionOptions:
    """Session settings from the server config; raises DeviceUnavailable when CUDA is asked for and absent."""
    if config.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailable(config.device, ort.get_available_providers())
    instances, threads = config.resolved_threads()
    return SessionOptions(provider=config.device, device_id=config.device_id, intra_op_threads=threads,
                          inter_op_threads=1, allow_spinning=False, cpu_mem_arena=config.cpu_mem_arena)  # fmt: skip


def shared_pool_size(instances: int, threads: int) -> int:
    """Intra-op size of the shared pool for `instances` concurrent runs of `threads` threads each: a pool of size n has
    n - 1 threads of its own and borrows the calling one, so instances x threads threads in all need
    instances x threads - instances + 1 (one run alone may then use them all)."""
    return max(1, instances * threads - instances + 1)


class SeqServer:
    def __init__(self, config: ServerConfig, repository: ModelRepository):
        self.config = config
        self.instances, self.threads = config.resolved_threads()
        options = session_options(config)
        if config.shared_threads:
            # Before any session of the process; every session then uses it.
            shared_thread_pool(shared_pool_size(self.instances, self.threads), 1)
        log.info(
            "onnxruntime: device %s, %d concurrent runs x %d intra-op threads on %d cores, %s",
            f"cuda:{config.device_id}" if config.device == "cuda" else config.device, self.instances, self.threads,
            available_cores(),
            "one shared thread pool" if config.shared_threads else "a non-spinning pool per session",
        )  # fmt: skip
        # The pool's size bounds concurrent onnxruntime runs across all models: instances x threads <= cores.
        self.executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix="ort")
        self.metrics = Metrics()
        self.health = Health()
        self.manager = ModelManager(repository, config, options, self.executor, self.metrics, self.health)
        self.state = ServingState(self.manager, self.metrics)
        limit = config.limits.max_message_bytes
        self.grpc = grpc.aio.server(
            interceptors=server_interceptors(config, self.metrics),
            options=[
                ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and take a share
                # of its connections (a stale process, a typo in a deployment) instead of failing to bind.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self.state), self.grpc)
        pb_grpc.add_ModelsServicer_to_server(ModelsServicer(self.state), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        open_inference_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(self.state), self.grpc)
        services = (
            pb.DESCRIPTOR.services_by_name["Inference"].full_name,
            pb.DESCRIPTOR.services_by_name["Models"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            open_inference.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, self.grpc)
        try:
            self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        except RuntimeError as exc:  # grpc.aio raises where grpc returned 0
            raise OSError(f"could not bind {config.host}:{config.port} (is another server on it?)") from exc
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        self._delay_skipped = asyncio.Event()
        self._in_delay = False

    async def start(self) -> None:
        """Load the models, start metrics and gRPC; overall health SERVING."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, _http_host(self.config.host))
        await self.manager.start()
        await self.grpc.start()
        await self.health.set("", SERVING)
        log.info("serving on port %d", self.port)

    async def drain(self, grace: float | None = None, delay: float | None = None) -> None:
        """Health and readiness NOT_SERVING; for `delay` seconds go on serving (a load balancer stops sending work
        meanwhile); then refuse new RPCs, let in-flight ones finish within the grace period, and stop."""
        grace = self.config.grace_period_s if grace is None else grace
        delay = self.config.drain_delay_s if delay is None else delay
        self.state.not_ready = True
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        if delay > 0:
            log.info("draining: NOT_SERVING, still serving for %.1f s (drain delay)", delay)
            self._in_delay = True
            try:
                await asyncio.wait_for(self._delay_skipped.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._in_delay = False
        log.info("draining: no new work, %.1f s for in-flight requests", grace)
        self.state.draining = True  # streams waiting on drained() stop reading
        await self.health.end_watches()  # each sends NOT_SERVING and ends: an open Watch held stop() for all of grace
        await self.grpc.stop(grace)
        await self.manager.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        self._stopped.set()
        log.info("stopped")

    def skip_drain_delay(self) -> bool:
        """End a running drain delay now (a second SIGTERM/SIGINT); False when none is running."""
        if not self._in_delay or self._delay_skipped.is_set():
            return False
        self._delay_skipped.set()
        return True

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _http_host(grpc_host: str) -> str:
    """The metrics endpoint listens where gRPC does: gRPC's "[::]" or "[::1]" is an HTTP server's "::" or "::1"."""
    return grpc_host[1:-1] if grpc_host.startswith("[") and grpc_host.endswith("]") else grpc_host


def create_server(config: ServerConfig, repository: ModelRepository) -> tuple[SeqServer, int]:
    """Build a server bound to `config.port` (0: a free port); `await server.start()` loads models and serves."""
    server = SeqServer(config, repository)
    return server, server.port


__all__ = ["create_server", "SeqServer", "DeviceUnavailable"]
