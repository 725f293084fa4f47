"""Training monitors: what a person watches while the database trains.

A monitor turns :class:`~dbdl_magic.runs.Callbacks` into a display and, when the run ends,
into a static summary. :func:`make_monitor` picks live ipywidgets inside a Jupyter kernel and
plain text elsewhere (terminals, CI logs, ``dbdl demo``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from .runs import Callbacks

_SKIP = {"epoch", "samples", "workers", "combines", "db_device", "train_seconds"}


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


def summary_line(model: Any) -> str:
    """One deterministic line: name, status, iterations, final metrics rounded to 3 places."""
    history = model.history
    parts = [
        f"dbdl: model {model.name} v{model.version} {model.status}",
        f"{len(history)} iteration(s)",
    ]
    if len(history):
        last = history.iloc[-1]
        for column in history.columns:
            if column.startswith(("val_", "train_")) and column != "train_seconds":
                value = last[column]
                if isinstance(value, (int, float)) and value == value:
                    parts.append(f"{column} {value:.3f}")
    return " | ".join(parts)


class TextMonitor:
    """Plain-text progress: a header, then one line per iteration, sparse in-iteration lines."""

    def __init__(self, stream: TextIO | None = None, progress_every: float = 2.0) -> None:
        self.stream = stream or sys.stdout
        self.progress_every = progress_every
        self._last_progress = 0.0
        self.start_info: dict[str, Any] = {}

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_start=self.on_start, on_iteration=self.on_iteration, on_progress=self.on_progress
        )

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_start(self, info: dict[str, Any]) -> None:
        self.start_info = info
        self._print(
            f"training {info['name']} v{info['version']} in {info['database']} "
            f"({info['backend']}, {info['workers']} worker(s), kernels on {info['device']}): "
            f"{info['rows']} training rows, {info['validation_rows']} validation rows, "
            f"{info['buffers']} buffers, {info['parameters']} parameters"
        )

    def on_iteration(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']:>3}"]
        parts += [f"{k} {format_value(v)}" for k, v in row.items() if k not in _SKIP]
        self._print("  ".join(parts))

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
        from .widgets import WidgetMonitor

        return WidgetMonitor(refresh=refresh, title=title)
    return TextMonitor()
