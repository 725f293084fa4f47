"""A training run: pack → iterate (one aggregate query each) → evaluate → checkpoint → finish.

:class:`TrainingRun` is the loop; what happens between iterations is its hooks'
(:mod:`~dbdl_magic.training.hooks`: history, monitors, early stopping, successive halving,
interrupts). Each iteration commits its checkpoint and metrics in one transaction. Work tables
(staged query, packed buffers) are removed whatever happens (if the server is gone by then, by
the next run or listing); a failed or interrupted run keeps its last good checkpoint and records
its status (if it cannot, whoever looks next records it as interrupted: the run's session is
gone).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from dbdl_magic.backends.base import Backend, Member, RunSession
from dbdl_magic.data.packing import PackedData
from dbdl_magic.events import Callbacks
from dbdl_magic.options import TrainOptions
from dbdl_magic.store import registry
from dbdl_magic.store.modules import DBModel, GroupedModel, load_stored
from dbdl_magic.training import cohort, failures, resume
from dbdl_magic.training.history import member_row
from dbdl_magic.training.hooks import (
    EarlyStop,
    Halving,
    Hook,
    HookList,
    Iteration,
    RecordHistory,
    RecordStatuses,
    ReturnOnInterrupt,
)
from dbdl_magic.training.members import MemberRun, create_members
from dbdl_magic.training.monitor import MonitorHook
from dbdl_magic.training.planning import IterationPlanner
from dbdl_magic.training.prepare import pack_data, spec_of, warm_start_source
from dbdl_magic.training.scaling import cpu_count
from dbdl_magic.training.selection import halving_rungs
from dbdl_magic.training.selection import trials as search_trials


@dataclass
class TrainingRun:
    """Orchestrates one training run of ``query`` with ``options`` on ``backend``.

    A run trains one model, or several side by side in the same aggregate queries: one per
    value of ``group_by``, or one per configuration of a ``grid``/random search.
    """

    backend: Backend
    query: str
    options: TrainOptions
    name: str
    callbacks: Callbacks = field(default_factory=Callbacks)
    server: dict[str, Any] = field(default_factory=dict)  # the kernel's facts (cuda, cpus, ...)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    history: list[dict[str, Any]] = field(default_factory=list)
    members: list[MemberRun] = field(default_factory=list)
    hooks: HookList = field(default_factory=HookList)  # set up by execute()
    session: RunSession | None = None  # held from the start of execute() to its end
    data: PackedData | None = None  # the packed rows, once packed
    planner: IterationPlanner | None = None  # plans iterations and holds the segments

    @property
    def cohort(self) -> str | None:
        """``"groups"``, ``"selection"`` or None (one model)."""
        if self.options.group_by:
            return "groups"
        return "selection" if self.options.grid else None

    @property
    def cpus(self) -> int:
        """Cores of the machine running the kernels (the server's when it has workers)."""
        return cpu_count(self.server if self.backend.supports_parallel else None)

    @property
    def selection_metric(self) -> str:
        """The metric that ranks trials (and that early stopping watches)."""
        return self.options.monitor

    @property
    def packed(self) -> PackedData:
        """The packed rows (once the run has packed them)."""
        if self.data is None:
            raise RuntimeError("the run has not packed its data yet")
        return self.data

    def execute(self) -> DBModel | GroupedModel:
        """Run to completion (or early stop / interrupt) and return the trained module.

        The run holds a session (:meth:`Backend.open_session`) from start to end: other
        sessions see its model versions as being trained and its work tables as in use. A lost
        connection or server raises :class:`TrainingError` with the cause chained.
        """
        try:
            self.session = self.backend.open_session(self.token)
        except DBAPIError as exc:
            raise failures.translate(exc) from exc
        try:
            key = self._train()
            try:
                with self.backend.engine.connect() as conn:
                    return load_stored(conn, self.backend, key["name"], key["version"],
                                       self.options.device)
            except DBAPIError as exc:
                raise failures.translate(exc) from exc
        finally:
            self.session.close()

    def _train(self) -> dict[str, Any]:
        """The loop: settle what sessions that are gone left behind; resume, or pack and
        create the members; train every live member each iteration; complete. Returns the
        key of the model to return. The work tables are dropped whatever happens (when even
        that fails, the run's own error is the one raised)."""
        opts, backend = self.options, self.backend
        trials = search_trials(opts)
        specs = [spec_of(t.get("model", opts.model)) for t in trials] or [spec_of(opts.model)]
        self.hooks = self._standard_hooks(trials)
        tables = self._tables()
        error: BaseException | None = None
        try:
            registry.mark_orphans(backend, self.name)
            registry.sweep_work_tables(backend)
            resumed = resume.resumable(self) if opts.resume else None
            source = None
            if opts.init_from and resumed is None:
                source = warm_start_source(backend, opts.init_from)
            self.data = pack_data(backend, self.query, opts, tables, specs, trials, source)
            first_epoch = self._start_members(trials, source, resumed)
            self.hooks.on_run_start(self, first_epoch)
            self.planner = IterationPlanner(backend, opts, self.cpus, self.token)
            for epoch in range(first_epoch, opts.epochs):
                alive = [m for m in self.members if m.status == "training"]
                if not alive:
                    break
                self._iteration(self.planner, alive, epoch, first=epoch == first_epoch)
            self.planner.close()
            return self._finish()
        except KeyboardInterrupt as exc:
            error = exc
            if not self.members:
                raise
            failures.mark_failed(self, exc)
            key = self.hooks.on_interrupt(self, exc)
            if key is None:
                raise
            error = None
            return key
        except BaseException as exc:
            failures.mark_failed(self, exc)
            error = failures.translate(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            if self.planner is not None:
                self.planner.close()
            failures.cleanup(self, tables, error)

    def _standard_hooks(self, trials: list[dict[str, Any]]) -> HookList:
        """The hooks of every run, in the order they are called (see :mod:`hooks`)."""
        opts = self.options
        rungs = halving_rungs(opts.epochs, len(trials)) if trials and opts.halving else []
        hooks: list[Hook] = [RecordHistory(), MonitorHook(self.callbacks), EarlyStop()]
        if rungs:
            hooks.append(Halving(rungs))
        hooks.append(RecordStatuses())
        if opts.on_interrupt == "return":
            hooks.append(ReturnOnInterrupt())
        return HookList(hooks)

    def _tables(self) -> tuple[str, str, str]:
        """The run's work tables: staged query, staged validation query, packed buffers."""
        t = self.token
        return (
            self.backend.table(f"stage_{t}"),
            self.backend.table(f"vstage_{t}"),
            self.backend.table(f"packed_{t}"),
        )

    def _start_members(
        self, trials: list[dict[str, Any]], source: dict[str, Any] | None,
        resumed: list[dict[str, Any]] | None,
    ) -> int:
        """The members: new versions (:meth:`_create_members`), or the ``resumed`` ones with
        their histories replayed. Returns the first epoch to train."""
        with self.backend.engine.begin() as conn:
            if resumed is None:
                self._create_members(conn, trials, source)
                return 0
            return resume.resume_members(self, conn, trials, resumed)

    def _create_members(
        self, conn: Connection, trials: list[dict[str, Any]], source: dict[str, Any] | None
    ) -> None:
        """A new run's members: a model version and checkpoint 0 each."""
        create_members(self, conn, trials, source)

    def _finish(self) -> dict[str, Any]:
        """The members marked complete, the hooks told, the run's model stored (the best
        trial's copy, the router): returns its key."""
        with self.backend.engine.begin() as conn:
            cohort.complete_members(self, conn)
            self.hooks.on_run_end(self)
            return cohort.finish(self, conn)

    def _iteration(
        self, planner: IterationPlanner, alive: list[MemberRun], epoch: int, first: bool = False
    ) -> None:
        """One iteration of every live member: the aggregate query (or ``sync_every`` parts),
        evaluation, checkpoints and history rows, committed together; then recorded."""
        backend, opts, data = self.backend, self.options, self.packed
        plan = planner.plan(data, epoch)
        outer = None
        if opts.averaging == "outer":
            outer = {"outer_lr": opts.outer_lr, "outer_momentum": opts.outer_momentum}
        payload = [
            Member(m.member, m.key["name"], m.key["version"],
                   {**m.config, "epoch": epoch, "threads": plan.threads, "parallel": plan.workers},
                   m.group)
            for m in alive
        ]
        progress = self.hooks.progress(self, sum(m.train_rows for m in alive))
        started = time.perf_counter()
        with backend.engine.begin() as conn:
            infos = backend.train_iteration(
                conn, data.table, payload, epoch, chunks=plan.chunks, progress=progress,
                run=self.token, segments=plan.segments, outer=outer,
            )
            trained = time.perf_counter() - started
            split, prefix = (1, "val_") if data.n_val else (0, "train_")
            metrics = backend.evaluate(conn, data.table, split, payload, epoch + 1)
            archived = backend.archive_many(
                conn, [m.key for m in alive], epoch + 1, opts.block_bytes, opts.deltas
            )
            seconds = time.perf_counter() - started
            rows: dict[int, dict[str, Any]] = {}
            for m, stored in zip(alive, archived, strict=True):
                info = infos.get(m.member, {})
                rows[m.member] = member_row(
                    epoch + 1, info, metrics.get(m.member, {}), prefix,
                    seconds=seconds, train_seconds=trained, samples=info.get("samples", 0),
                    workers=info.get("workers", 1), combines=info.get("combines", 0),
                    db_device=info.get("device"), stored_bytes=stored["new_bytes"],
                    parallel_note=plan.note,
                )
            registry.record_iteration(
                conn, backend, epoch + 1,
                [(m.key, rows[m.member], [*m.history, rows[m.member]]) for m in alive],
            )
        self._record(alive, rows, time.perf_counter() - started, trained)
        planner.measured_iteration(plan, trained, first)

    def _record(
        self, alive: list[MemberRun], rows: dict[int, dict[str, Any]], seconds: float,
        trained: float,
    ) -> None:
        """After an iteration's commit: its rows join the histories and the hooks see it.
        (An interrupt before the commit leaves them out; one after it is reconciled from the
        database by :func:`failures.mark_failed`.)"""
        epoch = next(iter(rows.values()))["epoch"]
        self.end_iteration(Iteration(epoch, alive, rows, seconds, trained))

    def end_iteration(self, it: Iteration) -> None:
        """A committed (or replayed) iteration: each member's row joins its history, then
        the hooks record, report and decide."""
        for m in it.members:
            m.history.append(it.rows[m.member])
        self.hooks.on_iteration_end(self, it)


def generated_name() -> str:
    """A readable unique model name: ``model_YYYYmmdd_HHMMSS_xxxx``."""
    return time.strftime("model_%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:4]


__all__ = ["Callbacks", "TrainingRun", "generated_name"]
