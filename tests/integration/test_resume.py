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
from dbdl_magic.events import Callbacks

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
    from dbdl_magic.events import Callbacks
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
    # the client never got to say more; its session is gone, which this look records
    assert listing.loc["crashy", "status"] == "interrupted"
    crashed = dl.load_model(db, "crashy")
    assert len(crashed.history) == 2 and crashed.info["iteration"] == 2
    resumed = dl.train(db, "SELECT * FROM data", name="crashy", resume=True, **options)
    assert resumed.version == 1 and resumed.status == "complete"
    assert_same_run(resumed, reference)
    # the killed client's work tables (packed buffers, iteration scratch) were dropped
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = ("SELECT tablename FROM pg_tables"
                   " WHERE (schemaname = 'dbdl' OR starts_with(schemaname, 'dbdl_work_'))"
                   " AND tablename"
                   " NOT IN ('models', 'checkpoints', 'meta', 'blocks', 'checkpoint_blocks')")
        else:
            sql = ("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'dbdl%'"
                   " AND name NOT IN ('dbdl_models', 'dbdl_checkpoints', 'dbdl_meta',"
                   " 'dbdl_blocks', 'dbdl_checkpoint_blocks')")
        assert conn.execute(text(sql)).scalars().all() == []


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
    assert victim.status == "interrupted" and len(victim.history) == 2  # its session ended
    resumed = dl.train(pg_db, "SELECT * FROM data", name="victim", resume=True, **OPTIONS)
    assert_same_run(resumed, reference)
    killer.dispose()


def test_resume_refuses_changed_options_and_complete_runs(sqlite_db):
    load_table(sqlite_db.engine, "data", synthetic(500))
    small = {**OPTIONS, "epochs": 1}
    dl.train(sqlite_db, "SELECT * FROM data", name="done", **small)
    with pytest.raises(InputError, match="complete"):
        dl.train(sqlite_db, "SELECT * FROM data", name="done", resume=True, **small)
    with pytest.warns(UserWarning, match="no run named 'ghost'; starting a new run"):
        dl.train(sqlite_db, "SELECT * FROM data", name="ghost", resume=True, **small)
    with sqlite_db.engine.begin() as conn:
        conn.execute(text("UPDATE dbdl_models SET status = 'interrupted'"))
    with pytest.raises(InputError, match="lr"):
        dl.train(sqlite_db, "SELECT * FROM data", name="done", resume=True,
                 **{**small, "lr": 0.5})


def stop_after(epoch: int) -> Callbacks:
    """Callbacks that press Ctrl-C right after iteration ``epoch`` has been committed."""

    def on_iteration(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return Callbacks(on_iteration=on_iteration)


def member_histories(db, name: str, model) -> dict[str, pd.DataFrame]:
    board = model.leaderboard
    return {
        line["label"]: dl.load_model(db, name, int(line["version"])).history
        for _, line in board.iterrows()
    }


@pytest.mark.parametrize("on_interrupt", ["raise", "return"])
def test_a_grid_search_resumes_with_its_halving_decisions(db, on_interrupt):
    """Four trials with successive halving (rungs after epochs 1 and 2), cut after epoch 3:
    the resumed search trains only the surviving trial and ends exactly like an uninterrupted
    search (histories, leaderboard, best model)."""
    load_table(db.engine, "data", synthetic(3000))
    grid = dict(OPTIONS, model="mlp:16", epochs=4, grid={"lr": [1e-3, 3e-3, 1e-2, 3e-2]})
    reference = dl.train(db, "SELECT * FROM data", name="ref", **grid)
    if on_interrupt == "raise":
        with pytest.raises(KeyboardInterrupt):
            dl.train(db, "SELECT * FROM data", name="cut", callbacks=stop_after(3), **grid)
    else:
        cut = dl.train(db, "SELECT * FROM data", name="cut", callbacks=stop_after(3),
                       on_interrupt="return", **grid)
        assert cut.status == "interrupted" and cut.version == 5  # the best so far, provisional
    resumed = dl.train(db, "SELECT * FROM data", name="cut", resume=True, **grid)
    assert resumed.status == "complete" and resumed.version == 5
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    board, ref_board = resumed.leaderboard, reference.leaderboard
    assert list(board["label"]) == list(ref_board["label"])
    assert list(board["epochs"]) == list(ref_board["epochs"]) == [4, 2, 1, 1]
    assert list(board["status"]) == list(ref_board["status"])
    ours, theirs = member_histories(db, "cut", resumed), member_histories(db, "ref", reference)
    for label, history in theirs.items():
        assert np.allclose(ours[label]["val_loss"], history["val_loss"], rtol=0, atol=1e-6)
    for a, b in zip(weights(resumed), weights(reference), strict=True):
        assert np.allclose(a, b, rtol=0, atol=1e-6)
    listing = dl.list_models(db).query("name == 'cut'")
    assert list(listing["version"]) == [1, 2, 3, 4, 5]
    assert set(listing["status"]) == {"complete"}


@pytest.mark.parametrize("grid", [None, {"lr": [1e-3, 1e-2]}], ids=["groups", "groups+grid"])
def test_a_per_group_run_resumes_after_ctrl_c(db, grid):
    frame = synthetic(3000)
    frame["region"] = np.where(frame["f3"] > 0, "north", "south")
    load_table(db.engine, "data", frame)
    options = dict(OPTIONS, model="mlp:16", epochs=4, group_by="region", grid=grid)
    members = 4 if grid else 2
    reference = dl.train(db, "SELECT * FROM data", name="ref", **options)
    with pytest.raises(KeyboardInterrupt):
        dl.train(db, "SELECT * FROM data", name="cut", callbacks=stop_after(2), **options)
    statuses = dl.list_models(db).query("name == 'cut'")["status"].tolist()
    assert statuses == ["interrupted"] * members
    resumed = dl.train(db, "SELECT * FROM data", name="cut", resume=True, **options)
    assert resumed.status == "complete" and resumed.version == members + 1
    assert resumed.info["groups"] == reference.info["groups"]  # the same trial wins
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    assert resumed.group_table.equals(reference.group_table)
    for group in ("north", "south"):
        ours = dl.load_model(db, "cut", group=group)
        theirs = dl.load_model(db, "ref", group=group)
        assert np.allclose(ours.history["val_loss"], theirs.history["val_loss"], atol=1e-6)
        for a, b in zip(weights(ours), weights(theirs), strict=True):
            assert np.allclose(a, b, rtol=0, atol=1e-6)


def test_resuming_a_cohort_refuses_a_different_search(sqlite_db):
    load_table(sqlite_db.engine, "data", synthetic(600))
    grid = dict(OPTIONS, model="mlp:8", epochs=3, grid={"lr": [1e-3, 1e-2]})
    with pytest.raises(KeyboardInterrupt):
        dl.train(sqlite_db, "SELECT * FROM data", name="cut", callbacks=stop_after(1), **grid)
    with pytest.raises(InputError, match="grid"):
        dl.train(sqlite_db, "SELECT * FROM data", name="cut", resume=True,
                 **{**grid, "grid": {"lr": [1e-3, 3e-2]}})
    with pytest.raises(InputError, match="was a group_by / grid run"):
        dl.train(sqlite_db, "SELECT * FROM data", name="cut", resume=True,
                 **{k: v for k, v in grid.items() if k != "grid"})
    with pytest.raises(InputError, match="differ"):
        dl.train(sqlite_db, "SELECT * FROM data", name="cut", resume=True,
                 **{**grid, "halving": False})
    # nothing was lost by the refusals: the right options still resume
    resumed = dl.train(sqlite_db, "SELECT * FROM data", name="cut", resume=True, **grid)
    assert resumed.status == "complete" and len(resumed.history) == 3
