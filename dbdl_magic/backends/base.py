"""What every backend provides. SQL is phrased here and in the subclasses; values are bound."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from dbdl_magic.kernel.blockstore import Archiver, Run
from dbdl_magic.kernel.catalog import (
    StoreTables,
    checkpoint_sql,
    insert_checkpoints_sql,
    lock_models_sql,
    member_states_sql,
    meta_sql,
    set_options_sql,
    versions_options_sql,
)

if TYPE_CHECKING:
    from dbdl_magic.backends.segments import Segments

ProgressSink = Callable[[int], None]


@dataclass
class ColumnKind:
    """What a column of the staged query holds: numeric, categorical, array or unsupported."""

    kind: str
    dbtype: str
    is_float: bool = False


@dataclass(frozen=True)
class Scoring:
    """A bulk prediction for :meth:`Backend.predict_into`: create table ``result`` holding the
    ``keys`` columns of ``source`` (a staged table, or on SQLite the query itself, with
    ``params`` bound) plus ``outputs`` (``prediction``, then ``proba_<class>``), scored with
    checkpoint ``key`` (its kernel ``config``, class labels ``classes``) from the raw values of
    ``features``, about ``rows_per_buffer`` rows per kernel call; with ``with_rn`` also
    ``__dbdl_rn``, increasing in the rows' order."""

    source: str
    result: str
    features: list[dict[str, Any]]
    params: dict[str, Any]
    keys: list[str]
    outputs: list[str]
    classes: list[Any]
    config: dict[str, Any]
    key: dict[str, Any]
    rows_per_buffer: int
    with_rn: bool


@dataclass
class Member:
    """One model trained by an iteration query: its checkpoint key, group value and config."""

    member: int
    name: str
    version: int
    config: dict[str, Any] = field(default_factory=dict)
    group: str | None = None


def _accumulate(total: dict[str, Any], info: dict[str, Any]) -> None:
    """Add one query's state header (see :func:`kernel.state.state_info`) to ``total``."""
    samples = int(info.get("samples") or 0)
    total["samples"] = total.get("samples", 0) + samples
    total["loss_sum"] = total.get("loss_sum", 0.0) + (info.get("loss") or 0.0) * samples
    total["combines"] = total.get("combines", 0) + int(info.get("combines") or 0)
    total["workers"] = max(total.get("workers", 1), int(info.get("workers") or 1))
    total["device"] = info.get("device", total.get("device"))
    total["queries"] = total.get("queries", 0) + 1


def _finish_totals(totals: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each member's mean loss over the samples of its queries."""
    for info in totals.values():
        info["loss"] = info["loss_sum"] / info["samples"] if info["samples"] else None
    return totals


def _buffer_ranges(
    conn: Connection, packed: str, chunks: int
) -> list[tuple[int, int] | None]:
    """``chunks`` consecutive ranges of training buffer ids (``[None]``: all at once)."""
    if chunks <= 1:
        return [None]
    top = conn.execute(text(f"SELECT max(buffer_id) FROM {packed} WHERE split = 0")).scalar()
    width = max(1, -(-(int(top or 0) + 1) // chunks))
    return [(c * width, (c + 1) * width) for c in range(chunks)]


class Backend(ABC):
    """SQL phrasing, kernel installation and iteration queries for one dialect."""

    name: str = "?"
    byteorder: str = "<"  # byte order of packed float32/int32 buffers
    supports_parallel: bool = False  # whether an iteration can run on several processes
    #: the database runs in this process (SQLite): packing may read the staged rows here
    #: (:mod:`dbdl_magic.data.inprocess`) instead of round-tripping them through SQL
    packs_in_process: bool = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._preparer = engine.dialect.identifier_preparer
        self._scratch_tables: set[str] = set()  # iteration scratch tables not yet dropped
        self._store_tables: StoreTables | None = None  # see store_tables()

    # -- naming -------------------------------------------------------------------------------
    def q(self, identifier: str) -> str:
        """Quote an identifier with the dialect's preparer (always quoted).

        Quoted names always go into SQLAlchemy ``text()``, which escapes ``%`` for the driver
        itself (the preparer's ``quote_identifier`` would double it a second time) and reads
        ``:name`` as a bound parameter, so colons are escaped: a column ``a :b`` stays a name.
        """
        p = self._preparer
        body = identifier.replace(p.escape_quote, p.escape_to_quote)
        return f"{p.initial_quote}{body}{p.final_quote}".replace(":", "\\:")

    @abstractmethod
    def table(self, name: str) -> str:
        """The quoted, qualified name of a dbdl-owned table."""

    def describe(self) -> str:
        """Database name for messages, without the password."""
        return self.engine.url.render_as_string(hide_password=True)

    # -- installation -------------------------------------------------------------------------
    @abstractmethod
    def install(self) -> None:
        """Create the kernels and model tables (idempotent)."""

    @abstractmethod
    def check(self) -> dict[str, Any]:
        """Verify the kernels are usable; returns the server kernel's facts or raises."""

    # -- packing --------------------------------------------------------------------------------
    @abstractmethod
    def column_kinds(self, conn: Connection, table: str) -> dict[str, ColumnKind]:
        """Kinds of the staged table's columns, in order."""

    @abstractmethod
    def to_float(self, expr: str) -> str:
        """SQL casting ``expr`` to a double."""

    @abstractmethod
    def nonfinite(self, expr: str) -> str:
        """SQL condition true where a float ``expr`` is NaN or ±infinity."""

    def fingerprint(self, conn: Connection, packed: str) -> str:
        """A digest of a packed table's buffers in (split, group, buffer) order."""
        digest = hashlib.blake2b(digest_size=16)
        rows = conn.execute(
            text(f"SELECT split, grp, buffer_id, x, y FROM {packed} ORDER BY split, grp, buffer_id")
        )
        for split, grp, buffer_id, x, y in rows:
            digest.update(f"{split}|{grp}|{buffer_id}|".encode())
            digest.update(hashlib.blake2b(bytes(x), digest_size=16).digest())
            digest.update(hashlib.blake2b(bytes(y), digest_size=16).digest())
        return digest.hexdigest()

    def staging_order(self, alias: str) -> str:
        """``ORDER BY`` of a window over the rows of ``alias`` that depends on their content
        only ("" when the dialect's scans are already in a stable order)."""
        return ""

    @abstractmethod
    def row_hash(self, rn: str, seed_param: str) -> str:
        """SQL for a deterministic pseudo-random integer from a row number and a bound seed."""

    @abstractmethod
    def array_stats(self, conn: Connection, table: str, column: str) -> dict[str, Any]:
        """``{"min_len", "max_len", "dims", "mean", "std"}`` of an array/blob column."""

    @abstractmethod
    def array_piece(self, column: str, mean_param: str, std_param: str, width: int) -> str:
        """SQL yielding a standardised array column as float32 bytes in :attr:`byteorder`."""

    def distribute_packed(self, conn: Connection, packed: str, parallel: int | str) -> None:  # noqa: B027
        """Spread a packed table over the database's nodes (Citus); elsewhere nothing."""

    def distribution(self, packed: str) -> dict[str, int] | None:
        """``{"shards", "nodes", "cpus"}`` of a distributed packed table (None: local)."""
        return None

    def group_pieces(self, pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        """A row's encoded pieces as this dialect packs them (SQLite: at most 100, in chunks)."""
        return pieces

    @abstractmethod
    def create_packed(
        self,
        conn: Connection,
        packed: str,
        rows_sql: str,
        pieces: list[tuple[str, bool]],
        y_sql: str,
        y_is_int: bool,
        rows_per_buffer: int,
        params: dict[str, Any],
    ) -> None:
        """Pack ``rows_sql`` (columns ``split``, ``ord`` and the pieces) into buffers.

        ``pieces`` are ``(sql, is_bytes)``: float expressions, or bytes already encoded.
        """

    # -- iterations -----------------------------------------------------------------------------
    # An iteration trains one or more *members* (a model each: one per group, one per
    # hyper-parameter configuration, or just the one) in the same aggregate query, grouped by
    # member. ``sync_every`` splits it into several queries over ranges of buffer ids, so the
    # partial models of parallel workers are averaged more often than once per epoch.
    fn_prefix = "dbdl_"  # kernel function names: dbdl_train (SQLite), dbdl.train (PostgreSQL)
    buffer_order = "p.buffer_id"  # the order one process trains a model's buffers in
    keep_order = ""  # what keeps an ordered subquery from being flattened away

    def members_relation(self, members: list[Member], params: dict[str, Any]) -> str:
        """A FROM item ``m(member, grp, name, version, config)`` listing ``members``; their
        values are bound (added to ``params``)."""
        for m in members:
            i = m.member
            params.update(
                {
                    f"m{i}_id": i,
                    f"m{i}_grp": m.group,
                    f"m{i}_name": m.name,
                    f"m{i}_version": m.version,
                    f"m{i}_config": json.dumps(m.config),
                }
            )
        return self.values_relation([f"m{m.member}" for m in members])

    @abstractmethod
    def values_relation(self, prefixes: list[str]) -> str:
        """``m(member, grp, name, version, config)`` from the bound ``:<prefix>_id`` … values."""

    @abstractmethod
    def create_scratch(self, conn: Connection, table: str, select_sql: str, params: Any) -> None:
        """``CREATE TABLE table AS select_sql`` in the form this dialect can run fastest."""

    def buffers_sql(self, packed: str) -> str:
        """The FROM item of the training buffers (SQLite shuffles their order per epoch)."""
        return f"(SELECT p0.x, p0.y, p0.buffer_id, p0.split, p0.grp FROM {packed} AS p0)"

    def run_kernels(self, conn: Connection, sql: str, params: dict[str, Any]) -> Any:
        """Execute a statement that calls kernels (SQLite re-raises the kernel's own error)."""
        return conn.execute(text(sql), params)

    def prepare_query(self, conn: Connection, packed: str, workers: int) -> None:  # noqa: B027
        """Session settings before an aggregate query (PostgreSQL: the parallel plan)."""

    @contextmanager
    def progress_channel(
        self, conn: Connection, run: str, sink: ProgressSink | None
    ) -> Iterator[None]:
        """Deliver in-iteration progress (samples done in this query) to ``sink``."""
        yield

    def iteration_query(
        self,
        packed: str,
        members: list[Member],
        source: str,
        buffer_range: tuple[int, int] | None = None,
        epoch: int = 0,
        ordered: bool = True,
        share: tuple[int, int] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The aggregate query of one iteration (or of one ``sync_every`` part of it: the
        buffers with ids in ``buffer_range``, a range the planner can estimate, so the part
        still gets a parallel plan).

        ``source`` is a table ``(member, state)`` holding each member's starting state;
        ``share`` ``(k, n)`` keeps segment k's share of the buffers (``buffer_id % n = k``).
        """
        params: dict[str, Any] = {"epoch": epoch}
        part = ""
        if buffer_range is not None:
            params["lo"], params["hi"] = buffer_range
            part = " AND p.buffer_id >= :lo AND p.buffer_id < :hi"
        if share is not None:
            params["share_k"], params["share_n"] = share
            part += " AND p.buffer_id % CAST(:share_n AS INTEGER) = CAST(:share_k AS INTEGER)"
        call = f"{self.fn_prefix}train(p.x, p.y, p.buffer_id, {{state}}, {{config}})"
        buffers = self.buffers_sql(packed)
        where = f"p.split = 0{part}"
        sql = self._per_member(call, "state", buffers, members, source, where, params, ordered)
        return sql, params

    def _per_member(
        self,
        call: str,
        alias: str,
        buffers: str,
        members: list[Member],
        source: str,
        where: str,
        params: dict[str, Any],
        ordered: bool = False,
    ) -> str:
        """``SELECT member, <call> AS alias`` over ``buffers``, one result row per member
        (``ordered``: each member's buffers in :attr:`buffer_order`).

        ``call`` names the member's state and config as ``{state}`` and ``{config}``. A single
        ungrouped member gets no GROUP BY (a constant group key would keep PostgreSQL from
        planning a partial aggregate per worker); several members join their states by id.
        """
        if len(members) == 1 and members[0].group is None:
            only = members[0]
            params.update(only_member=only.member, only_config=json.dumps(only.config))
            state = f"(SELECT s.state FROM {source} AS s)"
            expr = call.format(state=state, config="CAST(:only_config AS TEXT)")
            return (
                f"SELECT CAST(:only_member AS INTEGER) AS member, {expr} AS {alias}"
                f" FROM {buffers} AS p WHERE {where} HAVING count(*) > 0"
            )
        on_group = " AND p.grp = m.grp" if any(m.group is not None for m in members) else ""
        joined = (
            f"{buffers} AS p JOIN {self.members_relation(members, params)} ON {where}{on_group}"
            f" JOIN {source} AS s ON s.member = m.member"
        )
        if not ordered:
            expr = call.format(state="s.state", config="m.config")
            return (
                f"SELECT m.member AS member, {expr} AS {alias} FROM {joined}"
                " GROUP BY m.member, m.config"
            )
        # One process: feed each member its buffers in a fixed order (the order a lone model
        # sees), whatever plan the join and the grouping get; the same seed, the same model.
        expr = call.format(state="p.state", config="p.config")
        return (
            f"SELECT p.member AS member, {expr} AS {alias} FROM (SELECT m.member AS member,"
            " m.config AS config, s.state AS state, p.x AS x, p.y AS y, p.buffer_id AS buffer_id"
            f" FROM {joined} ORDER BY m.member, {self.buffer_order}{self.keep_order}) AS p"
            " GROUP BY p.member, p.config"
        )

    def train_iteration(
        self,
        conn: Connection,
        packed: str,
        members: list[Member],
        iteration: int,
        *,
        workers: int = 1,
        chunks: int = 1,
        progress: ProgressSink | None = None,
        run: str = "",
        segments: Segments | None = None,
        outer: dict[str, float] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Train every member from its checkpoint ``iteration`` over the training buffers and
        store checkpoint ``iteration + 1``; returns each member's header facts (samples, loss,
        combines, workers, device), summed over the ``chunks`` queries. With ``segments``, each
        query is a sync round run by the segments, combined (``outer``: and moved by the outer
        step) in the database. ``workers`` > 1 asks PostgreSQL for its own parallel plan of the
        query instead (new worker processes per query: slower than segments everywhere we
        measured, so runs never choose it; ``benchmarks/bench_scale.py`` compares the two)."""
        if segments is not None:
            ranges = _buffer_ranges(conn, packed, chunks)
            rounds = segments.train(conn, packed, members, iteration, ranges, outer, progress)
            seg_totals: dict[int, dict[str, Any]] = {}
            for infos in rounds:
                for member, info in infos.items():
                    _accumulate(seg_totals.setdefault(member, {}), info)
            return _finish_totals(seg_totals)
        # the first part reads the checkpoints through a derived table (copying a state into a
        # scratch table cost as much as compressing it); later parts read the last part's table
        states_sql, states_params = self._states_sql(members, iteration)
        source, source_params = f"({states_sql})", states_params
        totals: dict[int, dict[str, Any]] = {}
        done = 0
        for part in _buffer_ranges(conn, packed, chunks):
            sql, params = self.iteration_query(
                packed, members, source, part, iteration, ordered=workers <= 1
            )
            params.update(source_params)
            target = self._scratch()
            sink = None if progress is None else (lambda n, base=done: progress(base + n))
            self.prepare_query(conn, packed, workers)
            with self.progress_channel(conn, run, sink):
                self.create_scratch(conn, target, sql, params)
            infos = self._scratch_info(conn, target)
            for member, info in infos.items():
                _accumulate(totals.setdefault(member, {}), info)
            if outer is not None and any(int(i.get("combines") or 0) for i in infos.values()):
                self._outer_step(conn, target, source, source_params, outer)
            done = sum(t["samples"] for t in totals.values())
            # members without buffers in this part keep the state they had
            conn.execute(
                text(
                    f"INSERT INTO {target} (member, state) SELECT s.member, s.state FROM {source}"
                    f" AS s WHERE s.member NOT IN (SELECT t.member FROM {target} AS t)"
                ),
                source_params,
            )
            if source in self._scratch_tables:
                self.drop_table(conn, source)
            source, source_params = target, {}
        params = {"iteration": iteration + 1}
        relation = self.members_relation(members, params)
        conn.execute(
            text(insert_checkpoints_sql(self.store_tables(), source, relation)), params
        )
        self.drop_table(conn, source)
        return _finish_totals(totals)

    def segments_unavailable(self, parallel: int | str) -> str | None:
        """Why this database cannot run segments (None: it can)."""
        return "this database runs its kernels in one process"

    def _outer_step(
        self, conn: Connection, target: str, source: str, params: dict[str, Any],
        outer: dict[str, float],
    ) -> None:
        """Move the combined states in ``target`` by the outer step from their starting states
        in ``source`` (a distributed database combined several partial models)."""
        f = self.fn_prefix
        conn.execute(text(
            f"UPDATE {target} SET state = {f}outer_step(s.state, {target}.state,"
            f" CAST(:outer AS TEXT)) FROM {source} AS s WHERE s.member = {target}.member"
        ), {**params, "outer": json.dumps(outer)})

    def open_segments(self, size: int, token: str) -> Segments:
        """``size`` segments held by run ``token`` until closed (see :mod:`segments`)."""
        raise NotImplementedError(f"{self.name} has no segments")

    def evaluate(
        self,
        conn: Connection,
        packed: str,
        split: int,
        members: list[Member],
        iteration: int,
        workers: int = 1,
    ) -> dict[int, dict[str, Any]]:
        """Metrics of each member's checkpoint ``iteration`` over the buffers of ``split``
        (0 train, 1 validation); members without such buffers are absent."""
        params: dict[str, Any] = {"split": split}
        f = self.fn_prefix
        call = f"{f}metrics({f}evaluate(p.x, p.y, {{state}}, {{config}}), {{config}})"
        states_sql, states_params = self._states_sql(members, iteration)
        params.update(states_params)
        self.prepare_query(conn, packed, workers)
        sql = self._per_member(
            call, "metrics", packed, members, f"({states_sql})", "p.split = :split", params
        )
        rows = self.run_kernels(conn, sql, params).all()
        return {int(member): json.loads(out) for member, out in rows}

    # -- helpers of the iteration -------------------------------------------------------------
    def _scratch(self) -> str:
        """A new scratch table name, remembered until :meth:`drop_scratch_tables`."""
        name = self.table(f"iter_{uuid.uuid4().hex[:12]}")
        self._scratch_tables.add(name)
        return name

    def drop_scratch_tables(self, conn: Connection) -> None:
        """Drop the iteration scratch tables a failed or interrupted query left behind: SQLite
        runs CREATE TABLE outside the transaction (a rollback keeps the table) but a DROP after
        an INSERT inside it (a rollback restores the table), so every name is dropped again
        here, when the run ends."""
        while self._scratch_tables:
            self.drop_table(conn, self._scratch_tables.pop())

    def _states_sql(self, members: list[Member], iteration: int) -> tuple[str, dict[str, Any]]:
        """SELECT of ``(member, state)``: each member's checkpoint ``iteration``."""
        params: dict[str, Any] = {"iteration": iteration}
        relation = self.members_relation(members, params)
        return member_states_sql(self.store_tables(), relation), params

    def _scratch_info(self, conn: Connection, table: str) -> dict[int, dict[str, Any]]:
        rows = conn.execute(
            text(f"SELECT s.member, {self.fn_prefix}state_info(s.state) FROM {table} AS s")
        ).all()
        return {int(member): json.loads(info) for member, info in rows}

    @abstractmethod
    def predict_buffer(
        self, conn: Connection, x: bytes, key: dict[str, Any], config: dict[str, Any]
    ) -> bytes:
        """Run the predict kernel in the database on one packed feature buffer."""

    # -- prediction ------------------------------------------------------------------------------
    @abstractmethod
    def table_exists(self, conn: Connection, table: str) -> bool:
        """Whether the (quoted) table exists."""

    @abstractmethod
    def predict_into(self, conn: Connection, job: Scoring) -> None:
        """Create ``job.result`` from ``job.source``, scored inside the database (see
        :class:`Scoring`)."""

    # -- block store -----------------------------------------------------------------------------
    @abstractmethod
    def runner(self, conn: Connection) -> Run:
        """``run(sql, params)`` with ``$1``-style placeholders on ``conn`` (client side)."""

    def store_tables(self) -> StoreTables:
        """The model store's tables as this database names them (see :mod:`catalog`)."""
        if self._store_tables is None:  # quoted once: statements on hot paths ask each time
            self._store_tables = StoreTables.named(self.table)
        return self._store_tables

    def archive(
        self,
        conn: Connection,
        key: dict[str, Any],
        iteration: int,
        parent: tuple[str, int, int] | None,
        block_bytes: int,
        deltas: bool,
    ) -> dict[str, Any]:
        """Store a checkpoint's state as blocks, inside the database."""
        return Archiver(self.runner(conn), self.store_tables(), block_bytes, deltas).archive(
            key["name"], key["version"], iteration, parent
        )

    def archive_many(
        self,
        conn: Connection,
        keys: list[dict[str, Any]],
        iteration: int,
        block_bytes: int,
        deltas: bool,
    ) -> list[dict[str, Any]]:
        """:meth:`archive` checkpoint ``iteration`` of several models, each with its previous
        checkpoint as the delta parent."""
        return [
            self.archive(conn, key, iteration, (key["name"], key["version"], iteration - 1),
                         block_bytes, deltas)
            for key in keys
        ]

    def materialize(self, conn: Connection, key: dict[str, Any], iteration: int) -> None:
        """Rebuild a checkpoint's hot state (``checkpoints.state``) from its blocks."""
        Archiver(self.runner(conn), self.store_tables()).materialize(
            key["name"], key["version"], iteration
        )

    def release(self, conn: Connection, key: dict[str, Any], iteration: int | None = None) -> int:
        """Drop block references of a version (or one checkpoint); garbage-collect blocks."""
        return Archiver(self.runner(conn), self.store_tables()).release(
            key["name"], key["version"], iteration
        )

    def store_weights_raw(
        self, conn: Connection, key: dict[str, Any], iteration: int
    ) -> dict[str, Any]:
        """Re-store the weight blocks of the checkpoint a model serves as raw blocks
        (:meth:`Archiver.store_weights_raw`), through this backend's store tables (on
        PostgreSQL the owner's views)."""
        return Archiver(self.runner(conn), self.store_tables()).store_weights_raw(
            key["name"], key["version"], iteration
        )

    def load_state(self, conn: Connection, key: dict[str, Any], iteration: int) -> bytes:
        """A checkpoint's state reassembled from verified blocks (read by the client)."""
        return Archiver(self.runner(conn), self.store_tables()).load(
            key["name"], key["version"], iteration
        )

    # -- helpers shared by the dialects ---------------------------------------------------------
    def state_info(self, conn: Connection, key: dict[str, Any]) -> dict[str, Any]:
        """Header of a stored checkpoint, read by a kernel function inside the database."""
        selected = f"{self.fn_prefix}state_info(c.state)"
        row = conn.execute(text(checkpoint_sql(self.store_tables(), selected)), key).scalar_one()
        return json.loads(row)

    def drop_table(self, conn: Connection, table: str) -> None:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))

    # -- sessions: who is training what -----------------------------------------------------------
    # A training run holds a session from its start to its end. Other sessions ask through it
    # whether a model row left in status ``training`` still has a live trainer (if not, the row
    # is marked interrupted) and whether a work table still belongs to a live run (if not, it
    # is dropped). These defaults suit an embedded database shared by processes of one host:
    # the session is the training process, recorded in the model rows it trains and, until
    # they exist, in the meta table. PostgreSQL holds advisory locks instead.
    def open_session(self, token: str) -> RunSession:
        """Start the session of the run with work token ``token`` (end it with ``close()``)."""
        return RunSession(self, token)

    def lock_name(self, conn: Connection, name: str) -> None:
        """Serialise allocating versions of model ``name`` until ``conn``'s transaction ends,
        so two runs never read the same highest version (here: take the database's write lock
        now, the one lock an embedded database has)."""
        conn.execute(text(lock_models_sql(self.store_tables())))

    def version_live(
        self, conn: Connection, name: str, version: int, options: dict[str, Any]
    ) -> bool:
        """Whether a live session trains model ``name`` version ``version`` (a row in status
        ``training``; ``options`` are its stored options, which name its process here)."""
        return record_alive(options.get("session"))

    def token_live(self, conn: Connection, token: str) -> bool:
        """Whether the run with work token ``token`` (the suffix of its work tables) lives."""
        return token in _LIVE_RUNS or self.run_records(conn).get(token, False)

    def run_records(self, conn: Connection) -> dict[str, bool]:
        """Runs on record, each with whether it is alive (here: ``run:<token>`` rows of the
        meta table, written when a run starts and deleted when it ends)."""
        rows = conn.execute(
            text(meta_sql(self.store_tables(), "prefixed")), {"prefix": "run:"}
        ).all()
        return {
            key[4:]: key[4:] in _LIVE_RUNS or record_alive(json.loads(value))
            for key, value in rows
        }

    def forget_run(self, conn: Connection, token: str) -> None:
        """Delete the record of a run that is gone."""
        conn.execute(text(meta_sql(self.store_tables(), "delete")), {"key": f"run:{token}"})

    def scratch_orphaned(self, conn: Connection) -> bool:
        """Whether the iteration scratch tables (``iter_*``, named without their run's token)
        that exist now belong to no live run (here: when no run at all is alive)."""
        return not _LIVE_RUNS and not any(self.run_records(conn).values())

    @abstractmethod
    def work_tables(self, conn: Connection) -> list[str]:
        """The qualified, quoted names of this role's work tables (staged rows, packed
        buffers, scratch states: every dbdl table that is not part of the model store)."""


# -- the session of a training run ------------------------------------------------------------
_LIVE_RUNS: set[str] = set()  # work tokens of the runs alive in this process


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (boot id and start tick, read from ``/proc``), which tells
    a reused pid apart; None where ``/proc`` does not say (no such process, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f, open("/proc/sys/kernel/random/boot_id") as b:
            stat, boot = f.read(), b.read().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22: start time in ticks


def process_record(token: str) -> dict[str, Any]:
    """This process as a run's session: host, pid, process start and the run's token."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _process_start(os.getpid()), "run": token}


def record_alive(record: dict[str, Any] | None) -> bool:
    """Whether the session of :func:`process_record` still lives: in this process, while its
    run is; in another process of this host, while that process (the same start) exists. A
    process of another host cannot be checked and counts as alive; no record counts as gone."""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True
    pid = int(record.get("pid") or 0)
    if pid <= 0:
        return False
    if pid == os.getpid():
        return record.get("run") in _LIVE_RUNS
    started = _process_start(pid)
    if started is not None:
        return record.get("started") in (None, started)
    try:  # /proc does not say: ask the OS whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, run by another user
        return True
    return True


class RunSession:
    """A run's session as other sessions see it; this one is the training process (see
    :func:`process_record`), recorded in the meta table from the start and in the options of
    every model row the run trains (:attr:`record`, written by the run)."""

    def __init__(self, backend: Backend, token: str) -> None:
        self.backend, self.token = backend, token
        self.record: dict[str, Any] | None = process_record(token)
        _LIVE_RUNS.add(token)
        try:
            with backend.engine.begin() as conn:
                conn.execute(
                    text(meta_sql(backend.store_tables(), "insert")),
                    {"key": f"run:{token}", "value": json.dumps(self.record)},
                )
        except BaseException:
            _LIVE_RUNS.discard(token)
            raise

    def claim(self, conn: Connection, name: str, versions: list[int]) -> list[int]:
        """Take model ``name``'s ``versions`` (one run's, in member order) for this run, inside
        the transaction that holds :meth:`Backend.lock_name`; returns the versions another
        live session trains, and then takes none. Versions without a row yet are free."""
        tables = self.backend.store_tables()
        rows = [
            (int(v), json.loads(options))
            for v, options in conn.execute(
                text(versions_options_sql(tables)),
                {"name": name, "lo": min(versions, default=0), "hi": max(versions, default=0)},
            )
            if int(v) in versions
        ]
        taken = [
            v for v, options in rows
            if record_alive(options.get("session"))
            and options["session"].get("run") != self.token
        ]
        if taken:
            return taken
        for v, options in rows:
            conn.execute(
                text(set_options_sql(tables)),
                {"name": name, "version": v,
                 "options": json.dumps({**options, "session": self.record}, default=str)},
            )
        return []

    def close(self) -> None:
        """End the session (never raises: a run that ended with the server down is recorded
        as gone by the next session that looks)."""
        _LIVE_RUNS.discard(self.token)
        with suppress(Exception), self.backend.engine.begin() as conn:
            self.backend.forget_run(conn, self.token)
