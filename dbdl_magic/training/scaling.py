"""How many parallel workers (segments) an iteration uses, and how many threads each gets.

A PostgreSQL parallel worker is a new process per query: it pays PL/Python's start-up and
``import torch`` before it trains. ``parallel="auto"`` therefore measures before
it spreads: the first two iterations run on one process (the first also pays imports and
caches, so the second is the measurement), and only when that took long enough is a worker's
start-up cost measured and more workers used, if the estimate says they win.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: an iteration shorter than this never repays workers' start-up (≈ 1 s each, measured on a
#: 2-core machine; REQUIRED_GAIN then needs ≥ 3.7 s for 2 workers); don't even measure it
MIN_PARALLEL_SECONDS = 3.0
#: more workers must beat one by this factor in the estimate (combine and scan overheads)
REQUIRED_GAIN = 0.8
MAX_AUTO_WORKERS = 8


@dataclass
class WorkerPlan:
    """The worker count for the next iteration and why."""

    workers: int
    note: str


def cpu_count(server: dict[str, object] | None = None) -> int:
    """Cores of the machine that runs the kernels (the database server's when known)."""
    cpus = (server or {}).get("cpus")
    return int(cpus) if isinstance(cpus, int) and cpus > 0 else os.cpu_count() or 1


#: below this many parameters a second torch thread costs more than it gains (measured:
#: a 4.5 k-parameter MLP on 1 M rows trains 2.9× faster with 1 thread than with 2; RESULTS.md)
SMALL_MODEL_PARAMETERS = 100_000


def threads_per_worker(
    cpus: int, workers: int, forced: int | None = None, parameters: int | None = None
) -> int:
    """Torch threads per process: ``forced``, else 1 for small models, else the cores shared
    out so that workers × threads does not exceed them."""
    if forced:
        return forced
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, cpus // max(1, workers))


def estimate_seconds(serial: float, workers: int, startup: float, queries: int = 1) -> float:
    """Estimated training time of an iteration on ``workers`` processes.

    ``serial`` is the measured time on one process; each extra worker process pays ``startup``
    once per aggregate query (``queries`` > 1 with ``sync_every``).
    """
    if workers <= 1:
        return serial
    return startup * queries + serial / workers


def plan_workers(
    parallel: int | str,
    *,
    supports_parallel: bool,
    cpus: int,
    serial_seconds: float | None,
    startup_seconds: float | None,
    queries: int = 1,
    measured: dict[int, float] | None = None,
) -> WorkerPlan:
    """Choose the worker count: forced (``parallel=N``) or estimated (``"auto"``).

    ``serial_seconds`` is the last one-process iteration's training time (None before the
    first), ``startup_seconds`` a worker's measured start-up (None when not measured), and
    ``measured`` the last training time seen with each worker count: once a count has run,
    its real time replaces the estimate (so a disappointing count is dropped again).
    """
    measured = measured or {}
    if not supports_parallel:
        return WorkerPlan(1, "1 process (this database runs kernels in-process)")
    if parallel != "auto":
        return WorkerPlan(int(parallel), f"{int(parallel)} worker(s), forced")
    if serial_seconds is None:
        return WorkerPlan(1, "auto: 1 process while measuring an iteration")
    if serial_seconds < MIN_PARALLEL_SECONDS:
        return WorkerPlan(
            1, f"auto: 1 process (an iteration takes {serial_seconds:.2f} s, too short to spread)"
        )
    if startup_seconds is None:
        return WorkerPlan(1, "auto: 1 process (worker start-up not measured)")
    best, best_time = 1, serial_seconds
    for n in range(2, min(cpus, MAX_AUTO_WORKERS) + 1):
        guess = measured.get(n, estimate_seconds(serial_seconds, n, startup_seconds, queries))
        if guess < best_time:
            best, best_time = n, guess
    if best > 1 and best_time > REQUIRED_GAIN * serial_seconds:
        best, best_time = 1, serial_seconds
    how = "measured" if best in measured or best == 1 else "est."
    return WorkerPlan(
        best,
        f"auto: {best} worker(s) ({how} {best_time:.2f} s vs 1 process {serial_seconds:.2f} s;"
        f" worker start-up {startup_seconds:.2f} s, {cpus} cores)",
    )


__all__ = [
    "WorkerPlan",
    "cpu_count",
    "estimate_seconds",
    "plan_workers",
    "threads_per_worker",
]
