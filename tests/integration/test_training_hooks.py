"""The training loop's hooks: what a hook sees at each turning point of a real run (a halving
search on SQLite, fresh and resumed), and the shape limits of the training package."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import dbdl_magic as dl
from dbdl_magic.datasets import load_table
from dbdl_magic.events import Callbacks
from dbdl_magic.training.hooks import Hook, HookList, Iteration
from dbdl_magic.training.run import TrainingRun
from dbdl_magic.training.selection import halving_rungs

GRID = {"lr": [0.3, 0.05, 0.01, 0.002]}
OPTIONS = dict(target="label", model="mlp:8", epochs=4, batch_size=32, seed=3, validation=0.25,
               grid=GRID, parallel=1)


def synthetic(n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 4))
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["label"] = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    return frame


class Recorder(Hook):
    """Notes every call with what the run looked like at that moment."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_run_start(self, run: TrainingRun, first_epoch: int) -> None:
        self.events.append(("start", first_epoch, len(run.history)))

    def on_iteration_end(self, run: TrainingRun, it: Iteration) -> None:
        statuses = [m.status for m in run.members]
        in_row = [line["status"] for line in run.history[-1]["members"]]
        self.events.append(("iteration", it.epoch, sorted(it.rows), statuses, in_row,
                            len(run.history), it.replayed))

    def on_run_end(self, run: TrainingRun) -> None:
        self.events.append(("end", [m.status for m in run.members]))


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    """A recording hook appended after the run's own hooks."""
    hook = Recorder()
    standard = TrainingRun._standard_hooks

    def with_recorder(self, trials):
        hooks = standard(self, trials)
        hooks.hooks.append(hook)
        return hooks

    monkeypatch.setattr(TrainingRun, "_standard_hooks", with_recorder)
    return hook


def iterations(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [e for e in events if e[0] == "iteration"]


def test_hooks_see_a_halving_search_turn_by_turn(sqlite_db, recorder):
    """Four trials, rungs after epochs 1 and 2: a hook after the run's own sees 4, 2, 1, 1
    trials train, the halving decisions already made and written into the run's row, and
    the run's start and end once each."""
    assert halving_rungs(4, 4) == [1, 2]
    load_table(sqlite_db.engine, "data", synthetic())
    rows: list[dict[str, Any]] = []
    model = dl.train(sqlite_db, "data", name="search", callbacks=Callbacks(
        on_iteration=rows.append), **OPTIONS)

    events = recorder.events
    assert events[0] == ("start", 0, 0)
    assert events[-1][0] == "end"
    steps = iterations(events)
    assert [e[1] for e in steps] == [1, 2, 3, 4]
    assert [len(e[2]) for e in steps] == [4, 2, 1, 1]  # the members that trained
    for _, epoch, _, statuses, in_row, n_history, replayed in steps:
        assert statuses == in_row  # the decisions are in the row when later hooks run
        assert statuses.count("halved") == {1: 2, 2: 3, 3: 3, 4: 3}[epoch]
        assert n_history == epoch and not replayed
    assert sorted(events[-1][1]) == ["complete", "halved", "halved", "halved"]
    # the monitor saw one row per iteration, the same objects the run keeps
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    survivor = steps[-1][2][0]
    board = model.leaderboard.to_dict("records")
    assert board[0]["epochs"] == 4 and board[0]["label"] == f"lr={GRID['lr'][survivor]:.3g}"
    assert sorted(r["epochs"] for r in board) == [1, 1, 2, 4]


def test_a_resume_replays_its_iterations_through_the_hooks(sqlite_db, recorder):
    """Cut after epoch 3 committed, then resumed: the stored iterations pass through the hooks
    again (replayed, before the run starts; monitors are not told), the halving decisions
    come out the same, and only epoch 4 trains."""
    load_table(sqlite_db.engine, "data", synthetic())

    def cut(row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dl.train(sqlite_db, "data", name="cut", callbacks=Callbacks(on_iteration=cut), **OPTIONS)
    first = iterations(recorder.events)
    assert [e[1] for e in first] == [1, 2]  # epoch 3 committed, but the monitor cut it short
    recorder.events.clear()

    shown: list[int] = []
    resumed = dl.train(sqlite_db, "data", name="cut", resume=True, callbacks=Callbacks(
        on_iteration=lambda row: shown.append(row["epoch"])), **OPTIONS)
    events = recorder.events
    replayed = [e for e in iterations(events) if e[6]]
    assert [e[1] for e in replayed] == [1, 2, 3]
    assert [(e[2], e[3]) for e in replayed[:2]] == [(e[2], e[3]) for e in first]
    assert len(replayed[2][2]) == 1  # one trial left at epoch 3
    start = events.index(("start", 3, 3))
    assert start == len(replayed)  # replayed before the run starts
    assert [e[1] for e in iterations(events[start:])] == [4]
    assert shown == [4]
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]


class Listener(Hook):
    listens_to_progress = True

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_progress(self, run: Any, done: int, total: int) -> None:
        self.seen.append((done, total))


def test_progress_reaches_only_listening_hooks():
    """No listener: no progress sink (the kernels then report none); listeners get
    (done, total) in order."""
    assert HookList([Hook(), Hook()]).progress(None, 100) is None  # type: ignore[arg-type]
    a, b = Listener(), Listener()
    sink = HookList([a, Hook(), b]).progress(None, 100)  # type: ignore[arg-type]
    assert sink is not None
    sink(10)
    sink(60)
    assert a.seen == b.seen == [(10, 100), (60, 100)]


def test_interrupt_returns_the_first_hooks_model():
    class Returns(Hook):
        def __init__(self, key: dict[str, Any] | None) -> None:
            self.key, self.asked = key, 0

        def on_interrupt(self, run: Any, exc: KeyboardInterrupt) -> dict[str, Any] | None:
            self.asked += 1
            return self.key

    none, first, second = Returns(None), Returns({"version": 1}), Returns({"version": 2})
    hooks = HookList([none, first, second])
    assert hooks.on_interrupt(None, KeyboardInterrupt()) == {"version": 1}  # type: ignore[arg-type]
    assert (none.asked, first.asked, second.asked) == (1, 1, 0)
    assert HookList([none]).on_interrupt(None, KeyboardInterrupt()) is None  # type: ignore[arg-type]


TRAINING = Path(__file__).resolve().parents[2] / "dbdl_magic" / "training"


def definitions() -> list[tuple[str, ast.AST]]:
    out = []
    for path in sorted(TRAINING.glob("*.py")):
        tree = ast.parse(path.read_text())
        out += [(f"{path.name}:{node.name}", node) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    return out


def test_training_modules_stay_small_and_documented():
    """No class over 250 lines, no function over 60; public module-level functions and
    classes have docstrings; every function's arguments and result are annotated."""
    too_long, undocumented, unannotated = [], [], []
    for name, node in definitions():
        lines = node.end_lineno - node.lineno + 1
        if lines > (250 if isinstance(node, ast.ClassDef) else 60):
            too_long.append((name, lines))
        if isinstance(node, ast.FunctionDef):
            args = [a for a in node.args.args + node.args.kwonlyargs
                    if a.arg not in ("self", "cls")]
            if node.returns is None or any(a.annotation is None for a in args):
                unannotated.append(name)
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            defines = isinstance(node, (ast.FunctionDef, ast.ClassDef))
            if defines and not node.name.startswith("_") and ast.get_docstring(node) is None:
                undocumented.append(f"{path.name}:{node.name}")
    assert too_long == [] and undocumented == [] and unannotated == []
