"""Which model versions are loaded: load/unload at run time, a state per version, health per model.

A version that fails to load is FAILED with the reason and the others keep serving. Health (grpc.health.v1): the
service "" is SERVING while the server is up and not draining; each model name is SERVING while one of its versions
is READY. Requests naming version 0 get the highest READY version.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Coroutine

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from seqserve.server.config import ServerConfig
from seqserve.server.errors import ModelUnavailable, model_unavailable, outcome_seen
from seqserve.server.metrics import Metrics
from seqserve.server.repository import (
    Manifest, ModelNotFound, ModelRepository, ProviderFailed, RepositoryError, SessionOptions,
)
from seqserve.server.served import ServedModel

log = logging.getLogger(__name__)

AVAILABLE, LOADING, READY, UNLOADING, FAILED = "AVAILABLE", "LOADING", "READY", "UNLOADING", "FAILED"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class VersionStatus:
    name: str
    version: int
    state: str
    reason: str = ""
    manifest: Manifest | None = None
    capabilities: list[str] = field(default_factory=list)
    max_input_tokens: int = 0


class ModelManager:
    def __init__(
        self,
        repository: ModelRepository,
        config: ServerConfig,
        session_options: SessionOptions,
        executor: Executor,
        metrics: Metrics,
        health: HealthServicer,
    ):
        self.repository = repository
        self.config = config
        self.session_options = session_options
        self.executor = executor
        self.metrics = metrics
        self.health = health
        self._served: dict[tuple[str, int], ServedModel] = {}
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()  # loads and unloads that outlive their callers (see load)

    # ---------------------------------------------------------------------------------------------------------
    # Lookup

    def get(self, name: str, version: int = 0) -> ServedModel:
        """The served version (0: the highest READY one); NOT_FOUND when the repository has no such model/version."""
        if version:
            served = self._served.get((name, version))
            if served is not None:
                return served
            self._raise_missing(name, version)
        ready = sorted(v for (n, v) in self._served if n == name)
        if ready:
            return self._served[(name, ready[-1])]
        self._raise_missing(name, 0)
        raise AssertionError("unreachable")

    def serves(self, name: str) -> bool:
        """Whether some version of `name` is READY."""
        return any(n == name for (n, _) in self._served)

    def _raise_missing(self, name: str, version: int) -> None:
        available = self.repository.models()
        versions = available.get(name, [])
        if not versions or (version and version not in versions):
            raise ModelNotFound(name, version or None, available)
        v = version or versions[-1]
        status = self.status(name, v)  # a version never loaded is read: FAILED when its manifest is broken
        raise model_unavailable(name, v, status.state, status.reason)

    def statuses(self, name: str = "") -> list[VersionStatus]:
        """Every version in the repository (and any still loaded after leaving it), with its state."""
        found: dict[tuple[str, int], VersionStatus] = {}
        for model, versions in self.repository.models().items():
            if name and model != name:
                continue
            for v in versions:
                found[(model, v)] = self._status.get((model, v)) or self._available(model, v)
        for key, status in self._status.items():
            if (not name or key[0] == name) and key not in found:
                found[key] = status
        return [found[k] for k in sorted(found)]

    def _available(self, name: str, version: int) -> VersionStatus:
        try:
            manifest = self.repository.manifest(name, version)
        except RepositoryError as exc:
            return VersionStatus(name, version, FAILED, str(exc))
        return VersionStatus(name, version, AVAILABLE, manifest=manifest)

    def status(self, name: str, version: int) -> VersionStatus:
        return self._status.get((name, version)) or self._available(name, version)

    # ---------------------------------------------------------------------------------------------------------
    # Load / unload

    async def start(self) -> None:
        """Load the configured models (all, highest version each, when none are named); failures are logged, except
        a device that cannot run (ProviderFailed: every model would fall back to the CPU or another GPU), which
        stops the start."""
        names = list(self.config.models) or list(self.repository.models())
        for name in self.repository.models():  # known but not (yet) loaded: NOT_SERVING rather than unknown
            await self.health.set(name, NOT_SERVING)
        for name in names:
            await self._load_newest_that_works(name)
        ready = [f"{n} {v}" for (n, v) in sorted(self._served)]
        log.info("serving %d model versions: %s", len(ready), ", ".join(ready) or "none")

    async def _load_newest_that_works(self, name: str) -> None:
        """At start: the highest version, or, when it fails (a broken new export), the next one down that loads, so
        that publishing a bad version and restarting is not an outage. The failed ones stay listed FAILED."""
        versions = self.repository.versions(name) or [0]  # 0: let load() say NOT_FOUND
        for version in reversed(versions):
            try:
                await self.load(name, version)
            except (RepositoryError, ModelUnavailable) as exc:
                if isinstance(exc.__cause__, ProviderFailed):
                    raise exc.__cause__ from None
                log.error("model %s version %s not loaded: %s", name, version or "-", exc)
                continue
            if version != versions[-1]:
                log.warning("model %s: serving version %d, the highest that loads (%d failed)", name, version,
                            versions[-1])  # fmt: skip
            return

    async def load(self, name: str, version: int = 0) -> VersionStatus:
        """Load a version (0: the repository's highest); a failure is recorded as FAILED and raised. The load runs to
        its end, READY or FAILED, even when the caller stops waiting (a LoadModel past its deadline): a cancelled one
        left the version LOADING for good, every request told to retry."""
        version_dir = self.repository.version_dir(name, version or None)  # ModelNotFound when absent
        return await self._outliving(self._load((name, int(version_dir.name)), version_dir))

    def _outliving(self, work: Coroutine[Any, Any, VersionStatus]) -> Awaitable[VersionStatus]:
        """`work` as a task the caller's cancellation does not reach; close() waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(outcome_seen)  # _load and _unload log their own failures
        task.add_done_callback(self._background.discard)
        return asyncio.shield(task)

    async def _load(self, key: tuple[str, int], version_dir: Path) -> VersionStatus:
        name = key[0]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key in self._served:
                return self._status[key]
            self._status[key] = VersionStatus(key[0], key[1], LOADING)
            loop = asyncio.get_running_loop()
            try:
                # The default pool, not the inference pool: a slow load must not hold up requests to other models.
                served = await loop.run_in_executor(None, self._build, version_dir)
            except Exception as exc:
                # The repository's own errors say what is wrong; anything else is named by its type too.
                reason = str(exc) if isinstance(exc, RepositoryError) else f"{type(exc).__name__}: {exc}"
                self._status[key] = VersionStatus(key[0], key[1], FAILED, reason)
                log.error("loading %s version %d failed: %s", key[0], key[1], reason)
                await self._update_health(name)
                raise model_unavailable(key[0], key[1], FAILED, reason) from exc
            served.batcher.start()
            self._served[key] = served
            self._status[key] = VersionStatus(
                key[0], key[1], READY, manifest=served.manifest, capabilities=served.capabilities,
                max_input_tokens=served.max_input_tokens,
            )  # fmt: skip
            await self._update_health(name)
            log.info("model %s version %d is READY (%s)", key[0], key[1], ", ".join(served.capabilities))
            return self._status[key]

    def _build(self, version_dir: Path) -> ServedModel:
        from seqserve.server.repository import load_model

        overrides = self.repository.serving_config(version_dir.parent.name)  # checked before any session opens
        loaded = load_model(version_dir, self.session_options, in_repository=True)
        batching = self.config.batching.with_overrides(overrides)
        workers = self.config.resolved_threads()[0]  # concurrent runs: the executor's size
        return ServedModel(loaded, self.executor, batching, self.config.limits, self.metrics, workers)

    async def unload(self, name: str, version: int = 0) -> VersionStatus:
        """Stop taking requests for a version, finish its queued and running work, drop its sessions. The unload runs
        to its end even when the caller stops waiting (an UnloadModel past its deadline): a half-done one left the
        version UNLOADING for good. A version that is not loaded (AVAILABLE, or FAILED) is left as it is and its status
        returned: unloading is idempotent."""
        try:
            served = self.get(name, version)
        except ModelUnavailable as exc:
            if exc.state in (AVAILABLE, FAILED):
                return self.status(exc.name, exc.version)
            raise  # LOADING or UNLOADING: the client may retry
        key = (served.name, served.version)
        del served  # the sessions' memory goes back when _unload drops the last reference
        return await self._outliving(self._unload(key))

    async def _unload(self, key: tuple[str, int]) -> VersionStatus:
        name = key[0]
        async with self._locks.setdefault(key, asyncio.Lock()):
            served = self._served.pop(key, None)
            if served is None:  # unloaded meanwhile by another caller
                return self.status(*key)
            self._status[key] = VersionStatus(key[0], key[1], UNLOADING, manifest=served.manifest)
            await self._update_health(name)
            try:
                await served.batcher.close()
            except Exception as exc:  # logged here: a caller that stopped waiting is told nothing
                reason = f"unloading failed: {type(exc).__name__}: {exc}"
                self._status[key] = VersionStatus(key[0], key[1], FAILED, reason)
                log.exception("model %s version %d: %s", key[0], key[1], reason)
                raise
            self._status.pop(key, None)
            del served
            await asyncio.get_running_loop().run_in_executor(None, release_freed_memory)
            log.info("model %s version %d unloaded", key[0], key[1])
            return self.status(*key)

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        for key in list(self._served):
            served = self._served.pop(key)
            await served.batcher.close()

    async def _update_health(self, name: str) -> None:
        ready = any(n == name for (n, _) in self._served)
        await self.health.set(name, SERVING if ready else NOT_SERVING)
        self.metrics.models_ready.set(len(self._served))


def release_freed_memory() -> None:
    """Collect the unloaded version's objects now and hand the freed heap back to the system. Its sessions sit in
    reference cycles that the cyclic collector reaches only later: without the collection, unload/load cycles of make
    serve's en-de grew the server from 184 MB to 429 MB in 5 cycles. glibc keeps what was freed: after unloading every
    model of make serve's repository the server held 298 MB with the collection alone, 93 MB with malloc_trim
    (docs/checks/unload-memory). Elsewhere than glibc, only the collection. It runs in a worker thread; the collection
    still holds the GIL for a few milliseconds."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; absent from musl, macOS, Windows
    except (AttributeError, OSError):
        return None


_malloc_trim = _find_malloc_trim()
