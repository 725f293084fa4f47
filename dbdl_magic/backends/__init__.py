"""One backend per SQL dialect: they phrase SQL and install kernels; no training math."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from ..errors import InstallError
from .base import Backend


def backend_for(engine: Engine) -> Backend:
    """The backend for ``engine``'s dialect."""
    name = engine.dialect.name
    if name == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend(engine)
    if name == "postgresql":
        from .postgres import PostgresBackend

        return PostgresBackend(engine)
    raise InstallError(f"no dbdl backend for the {name!r} dialect; use SQLite or PostgreSQL")


__all__ = ["Backend", "backend_for"]
