"""One backend per SQL dialect: they phrase SQL and install kernels; no training math."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from dbdl_magic.backends.base import Backend
from dbdl_magic.errors import InstallError


def backend_for(engine: Engine) -> Backend:
    """The backend for ``engine``'s dialect."""
    name = engine.dialect.name
    if name == "sqlite":
        from dbdl_magic.backends.sqlite import SQLiteBackend

        return SQLiteBackend(engine)
    if name == "postgresql":
        from dbdl_magic.backends.postgres import PostgresBackend

        return PostgresBackend(engine)
    raise InstallError(f"no dbdl backend for the {name!r} dialect; use SQLite or PostgreSQL")


__all__ = ["Backend", "backend_for"]
