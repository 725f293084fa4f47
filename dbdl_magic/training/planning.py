"""How the next iteration runs: how many aggregate queries (``sync_every``), segments and
threads per segment, from what the run has measured so far (the cost model is
:mod:`dbdl_magic.training.scaling`). The planner holds the run's segments
(:mod:`dbdl_magic.backends.segments`): opened when a plan first needs them, kept warm while
plans do, closed by :meth:`IterationPlanner.close`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dbdl_magic.backends.base import Backend
from dbdl_magic.backends.segments import Segments
from dbdl_magic.data.packing import PackedData
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.scaling import (
    WorkerPlan,
    plan_workers,
    sync_rounds,
    threads_per_worker,
)


@dataclass
class IterationPlan:
    """One iteration's shape: sync rounds, segments (and why), torch threads, and the open
    segments that run it (None: one process, the run's own session)."""

    chunks: int
    workers: int
    note: str
    threads: int
    segments: Segments | None = None


@dataclass
class IterationPlanner:
    """Plans each iteration of a run from the iterations before it (``parallel="auto"``
    measures one process first, then spreads when the estimate says it pays)."""

    backend: Backend
    options: TrainOptions
    cpus: int
    token: str = ""
    segments: Segments | None = None
    startup_seconds: float | None = None
    #: ``auto``'s choice once both one process and segments were measured
    decided: WorkerPlan | None = None
    #: shards/nodes/cpus of a distributed packed table ({}: local; None: not asked yet)
    distribution: dict[str, int] | None = None
    #: segment count → that count's last training time (the first iteration is not measured)
    measured: dict[int, float] = field(default_factory=dict)

    def plan(self, data: PackedData, epoch: int = 0) -> IterationPlan:
        """The next iteration's plan; opens (or closes) the segments it needs."""
        opts = self.options
        chunks = sync_rounds(opts.sync_every, 1, data.n_parameters)
        if self.distribution is None:
            self.distribution = self.backend.distribution(data.table) or {}
        if self.distribution:
            return self._distributed(chunks, data)
        workers = self.decided or plan_workers(
            opts.parallel,
            unavailable=self.backend.segments_unavailable(opts.parallel),
            cpus=self.cpus,
            serial_seconds=self.measured.get(1),
            remaining=max(1, opts.epochs - epoch),
            startup_seconds=0.0 if self.segments is not None else self.startup_seconds,
            measured=self.measured,
        )
        if opts.parallel == "auto" and len(self.measured) > 1:
            # one process and segments have both been measured: the choice holds for the rest
            # of the run (re-deciding on noisy times would reopen segments and pay start-up)
            self.decided = workers
        threads = threads_per_worker(self.cpus, workers.workers, opts.threads, data.n_parameters)
        segments = self._hold(workers.workers)
        note = workers.note
        if workers.workers > 1 and not opts.sync_every:
            # a small model's segments sync several times per epoch (as many rounds as leave
            # every segment buffers to train)
            rounds = sync_rounds(None, workers.workers, data.n_parameters)
            chunks = max(1, min(rounds, data.n_buffers // (2 * workers.workers)))
            if chunks > 1:
                note += f"; {chunks} sync rounds per epoch"
        return IterationPlan(chunks, workers.workers, note, threads, segments)

    def _distributed(self, chunks: int, data: PackedData) -> IterationPlan:
        """A distributed database (Citus): every shard holding buffers trains one partial
        model, the coordinator combines; each shard task gets its node's cores shared out."""
        d = self.distribution or {}
        shards, nodes = d["shards"], d["nodes"]
        per_node = -(-shards // max(1, nodes))
        threads = threads_per_worker(d["cpus"], per_node, self.options.threads, data.n_parameters)
        combine = ("the coordinator combines" if shards > 1 else
                   "one shard: the worker runs the whole aggregate, nothing to combine")
        note = (f"citus: {shards} shard(s) on {nodes} worker node(s), {threads} thread(s) each;"
                f" {combine}")
        return IterationPlan(chunks, 1, note, threads)

    def _hold(self, n: int) -> Segments | None:
        """The open segments for ``n`` (opened, or re-opened at another size, as needed)."""
        if n <= 1:
            self.close()
            return None
        if self.segments is not None and self.segments.size != n:
            self.close()
        if self.segments is None:
            started = time.perf_counter()
            self.segments = self.backend.open_segments(n, self.token)
            self.startup_seconds = time.perf_counter() - started
        return self.segments

    def measured_iteration(self, plan: IterationPlan, trained: float, first: bool) -> None:
        """Note how long an iteration trained with ``plan``'s segments (not the run's first:
        it also pays imports and caches; segments import torch when they open). Segments
        once measured, ``auto`` decides for the rest of the run (see :meth:`plan`)."""
        if not first:
            self.measured[plan.workers] = trained

    def close(self) -> None:
        """Stop the segments, if open."""
        if self.segments is not None:
            segments, self.segments = self.segments, None
            segments.close()


__all__ = ["IterationPlan", "IterationPlanner"]
