"""The live widget monitor and the static training report, under a real IPython shell."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

from dbdl_magic.display import short_error
from dbdl_magic.events import (
    CohortMember,
    IterationFinished,
    MemberProgress,
    RunFinished,
    RunStarted,
)
from dbdl_magic.notebook.figures import (
    RED,
    TrainingReport,
    curves_png,
    metric_columns,
    metrics_table_html,
)
from dbdl_magic.notebook.monitor import TextMonitor, members_frame, summary_line
from dbdl_magic.notebook.widgets import WidgetMonitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start_info(epochs: int = 3, name: str = "digits") -> RunStarted:
    """The facts of an ordinary run (``on_start``)."""
    return RunStarted(
        name=name,
        version=2,
        database="sqlite:///tmp/t.db",
        backend="sqlite",
        rows=160,
        validation_rows=40,
        buffers=1,
        parameters=650,
        workers=1,
        epochs=epochs,
        device="cpu",
    )


def iteration_row(epoch: int) -> IterationFinished:
    """An iteration of an ordinary run (``on_iteration``)."""
    return IterationFinished(
        epoch=epoch,
        metrics={
            "train_loss": 2.0 / epoch,
            "val_loss": 2.2 / epoch,
            "val_accuracy": 0.5 + 0.1 * epoch,
            "val_f1": 0.45 + 0.1 * epoch,
        },
        seconds=0.123456 * epoch,
        train_seconds=0.1,
        samples=160,
        workers=1,
        combines=0,
        db_device="cpu",
        stored_bytes=2600,
    )


def history_of(iterations: list[IterationFinished]) -> pd.DataFrame:
    """A model's history: one row per iteration."""
    return pd.DataFrame([it.to_row() for it in iterations])


def fake_model(epochs: int = 3, name: str = "digits", status: str = "complete") -> SimpleNamespace:
    history = history_of([iteration_row(e) for e in range(1, epochs + 1)])
    return SimpleNamespace(name=name, version=2, status=status, history=history)


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    return struct.unpack(">II", data[16:24])


def body_rows(table_html: str) -> int:
    body = re.search(r"<tbody>(.*)</tbody>", table_html, re.S)
    assert body is not None
    return body.group(1).count("<tr>")


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    yield InteractiveShell.instance()


@pytest.fixture
def displays(shell: InteractiveShell) -> Iterator[CapturedIO]:
    """Everything published through the shell's display publisher (displays and updates)."""
    with capture_output(stdout=False, stderr=False) as captured:
        yield captured


def display_ids(captured: CapturedIO) -> set[str]:
    return {out.transient.get("display_id") for out in captured.outputs}


def count_changes(widget: Any, trait: str = "value") -> list[Any]:
    changes: list[Any] = []
    widget.observe(lambda change: changes.append(change["new"]), names=trait)
    return changes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- WidgetMonitor -----------------------------------------------------------------------------
def test_live_view_then_report_in_one_display(displays: CapturedIO) -> None:
    monitor = WidgetMonitor(refresh=0.0)
    callbacks = monitor.callbacks()
    callbacks.on_start(start_info())
    assert len(displays.outputs) == 1
    live = displays.outputs[0]
    assert not live.update and live.transient["display_id"]
    assert "application/vnd.jupyter.widget-view+json" in live.data
    assert live.data["text/plain"] == "dbdl: training digits v2"
    assert "650 parameters" in monitor.header.value and "sqlite" in monitor.header.value

    callbacks.on_progress(80, 160)  # half of the first of 3 iterations
    assert monitor.progress_value == pytest.approx(0.5 / 3)
    for epoch in (1, 2, 3):
        for done in (40, 120, 160):
            callbacks.on_progress(done, 160)
        callbacks.on_iteration(iteration_row(epoch))
        assert monitor.progress_value == pytest.approx(epoch / 3)
        assert body_rows(monitor.table.value) == epoch
    assert monitor.progress.value == monitor.progress.max
    assert bytes(monitor.image.value).startswith(PNG_MAGIC)
    assert "3/3 iterations" in monitor.label.value and "100%" in monitor.label.value

    model = fake_model()
    monitor.finish(model)
    assert display_ids(displays) == {monitor.display_id}
    final = displays.outputs[-1]
    assert final.update
    assert final.data["text/plain"] == summary_line(model)
    assert "data:image/png;base64," in final.data["text/html"]
    assert summary_line(model) in final.data["text/html"]
    assert "image/png" not in final.data
    assert monitor.widget.comm is None  # the live widgets are released


def test_in_iteration_progress_is_rate_limited(displays: CapturedIO) -> None:
    monitor = WidgetMonitor(refresh=0.5)
    monitor.on_start(start_info())
    values = count_changes(monitor.progress)
    labels = count_changes(monitor.label)
    for done in range(1, 1001):
        monitor.on_progress(done, 1000)
    assert 1 <= len(values) <= 3
    assert len(labels) <= 3


def test_curves_redrawn_at_most_every_second_and_always_at_the_end(
    displays: CapturedIO,
) -> None:
    clock = FakeClock()
    monitor = WidgetMonitor(refresh=0.2)
    monitor.clock = clock
    monitor.on_start(start_info(epochs=4))
    drawn = count_changes(monitor.image)
    for epoch, at in ((1, 0.1), (2, 0.5), (3, 1.5), (4, 1.6)):
        clock.now += at
        monitor.on_iteration(iteration_row(epoch))
    # 1: first draw; 2: too soon; 3: a second later; 4: the last iteration is always drawn
    assert len(drawn) == 3
    assert body_rows(monitor.table.value) == 4


def test_interrupted_finish_is_red(displays: CapturedIO) -> None:
    monitor = WidgetMonitor()
    monitor.on_start(start_info())
    monitor.on_iteration(iteration_row(1))
    monitor.finish(fake_model(epochs=1, status="interrupted"))
    final = displays.outputs[-1]
    assert final.update and display_ids(displays) == {monitor.display_id}
    assert "interrupted" in final.data["text/plain"]
    assert RED in final.data["text/html"]


def test_fail_shows_the_error_and_partial_results(displays: CapturedIO) -> None:
    monitor = WidgetMonitor()
    monitor.on_start(start_info())
    monitor.on_iteration(iteration_row(1))
    monitor.fail(RuntimeError("server closed the connection\n  detail line"))
    final = displays.outputs[-1]
    assert final.update and display_ids(displays) == {monitor.display_id}
    text = final.data["text/plain"]
    assert text.startswith("dbdl: model digits v2 failed | 1 iteration(s)")
    assert text.endswith("RuntimeError: server closed the connection")
    html = final.data["text/html"]
    assert RED in html and "server closed the connection" in html and "detail line" not in html
    assert "data:image/png;base64," in html and body_rows(html) == 1


def test_fail_before_any_iteration_and_before_start(displays: CapturedIO) -> None:
    silent = WidgetMonitor()
    silent.fail(ValueError("bad column"))  # nothing shown yet: the caller shows the exception
    assert displays.outputs == []

    monitor = WidgetMonitor()
    monitor.on_start(start_info())
    monitor.fail(KeyboardInterrupt())
    final = displays.outputs[-1]
    assert final.data["text/plain"] == (
        "dbdl: model digits v2 interrupted | 0 iteration(s) | KeyboardInterrupt"
    )
    assert "data:image/png" not in final.data["text/html"]


# -- TrainingReport -----------------------------------------------------------------------------
def test_report_png_and_table() -> None:
    report = TrainingReport(fake_model())
    width, height = png_size(report.png())
    assert 400 <= width <= 2000 and 150 <= height <= 1000 and width > height
    table = report.html_table()
    assert body_rows(table) == 3
    assert "<th" in table and "val_accuracy" in table and "stored_bytes" not in table
    assert "0.6000" in table and "0.1235" in table  # rounded to 4 places


def test_report_does_not_touch_pyplot() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    TrainingReport(fake_model()).png()
    assert plt.get_fignums() == before


def test_report_escapes_hostile_names() -> None:
    hostile = "<script>alert('x')</script>"
    model = fake_model(name=hostile)
    history = model.history.assign(db_device=hostile)
    model.history = history.rename(columns={"val_f1": "val_<b>f1</b>"})
    html = TrainingReport(model)._repr_html_()
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;script&gt;" in html


def test_report_text_is_the_summary_line() -> None:
    model = fake_model()
    report = TrainingReport(model)
    assert repr(report) == report.summary == summary_line(model)
    bundle = report._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"] == summary_line(model)
    assert repr(TrainingReport(fake_model())) == repr(report)  # deterministic


def test_report_red_only_when_not_complete() -> None:
    assert RED not in TrainingReport(fake_model())._repr_html_()
    interrupted = TrainingReport(fake_model(status="interrupted"))
    assert interrupted.alert and RED in interrupted._repr_html_()
    failed = TrainingReport(
        history=pd.DataFrame(), name="m", version=1, status="failed", error=TypeError("boom")
    )
    assert failed.summary == "dbdl: model m v1 failed | 0 iteration(s) | TypeError: boom"
    assert RED in failed._repr_html_()


def test_report_other_histories() -> None:
    regression = pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [1.0, 0.5],
            "val_loss": [1.1, 0.6],
            "val_mse": [4.0, 2.0],
            "val_mae": [1.5, 1.0],
            "val_r2": [None, 0.4],
            "seconds": [0.1, 0.1],
        }
    )
    no_validation = regression.drop(columns=["val_loss", "val_mse", "val_mae", "val_r2"])
    for history in (regression, no_validation, pd.DataFrame()):
        report = TrainingReport(history=history, name="r", version=1, status="complete")
        assert report.png().startswith(PNG_MAGIC)
        assert report.summary.startswith("dbdl: model r v1 complete")


def test_short_error() -> None:
    assert short_error(ValueError("first\nsecond")) == "ValueError: first"
    assert short_error(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert len(short_error("x" * 1000)) == 300


def test_report_and_monitor_on_a_real_trained_model(tmp_path, displays: CapturedIO) -> None:
    import dbdl_magic as dl
    from dbdl_magic.datasets import digits_frame, load_table

    db = dl.connect(f"sqlite:///{tmp_path / 't.db'}")
    try:
        load_table(db.engine, "digits", digits_frame().head(200))
        monitor = WidgetMonitor(refresh=0.0)
        model = dl.train(
            db,
            "SELECT * FROM digits",
            target="digit",
            model="linear",
            epochs=2,
            name="tiny",
            callbacks=monitor.callbacks(),
        )
        monitor.finish(model)
    finally:
        db.engine.dispose()
    assert monitor.started.rows + monitor.started.validation_rows == 200
    assert monitor.progress.value == monitor.progress.max
    report = TrainingReport(model)
    assert repr(report) == summary_line(model)
    assert "val_accuracy 0." in report.summary
    assert body_rows(report.html_table()) == 2
    assert png_size(report.png())[0] > 0
    final = displays.outputs[-1]
    assert final.update and display_ids(displays) == {monitor.display_id}
    assert final.data["text/plain"] == summary_line(model)
    assert "data:image/png;base64," in final.data["text/html"]


# -- cohort runs (groups, selection) ------------------------------------------------------------
CONFIGS = ["lr=0.1 optimizer=sgd", "lr=0.01 optimizer=adam", "lr=0.001 optimizer=adam", "lr=1"]


def cohort_info(cohort: str, labels: list[str], **extra: Any) -> RunStarted:
    """The facts of a cohort run (``on_start``)."""
    members = tuple(
        CohortMember(
            member=i,
            label=label,
            version=3 + i,
            group=label.partition("=")[2] if cohort == "groups" else None,
            trial=None if cohort == "groups" else {"label": label},
        )
        for i, label in enumerate(labels)
    )
    return dataclasses.replace(
        start_info(), workers="auto", cohort=cohort, members=members, **extra
    )


def selection_info() -> RunStarted:
    return cohort_info("selection", CONFIGS, selection_metric="val_loss", selection_mode="min")


def member(i: int, label: str, status: str, epoch: int, val_loss: float | None) -> MemberProgress:
    return MemberProgress(
        member=i,
        label=label,
        status=status,
        epoch=epoch,
        metrics={
            "train_loss": 1.5 if val_loss is None else val_loss - 0.1,
            "val_loss": val_loss,
            "val_accuracy": None if val_loss is None else 1 - val_loss / 2,
        },
        samples=160,
    )


def selection_row(epoch: int) -> IterationFinished:
    """Epoch 1: all four train; epoch 2: ``lr=1`` and ``lr=0.1`` were halved after epoch 1."""
    losses = {0: 0.9, 1: 0.5 / epoch, 2: 0.7 / epoch, 3: None}  # lr=1 diverged (no metrics)
    members = []
    for i, label in enumerate(CONFIGS):
        halved = epoch > 1 and i in (0, 3)  # they keep their epoch-1 values
        status, last = ("halved", 1) if halved else ("training", epoch)
        members.append(member(i, label, status, last, losses[i]))
    note = "auto: 1 worker (est. 2 workers 3.1 s vs 1 worker 2.0 s)"
    return dataclasses.replace(
        iteration_row(epoch), members=tuple(members), parallel_note=note
    )


def groups_row(epoch: int, n: int) -> IterationFinished:
    members = [
        member(i, f"bucket={i}", "early-stopped" if i == 3 else "training", epoch, 0.1 * (i + 1))
        for i in reversed(range(n))  # not in label order
    ]
    return dataclasses.replace(iteration_row(epoch), members=tuple(members))


def leaderboard() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "version": [4, 5, 3, 6],
            "label": [CONFIGS[1], CONFIGS[2], CONFIGS[0], CONFIGS[3]],
            "status": ["complete", "complete", "halved", "halved"],
            "epochs": [3, 3, 1, 1],
            "val_loss": [0.1234, 0.2345, 0.9, None],
            "val_accuracy": [0.91, 0.88, 0.55, None],
        }
    )


def selection_model(status: str = "complete") -> SimpleNamespace:
    model = fake_model(status=status)
    model.history = history_of([selection_row(e) for e in (1, 2, 3)])
    model.leaderboard = leaderboard()
    return model


def grouped_model() -> SimpleNamespace:
    model = fake_model()
    model.history = history_of([groups_row(e, 3) for e in (1, 2, 3)])
    model.group_table = pd.DataFrame(
        {
            "group": ["a", "b", "c"],
            "version": [3, 4, 5],
            "status": ["complete", "early-stopped", "complete"],
            "epochs": [3, 2, 3],
            "train rows": [60, 50, 50],
            "val_loss": [0.2, 0.3, 0.4],
        }
    )
    return model


def text_run(info: RunStarted, rows: list[IterationFinished]) -> str:
    stream = io.StringIO()
    monitor = TextMonitor(stream=stream)
    monitor.on_start(info)
    for row in rows:
        monitor.on_iteration(row)
    return stream.getvalue()


def test_members_frame_ranks_and_sorts() -> None:
    members = selection_row(2).member_rows()
    board = members_frame(members, "val_loss", "min")
    assert list(board["label"]) == [CONFIGS[1], CONFIGS[2], CONFIGS[0], CONFIGS[3]]
    assert list(board["rank"]) == [1, 2, 3, 4]  # no value (diverged): last
    assert list(board.columns) == [
        "rank", "label", "status", "epoch", "train_loss", "val_loss", "val_accuracy", "samples"
    ]  # fmt: skip
    best_accuracy = members_frame(members, "val_accuracy", "max")
    assert list(best_accuracy["label"]) == list(board["label"])
    by_label = members_frame(groups_row(1, 12).member_rows())
    assert "rank" not in by_label.columns
    assert list(by_label["label"])[:3] == ["bucket=0", "bucket=1", "bucket=2"]
    assert list(by_label["label"])[-1] == "bucket=11"  # numbers compare as numbers
    assert members_frame([]).empty


def test_text_monitor_selection_leaderboard() -> None:
    out = text_run(selection_info(), [selection_row(1), selection_row(2)])
    lines = out.splitlines()
    assert "auto workers" in lines[0]
    assert "4 models (4 configurations, ranked by val_loss, lower is better)" in lines[0]
    assert lines[1].startswith("epoch   1  train_loss 2.0000")
    assert "members" not in lines[1] and "[{" not in out  # no list on the iteration line
    assert out.count("parallel: auto: 1 worker") == 1  # printed when it changes
    second = lines[lines.index(next(x for x in lines if x.startswith("epoch   2"))) :]
    ranks = [x.split()[:3] for x in second if re.match(r"\s+\d+\s+lr=", x)]
    assert ranks == [
        ["1", "lr=0.01", "optimizer=adam"],
        ["2", "lr=0.001", "optimizer=adam"],
        ["3", "lr=0.1", "optimizer=sgd"],
        ["4", "lr=1", "halved"],
    ]
    halved = next(x for x in second if "lr=0.1 " in x)
    assert "halved" in halved and re.search(r"halved\s+1\s", halved)  # its last epoch, 1
    assert re.search(r"lr=1\s+halved\s+1\s+1\.5000\s+-\s+-\s+160$", second[-1])


def test_text_monitor_groups_sorted_and_capped() -> None:
    out = text_run(cohort_info("groups", [f"bucket={i}" for i in range(25)]), [groups_row(1, 25)])
    lines = out.splitlines()
    assert "25 models (groups by bucket)" in lines[0]
    header = lines[2].split()
    assert header[:3] == ["label", "status", "epoch"] and "rank" not in header
    table = lines[3:]
    assert [x.split()[0] for x in table[:20]] == [f"bucket={i}" for i in range(20)]
    assert table[20] == "  ... 5 more" and len(table) == 21
    assert "early-stopped" in table[3]


def test_text_monitor_ordinary_run_unchanged() -> None:
    out = text_run(start_info(), [iteration_row(1)])
    assert out.splitlines() == [
        "training digits v2 in sqlite:///tmp/t.db (sqlite, 1 worker(s), kernels on cpu): "
        "160 training rows, 40 validation rows, 1 buffers, 650 parameters",
        "epoch   1  train_loss 2.0000  val_loss 2.2000  val_accuracy 0.6000  val_f1 0.5500  "
        "seconds 0.1235  stored_bytes 2600",
    ]


def test_history_with_members_column_is_ignored() -> None:
    history = history_of([selection_row(e) for e in (1, 2)])
    history["val_note"] = "text"  # a non-numeric metric-like column is ignored too
    assert "members" in history.columns
    assert metric_columns(history) == ["train_loss", "val_loss", "val_accuracy", "val_f1"]
    table = metrics_table_html(history)
    assert body_rows(table) == 2 and "members" not in table and "lr=" not in table
    assert "val_note" not in table
    assert curves_png(history, "t").startswith(PNG_MAGIC)


def test_widget_shows_the_leaderboard_once_per_iteration(displays: CapturedIO) -> None:
    monitor = WidgetMonitor(refresh=0.0)
    monitor.on_start(selection_info())
    assert "4 models (4 configurations" in monitor.header.value
    assert "auto workers" in monitor.header.value
    changes = count_changes(monitor.members)
    for epoch in (1, 2, 3):
        monitor.on_iteration(selection_row(epoch))
    assert len(changes) == 3
    live = monitor.members.value
    assert 'class="dbdl-members"' in live and body_rows(live) == 4
    assert "leaderboard after epoch 3 by val_loss (lower is better)" in live
    assert "parallel: auto: 1 worker" in live
    order = [live.index(label) for label in (CONFIGS[1], CONFIGS[2], CONFIGS[0], CONFIGS[3])]
    assert order == sorted(order) and "halved" in live
    assert "members" not in monitor.table.value and body_rows(monitor.table.value) == 3
    assert bytes(monitor.image.value).startswith(PNG_MAGIC)

    model = selection_model()
    monitor.finish(model)
    final = displays.outputs[-1]
    assert final.update and display_ids(displays) == {monitor.display_id}
    assert final.data["text/plain"] == summary_line(model)
    html = final.data["text/html"]
    assert html.index("dbdl-metrics") < html.index("dbdl-members")
    assert "leaderboard: 4 configurations, ranked by val_loss" in html
    assert monitor.members.comm is None


def test_widget_ordinary_run_has_no_members_table(displays: CapturedIO) -> None:
    monitor = WidgetMonitor(refresh=0.0)
    monitor.on_start(start_info())
    monitor.on_iteration(iteration_row(1))
    assert monitor.members.value == ""
    monitor.finish(fake_model(epochs=1))
    assert "dbdl-members" not in displays.outputs[-1].data["text/html"]


def test_widget_fail_keeps_the_last_members(displays: CapturedIO) -> None:
    monitor = WidgetMonitor(refresh=0.0)
    monitor.on_start(cohort_info("groups", ["bucket=0", "bucket=1", "bucket=2"]))
    monitor.on_iteration(groups_row(1, 3))
    assert "3 groups after epoch 1" in monitor.members.value
    monitor.fail(KeyboardInterrupt())
    final = displays.outputs[-1]
    assert final.data["text/plain"].endswith("| 3 groups | KeyboardInterrupt")
    html = final.data["text/html"]
    assert RED in html and body_rows(html[html.index("dbdl-members") :]) == 3
    assert "bucket=2" in html and "early-stopped" not in html  # only 3 groups: 3 stops later


def test_report_selection_summary_and_leaderboard() -> None:
    model = selection_model()
    line = summary_line(model)
    assert line.startswith("dbdl: model digits v2 complete | 3 iteration(s) | train_loss 0.667")
    assert line.endswith("| best: lr=0.01 optimizer=adam val_loss 0.123")
    model.info = {"selection_metric": "val_accuracy"}
    assert summary_line(model).endswith("| best: lr=0.01 optimizer=adam val_accuracy 0.910")
    report = TrainingReport(selection_model())
    assert repr(report) == summary_line(selection_model())  # deterministic
    html = report._repr_html_()
    board = html[html.index("dbdl-members") :]
    assert body_rows(board) == 4 and "<th" in board and ">rank</th>" in board
    assert board.index(CONFIGS[1]) < board.index(CONFIGS[0]) and "halved" in board
    assert "0.1234" in board


def test_report_grouped_model() -> None:
    model = grouped_model()
    assert summary_line(model).endswith("| 3 groups")
    report = TrainingReport(model)
    assert repr(report) == summary_line(model)
    html = report._repr_html_()
    assert html.index("dbdl-metrics") < html.index("dbdl-members")
    groups = html[html.index("dbdl-members") :]
    assert body_rows(groups) == 3 and "train rows" in groups and "early-stopped" in groups
    ordinary = TrainingReport(fake_model())
    assert ordinary.cohort_html() == "" and "dbdl-members" not in ordinary._repr_html_()
    assert summary_line(SimpleNamespace(**vars(fake_model()), leaderboard=pd.DataFrame())) == (
        summary_line(fake_model())
    )  # an empty leaderboard is no leaderboard


# -- the records are the contract of what a run sends --------------------------------------------
def observed_run(tmp_path, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Train on 200 digits (a ``half`` column to group by), keeping the dicts the run sends."""
    import dbdl_magic as dl
    from dbdl_magic.datasets import digits_frame, load_table
    from dbdl_magic.events import Callbacks

    frame = digits_frame().head(200)
    frame["half"] = ["low" if d < 5 else "high" for d in frame["digit"]]
    starts: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    db = dl.connect(f"sqlite:///{tmp_path / 'observed.db'}")
    try:
        load_table(db.engine, "digits", frame)
        model = dl.train(
            db, "SELECT * FROM digits", target="digit", model="linear", epochs=2, seed=0,
            callbacks=Callbacks(on_start=starts.append, on_iteration=rows.append), **options,
        )
    finally:
        db.engine.dispose()
    assert len(starts) == 1 and len(rows) == 2
    return starts[0], rows, model


@pytest.mark.parametrize(
    "options",
    [{}, {"grid": {"lr": [0.1, 0.01]}}, {"group_by": "half"}],
    ids=["one model", "selection", "groups"],
)
def test_records_cover_every_key_a_real_run_sends(tmp_path, options: dict[str, Any]) -> None:
    info, rows, model = observed_run(tmp_path, **options)
    started = RunStarted.from_info(info)
    assert started.extra == {} and started.to_info() == info
    assert started.rows + started.validation_rows == 200 and started.epochs == 2
    cohort = "selection" if "grid" in options else "groups" if options else None
    assert started.cohort == cohort and len(started.members) == (2 if cohort else 0)
    for row in rows:
        it = IterationFinished.from_row(row)
        assert it.extra == {} and all(m.extra == {} for m in it.members)
        assert it.to_row() == {k: v for k, v in row.items() if v is not None or k in it.metrics}
        assert set(it.metrics) >= {"train_loss", "val_loss", "val_accuracy", "val_f1"}
        assert it.seconds is not None and it.seconds >= it.train_seconds > 0
        assert len(it.members) == (2 if cohort else 0)
    assert [it.epoch for it in map(IterationFinished.from_row, rows)] == [1, 2]
    # the model's stored history is the same record
    finished = RunFinished.from_model(model)
    assert finished.summary_line() == summary_line(model)
    assert [it.epoch for it in finished.history] == [1, 2]
    last = IterationFinished.from_row(rows[-1])
    assert finished.history[-1].metrics == pytest.approx(last.metrics)
    if cohort == "selection":
        assert finished.ranked_by == "val_loss" and len(finished.leaderboard) == 2
        assert f"best: {finished.leaderboard[0]['label']} val_loss " in summary_line(model)
    elif cohort == "groups":
        assert summary_line(model).endswith("| 2 groups")

    # a monitor shows the run's dicts and their records alike
    as_dicts, as_records = io.StringIO(), io.StringIO()
    for stream, start, its in (
        (as_dicts, info, rows),
        (as_records, started, [IterationFinished.from_row(r) for r in rows]),
    ):
        monitor = TextMonitor(stream=stream)
        monitor.on_start(start)
        for it in its:
            monitor.on_iteration(it)
        monitor.finish(model)
    assert as_dicts.getvalue() == as_records.getvalue()
    lines = as_dicts.getvalue().splitlines()
    assert lines[0].startswith(f"training {model.name} v") and "160 training rows" in lines[0]
    assert ("; 2 models (" in lines[0]) == bool(cohort)
    assert lines[-1] == summary_line(model)


def test_records_refuse_rows_without_their_keys() -> None:
    with pytest.raises(ValueError, match="an iteration row: missing 'epoch'"):
        IterationFinished.from_row({"train_loss": 1.0})
    with pytest.raises(ValueError, match="on_start facts: missing 'database', 'backend'"):
        RunStarted.from_info({"name": "m", "version": 1, "rows": 3})
    with pytest.raises(ValueError, match="members must be a list"):
        IterationFinished.from_row({"epoch": 1, "members": "lr=1"})
    with pytest.raises(TypeError, match="leaderboard must be a DataFrame or a list of dicts"):
        RunFinished.from_model(fake_model(), leaderboard="best")
    unknown = IterationFinished.from_row({"epoch": 1, "train_loss": 0.5, "lr_now": 0.1})
    assert unknown.extra == {"lr_now": 0.1}
    assert unknown.to_row() == {"epoch": 1, "train_loss": 0.5, "lr_now": 0.1}


def test_report_of_a_run_finished_record(displays: CapturedIO) -> None:
    """The widget monitor consumes a :class:`RunFinished` as it does a model."""
    run = RunFinished(
        name="digits",
        version=2,
        status="interrupted",
        history=tuple(iteration_row(e) for e in (1, 2)),
        error="KeyboardInterrupt",
    )
    assert run.summary_line() == (
        "dbdl: model digits v2 interrupted | 2 iteration(s) | train_loss 1.000 | "
        "val_loss 1.100 | val_accuracy 0.700 | val_f1 0.650 | KeyboardInterrupt"
    )
    report = TrainingReport(run)
    assert report.alert and repr(report) == run.summary_line()
    assert body_rows(report.html_table()) == 2 and "0.7000" in report.html_table()
    monitor = WidgetMonitor(refresh=0.0)
    monitor.on_start(start_info(epochs=2))
    monitor.on_finish(run)
    final = displays.outputs[-1]
    assert final.update and final.data["text/plain"] == run.summary_line()
    assert RED in final.data["text/html"]


def test_summary_line_of_a_failed_model_names_its_error() -> None:
    model = fake_model(status="failed")
    model.info = {"error": "TrainingError: the server ran out of memory\nCONTEXT: ..."}
    line = summary_line(model)
    assert line.startswith("dbdl: model digits v2 failed | 3 iteration(s) | train_loss 0.667")
    assert line.endswith("| TrainingError: the server ran out of memory")
    assert repr(TrainingReport(model)) == line
