"""A training run: pack → iterate (one aggregate query each) → evaluate → checkpoint → pull back.

Each iteration commits its checkpoint and metrics in one transaction. Work tables (staged query,
packed buffers) are removed whatever happens (if the server is gone by then, by the next run or
listing); a failed or interrupted run keeps its last good checkpoint and records its status (if
it cannot, whoever looks next records it as interrupted: the run's session is gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from dbdl_magic.backends.base import Backend, Member, RunSession
from dbdl_magic.data.encoding import Encoding
from dbdl_magic.data.packing import PackedData, PackOptions, infer_encoding, pack, stage_query
from dbdl_magic.errors import DbdlError, InputError, SpecError, TrainingError
from dbdl_magic.events import Callbacks
from dbdl_magic.kernel.netbuild import SpecError as KernelSpecError
from dbdl_magic.kernel.netbuild import build_network
from dbdl_magic.kernel.train import initial_state, warm_start_state
from dbdl_magic.options import TrainOptions
from dbdl_magic.store import registry
from dbdl_magic.store.modules import DBModel, GroupedModel, load_stored
from dbdl_magic.store.spec import parse_spec
from dbdl_magic.training.policies import EarlyStopping, frozen_layers, warm_encoding
from dbdl_magic.training.scaling import (
    MIN_PARALLEL_SECONDS,
    WorkerPlan,
    cpu_count,
    plan_workers,
    threads_per_worker,
)
from dbdl_magic.training.selection import halving_rungs, maximize, rank, trial_options
from dbdl_magic.training.selection import label as trial_label
from dbdl_magic.training.selection import trials as search_trials

log = logging.getLogger(__name__)


def metrics_of(row: dict[str, Any]) -> dict[str, Any]:
    """The metric entries of a history row (``train_loss``, ``val_*``; not the timings)."""
    return {
        k: v for k, v in row.items() if k.startswith(("train_", "val_")) and k != "train_seconds"
    }


@dataclass
class MemberRun:
    """One model of a run: one per group, one per searched configuration, or the only one."""

    member: int
    key: dict[str, Any]
    config: dict[str, Any]
    options: TrainOptions
    label: str = ""
    group: str | None = None
    trial: dict[str, Any] | None = None
    status: str = "training"  # training | halved | early-stopped | complete
    train_rows: int = 0
    validation_rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopper: EarlyStopping | None = None

    def summary(self) -> dict[str, Any]:
        """The member's line in the run's table: status plus its last metrics."""
        last = self.history[-1] if self.history else {}
        out: dict[str, Any] = {"member": self.member, "label": self.label, "status": self.status,
                               "version": self.key["version"], "epoch": last.get("epoch", 0)}
        out.update(metrics_of(last))
        out["samples"] = last.get("samples", 0)
        return out

    def best_iteration(self) -> int | None:
        """The checkpoint that is the model when early stopping restores the best one."""
        if self.stopper is not None and self.options.restore_best:
            return self.stopper.best_iteration if self.stopper.best_iteration > 0 else None
        return None


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
    _startup_seconds: float | None = None
    _measured: dict[int, float] = field(default_factory=dict)  # workers → last train seconds
    _session: RunSession | None = None  # held from the start of execute() to its end
    fingerprint: str = ""  # of the packed data (rows, split, shuffle); a resume must match it

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
        return self.options.monitor

    def _tables(self) -> tuple[str, str, str]:
        t = self.token
        return (
            self.backend.table(f"stage_{t}"),
            self.backend.table(f"vstage_{t}"),
            self.backend.table(f"packed_{t}"),
        )

    def execute(self) -> DBModel | GroupedModel:
        """Run to completion (or early stop / interrupt) and return the trained module.

        The run holds a session (:meth:`Backend.open_session`) from start to end: other
        sessions see its model versions as being trained and its work tables as in use. A lost
        connection or server raises :class:`TrainingError` with the cause chained.
        """
        try:
            self._session = self.backend.open_session(self.token)
        except DBAPIError as exc:
            raise _translate(exc) from exc
        try:
            key = self._train()
            try:
                with self.backend.engine.connect() as conn:
                    return load_stored(conn, self.backend, key["name"], key["version"],
                                       self.options.device)
            except DBAPIError as exc:
                raise _translate(exc) from exc
        finally:
            self._session.close()

    def _train(self) -> dict[str, Any]:
        """Settle what sessions that are gone left behind, then pack, train and record; returns
        the key of the model to return. The work tables are dropped whatever happens (when
        even that fails, the run's own error is the one raised)."""
        opts, backend = self.options, self.backend
        trials = search_trials(opts)
        specs = [_spec(t.get("model", opts.model)) for t in trials] or [_spec(opts.model)]
        tables = self._tables()
        stage, vstage, packed_table = tables
        first_epoch = 0
        error: BaseException | None = None
        try:
            registry.mark_orphans(backend, self.name)
            registry.sweep_work_tables(backend)
            resumed = self._resumable() if opts.resume else None
            source = self._source() if opts.init_from and resumed is None else None
            data = self._pack(specs, stage, vstage, packed_table, source, trials)
            rungs = halving_rungs(opts.epochs, len(trials)) if trials and opts.halving else []
            with backend.engine.begin() as conn:
                if resumed is None:
                    self._create_members(conn, data, trials, source)
                else:
                    first_epoch = self._resume_members(conn, data, trials, resumed, rungs)
            self._announce(data, first_epoch)
            for epoch in range(first_epoch, opts.epochs):
                alive = [m for m in self.members if m.status == "training"]
                if not alive:
                    break
                self._iteration(data, alive, epoch, first=epoch == first_epoch)
                self._stop_members(alive, epoch + 1, rungs)
            with backend.engine.begin() as conn:
                return self._complete(conn, data)
        except KeyboardInterrupt as exc:
            error = exc
            if not self.members:
                raise
            self._mark_failed(exc)
            if opts.on_interrupt == "raise":
                raise
            key = self._interrupted(data)
            error = None
            return key
        except BaseException as exc:
            self._mark_failed(exc)
            error = _translate(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            self._cleanup(tables, error)

    def _cleanup(self, tables: tuple[str, ...], error: BaseException | None) -> None:
        """Drop the run's work tables. When that fails too (the server is still down), the
        run's own ``error`` stays the one raised: this failure is logged and noted on it, and
        the next run or listing drops the tables (:func:`registry.sweep_work_tables`)."""
        backend = self.backend
        try:
            with backend.engine.begin() as conn:
                for table in tables:
                    backend.drop_table(conn, table)
                backend.drop_scratch_tables(conn)
        except Exception as exc:
            why = _first_line(exc)
            log.warning("dbdl: dropping the work tables of run %s failed: %s", self.token, why)
            if error is not None:
                error.add_note(
                    f"dbdl: dropping the run's work tables failed too ({why}); the next run or "
                    "list_models drops them"
                )

    def _complete(self, conn: Connection, data: PackedData) -> dict[str, Any]:
        """Mark every member complete (at its best checkpoint when early stopping restores
        it) and return the key of the model the run returns."""
        for m in self.members:
            if m.status == "training":
                m.status = "complete"
            best = m.best_iteration()
            registry.set_status(conn, self.backend, m.key, "complete", m.history,
                             model_iteration=best)
            if best is not None:
                registry.ensure_hot_state(conn, self.backend, m.key, best)
        if self.cohort and self.history:  # final statuses in the run's last row
            self.history[-1]["members"] = [m.summary() for m in self.members]
        return self._finish_cohort(conn, data)

    def _interrupted(self, data: PackedData) -> dict[str, Any]:
        """``on_interrupt="return"``: the last completed iteration's model, or for several
        models the best trial / the router so far (re-raises when nothing has trained)."""
        if len(self.members) == 1:
            return self.members[0].key
        if not any(m.history for m in self.members):
            raise KeyboardInterrupt
        for m in self.members:
            m.status = "interrupted" if m.status == "training" else m.status
        with self.backend.engine.begin() as conn:
            return self._finish_cohort(conn, data, "interrupted")

    # -- steps ------------------------------------------------------------------------------------
    def _resumable(self) -> list[dict[str, Any]] | None:
        """The stored versions to continue: the model, or every member of a group_by / grid
        run (each with its stored history and last checkpoint), claimed for this run's session
        (another session still training them is an error). The run must have the same name,
        query and options, and not be complete. None when there is nothing to resume (no run
        of that name, or none with a checkpoint): the run starts afresh and warns so. Work
        tables a killed client left behind are dropped here; so is the provisional router /
        best copy of an interrupted cohort (the resumed run writes it again)."""
        backend = self.backend
        with backend.engine.connect() as conn:
            try:
                latest = registry.read_model(conn, backend, self.name, with_state=False)
            except InputError:
                return self._fresh(f"there is no run named {self.name!r}")
            token = latest["options"].get("work_token")
            run = registry.read_run(conn, backend, self.name, token) if token else []
        if latest["status"] == "complete":
            raise InputError(
                f"model {self.name!r} version {latest['version']} is complete; nothing to resume "
                "(train again without resume=True for a new version)"
            )
        cohort_version = any(k in latest["options"] for k in ("member", "groups", "selection"))
        if self.cohort:
            members = [r for r in run if r["options"].get("member") is not None]
        else:
            members = [] if cohort_version else [latest]
        if not members:
            raise InputError(
                f"cannot resume {self.name!r}: its last run "
                f"{'was not' if self.cohort else 'was'} a group_by / grid run; resume with the "
                "same query and options"
            )
        if any(row["iteration"] is None for row in members):
            return self._fresh(f"model {self.name!r} version {latest['version']} has no "
                               "checkpoint to resume from")
        for row in members:
            different = self._differences(row)
            if different:
                raise InputError(
                    f"cannot resume {self.name!r}: {', '.join(different)} differ(s) from the "
                    "interrupted run; resume with the same query and options"
                )
        with backend.engine.begin() as conn:
            backend.lock_name(conn, self.name)
            self._claim(conn, [row["version"] for row in members])
            for prefix in ("stage", "vstage", "packed") if token else ():
                backend.drop_table(conn, backend.table(f"{prefix}_{token}"))
            for row in run:
                if row["options"].get("member") is None and self.cohort:
                    registry.delete_model(conn, backend, self.name, row["version"])
        return members

    def _fresh(self, why: str) -> None:
        """``resume=True`` with nothing to resume: say so (a warning the API and the notebook
        show) and start a new run."""
        message = f"resume=True: {why}; starting a new run of {self.name!r} instead"
        log.info("dbdl: %s", message)
        warnings.warn(message, UserWarning, stacklevel=5)  # the caller of dl.train
        return None

    def _claim(self, conn: Connection, versions: list[int]) -> None:
        """Take model versions for this run's session, or raise when another session trains
        one of them."""
        assert self._session is not None
        taken = self._session.claim(conn, self.name, versions)
        if taken:
            raise TrainingError(
                f"model {self.name!r} version {taken[0]} is being trained by another session; "
                "wait for that run to end (or stop it) first"
            )

    def _differences(self, row: dict[str, Any]) -> list[str]:
        """What differs between a stored version (a member: its trial applied) and this run:
        the query, the model, options that shape the data or the updates."""
        trial = row["options"].get("trial")
        opts = trial_options(self.options, trial) if trial else self.options
        mine = json.loads(json.dumps(opts.to_json_dict(), default=str))  # as stored
        different = [k for k in TrainOptions.RESUME_KEYS if row["options"].get(k) != mine.get(k)]
        if row["query"] != self.query:
            different.insert(0, "query")
        if row["spec"] != _spec(opts.model):
            different.insert(0, "model")
        return different

    def _source(self) -> dict[str, Any]:
        """The stored model a warm start begins from (``init_from="name[:version]"``)."""
        name, _, version = str(self.options.init_from).partition(":")
        if version and not version.isdigit():
            raise InputError(f"init_from={self.options.init_from!r}: use 'name' or 'name:version'")
        with self.backend.engine.connect() as conn:
            try:
                number = int(version) if version else None
                return registry.read_model(conn, self.backend, name, number)
            except InputError as exc:
                raise InputError(f"init_from={self.options.init_from!r}: {exc}") from exc

    def _pack(
        self,
        specs: list[dict[str, Any]],
        stage: str,
        vstage: str,
        packed: str,
        source: dict[str, Any] | None,
        trials: list[dict[str, Any]],
    ) -> PackedData:
        """Stage, encode and pack in one transaction; the staged copies are dropped after."""
        opts, backend = self.options, self.backend
        pack_opts = PackOptions(
            target=opts.target,
            features=opts.features,
            task=opts.task,
            validation=opts.validation,
            impute=opts.impute,
            max_categories=opts.max_categories,
            image_shape=opts.image_shape,
            rows_per_buffer=opts.rows_per_buffer,
            batch_size=max([opts.batch_size] + [t.get("batch_size", 0) for t in trials]),
            seed=opts.seed,
            group_by=opts.group_by,
        )
        with backend.engine.begin() as conn:
            stage_query(backend, conn, self.query, opts.params, stage, deterministic=True)
            encoding, n_rows = infer_encoding(backend, conn, stage, pack_opts)
            if source is not None:  # encode the new rows exactly as the source model did
                encoding = warm_encoding(
                    encoding, Encoding.from_json(source["encoding"]), str(opts.init_from)
                )
            batch = max(1, min(pack_opts.batch_size, n_rows))
            pack_opts.n_parameters = max(_check_spec_fits(s, encoding, batch) for s in specs)
            if opts.validation_query:
                stage_query(
                    backend, conn, opts.validation_query, opts.params, vstage, "validation query",
                    deterministic=True,
                )
                _check_columns(backend, conn, vstage, encoding, opts.group_by)
            data = pack(
                backend,
                conn,
                stage,
                packed,
                encoding,
                n_rows,
                pack_opts,
                vstage if opts.validation_query else None,
            )
            backend.drop_table(conn, stage)
            backend.drop_table(conn, vstage)
            self.fingerprint = data.fingerprint
            return data

    def _config(self, spec: dict[str, Any], enc: Encoding, opts: TrainOptions) -> dict[str, Any]:
        config = {
            "spec": spec,
            "input_shape": enc.input_shape,
            "n_outputs": enc.target.n_outputs,
            "task": enc.target.task,
            "optimizer": opts.optimizer_config(),
            "batch_size": opts.batch_size,
            "seed": opts.seed,
            "epoch": 0,
            "device": opts.db_device,
            "byteorder": self.backend.byteorder,
            "target_scale": [enc.target.mean, enc.target.std],
            "run": self.token,
        }
        config["freeze"] = frozen_layers(opts.freeze, spec, enc)
        return config

    def _member_plan(
        self, data: PackedData, trials: list[dict[str, Any]]
    ) -> list[tuple[str, str | None, dict[str, Any] | None]]:
        """``(label, group, trial)`` of every member, in member order."""
        if data.groups is not None:
            by = self.options.group_by
            if trials:  # a search in every group: each group picks its best configuration
                return [(f"{by}={g} {trial_label(t)}", g, t) for g in data.groups for t in trials]
            return [(f"{by}={g}", g, None) for g in data.groups]
        if trials:
            return [(trial_label(t), None, t) for t in trials]
        return [("", None, None)]

    def _create_members(
        self,
        conn: Connection,
        data: PackedData,
        trials: list[dict[str, Any]],
        source: dict[str, Any] | None,
    ) -> None:
        """A model version and checkpoint 0 for every member."""
        backend, enc = self.backend, data.encoding
        backend.lock_name(conn, self.name)  # until this transaction commits the new rows
        first_version = registry.next_version(conn, backend, self.name)
        plan = self._member_plan(data, trials)
        self._claim(conn, list(range(first_version, first_version + len(plan))))
        for i, (label, group, trial) in enumerate(plan):
            opts = trial_options(self.options, trial) if trial else self.options
            spec = _spec(opts.model)
            key = {"name": self.name, "version": first_version + i}
            member = self._member_run(data, i, key, opts, label, group, trial)
            registry.create_model(
                conn,
                backend,
                key,
                spec=spec,
                encoding=enc.to_json(),
                options=self._stored_options(member),
                query=self.query,
                parent=f"{source['name']}:{source['version']}" if source else None,
            )
            config = member.config
            if source is None:
                first, parent = initial_state(config), None
            else:
                first, copied = warm_start_state(config, source["state"])
                if not copied:
                    raise InputError(
                        f"init_from={self.options.init_from!r}: no layer of that model fits "
                        "this architecture (no tensor has the same name and shape)"
                    )
                parent = (source["name"], source["version"], source["iteration"])
            registry.write_checkpoint(conn, backend, key, 0, first)
            backend.archive(conn, key, 0, parent, opts.block_bytes, opts.deltas)
            self.members.append(member)

    def _stored_options(self, m: MemberRun) -> dict[str, Any]:
        """A member's options as its model version stores them (with this run's work token)."""
        stored = {**m.options.to_json_dict(), "work_token": self.token,
                  "data_fingerprint": self.fingerprint}
        if self._session is not None and self._session.record:  # who trains it (SQLite)
            stored["session"] = self._session.record
        if self.cohort:
            stored.update(member=m.member, label=m.label, group=m.group, trial=m.trial)
        return stored

    def _member_run(
        self, data: PackedData, i: int, key: dict[str, Any], opts: TrainOptions, label: str,
        group: str | None, trial: dict[str, Any] | None,
    ) -> MemberRun:
        rows = (data.groups or {}).get(group or "", {})
        return MemberRun(
            i, key, {**self._config(_spec(opts.model), data.encoding, opts), "member": i}, opts,
            label, group, trial,
            train_rows=rows.get("train", data.n_train),
            validation_rows=rows.get("validation", data.n_val),
            stopper=EarlyStopping(opts) if opts.patience else None,
        )

    def _resume_members(
        self,
        conn: Connection,
        data: PackedData,
        trials: list[dict[str, Any]],
        stored: list[dict[str, Any]],
        rungs: list[int],
    ) -> int:
        """Continue a stored run: its members with their committed histories, and the early
        stopping / halving decisions replayed from those histories (they depend on nothing
        else). Returns the first epoch still to train."""
        plan = self._member_plan(data, trials)
        if not self.cohort:
            plan = plan[:1]
        before = {r["options"].get("data_fingerprint") for r in stored} - {None}
        if before and before != {data.fingerprint}:
            raise InputError(
                f"cannot resume {self.name!r}: its training rows, split or shuffle differ from "
                "the interrupted run's (the data changed since); train a new version instead"
            )
        if [(label, group) for label, group, _ in plan] != [
            (r["options"].get("label", ""), r["options"].get("group")) for r in stored
        ]:
            raise InputError(
                f"cannot resume {self.name!r}: the {'groups' if data.groups else 'trials'} "
                "differ from the interrupted run's"
            )
        full: dict[int, list[dict[str, Any]]] = {}
        for i, ((label, group, trial), row) in enumerate(zip(plan, stored, strict=True)):
            opts = trial_options(self.options, trial) if trial else self.options
            key = {"name": self.name, "version": row["version"]}
            self.members.append(self._member_run(data, i, key, opts, label, group, trial))
            full[i] = list(row["history"] or [])[: int(row["iteration"])]
        done = max(len(h) for h in full.values())
        for epoch in range(done):  # replay: the members live at each epoch, their decisions
            alive = [m for m in self.members if m.status == "training"]
            if any(len(full[m.member]) <= epoch for m in alive):
                break
            rows = {m.member: full[m.member][epoch] for m in alive}
            for m in alive:
                m.history.append(rows[m.member])
            first = next(iter(rows.values()))
            self.history.append(self._run_row(rows, first["seconds"], first["train_seconds"]))
            self._stop_members(alive, epoch + 1, rungs)
        if any(len(m.history) != len(full[m.member]) for m in self.members):
            raise InputError(
                f"cannot resume {self.name!r}: its members' checkpoints do not line up with "
                "the run's early stopping / halving (were epochs, patience or halving changed?)"
            )
        for m in self.members:
            if m.status == "training":
                registry.ensure_hot_state(conn, self.backend, m.key, len(m.history))
            registry.set_status(conn, self.backend, m.key, "training", m.history)
            registry.set_options(conn, self.backend, m.key, self._stored_options(m))
        return done

    def _announce(self, data: PackedData, first_epoch: int) -> None:
        if self.callbacks.on_start is None:
            return
        first = self.members[0]
        info: dict[str, Any] = {
            **first.key,
            "database": self.backend.describe(),
            "backend": self.backend.name,
            "rows": data.n_train,
            "validation_rows": data.n_val,
            "buffers": data.n_buffers,
            "parameters": data.n_parameters,
            "workers": self.options.parallel if self.backend.supports_parallel else 1,
            "epochs": self.options.epochs,
            "first_epoch": first_epoch,
            "device": "cuda"
            if self.options.db_device != "cpu" and self.server.get("cuda")
            else "cpu",
            "cohort": self.cohort,
        }
        if self.cohort:
            info["members"] = [
                {"member": m.member, "label": m.label, "version": m.key["version"],
                 "group": m.group, "trial": m.trial}
                for m in self.members
            ]
            info["selection_metric"] = self.selection_metric
            info["selection_mode"] = "max" if maximize(self.selection_metric) else "min"
            info["group_by"] = self.options.group_by
        self.callbacks.on_start(info)

    def _plan(self, data: PackedData, queries: int) -> WorkerPlan:
        """Workers for the next iteration; measures a worker's start-up when it may pay off."""
        opts, backend = self.options, self.backend
        serial = self._measured.get(1)  # the last one-process iteration's training time
        if (
            opts.parallel == "auto"
            and backend.supports_parallel
            and serial is not None
            and serial >= MIN_PARALLEL_SECONDS
            and self._startup_seconds is None
        ):
            with backend.engine.begin() as conn:
                self._startup_seconds = backend.measure_worker_startup(conn, data.table)
        return plan_workers(
            opts.parallel,
            supports_parallel=backend.supports_parallel,
            cpus=self.cpus,
            serial_seconds=serial,
            startup_seconds=self._startup_seconds,
            queries=queries,
            measured=self._measured,
        )

    def _iteration(
        self, data: PackedData, alive: list[MemberRun], epoch: int, first: bool = False
    ) -> None:
        """One iteration of every live member: the aggregate query (or ``sync_every`` parts),
        evaluation, checkpoints; committed together."""
        backend, opts = self.backend, self.options
        chunks = math.ceil(1 / opts.sync_every) if opts.sync_every else 1
        plan = self._plan(data, chunks)
        threads = threads_per_worker(self.cpus, plan.workers, opts.threads, data.n_parameters)
        payload = [
            Member(m.member, m.key["name"], m.key["version"],
                   {**m.config, "epoch": epoch, "threads": threads, "parallel": plan.workers},
                   m.group)
            for m in alive
        ]
        started = time.perf_counter()
        progress = None
        if self.callbacks.on_progress is not None:
            sink, total = self.callbacks.on_progress, sum(m.train_rows for m in alive)
            progress = lambda done: sink(done, total)  # noqa: E731
        with backend.engine.begin() as conn:
            infos = backend.train_iteration(
                conn, data.table, payload, epoch, workers=plan.workers, chunks=chunks,
                progress=progress, run=self.token,
            )
            trained = time.perf_counter() - started
            split, prefix = (1, "val_") if data.n_val else (0, "train_")
            metrics = backend.evaluate(conn, data.table, split, payload, epoch + 1, plan.workers)
            archived = backend.archive_many(
                conn, [m.key for m in alive], epoch + 1, opts.block_bytes, opts.deltas
            )
            seconds = time.perf_counter() - started
            rows: dict[int, dict[str, Any]] = {}
            for m, stored in zip(alive, archived, strict=True):
                info = infos.get(m.member, {})
                row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": info.get("loss")}
                for name, value in metrics.get(m.member, {}).items():
                    if name != "n":
                        row[f"{prefix}{name}"] = value
                row.update(
                    seconds=seconds,
                    train_seconds=trained,
                    samples=info.get("samples", 0),
                    workers=info.get("workers", 1),
                    combines=info.get("combines", 0),
                    db_device=info.get("device"),
                    stored_bytes=stored["new_bytes"],
                    parallel_note=plan.note,
                )
                rows[m.member] = row
            registry.record_iteration(
                conn, backend, epoch + 1, [(m.key, rows[m.member], [*m.history, rows[m.member]])
                                          for m in alive]
            )
        self._record(alive, rows, time.perf_counter() - started, trained)
        if not first:  # the first iteration also pays imports and caches
            self._measured[plan.workers] = trained

    def _record(
        self, alive: list[MemberRun], rows: dict[int, dict[str, Any]], seconds: float,
        trained: float,
    ) -> None:
        """After an iteration's commit: its rows join the histories and the monitors see them.
        (An interrupt before the commit leaves them out; one after it is reconciled from the
        database by :meth:`_mark_failed`.)"""
        for m in alive:
            m.history.append(rows[m.member])
        run_row = self._run_row(rows, seconds, trained)
        self.history.append(run_row)
        if self.callbacks.on_iteration is not None:
            self.callbacks.on_iteration(run_row)

    def _run_row(
        self, rows: dict[int, dict[str, Any]], seconds: float, trained: float
    ) -> dict[str, Any]:
        """The row a monitor shows: the member's own, or a summary plus every member's line."""
        if not self.cohort:
            return dict(next(iter(rows.values())))
        first = next(iter(rows.values()))
        out: dict[str, Any] = {"epoch": first["epoch"]}
        metric_names = list(metrics_of(first))
        if self.cohort == "selection":
            best = rank(rows, self.selection_metric)[0]
            out.update({k: rows[best].get(k) for k in metric_names})
        else:  # groups: means weighted by each group's rows (a searching group: its best)
            by_member = {m.member: m for m in self.members}
            if self.options.grid:
                best = [rank({m.member: rows[m.member] for m in ms}, self.selection_metric)[0]
                        for ms in _by_group([by_member[i] for i in rows]).values()]
                rows = {i: rows[i] for i in best}
            for name in metric_names:
                pairs = [
                    (r[name], by_member[i].validation_rows if name.startswith("val_")
                     else by_member[i].train_rows)
                    for i, r in rows.items() if r.get(name) is not None
                ]
                weight = sum(w for _, w in pairs)
                out[name] = sum(v * w for v, w in pairs) / weight if weight else None
        out.update(
            seconds=seconds,
            train_seconds=trained,
            samples=sum(r["samples"] for r in rows.values()),
            workers=max(r["workers"] for r in rows.values()),
            combines=sum(r["combines"] for r in rows.values()),
            db_device=first["db_device"],
            stored_bytes=sum(r["stored_bytes"] for r in rows.values()),
            parallel_note=first["parallel_note"],
            members=[m.summary() for m in self.members],
        )
        return out

    def _stop_members(self, alive: list[MemberRun], epoch: int, rungs: list[int]) -> None:
        """Early stopping per member; successive halving of a search's trials at its rungs."""
        for m in alive:
            row = m.history[-1]
            watched = m.stopper is not None and (m.stopper.monitor in row or not self.cohort)
            if watched and m.stopper.update(row):
                m.status = "early-stopped"
        if epoch in rungs:  # within each group when every group runs its own search
            for live in _by_group([m for m in alive if m.status == "training"]).values():
                ranked = rank({m.member: m.history[-1] for m in live}, self.selection_metric)
                keep = set(ranked[: max(1, math.ceil(len(ranked) / 2))])
                for m in live:
                    if m.member not in keep:
                        m.status = "halved"
        if self.cohort and self.history:  # the statuses after this iteration's decisions
            self.history[-1]["members"] = [m.summary() for m in self.members]

    def _finish_cohort(
        self, conn: Connection, data: PackedData, status: str = "complete"
    ) -> dict[str, Any]:
        """The model the run returns: the only member, the best trial stored as the newest
        version, or the router version of a per-group run (``status``: how the run ended)."""
        backend, opts = self.backend, self.options
        if not self.cohort:
            return self.members[0].key
        backend.lock_name(conn, self.name)  # another run of this name may allocate too
        key = {"name": self.name, "version": registry.next_version(conn, backend, self.name)}
        stored = {**opts.to_json_dict(), "work_token": self.token}
        if self.cohort == "groups":
            if opts.grid:  # every group searched: route to each group's best trial
                boards = {g: self.leaderboard(ms) for g, ms in _by_group(self.members).items()}
                stored["groups"] = {g: board[0]["version"] for g, board in boards.items()}
                stored["selection"] = {"metric": self.selection_metric, "leaderboards": boards}
            else:
                stored["groups"] = {m.group: m.key["version"] for m in self.members}
            registry.create_model(
                conn, backend, key, spec=_spec(opts.model), encoding=data.encoding.to_json(),
                options=stored, query=self.query,
            )
            registry.set_status(conn, backend, key, status, self.history)
            return key
        board = self.leaderboard()
        best = next(m for m in self.members if m.key["version"] == board[0]["version"])
        iteration = best.best_iteration() or len(best.history)
        stored.update(
            selection={"metric": self.selection_metric, "leaderboard": board,
                       "best_version": best.key["version"]},
            trial=best.trial, label=best.label,
        )
        registry.create_model(
            conn, backend, key, spec=_spec(best.options.model),
            encoding=data.encoding.to_json(), options=stored, query=self.query,
            parent=f"{self.name}:{best.key['version']}",
        )
        registry.copy_checkpoint(conn, backend, best.key, iteration, key)
        backend.archive(conn, key, iteration, (self.name, best.key["version"], iteration),
                        opts.block_bytes, opts.deltas)
        registry.set_status(conn, backend, key, status, best.history[:iteration],
                         model_iteration=iteration)
        return key

    def leaderboard(self, members: list[MemberRun] | None = None) -> list[dict[str, Any]]:
        """Trials (of ``members``, default all) best first by the selection metric at each
        one's model checkpoint."""
        lines = {}
        for m in self.members if members is None else members:
            at = m.best_iteration() or len(m.history)
            line = m.summary()
            if m.history:
                row = m.history[at - 1]
                line.update(metrics_of(row))
            line["epochs"] = len(m.history)
            lines[m.member] = line
        order = rank(lines, self.selection_metric)
        return [{"rank": r + 1, **lines[i]} for r, i in enumerate(order)]

    def _mark_failed(self, exc: BaseException) -> None:
        """Record how the run ended; keep each member's committed history, which is the truth
        (an interrupt may land after an iteration's commit but before the in-memory lists
        caught up), and bring the in-memory histories level with it."""
        lost = isinstance(exc, KeyboardInterrupt) or _connection_lost(exc)
        status = "interrupted" if lost else "failed"
        for m in self.members:
            with contextlib.suppress(Exception), self.backend.engine.begin() as conn:
                registry.set_status(conn, self.backend, m.key, status, error=str(exc)[:2000])
                row = registry.read_model(conn, self.backend, m.key["name"], m.key["version"],
                                       with_state=False)
                m.history = list(row["history"] or [])
        committed = max((len(m.history) for m in self.members), default=0)
        while len(self.history) < committed:  # run rows of iterations committed unseen
            epoch = len(self.history)
            rows = {m.member: m.history[epoch] for m in self.members if len(m.history) > epoch}
            first = next(iter(rows.values()))
            self.history.append(self._run_row(rows, first["seconds"], first["train_seconds"]))


def _by_group(members: list[MemberRun]) -> dict[str | None, list[MemberRun]]:
    """Members by group, in member order (one entry, ``None``, without group_by)."""
    out: dict[str | None, list[MemberRun]] = {}
    for m in members:
        out.setdefault(m.group, []).append(m)
    return out


def _spec(model: Any) -> dict[str, Any]:
    try:
        return parse_spec(model)
    except KernelSpecError as exc:
        raise SpecError(str(exc)) from exc


def _check_spec_fits(spec: dict[str, Any], enc: Encoding, batch_size: int = 1) -> int:
    """Build the network once to check it fits the data and the kernels' size limits for
    batches of ``batch_size`` rows (before anything is packed); returns its parameter count."""
    try:
        net = build_network(spec, enc.input_shape, enc.target.n_outputs, batch_size)
        return sum(p.numel() for p in net.parameters())
    except KernelSpecError as exc:
        raise SpecError(f"model spec does not fit the data: {exc}") from exc


def _check_columns(
    backend: Backend, conn: Connection, table: str, enc: Encoding, group_by: str | None = None
) -> None:
    kinds = backend.column_kinds(conn, table)
    wanted = [*enc.feature_names(), enc.target.name] + ([group_by] if group_by else [])
    missing = [c for c in wanted if c not in kinds]
    if missing:
        raise InputError(f"the validation query lacks column(s) {', '.join(map(repr, missing))}")


def _translate(exc: BaseException) -> BaseException:
    """Database errors become :class:`TrainingError` with the server's message as ``detail``
    (a lost connection says that the last completed iteration is kept)."""
    if isinstance(exc, (DbdlError, KeyboardInterrupt)):
        return exc
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig) if exc.orig is not None else str(exc)
        context = getattr(getattr(exc.orig, "diag", None), "context", None)
        if context:  # PL/Python puts the kernel's traceback here
            detail = f"{detail}\n{context}"
        first = detail.strip().splitlines()[0] if detail.strip() else "database error"
        if "database is locked" in first:  # SQLite: another session kept the write lock
            return TrainingError(
                f"the database failed during training: {first} (another session kept its "
                "write lock too long: SQLite lets one session write at a time; try again when "
                "the other run ends, or use PostgreSQL for concurrent runs)",
                detail=detail,
            )
        if _connection_lost(exc):
            return TrainingError(
                f"the connection to the database was lost during training ({first}); the last "
                "completed iteration is stored: train again with resume=True to continue",
                detail=detail,
            )
        return TrainingError(f"the database failed during training: {first}", detail=detail)
    return exc


#: SQLSTATEs of a session the server ended: admin_shutdown, crash_shutdown, cannot_connect_now
_ENDED_SESSION = frozenset({"57P01", "57P02", "57P03"})


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is the database connection going away (server restarted or stopped,
    session terminated) rather than an error of the statement."""
    if not isinstance(exc, DBAPIError):
        return False
    code = str(getattr(exc.orig, "sqlstate", None) or "")
    return bool(exc.connection_invalidated) or code.startswith("08") or code in _ENDED_SESSION


def _first_line(exc: BaseException) -> str:
    """The first line of an error (a database error's own message, without the SQL)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """History rows → DataFrame, one row per iteration."""
    return pd.DataFrame(history)


def generated_name() -> str:
    """A readable unique model name: ``model_YYYYmmdd_HHMMSS_xxxx``."""
    return time.strftime("model_%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:4]


__all__ = ["Callbacks", "MemberRun", "TrainingRun", "generated_name", "history_frame"]
