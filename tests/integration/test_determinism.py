"""Same rows, same seed, same model: whatever order a scan returns the rows in.

PostgreSQL's synchronized sequential scans start a scan where a concurrent scan of the same
large table is; a table rewritten in another physical order returns its rows in that order.
Staging numbers the rows by their content, so neither changes the shuffle, the split or the
model; and a resume checks the packed data's fingerprint against the interrupted run's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.errors import InputError
from dbdl_magic.events import Callbacks

pytestmark = pytest.mark.postgres

OPTIONS = dict(target="label", model="linear", epochs=1, batch_size=256, lr=0.05, seed=3,
               validation=0.2, parallel=1, optimizer="sgd")


FLIP = "UPDATE data SET label = 1 - label WHERE f0 = (SELECT max(f0) FROM data)"


def weights(model) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in model.parameters()]


def test_physical_row_order_does_not_change_the_model(pg_db):
    """(SQLite numbers rows in rowid order, which concurrent readers do not change.)"""
    db = pg_db
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(3000, 6)), columns=[f"f{i}" for i in range(6)])
    frame["label"] = (frame["f0"] + frame["f1"] > 0).astype(int)
    load_table(db.engine, "ordered", frame)
    load_table(db.engine, "shuffled", frame.sample(frac=1.0, random_state=1))
    a = dl.train(db, "SELECT * FROM ordered", name="a", **{**OPTIONS, "epochs": 2})
    b = dl.train(db, "SELECT * FROM shuffled", name="b", **{**OPTIONS, "epochs": 2})
    assert list(a.history["train_loss"]) == list(b.history["train_loss"])
    for wa, wb in zip(weights(a), weights(b), strict=True):
        assert np.array_equal(wa, wb)


def test_same_seed_same_model_while_another_session_scans(pg_db):
    """A table larger than a quarter of shared_buffers gets synchronized scans: a cursor in
    another session parked a third of the way through makes the staging scan start there."""
    engine = pg_db.engine
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE big AS SELECT g AS id,"
            + ", ".join(f"sin(g * {i + 1}.7) AS f{i}" for i in range(10))
            + ", (sin(g * 1.7) + cos(g * 2.9) > 0)::int AS label"
            " FROM generate_series(1, 400000) AS g"
        ))
        conn.execute(text("ANALYZE big"))
        size = conn.execute(text("SELECT pg_relation_size('big')")).scalar_one()
        buffers = conn.execute(text(
            "SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'"
        )).scalar_one()
    assert size > buffers / 4, "the table must be large enough for synchronized scans"
    query = "SELECT " + ", ".join(f"f{i}" for i in range(10)) + ", label FROM big"
    alone = dl.train(pg_db, query, name="alone", **OPTIONS)

    scanner = engine.connect()
    trans = scanner.begin()
    scanner.execute(text("DECLARE parked NO SCROLL CURSOR FOR SELECT id FROM big"))
    first = scanner.execute(text("FETCH 130000 FROM parked")).scalars().all()
    assert first[0] == 1  # the parked scan started at the table's start...
    try:
        with engine.connect() as conn:  # ...and a plain scan now starts where it is parked
            start = conn.execute(text("SELECT id FROM big LIMIT 1")).scalar_one()
        scanned = dl.train(pg_db, query, name="scanned", **OPTIONS)
    finally:
        trans.rollback()
        scanner.close()
    print(f"\nsynchronized scan started at id {start}; epoch-1 train loss "
          f"{alone.history['train_loss'].iloc[0]:.6f} alone, "
          f"{scanned.history['train_loss'].iloc[0]:.6f} while another session scanned")
    assert start != 1, "the concurrent scan did not move the start of the next scan"
    assert list(alone.history["train_loss"]) == list(scanned.history["train_loss"])
    for wa, wb in zip(weights(alone), weights(scanned), strict=True):
        assert np.array_equal(wa, wb)


def test_resume_refuses_changed_data(db):
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(rng.normal(size=(2000, 4)), columns=[f"f{i}" for i in range(4)])
    frame["label"] = (frame["f0"] > 0).astype(int)
    load_table(db.engine, "data", frame)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.train(db, "SELECT * FROM data", name="changing", on_interrupt="raise",
                 callbacks=Callbacks(on_iteration=stop_after_first),
                 **{**OPTIONS, "epochs": 3})
    with db.engine.begin() as conn:  # one row changes: same query, other data
        conn.execute(text(FLIP))
    with pytest.raises(InputError, match="training rows, split or shuffle differ"):
        dl.train(db, "SELECT * FROM data", name="changing", resume=True,
                 **{**OPTIONS, "epochs": 3})
    with db.engine.begin() as conn:  # back as it was: the resume goes through
        conn.execute(text(FLIP))
    model = dl.train(db, "SELECT * FROM data", name="changing", resume=True,
                     **{**OPTIONS, "epochs": 3})
    assert list(model.history["epoch"]) == [1, 2, 3]
