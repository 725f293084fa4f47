"""Segments (``parallel=N``) through real SQLite files and a real PostgreSQL: they equal the
combine of their partial states computed separately, the same N and seed give the same model,
a killed segment fails the run cleanly and resume ends where an uninterrupted run ends, and
Ctrl-C leaves no statement or process behind."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

import dbdl_magic as dl
from dbdl_magic.backends.base import Member
from dbdl_magic.errors import InputError, TrainingError
from dbdl_magic.events import Callbacks
from dbdl_magic.kernel.state import decode_state
from dbdl_magic.options import TrainOptions
from dbdl_magic.training.hooks import Hook
from dbdl_magic.training.run import TrainingRun

QUERY = "SELECT * FROM digits"
BASE = dict(target="digit", features=[f"p{i}" for i in range(64)], model="mlp:32", batch_size=32,
            lr=3e-3, seed=3, validation=0.2, rows_per_buffer=96, threads=1)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def segment_processes() -> list[int]:
    """Process ids of SQLite segment processes started by this process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"dbdl_magic.backends.sqlite_segments" in cmdline:
            found.append(int(entry.name))
    return found


def segment_sessions(db) -> list[tuple[int, str, str]]:
    """(pid, state, application_name) of the server sessions of segments."""
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT pid, state, application_name FROM pg_stat_activity"
            " WHERE application_name LIKE 'dbdl segment %'"
        )).all()]


# -- the combine of the partials ----------------------------------------------------------------
class Partials(Hook):
    """After the first iteration: each segment's partial state recomputed on the run's own
    connection, one share at a time, then merged by the database's merge aggregate."""

    def __init__(self) -> None:
        self.merged: bytes | None = None
        self.stored: bytes | None = None

    def on_iteration_end(self, run, it) -> None:
        if it.epoch != 1:
            return
        backend, m = run.backend, run.members[0]
        plan_threads = 1
        member = Member(m.member, m.key["name"], m.key["version"],
                        {**m.config, "epoch": 0, "threads": plan_threads, "parallel": 2}, m.group)
        with backend.engine.begin() as conn:
            backend.materialize(conn, m.key, 0)  # archived into blocks after iteration 1
            states_sql, states_params = backend._states_sql([member], 0)
            partials = []
            for k in range(2):
                sql, params = backend.iteration_query(
                    run.packed.table, [member], f"({states_sql})", None, 0, ordered=True,
                    share=(k, 2),
                )
                state = backend.run_kernels(conn, sql, {**params, **states_params}).all()[0][1]
                partials.append(bytes(state))
            f = backend.fn_prefix
            self.merged = bytes(conn.execute(text(
                f"SELECT {f}merge(p.state) FROM (SELECT :a AS state, 0 AS k UNION ALL"
                " SELECT :b, 1) AS p"
            ), {"a": partials[0], "b": partials[1]}).scalar_one())
            self.stored = bytes(backend.load_state(conn, m.key, 1))


def test_segments_equal_the_combine_of_their_partials(db, digits):
    probe = Partials()

    class Probed(TrainingRun):
        def _standard_hooks(self, trials):
            hooks = super()._standard_hooks(trials)
            hooks.hooks.append(probe)
            return hooks

    opts = TrainOptions.from_kwargs(**BASE, epochs=1, parallel=2, averaging="mean", sync_every=1)
    run = Probed(db.backend, QUERY, opts, "combined")
    run.server = db.info
    model = run.execute()
    assert probe.merged is not None and probe.stored is not None
    merged, stored = decode_state(probe.merged), decode_state(probe.stored)
    assert merged.tensors.keys() == stored.tensors.keys()
    for key, value in stored.tensors.items():
        assert torch.equal(merged.tensors[key], value), key
    assert merged.samples == stored.samples == round(len(digits) * 0.8)
    h = model.history
    assert list(h["workers"]) == [2] and list(h["combines"]) == [1]
    assert h["parallel_note"].iloc[0] == "2 segments, forced"


def test_same_segments_and_seed_give_the_same_model(db, digits):
    runs = [dl.train(db, QUERY, **BASE, epochs=3, parallel=2, sync_every=0.5, name=f"twice{i}")
            for i in range(2)]
    assert same_weights(runs[0], runs[1])
    h = runs[0].history
    assert (h["workers"] == 2).all() and (h["combines"] == 2).all()  # 2 rounds × 1 combine
    assert (h["samples"] == round(len(digits) * 0.8)).all()
    assert h["val_accuracy"].iloc[-1] > 0.8
    # one process trains a different model (no averaging), as accurate
    single = dl.train(db, QUERY, **BASE, epochs=3, parallel=1, name="single")
    assert not same_weights(single, runs[0])
    assert (single.history["workers"] == 1).all() and (single.history["combines"] == 0).all()


def test_outer_and_mean_averaging_differ_and_outer_momentum_is_checkpointed(db, digits):
    mean = dl.train(db, QUERY, **BASE, epochs=2, parallel=2, averaging="mean", name="mean")
    outer = dl.train(db, QUERY, **BASE, epochs=2, parallel=2, averaging="outer", name="outer")
    assert not same_weights(mean, outer)
    with db.engine.connect() as conn:
        state = decode_state(bytes(db.backend.load_state(conn, {"name": "outer", "version": 1}, 2)))
    assert any(k.startswith("outer.model.") for k in state.tensors)
    # one outer step per sync round (2 segments: one combine per round)
    assert state.meta["outer_steps"] == int(outer.history["combines"].sum()) >= 2


def test_progress_from_every_segment_reaches_the_monitor(db, digits):
    seen: list[tuple[int, int]] = []
    dl.train(db, QUERY, **BASE, epochs=1, parallel=2,
             callbacks=Callbacks(on_progress=lambda done, total: seen.append((done, total))))
    assert seen, "no progress reported"
    n_train = round(len(digits) * 0.8)
    assert max(done for done, _ in seen) == n_train  # both segments' rows counted
    assert all(total == n_train for _, total in seen)


def test_in_memory_sqlite_refuses_segments_by_name():
    db = dl.connect("sqlite://")
    from dbdl_magic.datasets import digits_frame, load_table

    load_table(db.engine, "digits", digits_frame())
    with pytest.raises(InputError, match=r"parallel=2.*in-memory"):
        dl.train(db, QUERY, **BASE, epochs=1, parallel=2)
    auto = dl.train(db, QUERY, **BASE, epochs=1)
    assert (auto.history["workers"] == 1).all()


# -- failures -----------------------------------------------------------------------------------
def kill_one_segment(db, when_epoch: int, state: dict) -> Callbacks:
    """Callbacks that kill one segment (its server session, or its process on SQLite) once
    iteration ``when_epoch`` is under way."""

    def on_iteration(row: dict) -> None:
        state["epochs"] = int(row["epoch"])

    def on_progress(done: int, total: int) -> None:
        if state.get("killed") or state.get("epochs", 0) < when_epoch:
            return
        if db.backend.name == "sqlite":
            pids = segment_processes()
            assert len(pids) == 2, pids
            os.kill(pids[1], signal.SIGKILL)
            state["killed"] = pids[1]
        else:
            sessions = segment_sessions(db)
            pid = sorted(sessions, key=lambda s: s[2])[1][0]
            with db.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            state["killed"] = pid

    return Callbacks(on_iteration=on_iteration, on_progress=on_progress)


def test_killed_segment_fails_cleanly_and_resume_ends_like_an_uninterrupted_run(db, digits):
    opts = dict(BASE, epochs=4, parallel=2)
    state: dict = {}
    with pytest.raises(TrainingError, match="segment 1 of 2") as err:
        dl.train(db, QUERY, **opts, name="killed", callbacks=kill_one_segment(db, 2, state))
    assert state.get("killed"), "no segment was killed"
    assert "resume=True" in str(err.value)
    # the last good checkpoint is kept; nothing of the segments is left
    with db.engine.connect() as conn:
        done = conn.execute(text(
            f"SELECT max(iteration) FROM {db.backend.table('checkpoints')} WHERE name = 'killed'"
        )).scalar_one()
    # the kill lands in iteration 3 (or, at a round's very end, after its combine: then 3
    # committed and iteration 4 notices the dead segment)
    assert done in (2, 3), done
    assert segment_processes() == []
    if db.backend.name == "postgresql":
        assert segment_sessions(db) == []
    resumed = dl.train(db, QUERY, **opts, name="killed", resume=True)
    straight = dl.train(db, QUERY, **opts, name="straight")
    assert same_weights(resumed, straight)
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]


def test_ctrl_c_stops_every_segment(db, digits):
    state: dict = {}

    def on_progress(done: int, total: int) -> None:
        # Ctrl-C lands while the segments train (the monitor runs in the run's own thread,
        # between polls of the segments: where a real KeyboardInterrupt is raised too)
        if not state and done > 0:
            state["interrupted"] = True
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.train(db, QUERY, **dict(BASE, epochs=200, parallel=2), name="stopped",
                 callbacks=Callbacks(on_progress=on_progress))
    assert state.get("interrupted")
    assert segment_processes() == []
    if db.backend.name == "postgresql":
        deadline = time.monotonic() + 10
        while segment_sessions(db) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert segment_sessions(db) == []
        with db.engine.connect() as conn:
            active = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query LIKE '%dbdl.train%' AND pid <> pg_backend_pid()"
            )).scalar_one()
        assert active == 0
    with db.engine.connect() as conn:
        status = conn.execute(text(
            f"SELECT status FROM {db.backend.table('models')} WHERE name = 'stopped'"
        )).scalar_one()
    assert status in ("interrupted", "failed")


def test_a_small_model_on_segments_syncs_several_times_per_epoch(sqlite_db):
    from dbdl_magic.datasets import digits_frame, load_table

    load_table(sqlite_db.engine, "digits", digits_frame())
    model = dl.train(sqlite_db, QUERY, **dict(BASE, rows_per_buffer=None), epochs=1, parallel=2)
    h = model.history
    # packed for 10 rounds of 2 segments with 2 buffers each (40 buffers of 36 rows, rounded
    # up to whole batches of 32: 23); the rounds leave each segment buffers
    found = re.fullmatch(r"2 segments, forced; (\d+) sync rounds per epoch",
                         h["parallel_note"].iloc[0])
    assert found, h["parallel_note"].iloc[0]
    rounds = int(found[1])
    assert 5 <= rounds <= 10 and h["combines"].iloc[0] >= rounds - 1, h[["workers", "combines"]]
