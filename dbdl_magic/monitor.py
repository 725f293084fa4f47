"""Training monitors. ``TextMonitor`` prints one line per iteration (terminals, CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .runs import Callbacks

_SKIP = {"epoch", "samples", "workers", "combines", "db_device", "train_seconds"}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


class TextMonitor:
    """Plain-text progress: a header, then one line per iteration, in-iteration dots."""

    def __init__(self, stream: TextIO | None = None, progress_every: float = 2.0) -> None:
        self.stream = stream or sys.stdout
        self.progress_every = progress_every
        self._last_progress = 0.0
        self.start_info: dict[str, Any] = {}

    def callbacks(self) -> Callbacks:
        return Callbacks(on_start=self.on_start, on_iteration=self.on_iteration,
                         on_progress=self.on_progress)

    def on_start(self, info: dict[str, Any]) -> None:
        self.start_info = info
        print(
            f"training {info['name']} v{info['version']} in {info['database']} "
            f"({info['backend']}, {info['workers']} worker(s), kernels on {info['device']}): "
            f"{info['rows']} training rows, {info['validation_rows']} validation rows, "
            f"{info['buffers']} buffers, {info['parameters']} parameters",
            file=self.stream, flush=True,
        )

    def on_iteration(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']:>3}"]
        parts += [f"{k} {format_value(v)}" for k, v in row.items() if k not in _SKIP]
        print("  ".join(parts), file=self.stream, flush=True)

    def on_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.progress_every and total:
            self._last_progress = now
            print(f"  ... {100 * done / total:5.1f}% of the epoch", file=self.stream, flush=True)
