"""When a run fails or is interrupted: database errors translated for the user, the members
marked failed or interrupted (their committed histories kept), and the work tables dropped
whatever happened."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from dbdl_magic.errors import DbdlError, TrainingError
from dbdl_magic.store import registry
from dbdl_magic.training.history import catch_up

if TYPE_CHECKING:
    from dbdl_magic.training.run import TrainingRun

log = logging.getLogger(__name__)

#: SQLSTATEs of a session the server ended: admin_shutdown, crash_shutdown, cannot_connect_now
_ENDED_SESSION = frozenset({"57P01", "57P02", "57P03"})


def translate(exc: BaseException) -> BaseException:
    """Database errors become :class:`TrainingError` with the server's message as ``detail``
    (a lost connection says that the last completed iteration is kept); others stay."""
    if isinstance(exc, (DbdlError, KeyboardInterrupt)) or not isinstance(exc, DBAPIError):
        return exc
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
    if connection_lost(exc):
        return TrainingError(
            f"the connection to the database was lost during training ({first}); the last "
            "completed iteration is stored: train again with resume=True to continue",
            detail=detail,
        )
    return TrainingError(f"the database failed during training: {first}", detail=detail)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is the database connection going away (server restarted or stopped,
    session terminated) rather than an error of the statement."""
    if not isinstance(exc, DBAPIError):
        return False
    code = str(getattr(exc.orig, "sqlstate", None) or "")
    return bool(exc.connection_invalidated) or code.startswith("08") or code in _ENDED_SESSION


def first_line(exc: BaseException) -> str:
    """The first line of an error (a database error's own message, without the SQL)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def mark_failed(run: TrainingRun, exc: BaseException) -> None:
    """Record how the run ended (interrupted: Ctrl-C or the connection lost; else failed).
    Each member's committed history is the truth (an interrupt may land after an
    iteration's commit but before the in-memory lists caught up): the in-memory histories
    are brought level with it, run rows included."""
    lost = isinstance(exc, KeyboardInterrupt) or connection_lost(exc)
    status = "interrupted" if lost else "failed"
    for m in run.members:
        with contextlib.suppress(Exception), run.backend.engine.begin() as conn:
            registry.set_status(conn, run.backend, m.key, status, error=str(exc)[:2000])
            row = registry.read_model(conn, run.backend, m.key["name"], m.key["version"],
                                      with_state=False)
            m.history = list(row["history"] or [])
    catch_up(run)


def cleanup(run: TrainingRun, tables: tuple[str, ...], error: BaseException | None) -> None:
    """Drop the run's work tables. When that fails too (the server is still down), the
    run's own ``error`` stays the one raised: this failure is logged and noted on it, and
    the next run or listing drops the tables (:func:`registry.sweep_work_tables`)."""
    backend = run.backend
    try:
        with backend.engine.begin() as conn:
            for table in tables:
                backend.drop_table(conn, table)
            backend.drop_scratch_tables(conn)
    except Exception as exc:
        why = first_line(exc)
        log.warning("dbdl: dropping the work tables of run %s failed: %s", run.token, why)
        if error is not None:
            error.add_note(
                f"dbdl: dropping the run's work tables failed too ({why}); the next run or "
                "list_models drops them"
            )


__all__ = ["cleanup", "connection_lost", "first_line", "mark_failed", "translate"]
