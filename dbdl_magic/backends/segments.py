"""Segments: a run's data-parallel trainers that stay warm for the whole run.

A run with ``parallel=N`` opens N segments once: N server sessions on PostgreSQL
(:class:`PostgresSegments`, connections held by the run), N worker processes on SQLite
(:mod:`~dbdl_magic.backends.sqlite_segments`). Every sync round (an epoch, or a ``sync_every``
part of one) each segment runs the training aggregate over its share of the round's buffers
(``buffer_id % N = k``), all concurrently, torch imported once per segment; the partial
states are then combined in the database by the aggregate's combine function
(``dbdl.merge``, the combine as an aggregate over the partials in segment order) and, with
``averaging='outer'``, moved by the outer step (``dbdl.outer_step``). The last round's states
become the iteration's checkpoint in the run's own transaction, with its metrics.

A segment that fails (or whose session or process is killed) cancels the others and raises;
Ctrl-C cancels every segment's statement. Nothing is committed to the checkpoints then, so the
run keeps its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from dbdl_magic.errors import TrainingError
from dbdl_magic.kernel.catalog import insert_checkpoints_sql

if TYPE_CHECKING:
    from dbdl_magic.backends.base import Backend, Member

ProgressSink = Callable[[int], None]
POLL_SECONDS = 0.2


class Segments(ABC):
    """N trainers held by a run; :meth:`train` runs one iteration on them."""

    def __init__(self, backend: Backend, size: int, token: str) -> None:
        self.backend = backend
        self.size = size
        self.token = token

    # -- the iteration ------------------------------------------------------------------------
    def train(
        self,
        conn: Connection,
        packed: str,
        members: list[Member],
        iteration: int,
        ranges: list[tuple[int, int] | None],
        outer: dict[str, float] | None,
        progress: ProgressSink | None = None,
    ) -> list[dict[int, dict[str, Any]]]:
        """Train ``members`` from checkpoint ``iteration`` over the training buffers, one sync
        round per entry of ``ranges``, and insert checkpoint ``iteration + 1`` on ``conn``
        (the caller's transaction). ``outer`` holds ``outer_lr``/``outer_momentum`` for the
        outer step (None: the plain average). Returns each round's header facts per member
        (samples, loss, combines, workers)."""
        self.begin(conn, members, iteration)
        rounds: list[dict[int, dict[str, Any]]] = []
        done = 0
        for r, part in enumerate(ranges):
            statements = []
            for k in range(self.size):
                source, params = self.source(r, members)
                sql, qparams = self.backend.iteration_query(
                    packed, members, source, part, iteration, ordered=True, share=(k, self.size)
                )
                statements.append((sql, {**qparams, **params}))
            sink = None if progress is None else (lambda n, base=done: progress(base + n))
            self.run_round(r, statements, sink)
            infos = self.combine(r, members, outer)
            rounds.append(infos)
            done += sum(int(i.get("samples") or 0) for i in infos.values())
        self.commit(conn, members, iteration, len(ranges) - 1)
        return rounds

    @abstractmethod
    def begin(self, conn: Connection, members: list[Member], iteration: int) -> None:
        """Get the members' checkpoint ``iteration`` ready as round 0's starting states."""

    @abstractmethod
    def source(self, r: int, members: list[Member]) -> tuple[str, dict[str, Any]]:
        """A FROM item ``(member, state)`` of round ``r``'s starting states and its values."""

    @abstractmethod
    def run_round(
        self, r: int, statements: list[tuple[str, dict[str, Any]]], sink: ProgressSink | None
    ) -> None:
        """Run statement k on segment k, concurrently, keeping each result (member, state)."""

    @abstractmethod
    def combine(
        self, r: int, members: list[Member], outer: dict[str, float] | None
    ) -> dict[int, dict[str, Any]]:
        """Combine round ``r``'s partial states per member (members without buffers in the
        round keep their starting state); returns the header facts of the combined states."""

    @abstractmethod
    def commit(self, conn: Connection, members: list[Member], iteration: int, last: int) -> None:
        """Insert round ``last``'s states as checkpoint ``iteration + 1`` on ``conn``."""

    @abstractmethod
    def close(self) -> None:
        """Stop every segment (cancelling what runs) and drop the run's segment table."""


def await_all(
    futures: list[Future[Any]],
    cancel: Callable[[int], None],
    report: Callable[[], None],
    describe: Callable[[int, BaseException], BaseException],
) -> list[Any]:
    """Wait for one future per segment, calling ``report`` every poll. The first failure
    cancels the other segments (``cancel(k)``), waits for them, and raises ``describe(k, exc)``
    from it; Ctrl-C cancels every segment and re-raises once they have stopped."""
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_EXCEPTION)
            report()
            failed = [f for f in done if f.exception() is not None]
            if failed:
                k = futures.index(failed[0])
                for j, f in enumerate(futures):
                    if j != k and not f.done():
                        cancel(j)
                wait(futures)
                exc = failed[0].exception()
                assert exc is not None
                raise describe(k, exc) from exc
    except KeyboardInterrupt:
        for j, f in enumerate(futures):
            if not f.done():
                cancel(j)
        wait(futures)
        raise
    report()
    return [f.result() for f in futures]


class PostgresSegments(Segments):
    """N sessions of one role, held by the run (``application_name`` says which), in
    autocommit: each round inserts its partial states into the run's UNLOGGED segment table,
    segment 0's session merges them; the run's own transaction copies the last round's states
    into the checkpoints."""

    def __init__(self, backend: Backend, size: int, token: str) -> None:
        super().__init__(backend, size, token)
        self.table = backend.table(f"segs_{token}")
        self.engine = create_engine(backend.engine.url, pool=backend.engine.pool.recreate())
        self.connections: list[Connection] = []
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="dbdl-segment")
        self.seen: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()
        self._source_params: dict[str, Any] = {}
        self._round0 = ""
        try:
            for k in range(size):
                self.connections.append(self._open(k))
            self._warm()
            self._execute(0, (
                f"CREATE UNLOGGED TABLE IF NOT EXISTS {self.table} (round integer NOT NULL,"
                " segment integer NOT NULL, member integer NOT NULL, state bytea)"
            ))
            # weights do not compress: out of line without trying (pglz spent ≈ 0.17 s on
            # every 13 MB state written)
            self._execute(0, f"ALTER TABLE {self.table} ALTER COLUMN state SET STORAGE EXTERNAL")
        except BaseException:
            self.close()
            raise

    def _open(self, k: int) -> Connection:
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        name = f"dbdl segment {k}/{self.size} {self.token}"
        for sql, value in (
            ("SELECT set_config('application_name', :v, false)", name),
            ("SELECT set_config('jit', :v, false)", "off"),
            ("SELECT set_config('max_parallel_workers_per_gather', :v, false)", "0"),
            ("SELECT set_config('plan_cache_mode', :v, false)", "auto"),
        ):
            conn.execute(text(sql), {"v": value})
        conn.commit()
        raw = conn.connection.driver_connection
        raw.add_notice_handler(self._notice)
        return conn

    def _warm(self) -> None:
        """Every session imports torch and the kernels now, side by side, so that opening the
        segments is their start-up and the first round trains."""

        def run(k: int) -> None:
            self._execute(k, "SELECT dbdl.kernel_info(), dbdl.warm_up()")

        futures = [self.executor.submit(run, k) for k in range(self.size)]
        await_all(futures, self._cancel, lambda: None, self._describe)

    def _notice(self, diag: Any) -> None:
        message = diag.message_primary or ""
        if not message.startswith("dbdl-progress "):
            return
        report = json.loads(message[len("dbdl-progress "):])
        if report.get("run") == self.token:
            with self.lock:
                self.seen[(report["pid"], report.get("member", 0))] = report["samples"]

    def _execute(self, k: int, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run ``sql`` on segment k's session (autocommit); its rows, if it returns any."""
        conn = self.connections[k]
        result = conn.execute(text(sql), params or {})
        rows = result.all() if result.returns_rows else []
        conn.commit()
        return rows

    def pids(self) -> list[int]:
        """The server process id of each segment's session."""
        return [int(c.connection.driver_connection.info.backend_pid) for c in self.connections]

    def begin(self, conn: Connection, members: list[Member], iteration: int) -> None:
        self._execute(0, f"TRUNCATE {self.table}")
        sql, params = self.backend._states_sql(members, iteration)
        self._round0, self._source_params = f"({sql})", params

    def source(self, r: int, members: list[Member]) -> tuple[str, dict[str, Any]]:
        if r == 0:
            return self._round0, dict(self._source_params)
        return (
            f"(SELECT s.member, s.state FROM {self.table} AS s WHERE s.round = {int(r) - 1}"
            " AND s.segment = -1)",
            {},
        )

    def run_round(
        self, r: int, statements: list[tuple[str, dict[str, Any]]], sink: ProgressSink | None
    ) -> None:
        self.seen.clear()

        def run(k: int, sql: str, params: dict[str, Any]) -> None:
            insert = (
                f"INSERT INTO {self.table} (round, segment, member, state) SELECT"
                f" CAST(:seg_round AS integer), CAST(:seg_k AS integer), q.member, q.state"
                f" FROM ({sql}) AS q"
            )
            self._execute(k, insert, {**params, "seg_round": r, "seg_k": k})

        def report() -> None:
            if sink is not None:
                with self.lock:
                    total = sum(self.seen.values())
                sink(total)

        futures = [self.executor.submit(run, k, s, p) for k, (s, p) in enumerate(statements)]
        await_all(futures, self._cancel, report, self._describe)

    def _cancel(self, k: int) -> None:
        with contextlib.suppress(Exception):
            self.connections[k].connection.driver_connection.cancel_safe()

    def _describe(self, k: int, exc: BaseException) -> BaseException:
        cause = getattr(exc, "orig", None) or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return TrainingError(
            f"segment {k} of {self.size} failed: {first}; the other segments were cancelled and "
            "the run keeps its last checkpoint (train again with resume=True)"
        )

    def combine(
        self, r: int, members: list[Member], outer: dict[str, float] | None
    ) -> dict[int, dict[str, Any]]:
        params: dict[str, Any] = {"seg_round": r}
        source, sparams = self.source(r, members)
        params.update(sparams)
        merged = (
            f"(SELECT p.member, dbdl.merge(p.state ORDER BY p.segment) AS state FROM {self.table}"
            " AS p WHERE p.round = CAST(:seg_round AS integer) AND p.segment >= 0"
            " GROUP BY p.member)"
        )
        if outer is None:
            expr = "COALESCE(mg.state, st.state)"
        else:
            params["seg_outer"] = json.dumps(outer)
            expr = (
                "CASE WHEN mg.state IS NULL THEN st.state ELSE"
                " dbdl.outer_step(st.state, mg.state, CAST(:seg_outer AS text)) END"
            )
        self._execute(0, (
            f"INSERT INTO {self.table} (round, segment, member, state)"
            f" SELECT CAST(:seg_round AS integer), -1, st.member, {expr} FROM {source} AS st"
            f" LEFT JOIN {merged} AS mg ON mg.member = st.member"
        ), params)
        rows = self._execute(0, (
            f"SELECT s.member, dbdl.state_info(s.state) FROM {self.table} AS s"
            " WHERE s.round = CAST(:seg_round AS integer) AND s.segment = -1 AND s.member IN"
            f" (SELECT p.member FROM {self.table} AS p WHERE p.round ="
            " CAST(:seg_round AS integer) AND p.segment >= 0)"
        ), {"seg_round": r})
        return {int(m): json.loads(info) for m, info in rows}

    def commit(self, conn: Connection, members: list[Member], iteration: int, last: int) -> None:
        params: dict[str, Any] = {"iteration": iteration + 1, "seg_round": last}
        relation = self.backend.members_relation(members, params)
        last_merged = "s.round = CAST(:seg_round AS integer) AND s.segment = -1"
        conn.execute(text(insert_checkpoints_sql(
            self.backend.store_tables(), self.table, relation, last_merged
        )), params)

    def close(self) -> None:
        for k in range(len(self.connections)):
            self._cancel(k)
        self.executor.shutdown(wait=True, cancel_futures=True)
        dropped = False
        for conn in self.connections:
            if not dropped:
                try:
                    conn.execute(text(f"DROP TABLE IF EXISTS {self.table}"))
                    conn.commit()
                    dropped = True
                except DBAPIError:
                    pass
            with contextlib.suppress(DBAPIError):
                conn.close()
        if not dropped:  # every segment's session is gone: drop it from a fresh one
            try:
                with self.engine.begin() as fresh:
                    fresh.execute(text(f"DROP TABLE IF EXISTS {self.table}"))
            except DBAPIError:
                pass  # swept as a dead run's work table later
        self.connections = []
        self.engine.dispose()


__all__ = ["PostgresSegments", "Segments", "await_all"]
