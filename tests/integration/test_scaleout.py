"""Scale-out through real SQLite and real PostgreSQL: model selection in one pass (grid and
random search with successive halving), ``sync_every``, parallel workers chosen by
``parallel="auto"``, torch threads per process, and the bad input of these options."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import event, text

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.errors import InputError, SpecError
from dbdl_magic.events import Callbacks
from dbdl_magic.options import TrainOptions
from dbdl_magic.store import registry
from dbdl_magic.training.scaling import cpu_count
from dbdl_magic.training.selection import trials as search_trials

FEATURES = [f"p{i}" for i in range(64)]


@contextlib.contextmanager
def training_queries(db) -> Iterator[list[str]]:
    """Collects the training aggregate statements (``dbdl.train(p.x, ...)`` /
    ``dbdl_train(p.x, ...)``) that ``db`` executes inside the block: each one reads the
    training buffers once."""
    seen: list[str] = []

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        if "train(p.x" in statement:
            seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", on_execute)


def stored(db, name: str, version: int | None = None) -> dict[str, Any]:
    """The stored model row (options, spec, parent, history), without its state."""
    with db.engine.connect() as conn:
        return registry.read_model(conn, db.backend, name, version, with_state=False)


def versions(db, name: str) -> list[dict[str, Any]]:
    listing = dl.list_models(db)
    return listing[listing["name"] == name].sort_values("version").to_dict("records")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def state_header(db, name: str, version: int, iteration: int) -> dict[str, Any]:
    """A stored checkpoint's header, read by the kernel function inside the database."""
    with db.engine.connect() as conn:
        return db.backend.state_info(
            conn, {"name": name, "version": version, "iteration": iteration}
        )


def n_train_rows(frame, where=lambda f: np.ones(len(f), bool), validation: float = 0.2) -> int:
    return round(int(where(frame).sum()) * (1 - validation))


# -- model selection in one pass ------------------------------------------------------------------
def test_grid_search_one_pass_returns_best_and_halves(db, digits):
    grid = {"lr": [1e-3, 3e-3], "batch_size": [32, 64]}
    with training_queries(db) as queries:
        model = dl.train(db, "SELECT * FROM digits", target="digit", model="mlp:32", epochs=4,
                         grid=grid, seed=0, features=FEATURES, name="sel")
    # every trial is a stored version, the returned model the newest one
    rows = versions(db, "sel")
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["status"] == "complete" for r in rows)
    assert model.name == "sel" and model.version == 5

    # the trials, each with its configuration, and its own history as stored
    trials = {v: stored(db, "sel", v) for v in range(1, 5)}
    assert [t["options"]["trial"] for t in trials.values()] == [
        {"lr": 1e-3, "batch_size": 32}, {"lr": 1e-3, "batch_size": 64},
        {"lr": 3e-3, "batch_size": 32}, {"lr": 3e-3, "batch_size": 64},
    ]
    for t in trials.values():
        assert t["options"]["lr"] == t["options"]["trial"]["lr"]
        assert t["options"]["batch_size"] == t["options"]["trial"]["batch_size"]
    hist = {v: dl.load_model(db, "sel", v).history for v in trials}
    epochs = {v: len(h) for v, h in hist.items()}
    for h in hist.values():
        assert list(h["epoch"]) == list(range(1, len(h) + 1))
        assert (h["samples"] == n_train_rows(digits)).all()

    # successive halving with 4 trials over 4 epochs: rungs after epochs 1 and 2
    assert sorted(epochs.values()) == [1, 1, 2, 4]
    at1 = sorted(hist, key=lambda v: hist[v]["val_loss"].iloc[0])
    assert {epochs[at1[2]], epochs[at1[3]]} == {1}, "the worse half stops after epoch 1"
    survivors = sorted(at1[:2], key=lambda v: hist[v]["val_loss"].iloc[1])
    assert (epochs[survivors[0]], epochs[survivors[1]]) == (4, 2)
    best = survivors[0]

    # the leaderboard: every trial at its model checkpoint, best first by val_loss
    board = model.leaderboard
    selection = stored(db, "sel", 5)["options"]["selection"]
    assert selection["metric"] == "val_loss" and selection["best_version"] == best
    assert board.to_dict("records") == selection["leaderboard"]
    assert json.loads(json.dumps(selection)) == selection  # plain JSON, no numpy scalars
    assert set(board["label"]) == {
        "lr=0.001 batch_size=32", "lr=0.001 batch_size=64",
        "lr=0.003 batch_size=32", "lr=0.003 batch_size=64",
    }
    assert list(board["rank"]) == [1, 2, 3, 4]
    assert sorted(board["version"]) == [1, 2, 3, 4]
    assert list(board["val_loss"]) == sorted(board["val_loss"])
    for line in board.to_dict("records"):
        h = hist[line["version"]]
        assert line["epochs"] == len(h)
        assert line["val_loss"] == pytest.approx(h["val_loss"].iloc[-1], abs=1e-12)
        assert line["val_accuracy"] == pytest.approx(h["val_accuracy"].iloc[-1], abs=1e-12)
    assert board["version"].iloc[0] == best
    assert best == min(hist, key=lambda v: hist[v]["val_loss"].iloc[-1])

    # the returned model is the best trial's checkpoint, stored as the newest version
    winner = dl.load_model(db, "sel", best)
    assert same_weights(model, winner)
    assert same_weights(dl.load_model(db, "sel"), winner)
    assert rows[-1]["parent"] == f"sel:{best}"
    assert stored(db, "sel", 5)["options"]["trial"] == trials[best]["options"]["trial"]
    assert list(model.history["val_loss"]) == list(hist[best]["val_loss"])
    assert (model.predict(digits) == digits["digit"]).mean() > 0.85

    # the data was read once per iteration for all live trials: one aggregate query each
    assert len(queries) == 4
    assert all("GROUP BY" in q and ".member" in q for q in queries[:2])  # 4, then 2 trials


def test_grid_over_architectures_without_halving(db, digits):
    with training_queries(db) as queries:
        model = dl.train(db, "SELECT * FROM digits WHERE id % 2 = 0", target="digit",
                         grid={"model": ["linear", "mlp:32"]}, halving=False, epochs=2,
                         lr=3e-3, sync_every=0.5, features=FEATURES, name="arch")
    # two architectures in the same queries: as many as one model, ceil(1 / sync_every) each
    assert len(queries) == 2 * 2
    assert all("GROUP BY" in q and ".member" in q for q in queries)
    specs = {v: stored(db, "arch", v)["spec"] for v in (1, 2)}
    assert specs[1] != specs[2]
    linear = dl.load_model(db, "arch", 1)
    mlp = dl.load_model(db, "arch", 2)
    assert sum(isinstance(m, torch.nn.Linear) for m in linear.net.modules()) == 1
    assert [m.out_features for m in mlp.net.modules() if isinstance(m, torch.nn.Linear)] == [
        32, 10
    ]
    # halving=False: every trial trained every epoch, on every training row
    assert len(linear.history) == len(mlp.history) == 2
    n_train = n_train_rows(digits, lambda f: f["id"] % 2 == 0)
    assert (linear.history["samples"] == n_train).all()
    assert (mlp.history["samples"] == n_train).all()
    board = model.leaderboard
    assert list(board["epochs"]) == [2, 2] and list(board["rank"]) == [1, 2]
    best = int(board["version"].iloc[0])
    assert model.spec == specs[best] and same_weights(model, dl.load_model(db, "arch", best))


def test_random_search_is_reproducible(db, digits):
    grid = {"lr": (1e-4, 1e-2)}
    query = "SELECT * FROM digits WHERE id < 400"
    lrs = []
    for name in ("rnd_a", "rnd_b"):
        dl.train(db, query, target="digit", model="linear", epochs=1, grid=grid,
                 search="random", trials=3, seed=5, features=FEATURES, name=name)
        rows = versions(db, name)
        assert [r["version"] for r in rows] == [1, 2, 3, 4]  # 3 trials + the best
        lrs.append([stored(db, name, v)["options"]["lr"] for v in (1, 2, 3)])
    assert lrs[0] == lrs[1]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs[0]) and len(set(lrs[0])) == 3
    expected = search_trials(TrainOptions.from_kwargs(
        target="digit", grid=grid, search="random", trials=3, seed=5
    ))
    assert lrs[0] == [t["lr"] for t in expected]
    # different learning rates really trained different models
    weights = [dl.load_model(db, "rnd_a", v) for v in (1, 2, 3)]
    assert not same_weights(weights[0], weights[1])


# -- sync_every -----------------------------------------------------------------------------------
def test_sync_every_averages_within_the_epoch(db, digits):
    kwargs = dict(target="digit", model="mlp:32", epochs=3, lr=3e-3, batch_size=32, seed=0,
                  features=FEATURES, parallel=1)
    n_train = n_train_rows(digits)
    with training_queries(db) as once:
        plain = dl.train(db, "SELECT * FROM digits", **kwargs)
    with training_queries(db) as parts:
        synced = dl.train(db, "SELECT * FROM digits", sync_every=0.25, **kwargs)
    assert len(once) == 3 and len(parts) == 12  # 4 aggregate queries per iteration
    for h in (plain.history, synced.history):
        assert (h["samples"] == n_train).all()  # every training row once per epoch
        assert (h["workers"] == 1).all()
    acc_plain = plain.history["val_accuracy"].iloc[-1]
    acc_synced = synced.history["val_accuracy"].iloc[-1]
    assert acc_plain > 0.85 and acc_synced > 0.85
    assert abs(acc_plain - acc_synced) < 0.05, (acc_plain, acc_synced)
    assert synced.history["train_loss"].iloc[-1] < synced.history["train_loss"].iloc[0] / 2
    assert synced.history["parallel_note"].iloc[0] == "1 process, forced"


def test_parallel_sync_every_combines_segments(db, digits):
    with training_queries(db) as queries:
        model = dl.train(db, "SELECT * FROM digits", target="digit", model="mlp:32",
                         epochs=1, lr=3e-3, batch_size=32, parallel=2, sync_every=0.5,
                         rows_per_buffer=32, features=FEATURES, name="psync")
    h = model.history
    # the run's own session trains nothing: its 2 segments ran 2 rounds of 2 statements
    assert queries == []
    assert (h["samples"] == n_train_rows(digits)).all()  # no row trained twice or skipped
    assert (h["workers"] == 2).all() and (h["combines"] == 2).all()  # 1 combine per round
    assert (h["parallel_note"] == "2 segments, forced").all()
    assert h["val_accuracy"].iloc[-1] > 0.7
    # a small model: one torch thread per segment
    info = state_header(db, "psync", 1, 1)
    assert info["threads"] == 1


# -- parallel="auto" and worker start-up ----------------------------------------------------------
def test_auto_parallel_stays_in_one_process_on_a_tiny_table(db, digits):
    model = dl.train(db, "SELECT * FROM digits WHERE id < 200", target="digit", model="linear",
                     epochs=4, features=FEATURES)
    h = model.history
    assert (h["workers"] == 1).all() and (h["combines"] == 0).all()
    notes = list(h["parallel_note"])
    # the first iteration pays imports and caches: the second is the measurement
    assert all("measuring" in n for n in notes[:2]), notes
    # (on a badly overloaded machine an iteration may pass the threshold: then it is measured)
    assert all("too short" in n or n.startswith("auto: 1 ") for n in notes[2:]), notes


# -- threads --------------------------------------------------------------------------------------
def test_kernel_threads_fit_the_cores(db, digits):
    before = torch.get_num_threads()  # SQLite runs the kernels in this process
    try:
        auto = dl.train(db, "SELECT * FROM digits WHERE id < 300", target="digit",
                        model="linear", epochs=1, features=FEATURES, name="thr")
        one = dl.train(db, "SELECT * FROM digits WHERE id < 300", target="digit",
                       model="linear", epochs=1, features=FEATURES, name="thr1", threads=1)
    finally:
        torch.set_num_threads(before)
    cpus = cpu_count(db.info if db.backend.supports_parallel else None)
    info = state_header(db, "thr", auto.version, 1)
    workers = int(auto.history["workers"].iloc[-1])
    assert info["threads"] >= 1 and info["threads"] * workers <= cpus
    assert info["threads"] == 1  # a small model: one thread per process (see scaling.py)
    assert state_header(db, "thr1", one.version, 1)["threads"] == 1
    big = dl.train(db, "SELECT * FROM digits WHERE id < 300", target="digit",
                   model="mlp:512,256", epochs=1, features=FEATURES, name="thr_big")
    torch.set_num_threads(before)
    info = state_header(db, "thr_big", big.version, 1)
    workers = int(big.history["workers"].iloc[-1])
    assert info["threads"] == max(1, cpus // workers)  # a large model uses the cores


# -- bad input ------------------------------------------------------------------------------------
def _tables(db) -> set[str]:
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            rows = conn.execute(text(
                "SELECT schemaname || '.' || tablename FROM pg_tables"
                " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            ))
        else:
            rows = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
        return {r[0] for r in rows}


BAD_SCALEOUT = [
    (dict(sync_every=0), InputError, ["sync_every"]),
    (dict(sync_every=1.5), InputError, ["sync_every"]),
    (dict(parallel="many"), InputError, ["parallel", "many"]),
    (dict(parallel=0), InputError, ["parallel"]),
    (dict(threads=0), InputError, ["threads"]),
    (dict(grid={"lr": [1e-3]}, search="bayes"), InputError, ["search", "bayes"]),
    (dict(grid={"lr": [1e-3, -1]}), InputError, ["grid configuration", "lr=-1"]),
    (dict(grid={"epochs": [1, 2]}), InputError, ["grid", "'epochs'"]),
    (dict(grid={"lr": []}), InputError, ["grid['lr']"]),
    (dict(grid={"lr": (1e-4, 1e-2)}, search="random"), InputError, ["trials"]),
    (dict(grid={"lr": [1e-3]}, trials=0), InputError, ["trials"]),
    (dict(trials=3), InputError, ["grid"]),
    (dict(grid={"model": ["linear", "nosuchlayer:3"]}), SpecError,
     ["grid configuration model=nosuchlayer:3", "nosuchlayer"]),
    # found only once the data is staged (the spec does not fit a tabular input)
    (dict(grid={"model": ["linear", "cnn:4"]}), SpecError, ["model spec"]),
]


def test_bad_scaleout_input_leaves_nothing_behind(db, digits):
    before = _tables(db)
    for kwargs, error, culprits in BAD_SCALEOUT:
        with pytest.raises(error) as info:
            dl.train(db, "SELECT * FROM digits WHERE id < 100", target="digit",
                     model="linear", epochs=1, features=FEATURES, name="bad", **kwargs)
        message = str(info.value)
        for culprit in culprits:
            assert culprit in message, f"{kwargs}: {culprit!r} not named in: {message}"
        assert _tables(db) == before, f"{kwargs} left work tables behind"
        assert dl.list_models(db).empty, f"{kwargs} created a model row"


def test_interrupted_search_returns_the_best_trial_so_far(sqlite_db):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 16))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(16)])
    frame["label"] = (x[:, 0] * x[:, 1] > 0).astype(int)
    load_table(sqlite_db.engine, "big", frame)

    epochs: list[int] = []

    def on_progress(done, total):  # Ctrl-C at the third iteration's first progress report
        if len(epochs) == 2:
            epochs.append(0)
            os.kill(os.getpid(), signal.SIGINT)

    callbacks = Callbacks(on_iteration=lambda row: epochs.append(row["epoch"]),
                          on_progress=on_progress)
    model = dl.train(sqlite_db, "big", target="label", model="mlp:256,256", epochs=50,
                     grid={"lr": [1e-3, 3e-3]}, halving=False, on_interrupt="return",
                     callbacks=callbacks, name="cut")
    assert model.status == "interrupted" and model.version == 3
    board = model.leaderboard
    assert list(board["epochs"]) == [2, 2]  # committed iterations only
    assert set(board["status"]) == {"interrupted"}
    assert len(model.history) == 2
    best = dl.load_model(sqlite_db, "cut", int(board["version"].iloc[0]))
    for a, b in zip(model.state_dict().values(), best.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    epochs.clear()
    with pytest.raises(KeyboardInterrupt):  # the default still raises
        dl.train(sqlite_db, "big", target="label", model="mlp:256,256", epochs=50,
                 grid={"lr": [1e-3, 3e-3]}, name="cut2", callbacks=callbacks)


def test_a_trial_trains_the_same_alone_in_a_grid_and_under_halving(db, digits):
    """One process feeds every member its buffers in a fixed order: a configuration's model
    does not depend on which other configurations share the queries."""
    kwargs = dict(target="digit", model="mlp:32", epochs=4, batch_size=32, seed=0,
                  features=FEATURES, parallel=1)
    grid = {"lr": [1e-3, 3e-3, 1e-2]}
    full = dl.train(db, "digits", grid=grid, halving=False, name="full", **kwargs)
    halved = dl.train(db, "digits", grid=grid, name="halved", **kwargs)
    board_full = full.leaderboard.set_index("label")
    for _, line in halved.leaderboard.iterrows():  # every trial, for the epochs it trained
        trained = dl.load_model(db, "halved", int(line["version"])).history
        same = dl.load_model(db, "full", int(board_full.loc[line["label"], "version"])).history
        n = len(trained)
        assert np.allclose(trained["val_loss"], same["val_loss"].iloc[:n], rtol=0, atol=1e-9)
    if db.backend.name == "sqlite":  # and a grid member trains exactly like a lone run
        alone = dl.train(db, "digits", lr=1e-2, name="alone", **kwargs)
        member = dl.load_model(db, "full", int(board_full.loc["lr=0.01", "version"]))
        assert np.allclose(alone.history["val_loss"], member.history["val_loss"], atol=1e-9)
