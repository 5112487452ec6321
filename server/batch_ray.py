"""The Ray engine of `seqserve batch translate`: blocks of the input on a Ray Data actor pool.

Each block of lines becomes one row (and one Ray block) of a dataset; `map` sends the rows to a pool of actors, each
holding one `BlockTranslator` (one onnxruntime session of the exported model, no server), and the driver reads the
results back in input order (`preserve_order`), so `translate_file` appends and flushes them block by block and a
rerun resumes after the last complete line. Ray is the optional `ray` extra; nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator

from seqserve.server.batch import BatchError, BatchJob, Block, BlockTranslator, Engine

log = logging.getLogger(__name__)


class RayMissing(BatchError):
    def __init__(self, error: ImportError):
        super().__init__(f"--engine ray needs Ray Data ({error}): pip install '.[ray]' in a seqserve checkout")


class RayBlockTranslator:
    """The callable class of the actor pool: one onnxruntime session per actor, reused for every block."""

    def __init__(self, job: BatchJob):
        self.worker = BlockTranslator(job)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # Lines travel joined by "\n" (a line never holds one): one string column is the cheapest Arrow layout.
        lines = str(row["text"]).split("\n")[: int(row["count"])]
        start = int(row["start"])
        return {"start": start, "count": len(lines), "text": "\n".join(self.worker.translate(lines, start))}


def ray_engine(workers: int = 0, address: str | None = None, num_cpus: int | None = None) -> Engine:
    """An engine for `translate_file` on a Ray cluster: joins `address`, the already initialised cluster, or a new
    local one with `num_cpus`; `workers` actors (0: the cluster's CPUs divided by the job's threads)."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RayMissing(error) from error

    def engine(job: BatchJob, blocks: Iterable[Block]) -> Iterator[tuple[int, list[str]]]:
        rows = [{"start": b.start, "count": len(b.lines), "text": "\n".join(b.lines)} for b in blocks]
        if not rows:
            return
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False)  # fmt: skip
        threads = max(job.threads, 1)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        size = min(workers or max(cpus // threads, 1), len(rows))
        log.info("ray: %d blocks of up to %d lines on %d actors (%d CPUs in the cluster, %d thread(s) each)",
                 len(rows), job.block_lines, size, cpus, threads)  # fmt: skip
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            RayBlockTranslator,
            fn_constructor_kwargs={"job": job},
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=threads,
        )
        for row in dataset.iter_rows():
            count = int(row["count"])
            yield int(row["start"]), str(row["text"]).split("\n")[:count] if count else []

    return engine
