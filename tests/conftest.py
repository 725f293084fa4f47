"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pgserver import PostgresServer, server_pythonpath, unavailable_reason


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server with PL/Python for the whole session.

    When no server can be started here, the test fails on CI (``CI`` set) and is skipped
    otherwise.
    """
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unavailable on CI: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    server = PostgresServer.start(server_pythonpath())
    try:
        yield server
    finally:
        server.stop()
