"""The live Jupyter monitor: one display, updated in place, replaced by a static report; and
:func:`make_monitor`, which picks it inside a Jupyter kernel and the text monitor elsewhere.

While the run goes on the display shows a header, a progress bar (moving within an iteration),
elapsed/ETA, loss and metric curves and a metrics table that grows one row per iteration; runs
that train several models (groups, selection) add a members table below, redrawn once per
iteration. When the run ends the same display becomes a
:class:`~dbdl_magic.notebook.figures.TrainingReport`.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets
import pandas as pd
from IPython.display import DisplayHandle, display

from dbdl_magic.display import better_text
from dbdl_magic.events import Callbacks, IterationFinished, RunFinished, RunStarted
from dbdl_magic.notebook.figures import (
    TrainingReport,
    cohort_table_html,
    curves_png,
    metrics_table_html,
)
from dbdl_magic.notebook.monitor import (
    Monitor,
    TextMonitor,
    start_facts,
    start_members_frame,
    start_title,
)


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
        self.started: RunStarted | None = None
        self.iterations: list[IterationFinished] = []
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
        self._t0 = self.clock()  # when the run started (elapsed, ETA)
        self._last_progress = float("-inf")
        self._last_png = float("-inf")
        self._png_seconds = 0.0

    # -- Monitor protocol -------------------------------------------------------------------------
    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start, on_iteration=self.on_iteration, on_progress=self.on_progress
        )

    def on_start(self, event: RunStarted | Mapping[str, Any]) -> None:
        """Show the live view with the run's facts (a record or the ``on_start`` dict)."""
        self.started = started = RunStarted.of(event)
        self._t0 = self.clock()
        title = start_title(started, self.title)
        self.header.value = f"<b>{html.escape(title)}</b> {html.escape(start_facts(started))}"
        self._set_progress(0.0)
        if not self.displayed:
            self.handle = display(_LiveView(self.widget, f"dbdl: {title}"), display_id=True)
            self.displayed = True

    def on_progress(self, done: int, total: int) -> None:
        """In-iteration progress, at most every ``refresh`` seconds."""
        now = self.clock()
        if total <= 0 or now - self._last_progress < self.refresh:
            return
        self._last_progress = now
        self._set_progress((self.epochs_done + min(done / total, 1.0)) / self.epochs)

    def on_iteration(self, event: IterationFinished | Mapping[str, Any]) -> None:
        """One more table row; the curves when the redraw interval allows (always at the end)."""
        it = IterationFinished.of(event)
        self.iterations.append(it)
        history = self.history
        self._set_progress(self.epochs_done / self.epochs)
        self.table.value = metrics_table_html(history)
        self._show_members(it)
        now = self.clock()
        interval = max(self.refresh, 1.0, 5 * self._png_seconds)  # drawing costs <= ~20%
        if now - self._last_png >= interval or self.epochs_done >= self.epochs:
            self._last_png = now
            name = self.title or (self.started.name if self.started else "")
            title = f"{name}: training"
            self.image.value = curves_png(history, title)
            self.image.layout.display = None
            self._png_seconds = self.clock() - now

    def finish(self, model: Any) -> None:
        """Replace the live view by the model's :class:`TrainingReport`."""
        self._replace(TrainingReport(model))

    def on_finish(self, run: RunFinished) -> None:
        """Replace the live view by the :class:`TrainingReport` of ``run``."""
        self._replace(TrainingReport(run))

    def fail(self, error: BaseException) -> None:
        """Replace the live view (if shown) by a red summary naming ``error``."""
        if not self.displayed:
            return  # failed before training started; the caller shows the exception
        members = self._members_frame(self.iterations[-1]) if self.iterations else None
        rows = members.to_dict("records") if members is not None else []
        name = self.title or "model"
        self.on_finish(RunFinished.from_error(error, self.started, self.iterations, rows, name))

    # -- state ------------------------------------------------------------------------------------
    @property
    def history(self) -> pd.DataFrame:
        """The iterations so far, one row each, as in a model's history."""
        return pd.DataFrame([it.to_row() for it in self.iterations])

    @property
    def epochs(self) -> int:
        return max(self.started.epochs if self.started else 1, 1)

    @property
    def epochs_done(self) -> int:
        return self.iterations[-1].epoch if self.iterations else 0

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
        elapsed = self.clock() - self._t0
        eta = f" · ETA {_hms(elapsed * (1 - fraction) / fraction)}" if fraction > 0 else ""
        self.label.value = (
            f"&nbsp;{self.epochs_done}/{self.epochs} iterations · {100 * fraction:.0f}% · "
            f"{_hms(elapsed)} elapsed{eta}"
        )

    def _members_frame(self, it: IterationFinished) -> pd.DataFrame | None:
        """The iteration's members as the shared table (ranked for a selection); None if none."""
        return start_members_frame(self.started, it.member_rows()) if it.members else None

    def _show_members(self, it: IterationFinished) -> None:
        """Redraw the members table (and the parallel note) from an iteration."""
        frame, note = self._members_frame(it), it.parallel_note
        parts = [f"<div><i>parallel: {html.escape(str(note))}</i></div>"] if note else []
        if frame is not None:
            started = self.started
            if started is not None and started.ranks_members:
                metric = started.selection_metric
                better = better_text(started.selection_mode)
                by = f" by {metric} ({better})" if metric and "rank" in frame else ""
                caption = f"leaderboard after epoch {it.epoch}{by}"
            else:
                caption = f"{len(frame)} groups after epoch {it.epoch}"
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


def in_jupyter_kernel() -> bool:
    """True inside an ipykernel (where widgets can render), False in terminals and scripts."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def make_monitor(kind: str = "auto", *, refresh: float = 0.5, title: str = "") -> Monitor:
    """``auto``: widgets in a Jupyter kernel, text elsewhere; ``widgets`` / ``text`` force one."""
    if kind == "widgets" or (kind == "auto" and in_jupyter_kernel()):
        return WidgetMonitor(refresh=refresh, title=title)
    return TextMonitor()


__all__ = ["WidgetMonitor", "in_jupyter_kernel", "make_monitor"]
