"""PostgreSQL specifics: installation, parallel workers and the combine path, notices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.backends.base import Member
from dbdl_magic.datasets import digits_frame, load_table
from dbdl_magic.events import Callbacks
from dbdl_magic.kernel import KERNEL_VERSION


def test_install_is_idempotent_and_checked(pg_db):
    again = dl.install(pg_db.engine)
    assert again.info["kernel_version"] == KERNEL_VERSION
    assert again.info["torch"].startswith("2.")
    with pg_db.engine.connect() as conn:
        version = conn.execute(text("SELECT value FROM dbdl.meta WHERE key = 'version'"))
        assert version.scalar_one() == KERNEL_VERSION


def test_kernels_follow_the_parallel_rules(pg_db):
    with pg_db.engine.connect() as conn:
        agg = conn.execute(text(
            "SELECT p.proname, a.aggcombinefn::regproc::text, p.proparallel,"
            " a.aggtranstype::regtype::text"
            " FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dbdl'"
            " ORDER BY 1"
        )).all()
        functions = conn.execute(text(
            "SELECT p.proname, p.proparallel, p.prosrc FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'dbdl' AND p.prokind = 'f'"
        )).all()
    assert [(r[0], r[2], r[3]) for r in agg] == [
        ("evaluate", "s", "bytea"),
        ("merge", "s", "bytea"),
        ("train", "s", "bytea"),
    ]
    assert all(r[1] != "-" for r in agg)  # each has a combine function
    merge = next(r for r in agg if r[0] == "merge")
    assert merge[1] == "dbdl.train_combine"  # segments' partials: the training combine
    # these use SPI (storage routines, per-row prediction that reads the stored model):
    storage = {"archive_checkpoint", "materialize_checkpoint", "release_blocks", "predict",
               "predict_value", "predict_proba", "work_schema"}  # work_schema: DDL
    for name, parallel, source in functions:
        if name in storage:  # never allowed in a parallel plan
            assert parallel == "u", name
            continue
        assert parallel == "s", name
        assert "plpy.execute" not in source and "plpy.prepare" not in source, name
        assert "plpy.cursor" not in source and "subtransaction" not in source, name
        assert "(plpy," not in source, name  # no SPI handle handed to the kernel


@pytest.fixture
def big_digits(pg_db):
    frame = digits_frame()
    load_table(pg_db.engine, "digits", frame)
    return frame


def test_parallel_workers_run_the_combine_path(pg_db, big_digits):
    backend = pg_db.backend
    model = dl.train(pg_db, "SELECT * FROM digits", target="digit", model="mlp:64", epochs=4,
                     batch_size=32, lr=2e-3, parallel=2, seed=0)
    h = model.history
    n_train = round(len(big_digits) * 0.8)
    assert (h["workers"] == 2).all() and (h["combines"] >= 1).all()
    assert (h["samples"] == n_train).all()  # every row trained once, across both workers
    assert h["val_accuracy"].iloc[-1] > 0.85
    # The plan really is a parallel partial aggregate with two workers.
    packed, states = backend.table("packed_explain"), backend.table("states_explain")
    with pg_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {packed} AS SELECT 0 AS split, "
                          "CAST(NULL AS text) AS grp, CAST(1 AS bigint) AS buffer_id, "
                          "CAST('' AS bytea) AS x, CAST('' AS bytea) AS y "
                          "FROM generate_series(1, 100)"))
        conn.execute(text(f"CREATE TABLE {states} (member integer, state bytea)"))
        backend._parallel_settings(conn, packed, 2)
        sql, params = backend.iteration_query(packed, [Member(0, model.name, 1, {})], states)
        plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + sql), params))
        conn.execute(text(f"DROP TABLE {packed}"))
        conn.execute(text(f"DROP TABLE {states}"))
    assert "Workers Planned: 2" in plan and "Partial Aggregate" in plan, plan
    assert "Finalize Aggregate" in plan


def test_one_worker_runs_no_combine(pg_db, big_digits):
    model = dl.train(pg_db, "SELECT * FROM digits", target="digit", model="linear", epochs=2)
    assert (model.history["workers"] == 1).all() and (model.history["combines"] == 0).all()


def test_progress_arrives_as_notices(pg_db, big_digits):
    seen: list[tuple[int, int]] = []
    dl.train(pg_db, "SELECT * FROM digits", target="digit", model="mlp:32", epochs=2,
             callbacks=Callbacks(on_progress=lambda done, total: seen.append((done, total))))
    totals = {t for _, t in seen}
    assert len(totals) == 1
    total = totals.pop()
    assert len(seen) >= 4 and seen[-1][0] == total
    assert all(0 < done <= total for done, _ in seen)


def test_state_header_is_readable_in_sql(pg_db, big_digits):
    model = dl.train(pg_db, "SELECT * FROM digits", target="digit", model="linear", epochs=1)
    with pg_db.engine.connect() as conn:
        info = json.loads(conn.execute(
            text("SELECT dbdl.state_info(state) FROM dbdl.checkpoints WHERE name = :n "
                 "ORDER BY iteration DESC LIMIT 1"), {"n": model.name}).scalar_one())
    assert info["samples"] == model.history["samples"].iloc[-1]
    assert info["device"] == "cpu" and np.isfinite(info["loss"])


@pytest.mark.parametrize("made_by", ["dbdl", "user"])
def test_kernel_queries_skip_jit_and_stay_in_one_warm_server_process(pg_db, made_by):
    """Every statement that calls a kernel runs with JIT off (its compile cost ≈ 0.2 s a query
    bought nothing) and lz4 TOAST compression (pglz took ≈ 0.17 s per 13 MB state written to a
    scratch table) and, run after run, in the same server process (a LIFO pool: the process
    that has torch imported and its caches warm; an engine the user made pools FIFO, so no
    run may hold two connections at once)."""
    from sqlalchemy import create_engine, event

    if made_by == "user":
        pg_db = dl.connect(create_engine(pg_db.engine.url))
    frame = digits_frame().head(600)
    frame["region"] = np.where(frame.index % 2 == 0, "even", "odd")
    load_table(pg_db.engine, "digits", frame)
    seen: list[tuple[str, int, str]] = []
    kernels = ("dbdl.train(", "dbdl.evaluate(", "dbdl.predict_batch(", "dbdl.predict_buffer(")

    @event.listens_for(pg_db.engine, "before_cursor_execute")
    def before(conn, cursor, statement, parameters, context, executemany):
        called = [k for k in kernels if k in statement]
        if called:
            raw = conn.connection.driver_connection
            with raw.cursor() as probe:
                jit = probe.execute("SHOW jit").fetchone()[0]
                jit += "/" + probe.execute("SHOW default_toast_compression").fetchone()[0]
            seen.append((called[0], raw.info.backend_pid, jit))

    pg_db.engine.dispose()  # nothing pooled from before the hook
    try:
        dl.train(pg_db, "SELECT * FROM digits", target="digit", model="mlp:16", epochs=3,
                 group_by="region", parallel=1, name="grouped")
        dl.train(pg_db, "SELECT * FROM digits", target="digit", model="mlp:16", epochs=2,
                 parallel=1, name="plain")
        dl.predict(pg_db, "plain", "SELECT * FROM digits")
    finally:
        event.remove(pg_db.engine, "before_cursor_execute", before)
    assert {k for k, _, _ in seen} >= {"dbdl.train(", "dbdl.evaluate(", "dbdl.predict_batch("}
    assert {settings for _, _, settings in seen} == {"off/lz4"}
    assert len({pid for _, pid, _ in seen}) == 1, seen
