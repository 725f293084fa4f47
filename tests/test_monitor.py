"""The live widget monitor and the static training report, under a real IPython shell."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

from dbdl_magic.monitor import summary_line
from dbdl_magic.report import RED, TrainingReport, short_error
from dbdl_magic.widgets import WidgetMonitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start_info(epochs: int = 3, name: str = "digits") -> dict[str, Any]:
    """The keys ``TrainingRun._announce`` passes to ``on_start``."""
    return {
        "name": name,
        "version": 2,
        "database": "sqlite:///tmp/t.db",
        "backend": "sqlite",
        "rows": 160,
        "validation_rows": 40,
        "buffers": 1,
        "parameters": 650,
        "workers": 1,
        "epochs": epochs,
        "device": "cpu",
    }


def iteration_row(epoch: int) -> dict[str, Any]:
    """A row as ``TrainingRun._iteration`` passes to ``on_iteration``."""
    return {
        "epoch": epoch,
        "train_loss": 2.0 / epoch,
        "val_loss": 2.2 / epoch,
        "val_accuracy": 0.5 + 0.1 * epoch,
        "val_f1": 0.45 + 0.1 * epoch,
        "seconds": 0.123456 * epoch,
        "train_seconds": 0.1,
        "samples": 160,
        "workers": 1,
        "combines": 0,
        "db_device": "cpu",
        "stored_bytes": 2600,
    }


def fake_model(epochs: int = 3, name: str = "digits", status: str = "complete") -> SimpleNamespace:
    history = pd.DataFrame([iteration_row(e) for e in range(1, epochs + 1)])
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
    assert monitor.info["rows"] + monitor.info["validation_rows"] == 200
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
