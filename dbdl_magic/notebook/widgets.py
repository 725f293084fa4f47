"""The live Jupyter monitor: one display, updated in place, replaced by a static report.

While the run goes on the display shows a header, a progress bar (moving within an iteration),
elapsed/ETA, loss and metric curves and a metrics table that grows one row per iteration; runs
that train several models (groups, selection) add a members table below, redrawn once per
iteration. When the run ends the same display becomes a
:class:`~dbdl_magic.notebook.figures.TrainingReport`.
"""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as widgets
import pandas as pd
from IPython.display import DisplayHandle, display

from dbdl_magic.events import Callbacks
from dbdl_magic.notebook.figures import (
    TrainingReport,
    cohort_table_html,
    curves_png,
    metrics_table_html,
)
from dbdl_magic.notebook.monitor import cohort_text, start_members_frame, workers_text


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _LiveView:
    """Displays the live widget with a short text/plain (the widget repr is noise in text)."""

    def __init__(self, widget: widgets.Widget, text: str) -> None:
        self.widget, self.text = widget, text

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return {**self.widget._repr_mimebundle_(**kwargs), "text/plain": self.text}


class WidgetMonitor:
    """A :class:`~dbdl_magic.notebook.monitor.Monitor` drawn with ipywidgets.

    ``refresh`` bounds the update rate: in-iteration progress at most every ``refresh`` seconds,
    the curves at most once per iteration and every ``max(refresh, 1)`` seconds, or five times
    as long as the last drawing took (the last iteration is always drawn). ``title`` overrides
    the model name in the header.
    """

    clock = staticmethod(time.monotonic)  # seconds; replaceable in tests

    def __init__(self, refresh: float = 0.5, title: str = "") -> None:
        self.refresh = refresh
        self.title = title
        self.info: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.header = widgets.HTML()
        self.progress = widgets.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="50%")
        )
        self.label = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(display="none"))
        self.table = widgets.HTML()
        self.members = widgets.HTML()  # cohort runs: leaderboard / per-group table
        self._bar = widgets.HBox([self.progress, self.label])
        self.widget = widgets.VBox([self.header, self._bar, self.image, self.table, self.members])
        self.handle: DisplayHandle | None = None
        self.displayed = False
        self._started = self.clock()
        self._last_progress = float("-inf")
        self._last_png = float("-inf")
        self._png_seconds = 0.0

    # -- Monitor protocol -------------------------------------------------------------------------
    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start, on_iteration=self.on_iteration, on_progress=self.on_progress
        )

    def on_start(self, info: dict[str, Any]) -> None:
        """Show the live view with the run's facts (the keys of ``TrainingRun._announce``)."""
        self.info = dict(info)
        self._started = self.clock()
        i = {k: html.escape(str(v)) for k, v in info.items()}
        name = html.escape(self.title or str(info.get("name", "")))
        cohort = html.escape(cohort_text(info))
        self.header.value = (
            f"<b>training {name} v{i.get('version', '?')}</b> in {i.get('database', '?')} "
            f"({i.get('backend', '?')}, {html.escape(workers_text(info.get('workers', 1)))}, "
            f"kernels on {i.get('device', '?')}): {i.get('rows', '?')} training rows, "
            f"{i.get('validation_rows', 0)} validation rows, {i.get('parameters', '?')} parameters"
            + (f"; {cohort}" if cohort else "")
        )
        self._set_progress(0.0)
        if not self.displayed:
            text = f"dbdl: training {self.title or info.get('name', '')} v{info.get('version')}"
            self.handle = display(_LiveView(self.widget, text), display_id=True)
            self.displayed = True

    def on_progress(self, done: int, total: int) -> None:
        """In-iteration progress, at most every ``refresh`` seconds."""
        now = self.clock()
        if total <= 0 or now - self._last_progress < self.refresh:
            return
        self._last_progress = now
        self._set_progress((self.epochs_done + min(done / total, 1.0)) / self.epochs)

    def on_iteration(self, row: dict[str, Any]) -> None:
        """One more table row; the curves when the redraw interval allows (always at the end)."""
        self.rows.append(dict(row))
        history = pd.DataFrame(self.rows)
        self._set_progress(self.epochs_done / self.epochs)
        self.table.value = metrics_table_html(history)
        self._show_members(row)
        now = self.clock()
        interval = max(self.refresh, 1.0, 5 * self._png_seconds)  # drawing costs <= ~20%
        if now - self._last_png >= interval or self.epochs_done >= self.epochs:
            self._last_png = now
            title = f"{self.title or self.info.get('name', '')}: training"
            self.image.value = curves_png(history, title)
            self.image.layout.display = None
            self._png_seconds = self.clock() - now

    def finish(self, model: Any) -> None:
        """Replace the live view by the model's :class:`TrainingReport`."""
        self._replace(TrainingReport(model))

    def fail(self, error: BaseException) -> None:
        """Replace the live view (if shown) by a red summary naming ``error``."""
        if not self.displayed:
            return  # failed before training started; the caller shows the exception
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        members = self._members_frame(self.rows[-1] if self.rows else {})
        selection = self.info.get("cohort") == "selection"
        report = TrainingReport(
            history=pd.DataFrame(self.rows),
            name=str(self.info.get("name", self.title or "model")),
            version=self.info.get("version"),
            status=status,
            error=error,
            leaderboard=members if selection else None,
            group_table=None if selection else members,
            selection_metric=self.info.get("selection_metric"),
        )
        self._replace(report)

    # -- state ------------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return max(int(self.info.get("epochs") or 1), 1)

    @property
    def epochs_done(self) -> int:
        return int(self.rows[-1]["epoch"]) if self.rows else 0

    @property
    def progress_value(self) -> float:
        """The progress bar's position, 0 … 1 (``progress.max``)."""
        return float(self.progress.value)

    @property
    def display_id(self) -> str | None:
        return self.handle.display_id if self.handle is not None else None

    def _set_progress(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.progress.value = fraction
        elapsed = self.clock() - self._started
        eta = f" · ETA {_hms(elapsed * (1 - fraction) / fraction)}" if fraction > 0 else ""
        self.label.value = (
            f"&nbsp;{self.epochs_done}/{self.epochs} iterations · {100 * fraction:.0f}% · "
            f"{_hms(elapsed)} elapsed{eta}"
        )

    def _members_frame(self, row: dict[str, Any]) -> pd.DataFrame | None:
        """The row's members as the shared table (ranked for a selection); None if none."""
        members = row.get("members")
        return start_members_frame(self.info, members) if members else None

    def _show_members(self, row: dict[str, Any]) -> None:
        """Redraw the members table (and the parallel note) from an iteration's row."""
        frame, note = self._members_frame(row), row.get("parallel_note")
        parts = [f"<div><i>parallel: {html.escape(str(note))}</i></div>"] if note else []
        if frame is not None:
            if self.info.get("cohort") == "selection":
                metric = self.info.get("selection_metric")
                better = "higher" if self.info.get("selection_mode") == "max" else "lower"
                by = f" by {metric} ({better} is better)" if metric and "rank" in frame else ""
                caption = f"leaderboard after epoch {row.get('epoch')}{by}"
            else:
                caption = f"{len(frame)} groups after epoch {row.get('epoch')}"
            parts.append(cohort_table_html(frame, caption))
        self.members.value = "".join(parts)

    def _replace(self, report: TrainingReport) -> None:
        """Swap the live view for ``report`` in the same output, then release the widgets."""
        if self.handle is not None:
            self.handle.update(report)
        else:
            self.handle = display(report, display_id=True)
            self.displayed = True
        self.image.value = b""  # nbclient keeps closed widgets' last state in the notebook
        parts = (self.header, self.progress, self.label, self.image, self.table, self.members)
        for w in (*parts, self._bar):
            for model in (w, w.layout, getattr(w, "style", None)):
                if model is not None:
                    model.close()
        self.widget.layout.close()
        self.widget.close()


__all__ = ["WidgetMonitor"]
