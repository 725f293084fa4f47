"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pgserver import PostgresServer, throwaway_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server with PL/Python for the whole session.

    When no server can be started here, the test fails on CI (``CI`` set) and is skipped
    otherwise.
    """
    with throwaway_server() as server:
        yield server


_DB_COUNTER = iter(range(1, 1_000_000))


@pytest.fixture
def sqlite_db(tmp_path):
    """A fresh embedded SQLite database file with the dbdl tables."""
    import dbdl_magic as dl

    db = dl.connect(f"sqlite:///{tmp_path / 'test.db'}")
    yield db
    db.engine.dispose()


@pytest.fixture
def pg_db(pg_server: PostgresServer):
    """A fresh PostgreSQL database (in the session's server) with the kernels installed."""
    import dbdl_magic as dl

    url = pg_server.create_database(f"dbdl_test_{os.getpid()}_{next(_DB_COUNTER)}")
    db = dl.install(url)
    yield db
    db.engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest):
    """Each test using ``db`` runs against real SQLite and real PostgreSQL."""
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")


def load_digits(engine):
    """scikit-learn's digits (with an ``id`` column) as table ``digits``; returns the frame."""
    import numpy as np

    from dbdl_magic.datasets import digits_frame, load_table

    frame = digits_frame()
    frame.insert(0, "id", np.arange(len(frame)))
    load_table(engine, "digits", frame)
    return frame


@pytest.fixture
def digits(db):
    """Table ``digits`` in the ``db`` under test."""
    return load_digits(db.engine)


@pytest.fixture
def pg_digits(pg_db):
    """Table ``digits`` in a PostgreSQL database."""
    return load_digits(pg_db.engine)


@pytest.fixture(scope="module")
def module_pg_db(pg_server: PostgresServer):
    """One PostgreSQL database (kernels installed) shared by the tests of one module."""
    import dbdl_magic as dl

    url = pg_server.create_database(f"dbdl_module_{os.getpid()}_{next(_DB_COUNTER)}")
    db = dl.install(url)
    yield db
    db.engine.dispose()


def database_tables(db) -> set[str]:
    """Every table (on SQLite also every index) in ``db`` outside the system catalogs: to see
    that a failed call leaves nothing behind."""
    from sqlalchemy import text

    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = ("SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname"
                   " NOT IN ('pg_catalog', 'information_schema')")
        else:
            sql = "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')"
        return {r[0] for r in conn.execute(text(sql))}
