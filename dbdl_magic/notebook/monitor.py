"""Training monitors: what a person watches while the database trains.

A monitor turns :class:`~dbdl_magic.training.run.Callbacks` into a display and, when the run ends,
into a static summary. :func:`make_monitor` picks live ipywidgets inside a Jupyter kernel and
plain text elsewhere (terminals, CI logs, ``dbdl demo``).

Cohort runs train several models in the same queries: ``groups`` (one model per value of a
group-by column) and ``selection`` (hyper-parameter configurations side by side, weak ones
halved). Their ``on_iteration`` rows carry a ``members`` list, shown by every monitor as the
same table (:func:`members_frame`): a leaderboard for selection, a per-group table for groups.
"""

from __future__ import annotations

import numbers
import re
import sys
import time
from typing import Any, Protocol, TextIO

import pandas as pd

from dbdl_magic.events import Callbacks

# row keys not printed on the iteration line (members and the parallel note get lines of their own)
_SKIP = {"epoch", "samples", "workers", "combines", "db_device", "train_seconds"}
_SKIP |= {"members", "parallel_note"}
TEXT_ROWS = 20  # member lines printed per iteration by TextMonitor


class Monitor(Protocol):
    """What the magics, the accessor and the CLI need from a monitor."""

    def callbacks(self) -> Callbacks: ...

    def finish(self, model: Any) -> None:
        """The run ended with a model (``model.status`` is complete or interrupted)."""

    def fail(self, error: BaseException) -> None:
        """The run failed with ``error`` (which the caller re-raises)."""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_cell(value: Any, missing: str = "") -> str:
    """A table cell: floats to 4 places, ``missing`` for None/NaN."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return missing
    return format_value(value)


def _real(value: Any) -> bool:
    """True for a number that is not NaN (bools excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def workers_text(workers: Any) -> str:
    """``"2 worker(s)"``, or ``"auto workers"`` when the engine picks the count."""
    return f"{workers} worker(s)" if isinstance(workers, int) else f"{workers} workers"


def is_metric(column: Any) -> bool:
    """``train_*`` / ``val_*`` names, except the ``train_seconds`` timing."""
    return str(column).startswith(("train_", "val_")) and str(column) != "train_seconds"


def cohort_text(info: dict[str, Any]) -> str:
    """``"4 models (groups by country)"`` / ``"3 models (3 configurations, ranked by val_loss,
    lower is better)"`` from ``on_start`` facts; ``""`` for an ordinary run."""
    cohort, members = info.get("cohort"), info.get("members") or []
    if not cohort:
        return ""
    if cohort == "groups":
        labels = [str(m.get("label", "")) for m in members[:1]]
        by = info.get("group_by") or ", ".join(re.findall(r"(\w+)=", labels[0] if labels else ""))
        searched = {str(m.get("trial")) for m in members if m.get("trial")}
        each = f", {len(searched)} configurations each" if searched else ""
        return f"{len(members)} models (groups by {by or '?'}{each})"
    metric = info.get("selection_metric")
    better = "higher" if info.get("selection_mode") == "max" else "lower"
    ranked = f", ranked by {metric}, {better} is better" if metric else ""
    return f"{len(members)} models ({len(members)} configurations{ranked})"


def _natural(text: str) -> list[Any]:
    """Sort key that orders ``bucket=9`` before ``bucket=10``."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", text))]


def members_frame(
    members: list[dict[str, Any]], metric: str | None = None, mode: str = "min"
) -> pd.DataFrame:
    """The members of a cohort iteration as a table: label, status, epoch, metrics, samples.

    With a ``metric`` present in the members it is a leaderboard: sorted best first (``mode``
    ``"min"`` or ``"max"``, members without a value last) behind a ``rank`` column. Otherwise
    the members are sorted by label (numbers in labels compare as numbers).
    """
    records = sorted(members, key=lambda m: (_natural(str(m.get("label", ""))), m.get("member", 0)))
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    metrics = [str(c) for c in frame.columns if is_metric(c)]
    columns = [c for c in ("label", "status", "epoch") if c in frame.columns] + metrics
    columns += ["samples"] if "samples" in frame.columns else []
    if metric in metrics:
        frame = frame.sort_values(
            metric, ascending=mode != "max", na_position="last", kind="stable"
        )
        frame.insert(0, "rank", range(1, len(frame) + 1))
        columns.insert(0, "rank")
    return frame[columns].reset_index(drop=True)


def start_members_frame(info: dict[str, Any], members: list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`members_frame` ranked as the run's ``on_start`` facts say (selection only)."""
    metric = info.get("selection_metric") if info.get("cohort") == "selection" else None
    return members_frame(members, metric, str(info.get("selection_mode") or "min"))


def table_lines(frame: pd.DataFrame, limit: int = TEXT_ROWS, indent: str = "  ") -> list[str]:
    """A fixed-width text table (text left, numbers right): ``limit`` rows, then "... N more"."""
    if frame.empty:
        return []
    header = [str(c) for c in frame.columns]
    left = [not pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    cells = [
        [format_cell(v, "-") for v in row]
        for row in frame.head(limit).astype(object).itertuples(index=False)
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        aligned = zip(values, widths, left, strict=True)
        text = "  ".join(v.ljust(w) if lt else v.rjust(w) for v, w, lt in aligned)
        return (indent + text).rstrip()

    lines = [line(header)] + [line(r) for r in cells]
    if len(frame) > limit:
        lines.append(f"{indent}... {len(frame) - limit} more")
    return lines


def frame_or_none(value: Any) -> pd.DataFrame | None:
    """``value`` if it is a non-empty DataFrame (a leaderboard, a group table), else None."""
    return value if isinstance(value, pd.DataFrame) and not value.empty else None


def ranking_metric(model: Any, leaderboard: pd.DataFrame) -> str | None:
    """The metric a selection ranked by: the model's ``selection_metric`` (attribute or
    ``info`` key) when the leaderboard has it, else its first ``val_*`` column or train_loss."""
    info = getattr(model, "info", None)
    named = getattr(model, "selection_metric", None) or (
        info.get("selection_metric") if isinstance(info, dict) else None
    )
    columns = [str(c) for c in leaderboard.columns]
    fallback = [c for c in columns if c.startswith("val_")] + ["train_loss"]
    return next((c for c in [named, *fallback] if c in columns), None)


def _cohort_part(model: Any) -> str | None:
    """``"best: LABEL val_loss 0.123"`` for a selection, ``"N groups"`` for a grouped model."""
    board = frame_or_none(getattr(model, "leaderboard", None))
    if board is not None:
        best = board.iloc[0]
        label = best.get("label", f"v{best.get('version', '?')}")
        metric = ranking_metric(model, board)
        value = best.get(metric) if metric else None
        return f"best: {label}" + (f" {metric} {float(value):.3f}" if _real(value) else "")
    groups = frame_or_none(getattr(model, "group_table", None))
    return f"{len(groups)} groups" if groups is not None else None


def summary_line(model: Any) -> str:
    """One deterministic line: name, status, iterations, final metrics rounded to 3 places, and
    for cohort runs the best trial of a selection or the number of groups."""
    history = model.history
    parts = [
        f"dbdl: model {model.name} v{model.version} {model.status}",
        f"{len(history)} iteration(s)",
    ]
    if len(history):
        last = history.iloc[-1]
        for column in history.columns:
            if is_metric(column):
                value = last[column]
                if isinstance(value, (int, float)) and value == value:
                    parts.append(f"{column} {value:.3f}")
    cohort = _cohort_part(model)
    return " | ".join(parts + ([cohort] if cohort else []))


class TextMonitor:
    """Plain-text progress: a header, then one line per iteration, sparse in-iteration lines.

    Cohort runs add a member table after each iteration line (at most :data:`TEXT_ROWS` rows).
    """

    def __init__(self, stream: TextIO | None = None, progress_every: float = 2.0) -> None:
        self.stream = stream or sys.stdout
        self.progress_every = progress_every
        self._last_progress = 0.0
        self._last_note: str | None = None
        self.start_info: dict[str, Any] = {}

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start, on_iteration=self.on_iteration, on_progress=self.on_progress
        )

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_start(self, info: dict[str, Any]) -> None:
        self.start_info = info
        cohort = cohort_text(info)
        self._print(
            f"training {info['name']} v{info['version']} in {info['database']} "
            f"({info['backend']}, {workers_text(info['workers'])}, kernels on {info['device']}): "
            f"{info['rows']} training rows, {info['validation_rows']} validation rows, "
            f"{info['buffers']} buffers, {info['parameters']} parameters"
            + (f"; {cohort}" if cohort else "")
        )

    def on_iteration(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']:>3}"]
        parts += [f"{k} {format_value(v)}" for k, v in row.items() if k not in _SKIP]
        lines = ["  ".join(parts)]
        note = row.get("parallel_note")
        if note and note != self._last_note:
            self._last_note = note
            lines.append(f"  parallel: {note}")
        if row.get("members"):
            lines += table_lines(start_members_frame(self.start_info, row["members"]))
        self._print("\n".join(lines))

    def on_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.progress_every and total:
            self._last_progress = now
            self._print(f"  ... {100 * done / total:5.1f}% of the epoch")

    def finish(self, model: Any) -> None:
        self._print(summary_line(model))

    def fail(self, error: BaseException) -> None:
        self._print(f"dbdl: training failed: {error}")


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
        from dbdl_magic.notebook.widgets import WidgetMonitor

        return WidgetMonitor(refresh=refresh, title=title)
    return TextMonitor()
