"""What a training run tells the people watching it: the hooks a monitor implements.

The run calls ``on_start`` once with the run's facts (members, rows, workers, device),
``on_iteration`` after every committed iteration with its history row, and ``on_progress``
while an iteration runs (samples done in the epoch so far, samples per epoch). This module
depends on nothing else in the package: monitors in the notebook front and the training loop
both import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Callbacks:
    """Hooks for monitors: run start facts, each iteration's row, in-iteration progress."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_iteration: Callable[[dict[str, Any]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None  # (samples done, samples per epoch)
