"""Distributed PostgreSQL (Citus): the training aggregate pushes down to the workers.

Runs only when ``DBDL_CITUS_URL`` names a Citus coordinator (superuser) whose workers have
PL/Python, torch and dbdl_magic importable (``scripts/citus_cluster.py`` starts one: a
coordinator and two workers on 127.0.0.1; see docs/scale-out.md). Without it the tests report
themselves as not applicable — the only tests allowed to skip on CI. The accuracy comparison
also trains on plain PostgreSQL (the ``pg_db`` fixture).

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


def _kernels_on_workers(db) -> None:
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


def test_the_aggregate_pushes_down_to_as_many_shards_as_the_run_chose():
    db = dl.install(CITUS_URL)
    _kernels_on_workers(db)
    backend = db.backend
    token = uuid.uuid4().hex[:8]
    packed = backend.table(f"packed_citus_explain_{token}")
    states = backend.table(f"states_citus_explain_{token}")
    try:
        # The backend's own packed table is distributed by buffer_id over the shards the run
        # chose (parallel=N; "auto": one per worker node), not citus.shard_count.
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
            backend.distribute_packed(conn, packed, 3)
        with db.engine.connect() as conn:
            column, shards = _distribution(conn, packed)
            nodes = len(backend.citus_workers(conn))
        assert column == "buffer_id", f"{packed} is not distributed by buffer_id: {column!r}"
        assert shards == 3
        assert backend.distribution(packed) == {"shards": 3, "nodes": min(3, nodes),
                                                "cpus": backend.distribution(packed)["cpus"]}

        # One iteration is a partial aggregate per shard plus a combine on the coordinator.
        # The starting states come from a local (coordinator) table, as in train_iteration.
        sql, params = backend.iteration_query(packed, [Member(0, "citus_explain", 1, {})], states)
        with db.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {states} (member integer, state bytea)"))
            conn.execute(text("SET LOCAL citus.coordinator_aggregation_strategy TO 'disabled'"))
            plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN (VERBOSE) " + sql), params))
        assert CITUS_SCAN.search(plan), plan
        tasks = [int(n) for n in TASK_COUNT.findall(plan)]
        assert 3 in tasks, f"expected a task per shard (3):\n{plan}"
        assert PARTIAL.search(plan), f"no worker partial aggregate:\n{plan}"
        assert COMBINE.search(plan), f"no coordinator combine:\n{plan}"
        assert "dbdl.train(" in plan, plan
    finally:
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {packed}"))
            conn.execute(text(f"DROP TABLE IF EXISTS {states}"))


OPTIONS = dict(target="digit", model="mlp:64", epochs=8, seed=0, lr=3e-3, batch_size=32,
               rows_per_buffer=96, threads=1, features=[f"p{i}" for i in range(64)])


def test_training_on_citus_is_as_accurate_as_plain_postgresql(pg_db):
    db = dl.install(CITUS_URL)
    _kernels_on_workers(db)
    token = uuid.uuid4().hex[:8]
    source, name = f"citus_digits_{token}", f"citus_digits_{token}"
    frame = digits_frame()
    frame.insert(0, "id", range(len(frame)))
    load_table(db.engine, source, frame)
    load_table(pg_db.engine, source, frame)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("SELECT create_distributed_table(:t, 'digit')"), {"t": source})
        with db.engine.connect() as conn:
            nodes = len(db.backend.citus_workers(conn))
        citus = dl.train(db, f"SELECT * FROM {source}", name=name, **OPTIONS)
        plain = dl.train(pg_db, f"SELECT * FROM {source}", name=name, parallel=1, **OPTIONS)
        hc, hp = citus.history, plain.history
        print("\nepoch  citus acc  s/epoch | plain acc  s/epoch")
        for c, p in zip(hc.itertuples(), hp.itertuples(), strict=True):
            print(f"{c.epoch:>5}  {c.val_accuracy:9.4f}  {c.train_seconds:7.2f} |"
                  f" {p.val_accuracy:9.4f}  {p.train_seconds:7.2f}")
        # one partial model per worker node, combined on the coordinator, every epoch
        assert (hc["workers"] == nodes).all(), hc[["workers", "combines"]]
        assert (hc["combines"] == nodes - 1).all()
        assert hc["parallel_note"].iloc[0].startswith(f"citus: {nodes} shard(s) on {nodes} worker")
        assert (hc["samples"] == hp["samples"]).all()  # the same rows, once per epoch
        gap = hp["val_accuracy"].iloc[-1] - hc["val_accuracy"].iloc[-1]
        assert gap <= 0.02, (hc["val_accuracy"].tolist(), hp["val_accuracy"].tolist())

        # everything else on the same cluster: prediction, listing, resume, groups, grids
        scored = dl.predict(db, name, f"SELECT * FROM {source}", keys=["id"]).sort_values("id")
        client = citus.predict(frame.drop(columns=["digit"]))
        assert (scored["prediction"].to_numpy() == client).all()
        assert name in set(dl.list_models(db)["name"])
    finally:
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {db.backend.q(source)}"))
        with contextlib.suppress(InputError):
            dl.delete_model(db, name)
