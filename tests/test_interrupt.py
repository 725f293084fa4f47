"""Ctrl-C mid-iteration cancels the database statement and keeps the last completed model;
early stopping stops on a plateau and restores the best iteration."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.runs import Callbacks


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
        if row["epoch"] == 2:  # Ctrl-C 0.3 s into the third iteration
            started["t"] = time.monotonic()
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    t0 = time.monotonic()
    model = dl.train(db, "big", target="label", model="mlp:256,256", epochs=50,
                     batch_size=64, on_interrupt="return", validation=0.1,
                     callbacks=Callbacks(on_iteration=on_iteration))
    returned = time.monotonic()
    assert model.status == "interrupted"
    assert len(model.history) == 2 and model.info["iteration"] == 2
    # it stopped within the third iteration, not after 50
    per_iteration = (started["t"] - t0) / 2
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
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'dbdl' "
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


def test_ctrl_c_raises_by_default(sqlite_db):
    load_table(sqlite_db.engine, "big", synthetic(20_000))

    def on_iteration(row):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    with pytest.raises(KeyboardInterrupt):
        dl.train(sqlite_db, "big", target="label", model="mlp:256,256", epochs=50,
                 callbacks=Callbacks(on_iteration=on_iteration))
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
