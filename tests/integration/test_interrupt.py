"""Ctrl-C mid-iteration cancels the database statement and keeps the last completed model;
early stopping stops on a plateau and restores the best iteration."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.events import Callbacks
from dbdl_magic.training.run import TrainingRun


def synthetic(n: int, width: int = 32, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(width)])
    frame["label"] = (np.sin(x[:, 0]) + x[:, 1] * x[:, 2] > 0).astype(int)
    return frame


def test_ctrl_c_cancels_and_returns_the_last_completed_iteration(db):
    load_table(db.engine, "big", synthetic(20_000))
    started: dict[str, float] = {}

    def on_iteration(row):
        if row["epoch"] == 2:
            started["iteration 3"] = time.monotonic()

    def on_progress(done, total):
        # a real SIGINT at the third iteration's first progress report: surely mid-iteration,
        # however fast or loaded this machine is (a timer thread once fired after the third
        # iteration's commit). On PostgreSQL this runs inside psycopg's notice receiver.
        if "iteration 3" in started and "t" not in started:
            started["t"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

    t0 = time.monotonic()
    model = dl.train(db, "big", target="label", model="mlp:256,256", epochs=50,
                     batch_size=64, on_interrupt="return", validation=0.1,
                     callbacks=Callbacks(on_iteration=on_iteration, on_progress=on_progress))
    returned = time.monotonic()
    assert model.status == "interrupted"
    assert len(model.history) == 2 and model.info["iteration"] == 2
    # it stopped within the third iteration, not after 50
    per_iteration = (started["iteration 3"] - t0) / 2
    assert returned - started["t"] < per_iteration + 5
    listing = dl.list_models(db)
    assert listing.loc[0, "status"] == "interrupted"
    stored = dl.load_model(db, model.name)
    frame = synthetic(200, seed=1)
    assert np.allclose(stored.predict_proba(frame), model.predict_proba(frame))
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            active = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE '%dbdl.train(%' AND pid <> pg_backend_pid()")).scalar_one()
            assert active == 0
            leftovers = conn.execute(text(
                "SELECT count(*) FROM pg_tables"
                " WHERE (schemaname = 'dbdl' OR starts_with(schemaname, 'dbdl_work_')) "
                "AND tablename NOT IN ('models', 'checkpoints', 'meta', 'blocks', "
                "'checkpoint_blocks')")).scalar_one()
        else:
            names = conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE "
                "'dbdl\\_%' ESCAPE '\\' AND name NOT IN ('dbdl_models', 'dbdl_checkpoints', "
                "'dbdl_meta', 'dbdl_blocks', 'dbdl_checkpoint_blocks')")).scalars().all()
            leftovers = len(names)
            assert not names, names
        assert leftovers == 0


def test_ctrl_c_while_a_monitor_draws_progress_stops_the_query(db):
    """A Ctrl-C that lands inside the progress callback (a widget redrawing): PostgreSQL
    delivers progress as notices, whose receiver in psycopg swallows exceptions; the query must
    still be cancelled and the run end as interrupted, not train on to the end."""
    load_table(db.engine, "big", synthetic(6_000))
    seen: list[int] = []

    def on_iteration(row):
        seen.append(row["epoch"])

    def on_progress(done, total):
        if len(seen) == 2:
            raise KeyboardInterrupt

    model = dl.train(db, "big", target="label", model="mlp:64", epochs=30, batch_size=32,
                     on_interrupt="return", validation=0.1,
                     callbacks=Callbacks(on_iteration=on_iteration, on_progress=on_progress))
    assert model.status == "interrupted"
    assert len(model.history) == 2 and model.info["iteration"] == 2


def test_ctrl_c_right_after_a_commit_keeps_that_iteration(sqlite_db, monkeypatch):
    """The window between an iteration's commit and the in-memory histories: the returned
    model, its history and the stored row agree on the committed iteration."""
    load_table(sqlite_db.engine, "small", synthetic(600))
    record = TrainingRun._record

    def interrupted_after_commit(self, alive, rows, seconds, trained):
        if next(iter(rows.values()))["epoch"] == 3:
            raise KeyboardInterrupt
        record(self, alive, rows, seconds, trained)

    monkeypatch.setattr(TrainingRun, "_record", interrupted_after_commit)
    model = dl.train(sqlite_db, "small", target="label", model="mlp:8", epochs=10,
                     on_interrupt="return", validation=0.2)
    assert model.status == "interrupted"
    assert model.info["iteration"] == 3
    assert [row["epoch"] for row in model.history.to_dict("records")] == [1, 2, 3]
    stored = dl.list_models(sqlite_db)
    assert stored.loc[0, "status"] == "interrupted"


def test_ctrl_c_raises_by_default(sqlite_db):
    load_table(sqlite_db.engine, "big", synthetic(20_000))

    seen: list[int] = []

    def on_progress(done, total):  # a real SIGINT at the second iteration's first report
        if len(seen) == 1:
            seen.append(0)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        dl.train(sqlite_db, "big", target="label", model="mlp:256,256", epochs=50,
                 callbacks=Callbacks(on_iteration=lambda row: seen.append(row["epoch"]),
                                     on_progress=on_progress))
    assert dl.list_models(sqlite_db).loc[0, "status"] == "interrupted"


def test_early_stopping_restores_the_best_iteration(sqlite_db):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd"))
    frame["label"] = rng.integers(0, 2, size=300)  # pure noise: validation loss soon rises
    load_table(sqlite_db.engine, "noise", frame)
    model = dl.train(sqlite_db, "noise", target="label", model="mlp:128,128", epochs=60,
                     lr=1e-2, batch_size=16, patience=3)
    h = model.history
    assert len(h) < 60
    best = int(h["val_loss"].idxmin())
    assert len(h) == best + 1 + 3  # stopped after three iterations without improvement
    assert model.info["iteration"] == best + 1  # and the model is the best iteration
    with pytest.raises(dl.InputError, match="monitor='val_auc'"):
        dl.train(sqlite_db, "noise", target="label", epochs=3, patience=2, monitor="val_auc")
