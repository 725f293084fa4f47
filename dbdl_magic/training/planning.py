"""How the next iteration runs: how many aggregate queries (``sync_every``), workers and
threads per worker, from what the run has measured so far (the cost model is
:mod:`dbdl_magic.training.scaling`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dbdl_magic.backends.base import Backend
from dbdl_magic.data.packing import PackedData
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.scaling import (
    MIN_PARALLEL_SECONDS,
    plan_workers,
    threads_per_worker,
)


@dataclass
class IterationPlan:
    """One iteration's shape: aggregate queries, worker processes (and why), torch threads."""

    chunks: int
    workers: int
    note: str
    threads: int


@dataclass
class IterationPlanner:
    """Plans each iteration of a run from the iterations before it (``parallel="auto"``
    measures one process first, then a worker's start-up, then spreads when it pays)."""

    backend: Backend
    options: TrainOptions
    cpus: int
    startup_seconds: float | None = None
    #: worker count → that count's last training time (the first iteration is not measured)
    measured: dict[int, float] = field(default_factory=dict)

    def plan(self, data: PackedData) -> IterationPlan:
        """The next iteration's plan; measures a worker's start-up when it may pay off."""
        opts, backend = self.options, self.backend
        chunks = math.ceil(1 / opts.sync_every) if opts.sync_every else 1
        serial = self.measured.get(1)  # the last one-process iteration's training time
        if (
            opts.parallel == "auto"
            and backend.supports_parallel
            and serial is not None
            and serial >= MIN_PARALLEL_SECONDS
            and self.startup_seconds is None
        ):
            with backend.engine.begin() as conn:
                self.startup_seconds = backend.measure_worker_startup(conn, data.table)
        workers = plan_workers(
            opts.parallel,
            supports_parallel=backend.supports_parallel,
            cpus=self.cpus,
            serial_seconds=serial,
            startup_seconds=self.startup_seconds,
            queries=chunks,
            measured=self.measured,
        )
        threads = threads_per_worker(self.cpus, workers.workers, opts.threads, data.n_parameters)
        return IterationPlan(chunks, workers.workers, workers.note, threads)

    def measured_iteration(self, plan: IterationPlan, trained: float, first: bool) -> None:
        """Note how long an iteration trained with ``plan``'s workers (not the run's first:
        it also pays imports and caches)."""
        if not first:
            self.measured[plan.workers] = trained


__all__ = ["IterationPlan", "IterationPlanner"]
