"""Distributed PostgreSQL (Citus): the training aggregate pushes down to the workers.

Runs only when ``DBDL_CITUS_URL`` names a Citus coordinator whose workers have torch and
dbdl_magic importable (see docs/DEPLOYMENT.md). Without it the test reports itself as not
applicable — the one test allowed to skip on CI.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import digits_frame, load_table

CITUS_URL = os.environ.get("DBDL_CITUS_URL")

pytestmark = pytest.mark.skipif(
    not CITUS_URL, reason="not applicable: set DBDL_CITUS_URL to a Citus coordinator"
)


def test_training_pushes_the_aggregate_down_to_citus_workers():
    db = dl.install(CITUS_URL)
    load_table(db.engine, "citus_digits", digits_frame())
    model = dl.train(db, "SELECT * FROM citus_digits", name="citus_digits", target="digit",
                     model="mlp:32", epochs=3, seed=0)
    assert model.history["val_accuracy"].iloc[-1] > 0.8
    backend = db.backend
    packed = backend.table("packed_citus_explain")
    with db.engine.begin() as conn:
        conn.execute(text(
            f"CREATE TABLE {packed} (split integer, buffer_id bigint, x bytea, y bytea)"))
        conn.execute(text("SELECT create_distributed_table(:t, 'buffer_id')"), {"t": packed})
        plan = "\n".join(r[0] for r in conn.execute(
            text("EXPLAIN (VERBOSE) " + backend.iteration_sql(packed)),
            {"name": model.name, "version": model.version, "iteration": 0, "config": "{}"},
        ))
        conn.execute(text(f"DROP TABLE {packed}"))
    # the partial aggregate runs on the shards; the coordinator combines
    assert "Custom Scan (Citus" in plan, plan
    assert "worker_partial_agg" in plan and "coord_combine_agg" in plan, plan
