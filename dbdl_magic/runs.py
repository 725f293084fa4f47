"""A training run: pack → iterate (one aggregate query each) → evaluate → checkpoint → pull back.

Each iteration commits its checkpoint and metrics in one transaction. Work tables (staged query,
packed buffers) are removed whatever happens; a failed or interrupted run keeps its last good
checkpoint and records its status.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from . import store
from .backends.base import Backend
from .encoding import Encoding
from .errors import DbdlError, InputError, SpecError, TrainingError
from .kernel.netbuild import SpecError as KernelSpecError
from .kernel.netbuild import build_network
from .kernel.train import initial_state, warm_start_state
from .model import DBModel, model_from_stored
from .options import TrainOptions
from .packing import PackedData, PackOptions, infer_encoding, pack, stage_query
from .policies import EarlyStopping, frozen_layers, warm_encoding
from .spec import parse_spec


@dataclass
class Callbacks:
    """Hooks for monitors: run start facts, each iteration's row, in-iteration progress."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_iteration: Callable[[dict[str, Any]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (samples done, samples per epoch)


@dataclass
class TrainingRun:
    """Orchestrates one training run of ``query`` with ``options`` on ``backend``."""

    backend: Backend
    query: str
    options: TrainOptions
    name: str
    callbacks: Callbacks = field(default_factory=Callbacks)
    server: dict[str, Any] = field(default_factory=dict)  # the kernel's facts (cuda, torch, ...)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    history: list[dict[str, Any]] = field(default_factory=list)

    def _tables(self) -> tuple[str, str, str]:
        t = self.token
        return (
            self.backend.table(f"stage_{t}"),
            self.backend.table(f"vstage_{t}"),
            self.backend.table(f"packed_{t}"),
        )

    def execute(self) -> DBModel:
        """Run to completion (or early stop / interrupt) and return the trained module."""
        opts, backend = self.options, self.backend
        spec = _spec(opts.model)
        stage, vstage, packed_table = self._tables()
        key: dict[str, Any] | None = None
        stopper = EarlyStopping(opts) if opts.patience else None
        try:
            resumed = self._resumable(spec) if opts.resume else None
            source = self._source() if opts.init_from and resumed is None else None
            data = self._pack(spec, stage, vstage, packed_table, source)
            enc = data.encoding
            config = self._config(spec, enc)
            config["freeze"] = frozen_layers(opts.freeze, spec, enc)
            stored_options = {**opts.to_json_dict(), "work_token": self.token}
            first_epoch = 0
            with backend.engine.begin() as conn:
                if resumed is None:
                    version = store.next_version(conn, backend, self.name)
                    key = {"name": self.name, "version": version}
                    store.create_model(
                        conn,
                        backend,
                        key,
                        spec=spec,
                        encoding=enc.to_json(),
                        options=stored_options,
                        query=self.query,
                        parent=f"{source['name']}:{source['version']}" if source else None,
                    )
                    if source is None:
                        first, parent = initial_state(config), None
                    else:
                        first, copied = warm_start_state(config, source["state"])
                        if not copied:
                            raise InputError(
                                f"init_from={opts.init_from!r}: no layer of that model fits this "
                                "architecture (no tensor has the same name and shape)"
                            )
                        parent = (source["name"], source["version"], source["iteration"])
                    store.write_checkpoint(conn, backend, key, 0, first)
                    backend.archive(conn, key, 0, parent, opts.block_bytes, opts.deltas)
                else:
                    key = {"name": self.name, "version": resumed["version"]}
                    first_epoch = int(resumed["iteration"])
                    self.history = list(resumed["history"][:first_epoch])
                    store.set_status(conn, backend, key, "training", self.history)
                    store.set_options(conn, backend, key, stored_options)
            if stopper is not None:
                for past in self.history:
                    stopper.update(past)
            self._announce(data, config, key, first_epoch)
            for epoch in range(first_epoch, opts.epochs):
                row = self._iteration(data, config, key, epoch)
                if stopper is not None and stopper.update(row):
                    break
            best = stopper.best_iteration if stopper and opts.restore_best else None
            with backend.engine.begin() as conn:
                store.set_status(conn, backend, key, "complete", self.history, model_iteration=best)
                if best is not None:
                    store.ensure_hot_state(conn, backend, key, best)
        except KeyboardInterrupt as exc:
            if key is None:
                raise
            self._mark_failed(key, exc)
            if opts.on_interrupt == "raise":
                raise
        except BaseException as exc:
            if key is not None:
                self._mark_failed(key, exc)
            raise _translate(exc) from exc
        finally:
            with backend.engine.begin() as conn:
                for table in (stage, vstage, packed_table):
                    backend.drop_table(conn, table)
        with backend.engine.connect() as conn:
            row = store.read_model(conn, backend, key["name"], key["version"])
        return model_from_stored(row, opts.device)

    # -- steps ------------------------------------------------------------------------------------
    def _resumable(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The stored run to continue: same name, not complete, same data and update options.

        Work tables a killed client left behind are dropped here.
        """
        backend, opts = self.backend, self.options
        with backend.engine.connect() as conn:
            try:
                row = store.read_model(conn, backend, self.name, with_state=False)
            except InputError as exc:
                raise InputError(f"resume=True but there is no run named {self.name!r}") from exc
        if row["status"] == "complete":
            raise InputError(
                f"model {self.name!r} version {row['version']} is complete; nothing to resume "
                "(train again without resume=True for a new version)"
            )
        if row["iteration"] is None:
            raise InputError(f"model {self.name!r} has no checkpoint to resume from")
        mine = opts.to_json_dict()
        different = [k for k in TrainOptions.RESUME_KEYS if row["options"].get(k) != mine.get(k)]
        if row["query"] != self.query:
            different.insert(0, "query")
        if row["spec"] != spec:
            different.insert(0, "model")
        if different:
            raise InputError(
                f"cannot resume {self.name!r}: {', '.join(different)} differ(s) from the "
                "interrupted run; resume with the same query and options"
            )
        stale = row["options"].get("work_token")
        if stale:
            with backend.engine.begin() as conn:
                for prefix in ("stage", "vstage", "packed"):
                    backend.drop_table(conn, backend.table(f"{prefix}_{stale}"))
        return row

    def _source(self) -> dict[str, Any]:
        """The stored model a warm start begins from (``init_from="name[:version]"``)."""
        name, _, version = str(self.options.init_from).partition(":")
        if version and not version.isdigit():
            raise InputError(f"init_from={self.options.init_from!r}: use 'name' or 'name:version'")
        with self.backend.engine.connect() as conn:
            try:
                return store.read_model(conn, self.backend, name, int(version) if version else None)
            except InputError as exc:
                raise InputError(f"init_from={self.options.init_from!r}: {exc}") from exc

    def _pack(
        self,
        spec: dict[str, Any],
        stage: str,
        vstage: str,
        packed: str,
        source: dict[str, Any] | None = None,
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
            batch_size=opts.batch_size,
            seed=opts.seed,
        )
        with backend.engine.begin() as conn:
            stage_query(backend, conn, self.query, opts.params, stage)
            encoding, n_rows = infer_encoding(backend, conn, stage, pack_opts)
            if source is not None:  # encode the new rows exactly as the source model did
                encoding = warm_encoding(
                    encoding, Encoding.from_json(source["encoding"]), str(opts.init_from)
                )
            pack_opts.n_parameters = _check_spec_fits(spec, encoding)
            if opts.validation_query:
                stage_query(
                    backend, conn, opts.validation_query, opts.params, vstage, "validation query"
                )
                _check_columns(backend, conn, vstage, encoding)
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
            return data

    def _config(self, spec: dict[str, Any], enc: Encoding) -> dict[str, Any]:
        opts = self.options
        threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.parallel)
        return {
            "spec": spec,
            "input_shape": enc.input_shape,
            "n_outputs": enc.target.n_outputs,
            "task": enc.target.task,
            "optimizer": opts.optimizer_config(),
            "batch_size": opts.batch_size,
            "seed": opts.seed,
            "epoch": 0,
            "device": opts.db_device,
            "threads": threads,
            "byteorder": self.backend.byteorder,
            "target_scale": [enc.target.mean, enc.target.std],
            "run": self.token,
            "parallel": opts.parallel,
        }

    def _announce(
        self, data: PackedData, config: dict[str, Any], key: dict[str, Any], first_epoch: int
    ) -> None:
        if self.callbacks.on_start is None:
            return
        self.callbacks.on_start(
            {
                **key,
                "database": self.backend.describe(),
                "backend": self.backend.name,
                "rows": data.n_train,
                "validation_rows": data.n_val,
                "buffers": data.n_buffers,
                "parameters": data.n_parameters,
                "workers": self.options.parallel,
                "epochs": self.options.epochs,
                "first_epoch": first_epoch,
                "device": "cuda"
                if self.options.db_device != "cpu" and self.server.get("cuda")
                else "cpu",
            }
        )

    def _iteration(
        self,
        data: PackedData,
        config: dict[str, Any],
        key: dict[str, Any],
        epoch: int,
    ) -> dict[str, Any]:
        """One aggregate query + evaluation, committed with its checkpoint; returns the row."""
        backend = self.backend
        config = {**config, "epoch": epoch}
        started = time.perf_counter()
        progress = None
        if self.callbacks.on_progress is not None:
            sink, total = self.callbacks.on_progress, data.n_train
            progress = lambda done: sink(done, total)  # noqa: E731
        with backend.engine.begin() as conn:
            this = {**key, "iteration": epoch}
            after = {**key, "iteration": epoch + 1}
            backend.train_iteration(conn, data.table, this, config, progress)
            info = backend.state_info(conn, after)
            trained = time.perf_counter() - started
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": info["loss"]}
            split, prefix = (1, "val_") if data.n_val else (0, "train_")
            metrics = backend.evaluate(conn, data.table, split, after, config)
            metrics.pop("n", None)
            for name, value in metrics.items():
                row[f"{prefix}{name}"] = value
            parent = (key["name"], key["version"], epoch)
            stored = backend.archive(
                conn, key, epoch + 1, parent, self.options.block_bytes, self.options.deltas
            )
            store.clear_hot_states(conn, backend, key, below=epoch + 1)
            row.update(
                seconds=time.perf_counter() - started,
                train_seconds=trained,
                samples=info["samples"],
                workers=info.get("workers", 1),
                combines=info["combines"],
                db_device=info.get("device"),
                stored_bytes=stored["new_bytes"],
            )
            store.set_checkpoint_metrics(conn, backend, key, epoch + 1, row)
            self.history.append(row)
            store.set_status(conn, backend, key, "training", self.history)
        if self.callbacks.on_iteration is not None:
            self.callbacks.on_iteration(row)
        return row

    def _mark_failed(self, key: dict[str, Any], exc: BaseException) -> None:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with contextlib.suppress(Exception), self.backend.engine.begin() as conn:
            store.set_status(conn, self.backend, key, status, self.history, str(exc)[:2000])


def _spec(model: Any) -> dict[str, Any]:
    try:
        return parse_spec(model)
    except KernelSpecError as exc:
        raise SpecError(str(exc)) from exc


def _check_spec_fits(spec: dict[str, Any], enc: Encoding) -> int:
    """Build the network once to check it fits the data; returns its parameter count."""
    try:
        net = build_network(spec, enc.input_shape, enc.target.n_outputs)
        return sum(p.numel() for p in net.parameters())
    except KernelSpecError as exc:
        raise SpecError(f"model spec does not fit the data: {exc}") from exc


def _check_columns(backend: Backend, conn: Connection, table: str, enc: Encoding) -> None:
    kinds = backend.column_kinds(conn, table)
    missing = [c for c in [*enc.feature_names(), enc.target.name] if c not in kinds]
    if missing:
        raise InputError(f"the validation query lacks column(s) {', '.join(map(repr, missing))}")


def _translate(exc: BaseException) -> BaseException:
    """Database errors become :class:`TrainingError` with the server's message as ``detail``."""
    if isinstance(exc, (DbdlError, KeyboardInterrupt)):
        return exc
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig) if exc.orig is not None else str(exc)
        context = getattr(getattr(exc.orig, "diag", None), "context", None)
        if context:  # PL/Python puts the kernel's traceback here
            detail = f"{detail}\n{context}"
        first = detail.strip().splitlines()[0] if detail.strip() else "database error"
        return TrainingError(f"the database failed during training: {first}", detail=detail)
    return exc


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """History rows → DataFrame, one row per iteration."""
    return pd.DataFrame(history)


def generated_name() -> str:
    """A readable unique model name: ``model_YYYYmmdd_HHMMSS_xxxx``."""
    return time.strftime("model_%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:4]


__all__ = ["Callbacks", "TrainingRun", "generated_name", "history_frame"]
