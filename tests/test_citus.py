"""Distributed PostgreSQL (Citus): the training aggregate pushes down to the workers.

Runs only when ``DBDL_CITUS_URL`` names a Citus coordinator (superuser) whose workers have
PL/Python, torch and dbdl_magic importable (see docs/scale-out.md). Without it the test reports
itself as not applicable — the one test allowed to skip on CI.

What Citus prints for a pushed-down custom aggregate (EXPLAIN VERBOSE, Citus 10-14):

    HashAggregate                                   (or GroupAggregate: GROUP BY member)
      Output: remote_scan.member, coord_combine_agg('<oid>'::oid, remote_scan.state, NULL::bytea)
      ->  Custom Scan (Citus Adaptive)
            ->  Distributed Subplan <n>_1            (the local table of starting states)
            Task Count: <shards>
            Tasks Shown: One of <shards>
            ->  Task
                  Query: SELECT m.member, worker_partial_agg('dbdl.train(bytea,bytea,bigint,
                         bytea,text)'::regprocedure, ROW(...)) AS state FROM ... GROUP BY ...
                  Node: host=... port=... dbname=...
                  ->  HashAggregate / GroupAggregate
                        ->  ... Seq Scan on dbdl.<packed>_<shardid> ...

Citus 14 may use ``worker_binary_partial_agg`` / ``coord_binary_combine_agg`` instead (binary
state transfer). A plan without these (``dbdl.train(remote_scan.x, ...)`` on the coordinator)
would mean the rows were pulled to the coordinator: ``citus.coordinator_aggregation_strategy``
is set to ``disabled`` so that case errors instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid

import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.backends.base import Member
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.errors import InputError

CITUS_URL = os.environ.get("DBDL_CITUS_URL")

pytestmark = pytest.mark.skipif(
    not CITUS_URL,
    reason="not applicable: set DBDL_CITUS_URL to a Citus coordinator (see docs/scale-out.md)",
)

PARTIAL = re.compile(r"\bworker_(?:binary_)?partial_agg\(")
COMBINE = re.compile(r"\bcoord_(?:binary_)?combine_agg\(")
CITUS_SCAN = re.compile(r"Custom Scan \(Citus [A-Za-z -]+\)")
TASK_COUNT = re.compile(r"Task Count: (\d+)")


def _distribution(conn, table: str) -> tuple[str | None, int]:
    """(distribution column, shard count) of a Citus table; (None, 0) if it is not distributed."""
    column = conn.execute(
        text(
            "SELECT column_to_column_name(logicalrelid, partkey) FROM pg_dist_partition"
            " WHERE logicalrelid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).scalar()
    shards = conn.execute(
        text("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = CAST(:t AS regclass)"),
        {"t": table},
    ).scalar_one()
    return column, int(shards)


def test_training_pushes_the_aggregate_down_to_citus_workers():
    db = dl.install(CITUS_URL)
    backend = db.backend
    token = uuid.uuid4().hex[:8]
    source = f"citus_digits_{token}"
    packed = backend.table(f"packed_citus_explain_{token}")
    states = backend.table(f"states_citus_explain_{token}")

    with db.engine.connect() as conn:
        citus = conn.execute(
            text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
        ).scalar()
        assert citus, f"{CITUS_URL} has no citus extension: CREATE EXTENSION citus first"
        # The kernels (functions, aggregates) must exist on every worker and import torch there.
        workers = conn.execute(
            text(
                "SELECT nodename, nodeport, success, result"
                " FROM run_command_on_workers($$SELECT dbdl.kernel_info()$$)"
            )
        ).all()
    assert workers, "the coordinator has no active workers (citus_add_node)"
    broken = [f"{h}:{p}: {r}" for h, p, ok, r in workers if not ok]
    assert not broken, "dbdl kernels unusable on workers (see docs/scale-out.md):\n" + "\n".join(
        broken
    )

    try:
        # 1. The backend's own packed table is distributed by buffer_id.
        with db.engine.begin() as conn:
            backend.create_packed(
                conn,
                packed,
                "SELECT CASE WHEN g % 5 = 0 THEN 1 ELSE 0 END AS split, CAST(NULL AS text) AS grp,"
                " g AS ord, CAST(g AS real) AS p0, g % 2 AS y FROM generate_series(0, 999) AS g",
                [("p0", False)],
                "y",
                True,
                50,
                {},
            )
        with db.engine.connect() as conn:
            column, shards = _distribution(conn, packed)
        assert column == "buffer_id", f"{packed} is not distributed by buffer_id: {column!r}"
        assert shards >= 1

        # 2. One iteration is a partial aggregate per shard plus a combine on the coordinator.
        #    The starting states come from a local (coordinator) table, as in train_iteration.
        sql, params = backend.iteration_query(packed, [Member(0, "citus_explain", 1, {})], states)
        with db.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {states} (member integer, state bytea)"))
            conn.execute(text("SET LOCAL citus.coordinator_aggregation_strategy TO 'disabled'"))
            plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN (VERBOSE) " + sql), params))
        assert CITUS_SCAN.search(plan), plan
        tasks = [int(n) for n in TASK_COUNT.findall(plan)]
        assert shards in tasks, f"expected a task per shard ({shards}):\n{plan}"
        assert PARTIAL.search(plan), f"no worker partial aggregate:\n{plan}"
        assert COMBINE.search(plan), f"no coordinator combine:\n{plan}"
        assert "dbdl.train(" in plan, plan

        # 3. End to end, from a distributed source table.
        load_table(db.engine, source, digits_frame())
        with db.engine.begin() as conn:
            conn.execute(text("SELECT create_distributed_table(:t, 'digit')"), {"t": source})
        model = dl.train(
            db,
            f"SELECT * FROM {source}",
            name=f"citus_digits_{token}",
            target="digit",
            model="mlp:32",
            epochs=3,
            seed=0,
            parallel=1,  # Citus's parallelism is the shards; PG parallel workers add nothing
            threads=1,
        )
        assert model.history["val_accuracy"].iloc[-1] > 0.8, model.history
    finally:
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {packed}"))
            conn.execute(text(f"DROP TABLE IF EXISTS {states}"))
            conn.execute(text(f"DROP TABLE IF EXISTS {backend.q(source)}"))
        with contextlib.suppress(InputError):  # no model row when training never started
            dl.delete_model(db, f"citus_digits_{token}")
