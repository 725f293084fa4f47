"""The static summary of a training run: loss and metric curves plus a per-iteration table.

:class:`TrainingReport` renders as HTML (summary line, embedded PNG, metrics table and, for
cohort runs, the leaderboard of a selection or the per-group table) and as text (the
deterministic summary line of :meth:`~dbdl_magic.events.RunFinished.summary_line`). Figures are
drawn with :class:`matplotlib.figure.Figure` on an Agg canvas, so pyplot's global state is never
touched. This module knows the metric vocabulary (:mod:`dbdl_magic.display`) and the run records
(:mod:`dbdl_magic.events`), nothing of the monitors.
"""

from __future__ import annotations

import base64
import html
import io
import numbers
from functools import cached_property
from typing import Any

import pandas as pd

from dbdl_magic.display import format_cell, is_metric, lower_is_better
from dbdl_magic.events import RunFinished

RED = "#c62828"
HTML_ROWS = 100  # member / group rows shown in HTML tables, then "… N more"


def frame_or_none(value: Any) -> pd.DataFrame | None:
    """``value`` if it is a non-empty DataFrame (a leaderboard, a group table), else None."""
    return value if isinstance(value, pd.DataFrame) and not value.empty else None


def _numeric(series: pd.Series) -> bool:
    """Numbers or nothing yet; False for columns of lists (cohort ``members``) or strings."""
    if pd.api.types.is_numeric_dtype(series):
        return True
    return all(isinstance(v, numbers.Real) for v in series.dropna())


def metric_columns(history: pd.DataFrame) -> list[str]:
    """The numeric ``train_*`` / ``val_*`` metric columns of a history, in order (no timings)."""
    return [str(c) for c in history.columns if is_metric(c) and _numeric(history[c])]


def _table_columns(history: pd.DataFrame) -> list[str]:
    columns = [c for c in ("epoch",) if c in history.columns] + metric_columns(history)
    return columns + (["seconds"] if "seconds" in history.columns else [])


def table_html(frame: pd.DataFrame, css_class: str, limit: int | None = None) -> str:
    """An HTML table of ``frame`` (numbers right, text left, floats to 4 places, escaped);
    with ``limit``, that many rows and a last row "… N more"."""
    style = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:"
    styles = [
        style + ("right" if _numeric(frame.iloc[:, i]) else "left") for i in range(frame.shape[1])
    ]

    def tr(tag: str, cells: Any) -> str:
        pairs = zip(cells, styles, strict=True)
        return "<tr>" + "".join(f'<{tag} style="{st}">{c}</{tag}>' for c, st in pairs) + "</tr>"

    shown = frame if limit is None else frame.head(limit)
    head = tr("th", (html.escape(str(c)) for c in frame.columns))
    rows = [
        tr("td", (html.escape(format_cell(v)) for v in row))
        for row in shown.astype(object).itertuples(index=False)
    ]
    if len(frame) > len(shown):
        more = len(frame) - len(shown)
        rows.append(f'<tr><td colspan="{frame.shape[1]}">… {more} more</td></tr>')
    return (
        f'<table class="{css_class}" style="border-collapse:collapse;font-family:monospace;'
        f'font-size:12px"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    )


def metrics_table_html(history: pd.DataFrame) -> str:
    """An HTML table with one row per iteration: epoch, metrics, seconds (4 decimal places)."""
    return table_html(history[_table_columns(history)], "dbdl-metrics")


def cohort_table_html(frame: pd.DataFrame, caption: str, limit: int = HTML_ROWS) -> str:
    """A captioned members table (a leaderboard, a per-group table), at most ``limit`` rows."""
    return (
        f'<div class="dbdl-cohort" style="margin-top:6px"><b>{html.escape(caption)}</b>'
        f"{table_html(frame, 'dbdl-members', limit)}</div>"
    )


def ranked(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """A leaderboard (sorted best first) with a leading ``rank`` column."""
    board = leaderboard.reset_index(drop=True)  # a copy
    if "rank" not in board.columns:
        board.insert(0, "rank", range(1, len(board) + 1))
    return board


def _panels(history: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(loss columns, score columns): scores are accuracy/F1/R²…, else MSE/MAE."""
    metrics = metric_columns(history)
    losses = [c for c in metrics if c.endswith("_loss")]
    rest = [c for c in metrics if c not in losses]
    scores = [c for c in rest if not lower_is_better(c)]
    return losses, scores or rest


def curves_png(history: pd.DataFrame, title: str, alert: bool = False) -> bytes:
    """Two panels (loss curves; metric curves) per epoch as PNG bytes; red title on ``alert``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3), dpi=90)  # fixed margins: a layout engine costs 2x the time
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.86, wspace=0.22)
    x = history["epoch"] if "epoch" in history.columns else pd.Series(range(1, len(history) + 1))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, columns, label in zip(axes, _panels(history), ("loss", "metric"), strict=True):
        for column in columns:
            y = pd.to_numeric(history[column], errors="coerce")
            ax.plot(x, y, marker="o", markersize=3, label=column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if len(x):  # whole-epoch ticks even with a single point
            ax.set_xlim(float(x.min()) - 0.5, float(x.max()) + 0.5)
        ax.grid(alpha=0.3)
        if columns:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, color=RED if alert else "black", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


class TrainingReport:
    """A static summary of a run: from a model, a :class:`~dbdl_magic.events.RunFinished`, or a
    history plus name/version/status.

    ``TrainingReport(model)``, ``TrainingReport(run_finished)`` or ``TrainingReport(history=df,
    name=..., version=..., status="failed", error=exc)``. In a notebook it shows the summary
    line, the curves and the metrics table (red when the run was interrupted or failed), then
    the ``leaderboard`` of a selection run or the ``group_table`` of a grouped model (model
    attributes, or given); its text form is the summary line only, which holds no timings, so
    it is stable across runs.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        history: pd.DataFrame | None = None,
        name: str | None = None,
        version: int | None = None,
        status: str | None = None,
        error: BaseException | str | None = None,
        leaderboard: pd.DataFrame | None = None,
        group_table: pd.DataFrame | None = None,
        selection_metric: str | None = None,
    ) -> None:
        if isinstance(model, RunFinished):
            self.run, model = model, None
        else:
            self.run = RunFinished.from_model(
                model, history=history, name=name, version=version, status=status, error=error,
                leaderboard=leaderboard, group_table=group_table,
                selection_metric=selection_metric,
            )
        run = self.run

        def given(value: Any, attribute: str) -> Any:
            return value if value is not None else getattr(model, attribute, None)

        self.history = _frame(given(history, "history"), run.history_rows())
        if self.history is None:
            self.history = pd.DataFrame()
        self.leaderboard = _frame(given(leaderboard, "leaderboard"), list(run.leaderboard))
        self.group_table = _frame(given(group_table, "group_table"), list(run.group_table))

    @property
    def name(self) -> str:
        """The model's name."""
        return self.run.name

    @property
    def version(self) -> int | None:
        """The model's version (None if the run stopped before it had one)."""
        return self.run.version

    @property
    def status(self) -> str:
        """``"complete"``, ``"interrupted"`` or ``"failed"``."""
        return self.run.status

    @property
    def error(self) -> str | None:
        """The error of a run that failed, one line."""
        return self.run.error

    @property
    def selection_metric(self) -> str | None:
        """The metric the leaderboard is ranked by (None without a leaderboard)."""
        return self.run.ranked_by

    @property
    def alert(self) -> bool:
        """True when the run did not complete (interrupted or failed): shown in red."""
        return self.run.alert

    @property
    def summary(self) -> str:
        """The run's summary line (:meth:`~dbdl_magic.events.RunFinished.summary_line`), which
        ends with the error of a failed run."""
        return self.run.summary_line()

    @cached_property
    def _png(self) -> bytes:
        return curves_png(self.history, f"{self.name} v{self.version}: {self.status}", self.alert)

    def png(self) -> bytes:
        """Loss and metric curves per epoch as PNG bytes."""
        return self._png

    def html_table(self) -> str:
        """The metrics table: one row per iteration, values to 4 decimal places."""
        return metrics_table_html(self.history)

    def cohort_html(self) -> str:
        """The leaderboard (ranked) of a selection or the per-group table; "" otherwise."""
        if self.leaderboard is not None:
            metric = self.selection_metric
            by = f", ranked by {metric}" if metric else ""
            caption = f"leaderboard: {len(self.leaderboard)} configurations{by}"
            return cohort_table_html(ranked(self.leaderboard), caption)
        if self.group_table is not None:
            return cohort_table_html(self.group_table, f"{len(self.group_table)} groups")
        return ""

    def _repr_html_(self) -> str:
        color = RED if self.alert else "#2e7d32"
        parts = [
            f'<div style="font-weight:bold;color:{color if self.alert else "inherit"}">'
            f"{html.escape(self.summary)}</div>"
        ]
        if len(self.history):
            encoded = base64.b64encode(self.png()).decode("ascii")
            alt = html.escape(f"training curves of {self.name}", quote=True)
            parts.append(f'<img src="data:image/png;base64,{encoded}" alt="{alt}"/>')
            parts.append(self.html_table())
        parts.append(self.cohort_html())
        return (
            f'<div class="dbdl-report" style="border-left:4px solid {color};padding-left:8px">'
            + "".join(parts)
            + "</div>"
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        # The PNG travels inside text/html; no image/png entry of its own.
        return {"text/plain": self.summary, "text/html": self._repr_html_()}

    def __repr__(self) -> str:
        return self.summary


def _frame(value: Any, rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    """``value`` when it is a DataFrame (None if empty), else a frame of the records ``rows``
    (None if there are none)."""
    if isinstance(value, pd.DataFrame):
        return frame_or_none(value)
    return pd.DataFrame(rows) if rows else None


__all__ = [
    "TrainingReport",
    "cohort_table_html",
    "curves_png",
    "frame_or_none",
    "metric_columns",
    "metrics_table_html",
    "ranked",
    "table_html",
]
