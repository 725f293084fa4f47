"""Training monitors: what a person watches while the database trains.

A monitor turns :class:`~dbdl_magic.events.Callbacks` into a display and, when the run ends,
into a static summary; it reads the run's events as the records of :mod:`dbdl_magic.events`
(the run may still send dicts: :meth:`~dbdl_magic.events.RunStarted.of` and
:meth:`~dbdl_magic.events.IterationFinished.of` accept both). :class:`TextMonitor` writes plain
text (terminals, CI logs, ``dbdl demo``); the live ipywidgets monitor and
:func:`~dbdl_magic.notebook.widgets.make_monitor`, which picks one of the two, are in
:mod:`dbdl_magic.notebook.widgets`.

Cohort runs train several models in the same queries: ``groups`` (one model per value of a
group-by column) and ``selection`` (hyper-parameter configurations side by side, weak ones
halved). Their iterations carry ``members``, shown by every monitor as the same table
(:func:`members_frame`): a leaderboard for selection, a per-group table for groups.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

import pandas as pd

from dbdl_magic.display import better_text, format_cell, format_value, is_metric, workers_text
from dbdl_magic.events import Callbacks, IterationFinished, RunFinished, RunStarted

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


def summary_line(model: Any) -> str:
    """One deterministic line for a model a run returned: name, status, iterations, final
    metrics rounded to 3 places, for cohort runs the best trial of a selection or the number
    of groups, and the error of a failed model (:meth:`RunFinished.summary_line`)."""
    return RunFinished.from_model(model).summary_line()


def start_title(started: RunStarted, title: str = "") -> str:
    """``"training NAME vN"`` (``title`` in place of the model name when given)."""
    return f"training {title or started.name} v{started.version}"


def start_facts(started: RunStarted) -> str:
    """Where and on what the run trains: database, backend, workers, device, rows, buffers,
    parameters, and for a cohort run :func:`cohort_text`."""
    s, cohort = started, cohort_text(started)
    return (
        f"in {s.database} ({s.backend}, {workers_text(s.workers)}, kernels on {s.device}): "
        f"{s.rows} training rows, {s.validation_rows} validation rows, {s.buffers} buffers, "
        f"{s.parameters} parameters" + (f"; {cohort}" if cohort else "")
    )


def cohort_text(started: RunStarted) -> str:
    """``"4 models (groups by country)"`` / ``"3 models (3 configurations, ranked by val_loss,
    lower is better)"``; ``""`` for an ordinary run."""
    members = started.members
    if not started.cohort:
        return ""
    if started.cohort == "groups":
        labels = [m.label for m in members[:1]]
        by = started.group_by or ", ".join(re.findall(r"(\w+)=", labels[0] if labels else ""))
        searched = {str(m.trial) for m in members if m.trial}
        each = f", {len(searched)} configurations each" if searched else ""
        return f"{len(members)} models (groups by {by or '?'}{each})"
    metric = started.selection_metric
    ranked = f", ranked by {metric}, {better_text(started.selection_mode)}" if metric else ""
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


def start_members_frame(
    started: RunStarted | None, members: list[dict[str, Any]]
) -> pd.DataFrame:
    """:func:`members_frame` ranked as the run's start facts say (selection only)."""
    if started is None or not started.ranks_members:
        return members_frame(members)
    return members_frame(members, started.selection_metric, started.selection_mode or "min")


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


class TextMonitor:
    """Plain-text progress: a header, then one line per iteration, sparse in-iteration lines.

    Cohort runs add a member table after each iteration line (at most :data:`TEXT_ROWS` rows).
    """

    def __init__(self, stream: TextIO | None = None, progress_every: float = 2.0) -> None:
        self.stream = stream or sys.stdout
        self.progress_every = progress_every
        self._last_progress = 0.0
        self._last_note: str | None = None
        self.started: RunStarted | None = None

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start, on_iteration=self.on_iteration, on_progress=self.on_progress
        )

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_start(self, event: RunStarted | Mapping[str, Any]) -> None:
        """The header: the run's facts (a record or the ``on_start`` dict)."""
        self.started = started = RunStarted.of(event)
        self._print(f"{start_title(started)} {start_facts(started)}")

    def on_iteration(self, event: IterationFinished | Mapping[str, Any]) -> None:
        """One line of metrics; the parallel note when it changes; the members' table."""
        it = IterationFinished.of(event)
        parts = [f"epoch {it.epoch:>3}"]
        parts += [f"{k} {format_value(v)}" for k, v in it.to_row().items() if k not in _SKIP]
        lines = ["  ".join(parts)]
        note = it.parallel_note
        if note and note != self._last_note:
            self._last_note = note
            lines.append(f"  parallel: {note}")
        if it.members:
            lines += table_lines(start_members_frame(self.started, it.member_rows()))
        self._print("\n".join(lines))

    def on_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.progress_every and total:
            self._last_progress = now
            self._print(f"  ... {100 * done / total:5.1f}% of the epoch")

    def on_finish(self, run: RunFinished) -> None:
        """The run's summary line."""
        self._print(run.summary_line())

    def finish(self, model: Any) -> None:
        """The summary line of the model the run returned."""
        self.on_finish(RunFinished.from_model(model))

    def fail(self, error: BaseException) -> None:
        """One line naming the error that stopped the run."""
        self._print(f"dbdl: training failed: {error}")
