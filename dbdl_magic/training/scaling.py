"""How many segments an iteration uses, and how many torch threads each gets.

Segments are data-parallel trainers held by the run (sessions on PostgreSQL, processes on
SQLite: :mod:`dbdl_magic.backends.segments`); opening one costs a start-up (a session or process
importing torch) once per run, after which a sync round costs a few milliseconds (measured:
benchmarks/RESULTS.md). ``parallel="auto"`` therefore measures before it spreads: the first two
iterations run on one process (the first also pays imports and caches, so the second is the
measurement); when the time the segments would save over the remaining iterations exceeds their
start-up, the run opens them, and keeps them only while their measured iterations beat one
process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: an iteration shorter than this is not spread (the combine and the rounds' statements cost
#: tens of milliseconds; averaging changes the model, which a short run does not need)
MIN_PARALLEL_SECONDS = 1.0
#: start-up of one segment before it has been measured (a server session or process importing
#: torch: ≈ 2-3 s on the 2-core machine of RESULTS.md, sessions starting side by side)
SEGMENT_STARTUP_SECONDS = 3.0
#: more segments must beat one process by this factor (estimated, then measured)
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


#: sync rounds per epoch of small models on segments when ``sync_every`` is not given:
#: measured (RESULTS.md, bench_scale convergence) 2 segments with the outer step reach one
#: process's accuracy at 10 rounds per epoch and lose 2.4-3.0 points at 1-4
AUTO_SYNC_ROUNDS = 10


def sync_rounds(sync_every: float | None, segments: int, parameters: int) -> int:
    """Sync rounds per epoch: ``ceil(1 / sync_every)`` when given; otherwise one, or
    :data:`AUTO_SYNC_ROUNDS` for a small model on several segments (whose combine costs
    milliseconds; a large state's combine costs ≈ 0.1 s per MB, so large models sync once)."""
    if sync_every:
        return math.ceil(1 / sync_every)
    if segments > 1 and parameters < SMALL_MODEL_PARAMETERS:
        return AUTO_SYNC_ROUNDS
    return 1


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


def plan_workers(
    parallel: int | str,
    *,
    unavailable: str | None,
    cpus: int,
    serial_seconds: float | None,
    remaining: int,
    startup_seconds: float | None = None,
    measured: dict[int, float] | None = None,
) -> WorkerPlan:
    """Choose the segment count: forced (``parallel=N``) or estimated (``"auto"``).

    ``unavailable`` says why this database cannot run segments (None: it can);
    ``serial_seconds`` is the last one-process iteration's training time (None before it is
    measured), ``remaining`` the iterations left including this one, ``startup_seconds`` what
    opening the segments costs (0 once they are open; None: not measured yet) and ``measured``
    the last training time seen with each segment count, which replaces the estimate.
    """
    measured = measured or {}
    if unavailable:
        return WorkerPlan(1, f"1 process ({unavailable})")
    if parallel != "auto":
        n = int(parallel)
        return WorkerPlan(n, "1 process, forced" if n == 1 else f"{n} segments, forced")
    if serial_seconds is None:
        return WorkerPlan(1, "auto: 1 process while measuring an iteration")
    n = min(cpus, MAX_AUTO_WORKERS)
    if n < 2:
        return WorkerPlan(1, "auto: 1 process (1 core)")
    if serial_seconds < MIN_PARALLEL_SECONDS:
        return WorkerPlan(
            1, f"auto: 1 process (an iteration takes {serial_seconds:.2f} s, too short to spread)"
        )
    if n in measured:
        if measured[n] <= REQUIRED_GAIN * serial_seconds:
            return WorkerPlan(n, f"auto: {n} segments (measured {measured[n]:.2f} s vs 1 process"
                                 f" {serial_seconds:.2f} s)")
        return WorkerPlan(1, f"auto: 1 process ({n} segments measured {measured[n]:.2f} s vs"
                             f" {serial_seconds:.2f} s)")
    startup = SEGMENT_STARTUP_SECONDS if startup_seconds is None else startup_seconds
    saved = (serial_seconds - serial_seconds / n) * remaining
    if saved > startup:
        return WorkerPlan(n, f"auto: {n} segments (est. {serial_seconds / n:.2f} s vs 1 process "
                             f"{serial_seconds:.2f} s, start-up {startup:.1f} s, {cpus} cores)")
    return WorkerPlan(1, f"auto: 1 process ({n} segments would save ≈ {saved:.1f} s over "
                         f"{remaining} iteration(s), less than their start-up {startup:.1f} s)")


__all__ = [
    "WorkerPlan",
    "cpu_count",
    "plan_workers",
    "sync_rounds",
    "threads_per_worker",
]
