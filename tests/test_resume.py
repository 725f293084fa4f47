"""Crash and resume: a killed client or a killed server backend loses nothing; resuming gives
the same model as an uninterrupted run with the same seed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.errors import InputError, TrainingError
from dbdl_magic.runs import Callbacks

# parallel=1: "auto" may change the worker count between runs (it follows measured times),
# and a different number of averaged partial models gives a (slightly) different model
OPTIONS = dict(target="label", model="mlp:64,32", epochs=5, batch_size=64, seed=11, lr=2e-3,
               rows_per_buffer=1024, parallel=1)


def synthetic(n: int = 12_000) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 16))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(16)])
    frame["label"] = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] > 0).astype(int)
    return frame


def weights(model) -> list[np.ndarray]:
    return [p.detach().cpu().numpy() for p in model.parameters()]


def assert_same_run(a, b) -> None:
    assert list(a.history["epoch"]) == list(b.history["epoch"])
    assert np.allclose(a.history["train_loss"], b.history["train_loss"], rtol=0, atol=1e-6)
    assert np.allclose(a.history["val_loss"], b.history["val_loss"], rtol=0, atol=1e-6)
    for wa, wb in zip(weights(a), weights(b), strict=True):
        assert np.allclose(wa, wb, rtol=0, atol=1e-6)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import dbdl_magic as dl
    from dbdl_magic.runs import Callbacks
    url, options = sys.argv[1], eval(sys.argv[2])
    def on_progress(done, total, seen=[0]):
        seen[0] += 1
        if seen[0] > 1 and done < total and on_progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the client dies mid-iteration
    on_progress.epoch = 0
    def on_iteration(row):
        on_progress.epoch = row["epoch"]
    dl.train(url, "SELECT * FROM data", name="crashy", callbacks=Callbacks(
        on_progress=on_progress, on_iteration=on_iteration), **options)
""")


def test_resume_after_the_client_process_is_killed(db):
    load_table(db.engine, "data", synthetic())
    reference = dl.train(db, "SELECT * FROM data", name="reference", **OPTIONS)
    url = db.engine.url.render_as_string(hide_password=False)
    options = {**OPTIONS, "threads": 1}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, url, repr(options)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    listing = dl.list_models(db).set_index("name")
    assert listing.loc["crashy", "status"] == "training"  # the client never got to say more
    crashed = dl.load_model(db, "crashy")
    assert len(crashed.history) == 2 and crashed.info["iteration"] == 2
    resumed = dl.train(db, "SELECT * FROM data", name="crashy", resume=True, **options)
    assert resumed.version == 1 and resumed.status == "complete"
    assert_same_run(resumed, reference)
    # the killed client's work tables were dropped on resume
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = ("SELECT count(*) FROM pg_tables WHERE schemaname = 'dbdl' "
                   "AND tablename LIKE 'packed%'")
        else:
            sql = "SELECT count(*) FROM sqlite_master WHERE name LIKE 'dbdl_packed%'"
        assert conn.execute(text(sql)).scalar_one() == 0


def test_resume_after_the_server_backend_is_terminated(pg_db):
    load_table(pg_db.engine, "data", synthetic())
    reference = dl.train(pg_db, "SELECT * FROM data", name="reference", **OPTIONS)
    killer = create_engine(pg_db.engine.url)
    state = {"epoch": 0, "killed": False}

    def on_progress(done, total):
        if state["epoch"] == 2 and not state["killed"] and done < total:
            state["killed"] = True
            threading.Thread(target=terminate, daemon=True).start()

    def terminate():
        with killer.begin() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%dbdl.train(%' AND pid <> pg_backend_pid()"))

    with pytest.raises(TrainingError):
        dl.train(pg_db, "SELECT * FROM data", name="victim", callbacks=Callbacks(
            on_progress=on_progress,
            on_iteration=lambda row: state.update(epoch=row["epoch"])), **OPTIONS)
    assert state["killed"]
    victim = dl.load_model(pg_db, "victim")
    assert victim.status == "failed" and len(victim.history) == 2
    resumed = dl.train(pg_db, "SELECT * FROM data", name="victim", resume=True, **OPTIONS)
    assert_same_run(resumed, reference)
    killer.dispose()


def test_resume_refuses_changed_options_and_complete_runs(sqlite_db):
    load_table(sqlite_db.engine, "data", synthetic(500))
    small = {**OPTIONS, "epochs": 1}
    dl.train(sqlite_db, "SELECT * FROM data", name="done", **small)
    with pytest.raises(InputError, match="complete"):
        dl.train(sqlite_db, "SELECT * FROM data", name="done", resume=True, **small)
    with pytest.raises(InputError, match="no run named 'ghost'"):
        dl.train(sqlite_db, "SELECT * FROM data", name="ghost", resume=True, **small)
    with sqlite_db.engine.begin() as conn:
        conn.execute(text("UPDATE dbdl_models SET status = 'interrupted'"))
    with pytest.raises(InputError, match="lr"):
        dl.train(sqlite_db, "SELECT * FROM data", name="done", resume=True,
                 **{**small, "lr": 0.5})
