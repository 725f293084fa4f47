"""The test PostgreSQL server: PL/Python can import the venv's torch, and plans can go parallel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pgserver import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(pg_server: PostgresServer) -> Iterator[sa.Engine]:
    """An engine on the server's default database."""
    eng = sa.create_engine(pg_server.url)
    try:
        yield eng
    finally:
        eng.dispose()


def test_plpython_imports_torch(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS plpython3u"))
        conn.execute(
            sa.text(
                """
                CREATE OR REPLACE FUNCTION dbdl_torch_version() RETURNS text AS $$
                import torch, numpy, safetensors
                return torch.__version__
                $$ LANGUAGE plpython3u
                """
            )
        )
        version = conn.execute(sa.text("SELECT dbdl_torch_version()")).scalar_one()
    assert version.startswith("2.13"), version


def test_parallel_plan_can_be_forced(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE dbdl_parallel_probe AS "
                "SELECT g AS id, random() AS x FROM generate_series(1, 20000) AS g"
            )
        )
        conn.execute(sa.text("ANALYZE dbdl_parallel_probe"))
        for setting in (
            "parallel_setup_cost = 0",
            "parallel_tuple_cost = 0",
            "min_parallel_table_scan_size = 0",
            "max_parallel_workers_per_gather = 2",
        ):
            conn.execute(sa.text(f"SET LOCAL {setting}"))
        plan = "\n".join(
            conn.execute(sa.text("EXPLAIN SELECT sum(x) FROM dbdl_parallel_probe")).scalars()
        )
        analyzed = "\n".join(
            conn.execute(
                sa.text("EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM dbdl_parallel_probe")
            ).scalars()
        )
        conn.execute(sa.text("DROP TABLE dbdl_parallel_probe"))
    assert "Workers Planned: 2" in plan, plan
    # Workers really start (dynamic shared memory works), not just get planned.
    assert "Workers Launched: 2" in analyzed, analyzed
