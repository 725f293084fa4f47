"""PostgreSQL backend: PL/Python kernels in schema ``dbdl``; segments are sessions the run
holds (:class:`~dbdl_magic.backends.segments.PostgresSegments`); on Citus, shards.

Facts this module relies on: the training aggregate can run as a partial aggregate (Citus
shards, PostgreSQL's parallel plans) because it has a combine function and is PARALLEL SAFE;
each iteration is a ``CREATE TABLE AS`` followed by an insert of its rows into the checkpoint
table, all in one transaction; packed data lives in ordinary UNLOGGED tables (segments'
sessions and parallel workers cannot read another session's temporary tables).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dbdl_magic.backends import citus, postgres_predict
from dbdl_magic.backends.base import Backend, ColumnKind, ProgressSink, RunSession, Scoring
from dbdl_magic.backends.segments import PostgresSegments
from dbdl_magic.errors import InstallError
from dbdl_magic.kernel import KERNEL_VERSION
from dbdl_magic.kernel.blockstore import Archiver, Run
from dbdl_magic.kernel.catalog import POSTGRES, STORE_TABLES, checkpoint_sql, meta_sql

SCHEMA = "dbdl"
_DOLLAR = re.compile(r"\$(\d+)")
# One packed buffer per heap page (fillfactor + padding), so a parallel scan hands buffers to
# workers one by one instead of giving every buffer on the first page to one worker.
_PAD_BYTES = 1000


def _relation_text(quoted: str) -> str:
    """A quoted table name as a bound value (``regclass`` text), without the colon escapes
    :meth:`Backend.q` adds for SQLAlchemy's ``text()``."""
    return quoted.replace("\\:", ":")


def install_sql() -> str:
    """The kernel installation script: ``kernels/postgres/install.sql`` in the source tree,
    installed as package data of ``dbdl_magic.sql`` (pyproject.toml maps that package onto
    ``kernels/``; wheels and editable installs both carry it)."""
    return resources.files("dbdl_magic.sql").joinpath("postgres/install.sql").read_text("utf-8")


#: What the server's python3 must import (dbdl_magic.kernel.plpython.kernel_info checks them).
SERVER_MODULES = "torch, numpy, safetensors, zstandard and dbdl_magic"
_MISSING = re.compile(r"cannot import: ([\w.]+(?:, [\w.]+)*)|No module named '([\w.]+)'")


def _server_python_error(exc: DBAPIError) -> InstallError:
    """``dbdl.kernel_info()`` failed: name the modules the server's python3 lacks and the fix."""
    message = _db_message(exc)
    fix = (
        f"The server's python3 must import {SERVER_MODULES}: install them for the system "
        "python3 that PL/Python embeds, or start PostgreSQL with PYTHONPATH set to a "
        "site-packages folder holding them (and to the folder containing dbdl_magic)"
    )
    found = _MISSING.search(message)
    if found is None:
        return InstallError(
            f"the database server's Python cannot run the dbdl kernels ({message}). {fix}",
            detail=str(exc.orig),
        )
    names = found.group(1) or found.group(2)
    return InstallError(
        f"the database server's python3 cannot import {names}, which the dbdl kernels need. "
        f"{fix}",
        detail=str(exc.orig),
    )


def _db_message(exc: DBAPIError) -> str:
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(orig)
    return primary.strip()



class PostgresBackend(Backend):
    """PostgreSQL 12+ with ``plpython3u`` (superuser installs once; users need EXECUTE)."""

    name = "postgresql"
    byteorder = ">"  # float4send / int4send write big-endian
    _flavor: str | None = None
    _lz4: bool | None = None  # does the server offer lz4 TOAST compression?
    _work_schema: str | None = None
    _lock_engine: Engine | None = None

    #: how long a statement of this package waits for a lock before failing: another role that
    #: holds a lock on the shared model store cannot stall a run for longer than this
    lock_timeout = "30s"

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        event.listen(engine, "connect", self._session_settings)

    def _session_settings(self, dbapi_conn: Any, _record: Any) -> None:
        """Settings of every new server session (outside any transaction, so they stay)."""
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (self.lock_timeout,))
        finally:
            dbapi_conn.autocommit = autocommit

    @property
    def flavor(self) -> str:
        """``postgresql``, ``citus`` (extension installed) or ``greenplum`` (checked once)."""
        if self._flavor is None:
            with self.engine.connect() as conn:
                if "greenplum" in str(conn.execute(text("SELECT version()")).scalar()).lower():
                    self._flavor = "greenplum"
                elif citus.installed(conn):
                    self._flavor = "citus"
                else:
                    self._flavor = "postgresql"
        return self._flavor

    @property
    def supports_parallel(self) -> bool:  # type: ignore[override]
        """Parallel workers are the segments on plain PostgreSQL; on Citus and Greenplum the
        shards/segments already are, so iterations run one process per shard/segment."""
        return self.flavor == "postgresql"

    def table(self, name: str) -> str:
        """A store table (``models``, ``checkpoints``, ...: per-owner views in schema ``dbdl``)
        or, for any other name, a work table in this role's own work schema (created on first
        use by ``dbdl.work_schema``, reachable by no other role)."""
        if name in STORE_TABLES:
            return f"{self.q(SCHEMA)}.{self.q(name)}"
        return f"{self.q(self.work_schema)}.{self.q(name)}"

    @property
    def lock_engine(self) -> Engine:
        """An engine on a separate pool with the same connection arguments, for the sessions
        that only hold a run's advisory locks (they never import torch)."""
        if self._lock_engine is None:
            self._lock_engine = create_engine(self.engine.url, pool=self.engine.pool.recreate())
        return self._lock_engine

    @property
    def work_schema(self) -> str:
        """This role's schema for staged rows, packed buffers and scratch states."""
        if self._work_schema is None:
            with self.engine.begin() as conn:
                self._work_schema = str(
                    conn.execute(
                        text("SELECT dbdl.work_schema(CAST(current_user AS text))")
                    ).scalar_one()
                )
        return self._work_schema

    # -- installation -------------------------------------------------------------------------
    def install(self) -> None:
        script = install_sql()
        try:
            with self.engine.begin() as conn:
                raw = conn.connection.driver_connection
                with raw.cursor() as cur:  # several statements in one simple query
                    cur.execute(script)
                conn.execute(
                    text(
                        f"INSERT INTO {POSTGRES.meta} (key, value) VALUES ('version', :v) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                    ),
                    {"v": KERNEL_VERSION},
                )
        except DBAPIError as exc:
            message = _db_message(exc)
            if "plpython3u" in message and (
                "control file" in message or "not available" in message
            ):
                raise InstallError(
                    f"PL/Python is not available on the server {self.describe()}: install the "
                    "server package postgresql-plpython3-<major version> (Debian/Ubuntu) and "
                    "run dbdl install again",
                    detail=str(exc.orig),
                ) from exc
            if "permission denied" in message or "must be superuser" in message:
                raise InstallError(
                    f"installing the dbdl kernels needs a superuser (PL/Python is untrusted): "
                    f"ask an administrator to run `dbdl install URL` on {self.describe()}",
                    detail=str(exc.orig),
                ) from exc
            raise InstallError(
                f"installing the dbdl kernels failed: {message}", detail=str(exc.orig)
            ) from exc

    def check(self) -> dict[str, Any]:
        """The installed kernel version, then ``dbdl.kernel_info()``: the server's python3 must
        import every module the kernels use. Raises :class:`InstallError` naming what is
        missing and the fix; a server that cannot be reached raises the driver's error."""
        how = (
            f"as a superuser, run `dbdl install {self.describe()}` "
            "(or dbdl_magic.install(con) from Python)"
        )
        with self.engine.connect() as conn:
            try:
                installed = None
                meta = conn.execute(text("SELECT to_regclass(:meta) IS NOT NULL"),
                                    {"meta": POSTGRES.meta}).scalar()
                if meta:
                    installed = conn.execute(
                        text(meta_sql(POSTGRES, "read")), {"key": "version"}
                    ).scalar()
            except DBAPIError as exc:
                raise InstallError(
                    f"cannot read the dbdl kernel version in {self.describe()} "
                    f"({_db_message(exc)}): {how}",
                    detail=str(exc.orig),
                ) from exc
        if installed is None:
            raise InstallError(f"the dbdl kernels are not installed in {self.describe()}: {how}")
        if installed != KERNEL_VERSION:
            raise InstallError(
                f"{self.describe()} has dbdl kernel version {installed!r}, this dbdl_magic needs "
                f"{KERNEL_VERSION!r}: {how}"
            )
        try:
            with self.engine.connect() as conn:
                info = json.loads(conn.execute(text("SELECT dbdl.kernel_info()")).scalar_one())
        except DBAPIError as exc:
            raise _server_python_error(exc) from exc
        if info.get("kernel_version") != KERNEL_VERSION:
            raise InstallError(
                f"the server imports dbdl_magic kernel version {info.get('kernel_version')!r}, "
                f"the client has {KERNEL_VERSION!r}: install the same dbdl_magic on the server"
            )
        # learnt now, on a connection of its own: asked lazily inside a run's transaction it
        # opened a second pooled connection, and a FIFO pool then alternated server processes
        self.flavor  # noqa: B018
        return info

    # -- packing --------------------------------------------------------------------------------
    def column_kinds(self, conn: Connection, table: str) -> dict[str, ColumnKind]:
        rows = conn.execute(
            text(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory,"
                " coalesce(et.typcategory, ''), t.typname"
                " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                " LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'"
                " WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0"
                " AND NOT a.attisdropped ORDER BY a.attnum"
            ),
            {"t": table},
        ).all()
        kinds: dict[str, ColumnKind] = {}
        for name, dbtype, category, elem_category, typname in rows:
            if category == "N":
                is_float = typname in ("float4", "float8", "numeric")
                kinds[name] = ColumnKind("numeric", dbtype, is_float=is_float)
            elif category in ("S", "B", "E"):
                kinds[name] = ColumnKind("categorical", dbtype)
            elif category == "A" and elem_category == "N":
                kinds[name] = ColumnKind("array", dbtype)
            else:
                kinds[name] = ColumnKind("unsupported", dbtype)
        return kinds

    def to_float(self, expr: str) -> str:
        return f"CAST({expr} AS double precision)"

    def nonfinite(self, expr: str) -> str:
        return (
            f"(CAST({expr} AS double precision) = ANY(CAST(ARRAY['NaN', 'Infinity', "
            "'-Infinity'] AS double precision[])))"
        )

    def fingerprint(self, conn: Connection, packed: str) -> str:
        """Computed in the server (the buffers never leave it)."""
        return str(
            conn.execute(
                text(
                    "SELECT md5(string_agg(concat_ws('|', split, grp, buffer_id, md5(x), md5(y)),"
                    f" ',' ORDER BY split, grp, buffer_id)) FROM {packed}"
                )
            ).scalar_one()
        )

    def staging_order(self, alias: str) -> str:
        """Rows ordered by a 64-bit hash of their text (ties, i.e. equal rows, by the text):
        synchronized sequential scans and parallel plans return rows in varying order."""
        row = f"CAST({alias} AS text)"
        return f"ORDER BY hashtextextended({row}, 0), {row}"

    def row_hash(self, rn: str, seed_param: str) -> str:
        return f"hashint8extended(CAST({rn} AS bigint), CAST(:{seed_param} AS bigint))"

    def array_stats(self, conn: Connection, table: str, column: str) -> dict[str, Any]:
        """Sizes, mean/std and, when the rows' arrays differ in shape (8x8, 4x16, flat 64 ...),
        ``shapes``: the most common shapes found with their row counts."""
        col = self.q(column)
        r = conn.execute(
            text(
                f"SELECT min(cardinality({col})), max(cardinality({col})), max(array_ndims({col})),"
                f" min(array_ndims({col})), min(array_length({col}, 1)),"
                f" max(array_length({col}, 1)) FROM {table}"
            )
        ).one()
        mixed = self._array_shapes(conn, table, col, r[3], r[2], r[0] != r[1]) if r[2] else None
        if mixed is not None:  # refused by the caller: no need for the statistics
            return {"min_len": r[0], "max_len": r[1], "dims": None, "mean": 0.0, "std": 0.0,
                    **mixed}
        m = conn.execute(
            text(
                f"SELECT avg(CAST(u.e AS double precision)),"
                f" stddev_pop(CAST(u.e AS double precision)), count(*) - count(u.e),"
                f" count(*) FILTER (WHERE {self.nonfinite('u.e')}) FROM {table} AS s,"
                f" unnest(s.{col}) AS u(e)"
            )
        ).one()
        dims = None
        if r[2] == 2 and r[3] == 2 and r[4] == r[5] and r[4]:
            dims = [int(r[4]), int(r[1]) // int(r[4])]
        return {
            "min_len": r[0],
            "max_len": r[1],
            "dims": dims,
            "mean": float(m[0] or 0.0),
            "std": float(m[1] or 0.0),
            "null_values": int(m[2] or 0),  # NULL elements inside the arrays
            "nonfinite": int(m[3] or 0),
        }

    def _array_shapes(
        self,
        conn: Connection,
        table: str,
        col: str,
        min_ndims: int,
        max_ndims: int,
        ragged: bool,
        top: int = 5,
    ) -> dict[str, Any] | None:
        """None when every array of ``col`` has one shape, else ``{"shapes": [{"shape":
        [lengths], "rows": n}, ...], "n_shapes": k}``: the ``top`` most common of the ``k``
        shapes found (one more scan, only for multi-dimensional or mixed arrays)."""
        lengths = [f"array_length({col}, {d})" for d in range(1, int(max_ndims) + 1)]
        if min_ndims == max_ndims and not ragged:
            if max_ndims == 1:
                return None
            spans = conn.execute(
                text(
                    "SELECT " + ", ".join(f"min({n}), max({n})" for n in lengths)
                    + f" FROM {table}"
                )
            ).one()
            if all(spans[2 * i] == spans[2 * i + 1] for i in range(len(lengths))):
                return None
        keys = ", ".join(str(i) for i in range(1, len(lengths) + 2))
        rows = conn.execute(
            text(
                f"SELECT array_ndims({col}), {', '.join(lengths)}, count(*), count(*) OVER ()"
                f" FROM {table} WHERE cardinality({col}) > 0 GROUP BY {keys}"
                f" ORDER BY count(*) DESC, {keys} LIMIT {int(top)}"
            )
        ).all()
        shapes = [{"shape": [int(n) for n in row[1 : 1 + row[0]]], "rows": int(row[-2])}
                  for row in rows]
        return {"shapes": shapes, "n_shapes": int(rows[0][-1]) if rows else 0}

    def array_piece(self, column: str, mean_param: str, std_param: str, width: int) -> str:
        return (
            "(SELECT string_agg(float4send(CAST((CAST(u.e AS double precision) -"
            f" :{mean_param}) / :{std_param} AS real)), CAST('' AS bytea) ORDER BY u.i)"
            f" FROM unnest({column}) WITH ORDINALITY AS u(e, i))"
        )

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
        conn.execute(
            text(
                f"CREATE UNLOGGED TABLE {packed} (split integer NOT NULL, grp text,"
                " buffer_id bigint NOT NULL,"
                " n integer NOT NULL, x bytea NOT NULL, y bytea NOT NULL, pad text)"
                " WITH (fillfactor = 10)"
                + (" DISTRIBUTED BY (buffer_id)" if self.flavor == "greenplum" else "")
            )
        )
        # Float data does not compress: store it out of line without trying.
        conn.execute(
            text(
                f"ALTER TABLE {packed} ALTER COLUMN x SET STORAGE EXTERNAL,"
                " ALTER COLUMN y SET STORAGE EXTERNAL"
            )
        )
        row_bytes = " || ".join(
            f"r.p{i}" if is_bytes else f"float4send(CAST(r.p{i} AS real))"
            for i, (_, is_bytes) in enumerate(pieces)
        )
        y_bytes = "int4send(CAST(r.y AS integer))" if y_is_int else "float4send(CAST(r.y AS real))"
        conn.execute(
            text(
                f"INSERT INTO {packed} (split, grp, buffer_id, n, x, y, pad)"
                " SELECT r.split, r.grp, r.ord / :rpb AS buffer_id, count(*),"
                f" string_agg({row_bytes}, CAST('' AS bytea) ORDER BY r.ord),"
                f" string_agg({y_bytes}, CAST('' AS bytea) ORDER BY r.ord),"
                f" repeat(' ', {_PAD_BYTES}) FROM ({rows_sql}) AS r"
                " GROUP BY r.split, r.grp, r.ord / :rpb"
            ),
            {**params, "rpb": int(rows_per_buffer)},
        )
        conn.execute(text(f"ANALYZE {packed}"))

    def distribute_packed(self, conn: Connection, packed: str, parallel: int | str) -> None:
        """On Citus, spread the packed buffers over the run's shards (see :mod:`citus`)."""
        if self.flavor == "citus":
            citus.distribute_packed(conn, _relation_text(packed), parallel)

    def citus_workers(self, conn: Connection) -> list[tuple[str, int]]:
        """The active primary worker nodes of a Citus coordinator (host, port)."""
        return citus.worker_nodes(conn)

    def distribution(self, packed: str) -> dict[str, int] | None:
        """Citus: the packed table's shards, nodes and cores (see :func:`citus.distribution`)."""
        if self.flavor != "citus":
            return None
        with self.engine.connect() as conn:
            return citus.distribution(conn, _relation_text(packed))

    # -- iterations -----------------------------------------------------------------------------
    def kernel_settings(self, conn: Connection) -> None:
        """Settings for the rest of a transaction that runs kernels.

        No JIT: the kernels' high COST (set so the planner spreads them over parallel workers)
        pushes every kernel query past ``jit_above_cost``, and compiling its expressions took
        ≈ 0.2 s per query for nothing (the work is in PL/Python). LZ4 for the states that
        scratch tables receive (CREATE TABLE AS cannot mark a column uncompressed): pglz spent
        ≈ 0.17 s trying to compress a 13 MB state, lz4 ≈ 0.03 s.
        """
        conn.execute(text("SET LOCAL jit = off"))
        if self._lz4 is None:
            self._lz4 = bool(conn.execute(text(
                "SELECT count(*) FROM pg_settings WHERE name = 'default_toast_compression'"
                " AND 'lz4' = ANY(enumvals)"
            )).scalar())
        if self._lz4:
            conn.execute(text("SET LOCAL default_toast_compression = lz4"))

    def _parallel_settings(self, conn: Connection, packed: str, workers: int) -> None:
        """Plan the next query on ``workers`` parallel workers (the leader only coordinates),
        or in this process when ``workers`` is 1."""
        workers = int(workers)
        self.kernel_settings(conn)
        if self.flavor == "citus":
            # Citus plans multi-shard queries only with bound parameters (custom plans)
            conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
            return
        # custom plans (the default for statements with new text): the planner sees the bound
        # buffer-id range of a sync_every part and estimates its rows. Nothing large is bound
        # here: states come from tables (a large bound bytea would be folded into a custom plan).
        conn.execute(text("SET LOCAL plan_cache_mode = auto"))
        if workers <= 1:
            conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
            return
        for setting in (
            "parallel_setup_cost = 0",
            "parallel_tuple_cost = 0",
            "min_parallel_table_scan_size = 0",
            f"max_parallel_workers_per_gather = {workers}",
            "parallel_leader_participation = off",
        ):
            conn.execute(text(f"SET LOCAL {setting}"))
        conn.execute(text(f"ALTER TABLE {packed} SET (parallel_workers = {workers})"))

    fn_prefix = "dbdl."

    def values_relation(self, prefixes: list[str]) -> str:
        rows = [
            f"(CAST(:{p}_id AS integer), CAST(:{p}_grp AS text), CAST(:{p}_name AS text),"
            f" CAST(:{p}_version AS integer), CAST(:{p}_config AS text))"
            for p in prefixes
        ]
        return f"(VALUES {', '.join(rows)}) AS m(member, grp, name, version, config)"

    def create_scratch(self, conn: Connection, table: str, select_sql: str, params: Any) -> None:
        # CREATE TABLE AS may run in parallel; INSERT ... SELECT never does.
        conn.execute(text(f"CREATE UNLOGGED TABLE {table} AS {select_sql}"), params)

    def segments_unavailable(self, parallel: int | str) -> str | None:
        if self.flavor == "postgresql":
            return None
        if self.flavor == "citus":
            return "citus: the packed table's shards train the partial models"
        return f"{self.flavor}: its segments train the partial models"

    def open_segments(self, size: int, token: str) -> PostgresSegments:
        return PostgresSegments(self, size, token)

    def prepare_query(self, conn: Connection, packed: str, workers: int) -> None:
        self._parallel_settings(conn, packed, workers)

    @contextmanager
    def progress_channel(
        self, conn: Connection, run: str, sink: ProgressSink | None
    ) -> Iterator[None]:
        if sink is None:
            yield
            return
        raw = conn.connection.driver_connection
        seen: dict[tuple[int, int], int] = {}
        interrupted = False

        def report(diag: Any) -> None:
            message = diag.message_primary or ""
            if not message.startswith("dbdl-progress "):
                return
            report = json.loads(message[len("dbdl-progress ") :])
            if report.get("run") != run:
                return
            seen[(report["pid"], report.get("member", 0))] = report["samples"]
            sink(sum(seen.values()))

        def on_notice(diag: Any) -> None:
            nonlocal interrupted
            try:
                report(diag)
            except KeyboardInterrupt:
                # psycopg's notice receiver would swallow a Ctrl-C landing here and the query
                # would run on: cancel the statement and raise once it has stopped
                interrupted = True
                raw.cancel_safe()

        raw.add_notice_handler(on_notice)
        try:
            yield
        except Exception:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            raw.remove_notice_handler(on_notice)
        if interrupted:
            raise KeyboardInterrupt

    def predict_buffer(
        self, conn: Connection, x: bytes, key: dict[str, Any], config: dict[str, Any]
    ) -> bytes:
        selected = "dbdl.predict_buffer(CAST(:x AS bytea), c.state, CAST(:config AS text))"
        self.kernel_settings(conn)
        conn.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        return bytes(
            conn.execute(
                text(checkpoint_sql(self.store_tables(), selected)),
                {**key, "x": x, "config": json.dumps(config)},
            ).scalar_one()
        )

    def table_exists(self, conn: Connection, table: str) -> bool:
        return bool(conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar())

    def predict_into(self, conn: Connection, job: Scoring) -> None:
        """One statement scores ``job.source`` a range of heap pages at a time (see
        :mod:`postgres_predict`)."""
        postgres_predict.predict_into(self, conn, job)

    def server_major(self, conn: Connection) -> int:
        """The server's major version (14: TID range scans, ``enable_memoize``)."""
        return int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000

    def runner(self, conn: Connection) -> Run:
        def run(sql: str, params: Any) -> list[tuple[Any, ...]]:
            values = {f"p{i + 1}": v for i, v in enumerate(params)}
            statement = _DOLLAR.sub(r"%(p\1)s", sql.replace("%", "%%"))
            result = conn.exec_driver_sql(statement, values)
            return [tuple(r) for r in result] if result.returns_rows else []

        return run

    # The server-side routines keep state bytes inside the database.
    def archive_many(
        self,
        conn: Connection,
        keys: list[dict[str, Any]],
        iteration: int,
        block_bytes: int,
        deltas: bool,
    ) -> list[dict[str, Any]]:
        """Archive an iteration's checkpoints in the server (``dbdl.archive_checkpoint``); on
        Citus from the client: the iteration's transaction has sent the starting states to
        the workers (intermediate results), which makes it a distributed transaction, and
        then every subtransaction sends SAVEPOINT and RELEASE to each worker connection of
        it. PL/Python runs every ``plpy.execute`` in a subtransaction, so the archive's ~3
        statements per block cost 1-1.5 ms each instead of 0.01-0.05 ms (measured: 0.13 s
        per epoch for a 4k-parameter MLP on 2 shards, 0.012 s on plain PostgreSQL; whole
        iterations on 4 shards 0.25 s from the client vs 0.31 s in the server). The client's
        statements are no subtransactions."""
        if self.flavor == "citus":
            archiver = Archiver(self.runner(conn), self.store_tables(), block_bytes, deltas)
            return [
                archiver.archive(k["name"], k["version"], iteration,
                                 (k["name"], k["version"], iteration - 1))
                for k in keys
            ]
        params: dict[str, Any] = {"iteration": iteration, "block_bytes": block_bytes,
                                  "deltas": deltas}
        rows = []
        for i, key in enumerate(keys):
            params.update({f"n{i}": key["name"], f"v{i}": key["version"]})
            rows.append(f"({i}, CAST(:n{i} AS text), CAST(:v{i} AS integer))")
        out = conn.execute(
            text(
                "SELECT k.i, dbdl.archive_checkpoint(k.name, k.version,"
                " CAST(:iteration AS integer), k.name, k.version, CAST(:iteration AS integer) - 1,"
                " CAST(:block_bytes AS integer), CAST(:deltas AS boolean))"
                f" FROM (VALUES {', '.join(rows)}) AS k(i, name, version) ORDER BY k.i"
            ),
            params,
        ).all()
        return [json.loads(r[1]) for r in out]

    def archive(
        self,
        conn: Connection,
        key: dict[str, Any],
        iteration: int,
        parent: tuple[str, int, int] | None,
        block_bytes: int,
        deltas: bool,
    ) -> dict[str, Any]:
        parent_name, parent_version, parent_iteration = parent or (None, None, None)
        out = conn.execute(
            text(
                "SELECT dbdl.archive_checkpoint(CAST(:name AS text), CAST(:version AS integer),"
                " CAST(:iteration AS integer), CAST(:parent_name AS text),"
                " CAST(:parent_version AS integer), CAST(:parent_iteration AS integer),"
                " CAST(:block_bytes AS integer), CAST(:deltas AS boolean))"
            ),
            {
                **key,
                "iteration": iteration,
                "parent_name": parent_name,
                "parent_version": parent_version,
                "parent_iteration": parent_iteration,
                "block_bytes": block_bytes,
                "deltas": deltas,
            },
        ).scalar_one()
        return json.loads(out)

    def materialize(self, conn: Connection, key: dict[str, Any], iteration: int) -> None:
        conn.execute(
            text(
                "SELECT dbdl.materialize_checkpoint(CAST(:name AS text),"
                " CAST(:version AS integer), CAST(:iteration AS integer))"
            ),
            {**key, "iteration": iteration},
        )

    def release(self, conn: Connection, key: dict[str, Any], iteration: int | None = None) -> int:
        return int(
            conn.execute(
                text(
                    "SELECT dbdl.release_blocks(CAST(:name AS text), CAST(:version AS integer),"
                    " CAST(:iteration AS integer))"
                ),
                {**key, "iteration": iteration},
            ).scalar_one()
        )

    # -- sessions -------------------------------------------------------------------------------
    # Advisory locks of this role, key 1 = hashtext('role/<name or token>'), key 2 = a model
    # version (>= 1), 0 (allocating versions of a name, for one transaction) or -1 (the run
    # with that work token). A run holds its locks on a connection of its own until it ends; a
    # killed client or a server restart ends that session and with it the locks. One version
    # lock per run, however many models it trains: (name, the run's first version), which is
    # a model's own version and, for the members of a group_by / grid run, the version of
    # member 0 (a member's version minus its member index), so thousands of groups do not
    # fill the server's lock table.
    def open_session(self, token: str) -> PostgresRunSession:
        return PostgresRunSession(self, token)

    def lock_name(self, conn: Connection, name: str) -> None:
        conn.execute(text(f"SELECT pg_advisory_xact_lock({_LOCK_KEY}, 0)"), {"key": name})

    def version_live(
        self, conn: Connection, name: str, version: int, options: dict[str, Any]
    ) -> bool:
        return not self._try_xact_lock(conn, name, version - int(options.get("member") or 0))

    def token_live(self, conn: Connection, token: str) -> bool:
        return not self._try_xact_lock(conn, token, -1)

    def run_records(self, conn: Connection) -> dict[str, bool]:
        return {}  # the locks are the record

    def forget_run(self, conn: Connection, token: str) -> None:
        pass  # a lock goes with its session

    def scratch_orphaned(self, conn: Connection) -> bool:
        # an iteration creates and drops its scratch tables inside its own transaction: one
        # that other sessions can see was left by a transaction that committed without
        # dropping it, never by a run that still needs it
        return True

    def work_tables(self, conn: Connection) -> list[str]:
        """The tables in this role's work schema that it owns."""
        schema = self.work_schema
        names = conn.execute(
            text(
                "SELECT tablename FROM pg_tables WHERE schemaname = :schema"
                " AND tableowner = current_user ORDER BY tablename"
            ),
            {"schema": schema},
        ).scalars()
        return [f"{self.q(schema)}.{self.q(n)}" for n in names if n not in STORE_TABLES]

    def _try_xact_lock(self, conn: Connection, key: str, number: int) -> bool:
        """Take lock (``key``, ``number``) for the rest of ``conn``'s transaction if no session
        holds it. The looker then waits at most 2 s for any lock (a killed client's server
        process can hold its tables until its query ends)."""
        conn.execute(text("SET LOCAL lock_timeout = '2s'"))
        return bool(
            conn.execute(
                text(f"SELECT pg_try_advisory_xact_lock({_LOCK_KEY}, CAST(:n AS integer))"),
                {"key": key, "n": number},
            ).scalar()
        )


#: key 1 of this role's advisory locks on a model name or run token (bound as ``:key``)
_LOCK_KEY = "hashtext(CAST(current_user AS text) || '/' || CAST(:key AS text))"


class PostgresRunSession(RunSession):
    """A run's session: advisory locks held on a connection checked out for the whole run,
    (token, -1) from the start, (name, first version) for the versions it trains. The
    connection comes from a pool of its own (:attr:`PostgresBackend.lock_engine`): the engine's
    pool hands the run the connection whose server process has the kernels warm, and a lock
    connection taken from it would, run after run, push the iterations to another process."""

    CLAIM_WAIT_S = 2.0  # how long a claim retries (a looker holds a lock for a moment)

    def __init__(self, backend: PostgresBackend, token: str) -> None:
        self.backend, self.token, self.record = backend, token, None
        self.conn = backend.lock_engine.connect()
        try:
            self.conn.execute(text(f"SELECT pg_advisory_lock({_LOCK_KEY}, -1)"), {"key": token})
            self.conn.commit()  # session locks outlive the transaction; don't sit in one
        except BaseException:
            self.conn.invalidate()
            self.conn.close()
            raise

    def claim(self, conn: Connection, name: str, versions: list[int]) -> list[int]:
        """Lock (``name``, first of ``versions``): the versions of one run, in member order."""
        return [] if not versions or self._lock(name, versions[0]) else versions[:1]

    def _lock(self, name: str, version: int) -> bool:
        deadline = time.monotonic() + self.CLAIM_WAIT_S
        while True:
            got = self.conn.execute(
                text(f"SELECT pg_try_advisory_lock({_LOCK_KEY}, CAST(:n AS integer))"),
                {"key": name, "n": version},
            ).scalar()
            self.conn.commit()
            if got or time.monotonic() >= deadline:
                return bool(got)
            time.sleep(0.05)

    def close(self) -> None:
        """Release the locks (at once, for whoever waits on them) and close the connection."""
        with suppress(Exception):  # a session that is gone took its locks with it
            self.conn.execute(text("SELECT pg_advisory_unlock_all()"))
            self.conn.commit()
        with suppress(Exception):
            self.conn.invalidate()
            self.conn.close()
