"""Failures and concurrent sessions: a server restart mid-run, two sessions training one name,
two resumers of one version, resume=True with nothing to resume, and the sweep of what dead
sessions left behind (model rows still saying ``training``, work tables)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from pgserver import PostgresServer, throwaway_server
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.errors import TrainingError
from dbdl_magic.events import Callbacks
from dbdl_magic.store import registry
from dbdl_magic.training.run import TrainingRun

# parallel=1: the same seed gives the same model only with the same number of workers
OPTIONS = dict(target="label", model="mlp:32,16", epochs=3, batch_size=64, seed=7, lr=2e-3,
               rows_per_buffer=500, parallel=1, threads=1)
QUERY = "SELECT * FROM data"


def synthetic(n: int = 4000) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 12))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(12)])
    frame["label"] = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] > 0).astype(int)
    return frame


def assert_same_model(a, b) -> None:
    """Same histories and the same weights (the resume tests' tolerance)."""
    assert list(a.history["epoch"]) == list(b.history["epoch"])
    assert np.allclose(a.history["val_loss"], b.history["val_loss"], rtol=0, atol=1e-6)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert np.allclose(sa[name].cpu().numpy(), sb[name].cpu().numpy(), rtol=0, atol=1e-6)


def work_table_names(db) -> list[str]:
    """Training work tables (staged, packed, scratch) wherever the database keeps them."""
    with db.engine.connect() as conn:
        if db.backend.name == "postgresql":
            sql = ("SELECT tablename FROM pg_tables WHERE tablename ~ "
                   "'^(stage|vstage|packed|iter)_[0-9a-f]{12}$'")
        else:
            sql = ("SELECT name FROM sqlite_master WHERE type = 'table' AND (name LIKE "
                   "'dbdl_stage_%' OR name LIKE 'dbdl_vstage_%' OR name LIKE 'dbdl_packed_%'"
                   " OR name LIKE 'dbdl_iter_%')")
        return sorted(conn.execute(text(sql)).scalars())


def stored_rows(url: str, name: str) -> list[tuple[str, str | None]]:
    """``(status, error)`` of ``name``'s versions, read with plain SQL (so nothing of
    dbdl_magic looks at them)."""
    engine = create_engine(url)
    models = "dbdl.models" if engine.dialect.name == "postgresql" else "dbdl_models"
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                text(f"SELECT status, error FROM {models} WHERE name = :n ORDER BY version"),
                {"n": name},
            )]
    finally:
        engine.dispose()


def stored_status(url: str, name: str) -> list[str]:
    return [status for status, _ in stored_rows(url, name)]


def url_of(db) -> str:
    return db.engine.url.render_as_string(hide_password=False)


# -- a PostgreSQL server of this module's own (it is stopped and restarted) --------------------
@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    with throwaway_server() as server:
        yield server


@pytest.fixture
def own_db(own_server: PostgresServer):
    if not own_server.running:  # a test that stopped it failed before starting it again
        own_server._launch_and_wait()
    db = dl.install(own_server.create_database(f"failures_{uuid.uuid4().hex[:8]}"))
    load_table(db.engine, "data", synthetic())
    yield db
    db.engine.dispose()


def stop_immediately(server: PostgresServer) -> None:
    """``pg_ctl stop -m immediate``: every server process quits at once (a crash, for the
    data: crash recovery on the next start empties the unlogged tables)."""
    server._run("pg_ctl", "-D", str(server.datadir), "-m", "immediate", "-w", "stop")
    assert server._proc is not None
    server._proc.wait(timeout=30)


def in_the_second_iteration(fault) -> Callbacks:
    """Callbacks that call ``fault()`` once, in the middle of the second iteration."""
    state = {"epoch": 0, "done": False}

    def on_progress(done: int, total: int) -> None:
        if state["epoch"] == 1 and not state["done"] and done < total:
            state["done"] = True
            fault()

    return Callbacks(on_progress=on_progress,
                     on_iteration=lambda row: state.update(epoch=row["epoch"]))


def test_a_server_restart_mid_run(own_server, own_db):
    """The server stops mid-iteration and is still down while the run cleans up: the user gets
    TrainingError (the lost connection as its cause, the failed cleanup noted on it); once the
    server is back, the first look marks the version interrupted and drops the work tables the
    crash left (empty: unlogged), and resume=True ends where an uninterrupted run does."""
    db = own_db
    reference = dl.train(db, QUERY, name="reference", **OPTIONS)
    with pytest.raises(TrainingError, match="connection to the database was lost") as raised:
        dl.train(db, QUERY, name="victim",
                 callbacks=in_the_second_iteration(lambda: stop_immediately(own_server)),
                 **OPTIONS)
    error = raised.value
    assert isinstance(error.__cause__, DBAPIError) and error.detail
    assert any("work tables failed too" in note for note in getattr(error, "__notes__", []))
    own_server._launch_and_wait()
    # nobody could record the end: the row still says training, the packed table is there
    assert stored_status(url_of(db), "victim") == ["training"]
    assert [t for t in work_table_names(db) if t.startswith("packed_")]
    listing = dl.list_models(db).set_index("name")
    assert listing.loc["victim", "status"] == "interrupted"
    [(status, why)] = stored_rows(url_of(db), "victim")
    assert status == "interrupted" and "training session ended" in why
    assert work_table_names(db) == []
    victim = dl.load_model(db, "victim")
    assert victim.status == "interrupted" and len(victim.history) == 1
    resumed = dl.train(db, QUERY, name="victim", resume=True, **OPTIONS)
    assert resumed.version == 1 and resumed.status == "complete"
    assert_same_model(resumed, reference)


@pytest.mark.parametrize("fault", ["restart", "terminate"])
def test_a_lost_connection_is_recorded_when_the_server_is_back(own_server, own_db, fault):
    """The server restarts (immediate stop and start) or terminates the training session
    within the callback, so it is back before the run cleans up: TrainingError with the cause,
    the version recorded as interrupted by the run itself, no work table left."""
    db = own_db
    killer = create_engine(db.engine.url)
    killed: list[int] = []

    def restart() -> None:
        stop_immediately(own_server)
        own_server._launch_and_wait()

    def terminate() -> None:
        with killer.begin() as conn:
            killed.append(conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE"
                " datname = current_database() AND state = 'active'"
                " AND query LIKE '%dbdl.train(%' AND pid <> pg_backend_pid()")).scalar_one())

    with pytest.raises(TrainingError, match="connection to the database was lost") as raised:
        dl.train(db, QUERY, name="victim", callbacks=in_the_second_iteration(
            restart if fault == "restart" else terminate), **OPTIONS)
    killer.dispose()
    assert killed == ([1] if fault == "terminate" else [])
    assert isinstance(raised.value.__cause__, DBAPIError)
    assert not getattr(raised.value, "__notes__", [])  # the cleanup succeeded
    assert stored_status(url_of(db), "victim") == ["interrupted"]
    assert work_table_names(db) == []
    resumed = dl.train(db, QUERY, name="victim", resume=True, **OPTIONS)
    assert resumed.status == "complete" and list(resumed.history["epoch"]) == [1, 2, 3]


# -- concurrent sessions --------------------------------------------------------------------------
def run_in_threads(*jobs) -> list:
    """Run the jobs in threads of their own; their results or exceptions, in order."""
    out: list = [None] * len(jobs)

    def run(i, job):
        try:
            out[i] = job()
        except BaseException as exc:  # reported to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


def test_two_sessions_train_one_name_at_once(db, monkeypatch):
    """Two sessions (engines of their own) reach the version allocation together, and each
    holds its highest-version read for a while: both get a version, 1 and 2, no unique key
    violation."""
    load_table(db.engine, "data", synthetic(800))
    url = url_of(db)
    barrier = threading.Barrier(2, timeout=120)
    create, next_version = TrainingRun._create_members, registry.next_version

    def together(self, *args, **kwargs):
        barrier.wait()
        return create(self, *args, **kwargs)

    def slow_next_version(*args, **kwargs):
        version = next_version(*args, **kwargs)
        time.sleep(0.5)  # the other session reads now, unless the name is locked
        return version

    monkeypatch.setattr(TrainingRun, "_create_members", together)
    monkeypatch.setattr(registry, "next_version", slow_next_version)
    options = {**OPTIONS, "epochs": 2}

    def session():
        own = dl.connect(url)
        try:
            return dl.train(own, QUERY, name="same", **options)
        except BaseException:
            barrier.abort()  # the other session stops waiting for this one
            raise
        finally:
            own.engine.dispose()

    results = run_in_threads(session, session)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, "\n".join(
        "".join(traceback.format_exception(r.__cause__ or r)) for r in failed)
    assert sorted(m.version for m in results) == [1, 2]
    listing = dl.list_models(db).query("name == 'same'")
    assert list(listing["version"]) == [1, 2]
    assert set(listing["status"]) == {"complete"}


@pytest.mark.parametrize("group_by", [None, "region"], ids=["one model", "per group"])
def test_two_resumers_of_one_version(db, group_by):
    """A run cut after its first iteration is resumed by one session; a second session that
    resumes it meanwhile is told the version is being trained by another session, and
    changes nothing (a per-group run's members all count as being trained)."""
    frame = synthetic(800)
    frame["region"] = np.where(frame["f3"] > 0, "north", "south")
    load_table(db.engine, "data", frame)
    url = url_of(db)
    options = {**OPTIONS, "group_by": group_by}
    members = 2 if group_by else 1

    def cut(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.train(db, QUERY, name="cut", callbacks=Callbacks(on_iteration=cut), **options)
    assert stored_status(url, "cut") == ["interrupted"] * members
    second: list = []

    def second_resumer():
        own = dl.connect(url)
        try:
            return dl.train(own, QUERY, name="cut", resume=True, **options)
        finally:
            own.engine.dispose()

    def on_start(info):  # the first resumer holds the versions: run the second one now
        second.extend(run_in_threads(second_resumer))
        second.append(stored_status(url, "cut"))

    first = dl.train(db, QUERY, name="cut", resume=True,
                     callbacks=Callbacks(on_start=on_start), **options)
    assert len(second) == 2 and isinstance(second[0], TrainingError), repr(second)
    assert "model 'cut' version 1 is being trained by another session" in str(second[0])
    assert second[1] == ["training"] * members  # the second session marked nothing
    assert first.status == "complete" and list(first.history["epoch"]) == [1, 2, 3]
    assert stored_status(url, "cut") == ["complete"] * (members + bool(group_by))
    assert work_table_names(db) == []


def test_resume_with_nothing_to_resume_starts_fresh(db):
    load_table(db.engine, "data", synthetic(800))
    with pytest.warns(UserWarning, match="no run named 'fresh'; starting a new run"):
        model = dl.train(db, QUERY, name="fresh", resume=True, **{**OPTIONS, "epochs": 2})
    assert model.version == 1 and model.status == "complete"
    assert list(model.history["epoch"]) == [1, 2]


# -- what sessions that are gone left behind ---------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_whoever_looks_marks_a_version_whose_session_is_gone(db):
    """Versions left saying ``training`` by sessions that are gone (on SQLite: "a" by another
    process that has ended, "b" by a run of this process that has ended) are marked
    interrupted by load_model, and by a new run of that name."""
    load_table(db.engine, "data", synthetic(600))
    url, models = url_of(db), db.backend.table("models")
    for name in ("a", "b"):
        dl.train(db, QUERY, name=name, **{**OPTIONS, "epochs": 1})
    with db.engine.begin() as conn:  # as a killed client leaves them
        for name, options in conn.execute(text(f"SELECT name, options FROM {models}")).all():
            options = json.loads(options)
            if name == "a" and "session" in options:
                options["session"].update(pid=dead_pid(), started=None)
            conn.execute(text(f"UPDATE {models} SET status = 'training', options = :o"
                              " WHERE name = :n"), {"o": json.dumps(options), "n": name})
    assert stored_status(url, "a") == stored_status(url, "b") == ["training"]
    assert dl.load_model(db, "a").status == "interrupted"
    assert stored_status(url, "a") == ["interrupted"]
    model = dl.train(db, QUERY, name="b", **{**OPTIONS, "epochs": 1})
    assert model.version == 2
    assert stored_status(url, "b") == ["interrupted", "complete"]


def test_the_sweep_drops_only_what_dead_sessions_left(db):
    """Work tables of runs whose session is gone are dropped when someone lists the models:
    a run whose model row failed, a run that crashed while packing (no model row yet); those
    of a live run stay until it ends, and a prediction's staged rows (the same prefix, a token
    no training run has) stay."""
    backend, url = db.backend, url_of(db)
    failed, crashed, live, other = (uuid.uuid4().hex[:12] for _ in range(4))
    tables = [("packed", failed), ("stage", failed), ("packed", crashed), ("packed", live),
              ("stage", other)]
    if backend.name == "sqlite":  # SQLite commits a staged table before the rows exist
        tables.append(("stage", crashed))
    with db.engine.begin() as conn:
        for prefix, token in tables:
            conn.execute(text(f"CREATE TABLE {backend.table(f'{prefix}_{token}')} (x INTEGER)"))
        conn.execute(
            text(f"INSERT INTO {backend.table('models')} (name, version, status, spec,"
                 " encoding, options, query) VALUES ('gone', 1, 'failed', '{}', '{}', :o, 'q')"),
            {"o": json.dumps({"work_token": failed})},
        )
        if backend.name == "sqlite":  # the crashed run's record names a process that ended
            record = {"host": socket.gethostname(), "pid": dead_pid(), "started": None,
                      "run": crashed}
            conn.execute(text("INSERT INTO dbdl_meta (key, value) VALUES (:k, :v)"),
                         {"k": f"run:{crashed}", "v": json.dumps(record)})
    session = backend.open_session(live)  # the live run's session, from another connection
    try:
        dl.list_models(db)
        left = work_table_names(db)
        assert [t for t in left if failed in t or crashed in t] == []
        assert [t for t in left if live in t] == [f"{'dbdl_' * (backend.name == 'sqlite')}"
                                                   f"packed_{live}"]
        assert [t for t in left if other in t]
    finally:
        session.close()
    dl.list_models(db)  # the live run has ended: its table goes too
    left = work_table_names(db)
    assert [t for t in left if live in t] == []
    assert [t for t in left if other in t]  # never a training run's: kept
    assert stored_status(url, "gone") == ["failed"]
    if backend.name == "sqlite":
        with db.engine.connect() as conn:
            records = conn.execute(text("SELECT key FROM dbdl_meta WHERE key LIKE 'run:%'"))
            assert records.scalars().all() == []


def test_two_sessions_create_the_work_schema_at_once(pg_db):
    """A role's first two sessions ask for its work schema together: the second waits for the
    first's transaction and gets the schema the first created (no duplicate-key error)."""
    url = url_of(pg_db)
    first, second = create_engine(url), create_engine(url)
    try:
        with first.connect() as a:
            a.execute(text("SET lock_timeout = '30s'"))
            schema = a.execute(text("SELECT dbdl.work_schema(CAST(current_user AS text))"))
            created = schema.scalar_one()  # created, not committed yet

            def ask():
                with second.begin() as b:
                    return b.execute(
                        text("SELECT dbdl.work_schema(CAST(current_user AS text))")
                    ).scalar_one()

            out: list = [None]
            waiter = threading.Thread(target=lambda: out.__setitem__(0, run_in_threads(ask)[0]))
            waiter.start()
            time.sleep(1.0)  # the second session now waits on the first's new schema
            assert waiter.is_alive()
            a.commit()
            waiter.join(timeout=60)
        assert not isinstance(out[0], BaseException), out[0]
        assert out[0] == created
    finally:
        first.dispose()
        second.dispose()
